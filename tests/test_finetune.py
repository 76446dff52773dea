import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

import finetune as ft
from common import UserError, read_jsonl, run_main, torch_save
from model import Arch, Bert, SearchSpace, read_pretrained, save_pretrained
from tasks import glue, squad
from test_squad import WORDS, squad_examples, tok, vocab, write_squad  # noqa: F401 (tok, vocab: fixtures)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~50x faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def finetune(model_folder, task, data_dir=None, lr=None, epochs=None, out=None, **settings):
    """finetune.run with its Config built from keywords: lr and epochs take a number or a list (the §4.1 sweep),
    `settings` are other Config fields (batch_size, arch, max_train_examples, device, ...)."""
    as_list = lambda x: None if x is None else list(x) if isinstance(x, (list, tuple)) else [x]  # noqa: E731
    return ft.run(ft.Config(task=task, model=str(model_folder), data=str(data_dir or ""), lr=as_list(lr),
                            epochs=as_list(epochs), out=str(out or ""), **settings))


def tiny_bert_folder(folder, vocab, seed=0):
    torch.manual_seed(seed)
    save_pretrained(Bert(Arch(2, 64, 128, 2, 64), vocab_size=len((vocab / "vocab.txt").read_text().split()),
                         max_position=512), folder)
    (folder / "vocab.txt").write_text((vocab / "vocab.txt").read_text())
    return folder


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))


MNLI_TRAIN = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV = MNLI_TRAIN[:10] + ["label1", "label2", "label3", "label4", "label5", "gold_label"]


def mnli_row(i, a, b, label=None, dev=False):
    row = [i, 1, f"{i}e", "fiction", "(x)", "(y)", "(S x)", "(S y)", a, b]
    return row if label is None else row + ([label] * 5 if dev else [label]) + [label]


def make_mnli(root):
    labels = ["entailment", "neutral", "contradiction"]
    d = root / "MNLI"
    write_tsv(d / "train.tsv", [MNLI_TRAIN] + [mnli_row(i, f"the cat {i}", "a dog", labels[i % 3]) for i in range(7)])
    write_tsv(d / "dev_matched.tsv", [MNLI_DEV] + [mnli_row(i, "a tree", "the river", labels[i % 3], True)
                                                   for i in range(4)])
    write_tsv(d / "dev_mismatched.tsv", [MNLI_DEV] + [mnli_row(i, "a book", "old car", "neutral", True)
                                                      for i in range(5)])
    write_tsv(d / "test_matched.tsv", [MNLI_TRAIN[:10]] + [mnli_row(i, "the man", "a woman") for i in range(3)])
    return d


def test_glue_layout_loading_and_encoding(tmp_path, tok):
    make_mnli(tmp_path)
    train = glue.read_glue("mnli", "train", tmp_path)  # glue_data/ root: the task folder is found inside it
    assert len(train.a) == 7 and train.a[2] == "the cat 2" and train.b[2] == "a dog"
    assert train.labels == [0, 1, 2, 0, 1, 2, 0]  # entailment, neutral, contradiction: datasets' order
    mm = glue.read_glue("MNLI", "dev_mismatched", tmp_path / "MNLI")
    assert len(mm.a) == 5 and set(mm.labels) == {1}
    assert len(glue.read_glue("mnli", "dev_matched", tmp_path).a) == 4
    test = glue.read_glue("mnli", "test_matched", tmp_path)
    assert len(test.a) == 3 and test.labels == [None] * 3 and test.ids == ["0", "1", "2"]

    # CoLA: train/dev without a header, test with one
    cola = tmp_path / "CoLA"
    write_tsv(cola / "train.tsv", [["gj04", i % 2, "*" if i % 2 == 0 else "", f"the dog sees {i}"] for i in range(6)])
    write_tsv(cola / "dev.tsv", [["gj04", 1, "", "a cat runs"]] * 3)
    write_tsv(cola / "test.tsv", [["index", "sentence"], [0, "big red car"], [1, "the man"]])
    c = glue.read_glue("cola", "train", cola)
    assert len(c.a) == 6 and c.b is None and c.labels == [0, 1, 0, 1, 0, 1] and c.a[5] == "the dog sees 5"
    assert len(glue.read_glue("cola", "dev", cola).a) == 3
    assert glue.read_glue("cola", "test", cola).a == ["big red car", "the man"]

    # STS-B: a float label in the last column; MRPC: label first, texts by header name
    write_tsv(tmp_path / "STS-B" / "train.tsv", [["index", "genre", "filename", "year", "old_index", "source1",
                                                  "source2", "sentence1", "sentence2", "score"],
                                                 [0, "g", "f", 2012, 1, "s", "s", "a cat", "the dog", "3.800"]])
    assert glue.read_glue("stsb", "train", tmp_path).labels == [3.8]
    write_tsv(tmp_path / "MRPC" / "train.tsv", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                                                [1, 7, 8, "a red car", "the red car"]])
    m = glue.read_glue("mrpc", "train", tmp_path)
    assert (m.a, m.b, m.labels) == (["a red car"], ["the red car"], [1])

    # encoding: [CLS] a [SEP] b [SEP] with token types, truncated to max_len
    feats = glue.encode_glue(tok, train)
    ids, types_ = feats[2]
    assert ids == tok.encode("the cat 2", "a dog").ids and ids[0] == tok.token_to_id("[CLS]")
    assert types_ == [0] * 5 + [1] * 3  # [CLS] the cat 2 [SEP] | a dog [SEP]
    long = glue.Split([" ".join(["cat"] * 300)], ["dog " * 300], [0], [0])
    (ids, types_), = glue.encode_glue(tok, long, max_len=128)
    assert len(ids) == 128 and ids.count(tok.token_to_id("[SEP]")) == 2 and 1 in types_


def test_datasets_code_path(monkeypatch):
    """Without --data the same splits come from `datasets` (offline here: the loader is stood in for)."""
    import datasets
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "rajpurkar/squad":
            return datasets.Dataset.from_dict({"id": ["a"], "title": ["t"], "context": ["the red car"],
                                               "question": ["what ?"],
                                               "answers": [{"text": ["red car"], "answer_start": [4]}]})
        label = -1 if split.startswith("test") else 2
        return datasets.Dataset.from_dict({"premise": ["a cat"], "hypothesis": ["a dog"], "label": [label],
                                           "idx": [7]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dev = glue.read_glue("mnli", "dev_mismatched")
    assert (dev.a, dev.b, dev.labels, dev.ids) == (["a cat"], ["a dog"], [2], [7])
    assert glue.read_glue("mnli", "test_matched").labels == [None]
    assert squad.read_squad("dev") == [dict(id="a", question="what ?", context="the red car", answers=["red car"],
                                         starts=[4])]
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched"), ("nyu-mll/glue", "mnli", "test_matched"),
                     ("rajpurkar/squad", None, "validation")]


def test_glue_bad_input_errors(tmp_path):
    with pytest.raises(UserError, match="unknown task 'mnlx'"):
        glue.task_name("mnlx")
    with pytest.raises(UserError, match="unknown task"):
        finetune(tmp_path, "squad2", data_dir=tmp_path)
    assert glue.task_name("SST-2") == "sst2" and glue.task_name("sts-b") == "stsb"
    (tmp_path / "RTE").mkdir()
    with pytest.raises(UserError, match=r"RTE has no train\.tsv"):
        glue.read_glue("rte", "train", tmp_path / "RTE")
    write_tsv(tmp_path / "RTE" / "train.tsv", [["index", "sentence1", "sentence2", "label"],
                                               [0, "a", "b", "entailment"], [1, "a", "b"]])
    with pytest.raises(UserError, match=r"train\.tsv line 3: 3 tab-separated columns where its header has 4"):
        glue.read_glue("rte", "train", tmp_path)
    write_tsv(tmp_path / "RTE" / "dev.tsv", [["index", "sentence1", "sentence2", "label"], [0, "a", "b", "maybe"]])
    with pytest.raises(UserError, match=r"dev\.tsv line 2: label 'maybe'"):
        glue.read_glue("rte", "dev", tmp_path)
    write_tsv(tmp_path / "QNLI" / "train.tsv", [["index", "sentence1", "sentence2", "label"]])
    with pytest.raises(UserError, match="no column 'question'"):
        glue.read_glue("qnli", "train", tmp_path)



def test_the_original_glue_files_as_download_glue_data_writes_them(tmp_path, capsys):
    """The quirks of the real files: MRPC's byte-order mark, QQP's malformed lines, CoLA's missing header and final
    newline, MNLI's two dev sets, test files without labels."""
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"  # copied from msr_paraphrase_train.txt
    (mrpc / "train.tsv").write_text(header + "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him .\n"
                                    "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought it .\n",
                                    encoding="utf-8")
    (mrpc / "test.tsv").write_text("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1089874\t1089925\tPCCW 's chief\t"
                                   "Current Chief\n", encoding="utf-8")
    m = glue.read_glue("mrpc", "train", tmp_path)
    assert (m.a, m.b, m.labels) == (["Amrozi accused his brother .", "Yucaipa owned Dominick 's ."],
                                    ["Referring to him .", "Yucaipa bought it ."], [1, 0])
    test = glue.read_glue("mrpc", "test", tmp_path)
    assert (test.a, test.labels, test.ids) == (["PCCW 's chief"], [None], ["0"])

    qqp = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
           "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of math?\t0",
           "363362\t493340\t493341\tWhat is the best way to learn?",  # a line with missing fields
           "402555\t536040\t536041\tWhy do people ask?\tWhy do people ask questions?\t1",
           "\t\t\tstray",  # and another
           "4\t5\t6\tIs it?\tIs it so?\t1"]
    write_tsv(tmp_path / "QQP" / "train.tsv", [[line] for line in qqp])
    capsys.readouterr()
    q = glue.read_glue("qqp", "train", tmp_path)
    assert q.labels == [0, 1, 1] and q.b == ["Which level of math?", "Why do people ask questions?", "Is it so?"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 2 malformed line(s)" in err and "(line 3, 5)" in err

    cola = tmp_path / "CoLA"
    cola.mkdir()
    (cola / "train.tsv").write_text("gj04\t1\t\tOur friends won't buy this analysis.\n"
                                    "gj04\t0\t*\tThey drank the pub.")  # no header, no final newline
    c = glue.read_glue("cola", "train", tmp_path)
    assert (c.a, c.labels) == (["Our friends won't buy this analysis.", "They drank the pub."], [1, 0])
    (cola / "dev.tsv").write_bytes("gj04\t1\t\tCaf\xe9 au lait.\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"dev\.tsv line 1 is not UTF-8 \(byte 0xe9\)"):
        glue.read_glue("cola", "dev", tmp_path)
    # a malformed line elsewhere than QQP is still refused, naming it
    (cola / "dev.tsv").write_text("gj04\t1\t\tfine\ngj04\t1\n")
    with pytest.raises(UserError, match=r"dev\.tsv line 2: 2 tab-separated columns where its header has 4"):
        glue.read_glue("cola", "dev", tmp_path)


def test_hub_glue_offline_is_one_line(capsys):
    """No --data and no network (the suite runs with HF_HUB_OFFLINE=1): one line, naming what to pass instead."""
    with pytest.raises(UserError, match=r"GLUE RTE \(nyu-mll/glue\) is not in the local datasets cache and the "
                                        r"Hugging Face hub cannot be reached \(offline\): pass --data with GLUE's "
                                        r"RTE folder \(its TSV files\), or go online once"):
        glue.read_glue("rte", "train")

def test_compute_metrics_agree_with_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    rng = np.random.default_rng(0)
    for _ in range(5):
        y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
        p[:120] = y[:120]  # correlated, as a model's predictions are
        cola, mrpc = glue.compute_metrics("cola", p, y), glue.compute_metrics("mrpc", p, y)
        assert cola["matthews"] == pytest.approx(100 * matthews_corrcoef(y, p)) and cola["score"] == cola["matthews"]
        assert mrpc["accuracy"] == pytest.approx(100 * accuracy_score(y, p))
        assert mrpc["f1"] == pytest.approx(100 * f1_score(y, p)) and mrpc["score"] == mrpc["accuracy"]
        y3, p3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
        assert glue.compute_metrics("mnli", p3, y3)["accuracy"] == pytest.approx(100 * accuracy_score(y3, p3))
        ys = rng.integers(0, 6, 150).astype(float)  # many ties, as STS-B's gold scores have
        ps = ys + rng.normal(0, 1.5, 150)
        ps[:20] = np.round(ps[:20])
        s = glue.compute_metrics("stsb", ps, ys)
        assert s["pearson"] == pytest.approx(100 * pearsonr(ps, ys)[0])
        assert s["spearman"] == pytest.approx(100 * spearmanr(ps, ys)[0])
        assert s["score"] == pytest.approx((s["pearson"] + s["spearman"]) / 2)
    undefined = glue.compute_metrics("cola", [1, 1, 1], [0, 1, 1])["matthews"]  # one class predicted
    assert undefined == 100 * matthews_corrcoef([0, 1, 1], [1, 1, 1]) == 0.0


def keyword_task(n, seed):
    """RTE layout; 'entailment' iff 'good' occurs in the second sentence."""
    rng = random.Random(seed)
    plain = [w for w in WORDS if w != "good"]
    rows = [["index", "sentence1", "sentence2", "label"]]
    for i in range(n):
        a, b = [rng.choice(plain) for _ in range(6)], [rng.choice(plain) for _ in range(6)]
        yes = rng.random() < 0.5
        if yes:
            b[rng.randrange(6)] = "good"
        rows.append([i, " ".join(a), " ".join(b), "entailment" if yes else "not_entailment"])
    return rows


def reloaded_predictions(best, split):
    """The labels that a fine-tuned folder (best/) predicts for a GLUE split, read back from disk."""
    logits = ft.predict(ft.load_model(best, "rte")[0], glue.encode_glue(ft.load_tokenizer(best), split), 64, 0, "cpu")
    return glue.labels_of(logits)


def test_finetune_learns_a_keyword_task(tmp_path, vocab):
    model = tiny_bert_folder(tmp_path / "model", vocab)
    glue_dir = tmp_path / "glue"
    write_tsv(glue_dir / "RTE" / "train.tsv", keyword_task(320, 0))
    write_tsv(glue_dir / "RTE" / "dev.tsv", keyword_task(100, 1))
    write_tsv(glue_dir / "RTE" / "test.tsv", [r[:3] for r in keyword_task(20, 2)])
    result = finetune(model, "rte", data_dir=glue_dir, lr=[1e-4, 1e-3], epochs=[1, 4], batch_size=16,
                      out=tmp_path / "run")
    dev = glue.read_glue("rte", "dev", glue_dir)
    one_class = 100 * dev.labels.count(0) / len(dev.labels)  # the score of "always entailment": 52 of 100
    # lr 1e-4 never leaves one class (the scores of always one or always the other); lr 1e-3 learns the rule
    # exactly, first at epoch 2 of 4: that epoch is the sweep's best
    assert [(r["lr"], r["epochs"], r["epoch"], r["accuracy"]) for r in result["runs"]] == [
        (1e-4, 1, 1, one_class), (1e-4, 4, 3, one_class), (1e-3, 1, 1, 100 - one_class), (1e-3, 4, 2, 100.0)]
    assert (result["lr"], result["epochs"], result["epoch"], result["score"]) == (1e-3, 4, 2, 100.0)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["kind"] for r in records].count("epoch") == 10 and records[-1]["kind"] == "best"
    best = tmp_path / "run" / "best"
    assert {"config.json", "model.safetensors", "head.pt", "vocab.txt", "dev_metrics.json"} <= {
        f.name for f in best.iterdir()}
    _, state = read_pretrained(best)  # only the weights its head uses: no masked-LM head (cls.predictions.*)
    assert not [k for k in state if k.startswith("cls.")]
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= state.keys()
    # the checkpoint reloads to the same dev accuracy (scikit-learn's), and the submission file answers the rule
    assert 100 * accuracy_score(dev.labels, reloaded_predictions(best, dev)) == result["accuracy"]
    test = keyword_task(20, 2)[1:]
    assert (tmp_path / "run" / "RTE.tsv").read_text().splitlines() == ["index\tprediction"] + [
        f"{i}\t{label}" for i, _, _, label in test]
    with pytest.raises(UserError, match="already holds a run"):
        finetune(model, "rte", data_dir=glue_dir, out=tmp_path / "run")


def test_sub_model_of_a_superplm_checkpoint(tmp_path, vocab):
    """search.py's evaluator: extract an architecture from a SuperPLM run folder and fine-tune it (§3.4-3.5)."""
    torch.manual_seed(0)
    superplm = Bert(Arch(2, 64, 128, 2, 64), vocab_size=len((vocab / "vocab.txt").read_text().split()))
    run = tmp_path / "superplm"
    run.mkdir()
    (run / "vocab.txt").write_text((vocab / "vocab.txt").read_text())
    space = SearchSpace(layers=(1, 2), hidden=(48, 64), ffn=(96, 128), heads=(1, 2))
    torch_save(dict(model_config=superplm.config(), model=superplm.state_dict(), space=dataclasses.asdict(space),
                    objective="mlm", tokenizer=str(run / "vocab.txt")), run / "checkpoint.pt")
    arch = Arch(1, 48, 96, 1, 32)
    model, tokenizer = ft.load_model(run, "rte", str(arch))
    ids = torch.randint(5, 40, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model.bert.eval()(ids), superplm.eval()(ids, arch=arch), atol=1e-6)
    assert tokenizer == str(run / "vocab.txt")
    glue_dir = tmp_path / "glue"
    write_tsv(glue_dir / "RTE" / "train.tsv", keyword_task(32, 0))
    write_tsv(glue_dir / "RTE" / "dev.tsv", keyword_task(16, 1))
    result = finetune(run, "rte", data_dir=glue_dir, arch=str(arch), epochs=1, out=tmp_path / "run")
    dev = glue.read_glue("rte", "dev", glue_dir)  # the saved sub-model scores what the run reported (scikit-learn)
    assert 100 * accuracy_score(dev.labels, reloaded_predictions(tmp_path / "run" / "best", dev)) == result["accuracy"]
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (1, 48, 96)
    with pytest.raises(UserError, match="--arch needs a SuperPLM"):
        ft.load_model(tiny_bert_folder(tmp_path / "plain", vocab), "rte", str(arch))


def test_squad_run_writes_official_predictions(tmp_path, vocab):
    model = tiny_bert_folder(tmp_path / "model", vocab)
    write_squad(tmp_path / "squad", "train", squad_examples(24, 4))
    write_squad(tmp_path / "squad", "dev", squad_examples(6, 5))
    result = finetune(model, "squad", data_dir=tmp_path / "squad", epochs=1, max_train_examples=16,
                      out=tmp_path / "run", max_len=48, doc_stride=16)
    assert {"exact_match", "f1", "score"} <= set(result) and result["score"] == result["f1"]
    predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert set(predictions) == {f"q5-{i}" for i in range(6)} and all(isinstance(v, str) for v in predictions.values())
    assert squad.squad_scores(predictions, {e["id"]: e["answers"] for e in squad_examples(6, 5)})["f1"] == \
        pytest.approx(result["f1"])


def test_pooler_is_taken_from_a_hugging_face_checkpoint(tmp_path):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    hf = BertModel(BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=128)).eval()
    hf.save_pretrained(tmp_path)
    model = ft.load_model(tmp_path, "mnli")[0].eval()
    ids = torch.randint(5, 99, (2, 9))
    mask, types = torch.ones_like(ids), torch.tensor([[0] * 5 + [1] * 4] * 2)
    mask[1, 7:] = 0
    pooled = torch.tanh(model.pooler(model.bert(ids, mask, types)[:, 0]))
    with torch.no_grad():
        assert torch.allclose(pooled, hf(ids, mask, types).pooler_output, atol=1e-5)
    assert model(ids, mask, types).shape == (2, 3)


def test_cli_help_shows_table_d1_and_one_line_errors(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        ft.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    # the default task's (MNLI's) Table D.1 values as the defaults, no None; every task's in the text
    for flag, after, shown in (("--lr LR [LR ...]", "--epochs", ["(default: [3e-05])", "rte 2e-05", "cola 1e-05"]),
                               ("--epochs EPOCHS [EPOCHS ...]", "--batch-size", ["(default: [4])", "mrpc 10", "qqp 5"]),
                               ("--batch-size BATCH_SIZE", "--max-len", ["Table D.1's: 32, SQuAD 16 (default: 32)"]),
                               ("--max-len MAX_LEN", "--doc-stride", ["128, SQuAD 384 (default: 128)"])):
        help_ = text.split(f" {flag} ")[1].split(f" {after} ")[0]
        assert "None" not in help_ and all(s in help_ for s in shown), help_
    # a default the run works out says what it is, never "None": every example
    assert "None" not in text and text.count("examples; default: all of them --") == 2
    with pytest.raises(SystemExit) as e:
        run_main(lambda: ft.main(["--task", "rte"]))
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: no model")


def rte(tmp_path, vocab):
    model = tiny_bert_folder(tmp_path / "model", vocab)
    glue_dir = tmp_path / "glue"
    write_tsv(glue_dir / "RTE" / "train.tsv", keyword_task(32, 0))
    write_tsv(glue_dir / "RTE" / "dev.tsv", keyword_task(8, 1))
    return ["--task", "RTE", "--model", str(model), "--data", str(glue_dir), "--batch-size", "8"]  # GLUE's spelling


def test_table_d1_per_task_and_the_presets(monkeypatch):
    runs = []
    monkeypatch.setattr(ft, "run", lambda cfg, argv=None: runs.append(cfg))
    for argv in (["--task", "rte"], ["--task", "SQuAD"], ["--task", "cola", "--preset", "tiny"],
                 ["--task", "rte", "--preset", "tiny", "--lr", "1e-4", "3e-4", "--max-eval-examples", "50"]):
        ft.main(["--model", "m", *argv])
    # (batch size, learning rate, epochs) as in the paper's Table D.1, and §4.1's input lengths
    assert [(c.task, c.batch_size, c.lr, c.epochs, c.max_len, c.max_train_examples, c.max_eval_examples, c.out)
            for c in runs] == [("rte", 32, [2e-5], [10], 128, None, None, "runs/finetune/rte"),
                               ("squad", 16, [3e-5], [4], 384, None, None, "runs/finetune/squad"),
                               ("cola", 32, [1e-5], [1], 128, 2000, 1000, "runs/finetune-tiny/cola"),
                               ("rte", 32, [1e-4, 3e-4], [1], 128, 2000, 50, "runs/finetune-tiny/rte")]


def test_cli_run_folder_records_its_settings_and_a_failed_start_leaves_nothing(tmp_path, vocab, capsys):
    flags, out = rte(tmp_path, vocab), tmp_path / "run"
    wrong = [*flags, "--data", str(tmp_path / "nowhere"), "--out", str(out)]  # the last --data wins
    with pytest.raises(ft.UserError, match="pass the right --data"):
        ft.main(wrong)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(ft.UserError):
        ft.main(wrong)
    assert list(out.iterdir()) == []  # as it was found: the next attempt needs no --overwrite
    result = ft.main([*flags, "--epochs", "2", "--out", str(out), "--log-every", "2", "--threads", "1"])
    last = capsys.readouterr().out.splitlines()[-1]  # it names the run folder
    assert last.endswith(f" -> {out}/ (best/, results.json, metrics.jsonl, log.txt)")
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["task"] == "rte" and record["config"]["lr"] == [2e-5]  # resolved: Table D.1's
    assert record["command"].startswith("python ") and "--task RTE" in record["command"]
    assert record["status"] == "finished" and record["started"] <= record["ended"]
    log = (out / "log.txt").read_text().splitlines()
    assert [line.split(" | ")[1] for line in log if " | step " in line] == ["step 2/4", "step 4/4"] * 2
    assert sum(" | epoch " in line for line in log) == 2
    # config.json round-trips into the same run
    again = ft.main(["--config", str(out / "config.json"), "--out", str(tmp_path / "again")])
    assert again == result and json.loads((tmp_path / "again" / "config.json").read_text())["config"] == dict(
        record["config"], out=str(tmp_path / "again"))
    # run() resolves Table D.1's values on a copy: the caller's config is left as it was
    cfg = ft.Config(task="RTE", model=flags[3], data=flags[5], epochs=[2], batch_size=8)
    assert ft.run(cfg) == result and cfg == ft.Config(task="RTE", model=flags[3], data=flags[5], epochs=[2],
                                                      batch_size=8)


def test_sigterm_keeps_the_finished_epochs_and_says_so(tmp_path, vocab, monkeypatch):
    import os
    import signal
    flags, calls = rte(tmp_path, vocab), []
    loss_fn = ft.loss_fn

    def preempted_at(step):  # SIGTERM to this process during training step `step`
        def patched(*args):
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss_fn(*args)
        calls.clear()
        monkeypatch.setattr(ft, "loss_fn", patched)

    preempted_at(2)  # in the first epoch: nothing to keep, the folder is not left behind
    with pytest.raises(KeyboardInterrupt, match="nothing kept"):
        ft.main([*flags, "--epochs", "3", "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists() and len(calls) == 2  # the step in progress was finished, no more
    preempted_at(6)  # in the second epoch: the first one's results are kept
    with pytest.raises(KeyboardInterrupt, match=r"SIGTERM: kept .*metrics.jsonl.*best/ \(lr 2e-05 epochs 3 epoch 1"):
        ft.main([*flags, "--epochs", "3", "--out", str(tmp_path / "b")])
    assert [r["epoch"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["status"] == "interrupted"
    assert (tmp_path / "b" / "best" / "model.safetensors").exists()
