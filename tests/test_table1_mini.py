"""bench/table1_mini.py: BERT's default rule, the coherence task, Figure 5's step count, and the whole study end to
end on a minute-sized budget."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import search  # noqa: E402
import table1_mini as t1  # noqa: E402
from conftest import pixels, png  # noqa: E402
from latency import params  # noqa: E402
from model import Arch  # noqa: E402
from superplm import load_superplm  # noqa: E402


class WidthPredictor:
    """A stand-in latency predictor: layers x hidden / 100 ms."""

    def predict(self, archs):
        return np.array([a.layers * a.hidden / 100 for a in archs], dtype=np.float64)


def test_default_rule_and_bert_s():  # model.py's and search.py's, used by the study and the demo
    assert Arch.default_rule(4, 256) == Arch.parse("4-256-1024-4-256")  # BERT-S3 of Table 4
    assert Arch.default_rule(4, 512) == Arch.parse("4-512-2048-8-512")  # BERT-S1
    assert t1.is_default_rule(Arch.parse("4-192-768-3-192"))
    assert not t1.is_default_rule(Arch.parse("4-432-384-4-256"))  # AutoTinyBERT-S3
    assert not t1.is_default_rule(Arch.parse("4-100-400-1-64"))  # hidden not a multiple of 64
    pred = WidthPredictor()  # 4-64: 2.56 ms, 4-128: 5.12, 4-192: 7.68, ...
    assert search.bert_s(7.68, pred, 4) == Arch.parse("4-192-768-3-192")  # equal counts as below
    assert search.bert_s(7.67, pred, 4) == Arch.parse("4-128-512-2-128")
    assert search.bert_s(1000, pred, 4) == Arch.parse("4-768-3072-12-768")  # BERT-base's width at most
    assert search.bert_s(1.0, pred, 4) == Arch.parse("4-64-256-1-64")  # none below: the smallest
    assert search.bert_s(7.0, pred, 2) == Arch.parse("2-320-1280-5-320")  # 6.4 ms


def test_steps_to_reach():
    curve = [(10, 5.0), (20, 4.0), (30, 3.0)]
    assert t1.steps_to_reach(curve, 4.0) == 20
    assert t1.steps_to_reach(curve, 3.5) == pytest.approx(25.0)  # halfway between the points
    assert t1.steps_to_reach(curve, 5.5) == 10  # reached at the first point
    assert t1.steps_to_reach(curve, 2.9) is None
    assert t1.steps_to_reach([(10, 5.0), (20, 5.5), (30, 4.5)], 5.0) == 10  # the first time, not the last


def test_coherence_task():
    docs = [f"Doc {d} sentence one is here. Doc {d} sentence two is here. Doc {d} sentence three is here."
            for d in range(40)]
    train, dev = t1.coherence_task(docs, 60, 20, seed=0)
    assert train[0] == dev[0] == ["index", "sentence1", "sentence2", "label"]
    assert len(train) == 61 and len(dev) == 21
    for rows in (train, dev):
        labels = [r[3] for r in rows[1:]]
        assert labels.count("entailment") == labels.count("not_entailment")  # balanced: majority 50%
        for _, a, b, label in rows[1:]:
            doc_a, doc_b = a.split()[1], b.split()[1]
            nth = {"one": 1, "two": 2, "three": 3}
            if label == "entailment":  # the next sentence of the same document
                assert doc_a == doc_b and nth[b.split()[3]] == nth[a.split()[3]] + 1
            else:  # a sentence of another document
                assert doc_a != doc_b
    docs_of = lambda rows: {w for r in rows[1:] for w in (r[1].split()[1], r[2].split()[1])}  # noqa: E731
    assert not docs_of(train) & docs_of(dev)  # train and dev from disjoint documents
    assert t1.coherence_task(docs, 60, 20, seed=0) == [train, dev]
    with pytest.raises(t1.UserError, match="sentence pairs"):
        t1.coherence_task(docs, 500, 20)


@pytest.mark.slow
def test_whole_study_runs_and_resumes(tmp_path, small_corpus):
    corpus = small_corpus
    out = tmp_path / "study"
    argv = ["--train-args", f"--superplm-arch 2-128-256-2-128 --corpus {corpus} --vocab-size 300 --seq-len 32 "
            f"--batch-size 8 --cache-dir {tmp_path / 'cache'}", "--targets", "2-64-256-1-64", "--bert-layers", "2",
            "--seeds", "0", "1", "--oneshot-epochs", "0.06", "--further-epochs", "0.06", "--latency-samples", "12",
            "--generations", "2", "--population", "4", "--task-train", "40", "--task-dev", "20", "--ft-epochs", "1",
            "--ft-lr", "1e-4", "--curve-points", "2", "--out", str(out)]
    t1.main(argv)
    results = json.loads((out / "results.json").read_text())
    figure1, figure5 = png(out / "figure1.png"), png(out / "figure5.png")  # 9.5 x 4.5 and 5 x 4 inches at 130 dpi
    assert figure1.shape == (585, 1235, 4) and figure5.shape == (520, 650, 4)
    # Figure 1: the scored candidates in light grey, AutoTinyBERT (C3), BERT-S (C0) and the searched arch from
    # scratch (C2) as markers; Figure 5: the inherited curve (C3) and the one from scratch (C2)
    assert all(pixels(figure1, c) > 20 for c in ("lightgrey", "C3", "C0", "C2")), [pixels(figure1, c) for c in (
        "lightgrey", "C3", "C0", "C2")]
    assert pixels(figure5, "C3") > 20 and pixels(figure5, "C2") > 20
    steps = results["info"]["steps"]
    spe = results["info"]["epoch_steps"]
    assert steps == dict(oneshot=round(0.06 * spe), further=round(0.06 * spe), total=2 * round(0.06 * spe))
    (row,) = results["targets"]
    assert row["seeds"] == [0, 1] and row["majority"] == 50.0
    auto, bert, alone, proxy = row["models"]
    assert [m["model"] for m in row["models"]] == ["AutoTinyBERT", "BERT-S (scratch)", "searched (scratch)",
                                                   "params pick (scratch)"]
    assert bert["archs"] == ["2-64-256-1-64"] * 2  # the target's shape meets its own budget (slack 1.1)
    assert alone["archs"] == auto["archs"]  # Figure 5: the same arch, inherited or from scratch
    assert auto["steps"] == steps["further"] and bert["steps"] == alone["steps"] == proxy["steps"] == steps["total"]
    for s, a, b, pa, pb, c, pc in zip(row["seeds"], auto["archs"], bert["archs"], auto["pred_ms"], bert["pred_ms"],
                                      proxy["archs"], proxy["pred_ms"]):
        found = next(r for r in results["runs"] if r["run"] == f"search-s{s}-2-64-256-1-64")
        assert found["best"] == a and pa <= found["budget_ms"]  # the winner meets the budget
        assert b == "2-64-256-1-64" and pb <= found["budget_ms"]  # BERT-S: the target's shape, within the budget
        # the params pick: search.py --evaluator params under the same budget, the most parameters it scored
        scored = json.loads((out / f"proxy-s{s}-2-64-256-1-64" / "scored.json").read_text())
        assert c == scored[0]["arch"] and pc <= found["budget_ms"] and len(scored) == 8
        assert scored[0]["score"] == max(params([Arch.parse(r["arch"]) for r in scored])) / 1e6
    loss = {m["model"]: m["loss"] for m in row["models"]}
    for (a, b), d in zip(t1.VERSUS, row["vs"].values()):  # how much lower the first's loss is, seed by seed
        assert d == [y - x for x, y in zip(loss[a], loss[b])]
    assert row["loss_gain"] == pytest.approx([b - a for a, b in zip(auto["loss"], bert["loss"])])
    runs = {r["run"]: r for r in results["runs"]}
    for m, kind in zip(row["models"], ("further", "scratch", "scratch", "scratch")):  # dev accuracy of 20 pairs, in %
        assert m["acc"] == [runs[f"task-{kind}-s{s}-{a}"]["acc"] for s, a in zip(row["seeds"], m["archs"])]
        assert all(x * 20 / 100 == pytest.approx(round(x * 20 / 100), abs=1e-9) for x in m["acc"])
    assert row["acc_gain"] == pytest.approx([a - b for a, b in zip(auto["acc"], bert["acc"])])
    assert {"superplm-s0", "superplm-s1", "latency", "proxy-s0-2-64-256-1-64"} <= set(runs)

    # the reported loss is the further-trained model's held-out loss, and the curve ends there
    further = out / f"further-s0-{auto['archs'][0]}"
    model, _, tok = load_superplm(further)
    heldout = t1.HeldOut(t1.superplm.parse_config(["--preset", "tiny", *argv[1].split()]), tok,
                         results["info"]["heldout_rows"], 32)
    assert heldout(model) == pytest.approx(auto["loss"][0], rel=1e-5)
    assert runs[f"further-s0-{auto['archs'][0]}"]["curve"][-1] == [steps["further"], auto["loss"][0]]

    stamp = (further / "checkpoint.pt").stat().st_mtime_ns
    t1.main(argv + ["--resume"])  # nothing left to train: the same numbers again
    assert (further / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["targets"] == results["targets"]
    with pytest.raises(t1.UserError, match="other settings"):
        t1.main(argv + ["--seeds", "0", "--resume"])
    with pytest.raises(t1.UserError, match="--resume"):
        t1.main(argv)
    with pytest.raises(t1.UserError, match="default-rule shape"):
        t1.main(argv[:-2] + ["--targets", "2-96-204-1-64", "--out", str(tmp_path / "other")])
