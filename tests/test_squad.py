import json
import random

import numpy as np
import pytest

from common import UserError
from data import load_tokenizer
from tasks import squad as sq

WORDS = ("the a an cat dog bird fish tree house river city paris cafe runs sits eats sees red blue green small "
         "big old new quick slow and or but in on of to with is was good bad man woman child book car road").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """A WordPiece vocab.txt: specials, punctuation, the words, and '##ness' so that 'goodness' is 2 pieces."""
    folder = tmp_path_factory.mktemp("vocab")
    tokens = SPECIALS + list(".,!?'\"-") + WORDS + ["##ness", "##s"]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return folder


@pytest.fixture(scope="module")
def tok(vocab):
    return load_tokenizer(vocab)


def test_squad_scores_normalisation_and_several_golds():
    cases = [  # (prediction, golds, exact match, f1)
        ("The Eiffel Tower", ["eiffel tower"], 1, 1.0),          # case and article
        ("eiffel tower!", ["Eiffel, Tower."], 1, 1.0),           # punctuation
        ("  eiffel \t  tower ", ["eiffel tower"], 1, 1.0),       # white space
        ("an apple a day", ["apple day"], 1, 1.0),                # articles, only as words
        ("theatre", ["atre"], 0, 0.0),                            # 'the' inside a word stays
        ("red car", ["blue car", "red car park", "red car"], 1, 1.0),  # the best gold counts
        ("red car", ["blue car", "red car park"], 0, 0.8),        # f1: max(0.5, 2*2/(2+3))
        ("big red car", ["red car"], 0, 0.8),                     # precision 2/3, recall 1
        ("dog", ["cat"], 0, 0.0),
    ]
    for k, (pred, golds, em, f1) in enumerate(cases):
        s = sq.squad_scores({"q": pred}, {"q": golds})
        assert s["exact_match"] == pytest.approx(100 * em), (k, pred)
        assert s["f1"] == pytest.approx(100 * f1), (k, pred)
    total = sq.squad_scores({c[0] + str(i): c[0] for i, c in enumerate(cases)},
                            {c[0] + str(i): c[1] for i, c in enumerate(cases)} | {"missing": ["x"]})
    assert total["exact_match"] == pytest.approx(100 * sum(c[2] for c in cases) / (len(cases) + 1))
    assert total["f1"] == pytest.approx(100 * sum(c[3] for c in cases) / (len(cases) + 1))


def squad_examples(n, seed, words=40):
    """Contexts of real words (capitals, accents, a two-piece word, punctuation), answers at word boundaries."""
    rng = random.Random(seed)
    pool = WORDS + ["Paris", "Café", "goodness", "dogs", "runs,", "river."]
    out = []
    for i in range(n):
        tokens = [rng.choice(pool) for _ in range(words)]
        context = " ".join(tokens)
        starts = [0] + [len(" ".join(tokens[:k])) + 1 for k in range(1, words)]
        answers, begins = [], []
        for _ in range(3):
            k, m = rng.randrange(words - 3), rng.randint(1, 3)
            text = " ".join(tokens[k:k + m]).rstrip(",.")
            answers.append(text)
            begins.append(starts[k])
        out.append(dict(id=f"q{seed}-{i}", question="what sees the big dog ?", context=context, answers=answers,
                        starts=begins))
    return out


def write_squad(folder, which, examples):
    folder.mkdir(parents=True, exist_ok=True)
    qas = [dict(id=e["id"], question=e["question"],
                answers=[dict(text=t, answer_start=s) for t, s in zip(e["answers"], e["starts"])]) for e in examples]
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": e["context"], "qas": [q]}
                                                                     for e, q in zip(examples, qas)]}]}
    (folder / f"{which}-v1.1.json").write_text(json.dumps(data))


def test_squad_layout_loading(tmp_path):
    train, dev = squad_examples(6, 0), squad_examples(3, 1)
    write_squad(tmp_path, "train", train)
    write_squad(tmp_path, "dev", dev)
    assert sq.read_squad("train", tmp_path) == train
    assert sq.read_squad("dev", tmp_path) == dev
    with pytest.raises(UserError, match=r"no dev-v1\.1\.json"):
        sq.read_squad("dev", tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-v1.1.json").write_text(json.dumps({"data": [{"paragraphs": [{"qas": [{"id": "x"}]}]}]}))
    with pytest.raises(UserError, match="not in SQuAD's JSON layout"):
        sq.read_squad("train", tmp_path / "bad")
    (tmp_path / "bad" / "dev-v1.1.json").write_text('{"data": [')  # a download cut short
    with pytest.raises(UserError, match=r"dev-v1\.1\.json is not SQuAD's JSON \(Expecting value"):
        sq.read_squad("dev", tmp_path / "bad")


def test_squad_windows_map_every_gold_answer_back_to_its_text(tok):
    examples = squad_examples(8, 2, words=60)
    windows = sq.squad_windows(tok, examples, max_len=32, doc_stride=8, labelled=True)
    assert len(windows) > 3 * len(examples)  # the contexts are split across several windows
    for i, ex in enumerate(examples):
        ws = [w for w in windows if w.example == i]
        n_ctx = len(tok.encode(ex["context"], add_special_tokens=False).ids)
        assert ws[0].offsets[0][0] == 0 and ws[-1].offsets[-1][1] == len(ex["context"])  # the whole context
        assert sorted({o for w in ws for o in w.offsets}) == sorted(set(
            tok.encode(ex["context"], add_special_tokens=False).offsets)) and n_ctx > 32
        for w in ws:
            assert len(w.ids) <= 32 and w.ids[w.ctx - 1] == w.ids[-1] == tok.token_to_id("[SEP]")
            assert w.types == [0] * w.ctx + [1] * (len(w.ids) - w.ctx)
        for text, start in zip(ex["answers"], ex["starts"]):
            found = 0
            for w in ws:
                span = sq.answer_span(w.offsets, start, start + len(text))
                if span:
                    found += 1
                    assert ex["context"][w.offsets[span[0]][0]:w.offsets[span[1]][1]] == text
            assert found >= 1
        for w in ws:  # training targets: the first gold answer where the window holds it, else [CLS]
            text = ex["answers"][0]
            if w.start:
                assert ex["context"][w.offsets[w.start - w.ctx][0]:w.offsets[w.end - w.ctx][1]] == text
            else:
                assert sq.answer_span(w.offsets, ex["starts"][0], ex["starts"][0] + len(text)) is None


def test_decode_recovers_the_peaked_span(tok):
    examples = squad_examples(3, 3, words=60)
    windows = sq.squad_windows(tok, examples, max_len=32, doc_stride=8)
    logits = [(np.random.default_rng(k).normal(0, 0.1, len(w.ids)), np.random.default_rng(k + 99).normal(0, 0.1,
               len(w.ids))) for k, w in enumerate(windows)]
    for i, ex in enumerate(examples):  # peak on the last gold answer, in the last window that holds it
        text, start = ex["answers"][-1], ex["starts"][-1]
        w, k = [(w, k) for k, w in enumerate(windows) if w.example == i
                and sq.answer_span(w.offsets, start, start + len(text))][-1]
        a, b = sq.answer_span(w.offsets, start, start + len(text))
        logits[k][0][w.ctx + a] += 10
        logits[k][1][w.ctx + b] += 10
    predictions = sq.decode(examples, windows, logits)
    assert predictions == {ex["id"]: ex["answers"][-1] for ex in examples}
    # an end before the start, or a span longer than max_answer_len, is never decoded
    w = windows[0]
    s, e = np.full(len(w.ids), -10.0), np.full(len(w.ids), -10.0)
    s[w.ctx + 5], e[w.ctx + 2], e[w.ctx + 7] = 10, 20, 5
    assert sq.decode(examples[:1], [w], [(s, e)])[examples[0]["id"]] == \
        examples[0]["context"][w.offsets[5][0]:w.offsets[7][1]]
    assert sq.decode(examples[:1], [w], [(s, e)], max_answer_len=2)[examples[0]["id"]] != \
        examples[0]["context"][w.offsets[5][0]:w.offsets[7][1]]
