"""SQuAD v1.1 for finetune.py, scored by dev F1 (§4.1), as BERT's run_squad on a fast tokenizer's character offsets:
the official JSON or `datasets`' copy (read_squad), windows of [CLS] question [SEP] context [SEP] labelled with the
first gold answer (squad_windows), n-best decoding (decode), the official exact match and F1 (squad_scores)."""

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import UserError, load_hub_dataset, subset_indices


def normalize_answer(text):
    """The official SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction, gold):
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    return 0.0 if same == 0 else 2 * same / (len(p) + len(g))  # harmonic mean of same/|p| and same/|g|


def squad_scores(predictions, answers):
    """The official v1.1 exact match and F1 in percent, each the max over a question's gold answers {id: [texts]}."""
    em = f1 = 0.0
    for qid, golds in answers.items():
        pred = predictions.get(qid, "")
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(token_f1(pred, g) for g in golds)
    n = max(len(answers), 1)
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n}


def read_squad(which, data_dir=None):
    """SQuAD v1.1 examples (which: train | dev) as dicts: id, question, context, answers (texts), starts (chars)."""
    if not data_dir:
        ds = load_hub_dataset("SQuAD v1.1 (rajpurkar/squad)", "pass --data with the folder of train-v1.1.json and "
                              "dev-v1.1.json", "rajpurkar/squad", split="train" if which == "train" else "validation")
        return [dict(id=r["id"], question=r["question"], context=r["context"], answers=r["answers"]["text"],
                     starts=r["answers"]["answer_start"]) for r in ds]
    path = Path(data_dir) / f"{which}-v1.1.json"
    if not path.exists():
        raise UserError(f"{data_dir} has no {path.name}: expected SQuAD v1.1's train-v1.1.json and "
                        "dev-v1.1.json; pass the right --data, or none to load it with datasets")
    try:
        squad = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"{path} is not SQuAD's JSON ({str(e).splitlines()[0]}): download it again") from None
    try:
        return [dict(id=qa["id"], question=qa["question"], context=p["context"],
                     answers=[a["text"] for a in qa["answers"]], starts=[a["answer_start"] for a in qa["answers"]])
                for article in squad["data"] for p in article["paragraphs"] for qa in p["qas"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"{path} is not in SQuAD's JSON layout (data > paragraphs > qas > answers): no {e}") from None


@dataclass
class Window:
    """One feature: [CLS] question [SEP] a window of the context [SEP]."""
    example: int   # index of its example
    ids: list
    types: list
    ctx: int       # position of the first context token in `ids`
    offsets: list  # (first char, end char) in the context of each context token of the window
    start: int = 0  # the answer's first and last token in `ids`; (0, 0) = [CLS]: no answer in this window
    end: int = 0


def answer_span(offsets, char_start, char_end):
    """(first, last) index in `offsets` of the tokens covering chars [char_start, char_end); None if not all held."""
    if not offsets or offsets[0][0] > char_start or offsets[-1][1] < char_end:
        return None
    first = next(k for k, (_, e) in enumerate(offsets) if e > char_start)
    last = next(k for k in reversed(range(len(offsets))) if offsets[k][0] < char_end)
    return first, last


def squad_windows(tokenizer, examples, max_len=384, doc_stride=128, max_query_len=64, labelled=False):
    """BERT's run_squad features: windows of max_len tokens in all, doc_stride context tokens apart, with offsets."""
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    questions = tokenizer.encode_batch([ex["question"] for ex in examples], add_special_tokens=False)
    contexts = tokenizer.encode_batch([ex["context"] for ex in examples], add_special_tokens=False)
    windows = []
    for i, (ex, question, c) in enumerate(zip(examples, questions, contexts)):
        q = question.ids[:max_query_len]
        room, begin = max_len - len(q) - 3, 0
        while True:
            stop = min(begin + room, len(c.ids))
            w = Window(i, [cls] + q + [sep] + c.ids[begin:stop] + [sep], [0] * (len(q) + 2) + [1] * (stop - begin + 1),
                       len(q) + 2, c.offsets[begin:stop])
            if labelled:  # train on the first gold answer
                span = answer_span(w.offsets, ex["starts"][0], ex["starts"][0] + len(ex["answers"][0]))
                if span:
                    w.start, w.end = w.ctx + span[0], w.ctx + span[1]
            windows.append(w)
            if stop == len(c.ids):
                break
            begin += min(doc_stride, room)
    return windows


def decode(examples, windows, logits, n_best=20, max_answer_len=30):
    """{id: text}: per example, the context span of highest start + end logit among each window's n_best starts and
    ends (end >= start, at most max_answer_len tokens). logits: per window, (start, end) logits over its tokens."""
    best = {}
    for w, (start, end) in zip(windows, logits):
        s, e = start[w.ctx:w.ctx + len(w.offsets)], end[w.ctx:w.ctx + len(w.offsets)]
        for i in np.argsort(-s)[:n_best]:
            for j in np.argsort(-e)[:n_best]:
                if i <= j < i + max_answer_len and s[i] + e[j] > best.get(w.example, (-np.inf,))[0]:
                    best[w.example] = (s[i] + e[j], w.offsets[i][0], w.offsets[j][1])
    return {ex["id"]: ex["context"][best[k][1]:best[k][2]] if k in best else "" for k, ex in enumerate(examples)}


def squad_task(tokenizer, data_dir=None, max_len=384, doc_stride=128, max_train=None, max_eval=None, seed=0):
    """(train features, targets [start, end], evaluate): evaluate(predict) -> (dev metrics, "score" = F1, {id: text}),
    predict(features) -> each window's (start, end) logits. max_train / max_eval: a seeded choice of questions."""
    train = read_squad("train", data_dir)
    train = [train[i] for i in subset_indices(len(train), max_train, seed)]
    dev = read_squad("dev", data_dir)
    dev = [dev[i] for i in subset_indices(len(dev), max_eval, seed)]
    window = dict(max_len=max_len, doc_stride=doc_stride)
    train_w, dev_w = squad_windows(tokenizer, train, labelled=True, **window), squad_windows(tokenizer, dev, **window)
    dev_feats, golds = [(w.ids, w.types) for w in dev_w], {ex["id"]: ex["answers"] for ex in dev}

    def evaluate(predict):
        predictions = decode(dev, dev_w, predict(dev_feats))
        m = squad_scores(predictions, golds)
        return dict(m, score=m["f1"]), predictions
    return [(w.ids, w.types) for w in train_w], [[w.start, w.end] for w in train_w], evaluate
