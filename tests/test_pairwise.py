"""bench/pairwise.py: Eq. 5 on hand-made cases, and the whole study end to end on a minute-sized budget."""

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pairwise  # noqa: E402
from conftest import pixels, png  # noqa: E402
from latency import kendall_tau, macs, params  # noqa: E402
from model import Arch  # noqa: E402
from search import MLMScore  # noqa: E402
from superplm import load_superplm, space_for  # noqa: E402


def luo(f, s, pairs=None):
    """The pairwise accuracy of Luo et al. (2018)'s code, which Eq. 5 follows: pairs i < j in list order."""
    pairs = list(itertools.combinations(range(len(f)), 2)) if pairs is None else pairs
    return sum((f[i] >= f[j] and s[i] >= s[j]) or (f[i] < f[j] and s[i] < s[j]) for i, j in pairs) / len(pairs)


def test_pairwise_accuracy_hand_made():
    acc = pairwise.pairwise_accuracy
    assert acc([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0  # same order, different scale
    assert acc([1, 2, 3, 4], [40, 30, 20, 10]) == 0.0  # reversed
    assert acc([1, 2, 3], [1, 3, 2]) == pytest.approx(2 / 3)  # one of three pairs swapped
    assert acc([3, 1, 2], [30, 10, 20]) == 1.0  # list order does not matter
    # Ties: Eq. 5's >= holds both ways on a tied side, so the pair earns half when only one side ties ...
    assert acc([1, 1], [1, 2]) == 0.5
    assert acc([1, 1], [2, 1]) == 0.5  # ... in either order (Luo et al.'s loop would give 0 here and 1 above)
    assert acc([1, 2], [5, 5]) == 0.5
    assert acc([7, 7], [3, 3]) == 1.0  # ... and a whole pair when both sides tie
    assert acc([1, 1, 2], [1, 2, 3]) == pytest.approx((0.5 + 1 + 1) / 3)
    assert luo([1, 1], [1, 2]) == 0.0 and luo([1, 1], [2, 1]) == 1.0  # the order-dependence avoided
    with pytest.raises(ValueError):
        acc([1.0], [1.0])
    with pytest.raises(ValueError):
        acc([1.0, 2.0], [1.0, 2.0, 3.0])


def test_pairwise_accuracy_matches_eq5_and_tau_without_ties():
    rng = np.random.default_rng(0)
    for n in (2, 5, 12, 16):
        f, s = rng.normal(size=n), rng.normal(size=n)
        assert pairwise.pairwise_accuracy(f, s) == pytest.approx(luo(f, s))
        assert pairwise.pairwise_accuracy(f, s) == pytest.approx((kendall_tau(f, s) + 1) / 2)  # tau-a, no ties


def test_pairwise_accuracy_within_groups():
    f, s, groups = [1, 2, 3, 4], [2, 1, 3, 4], [0, 0, 1, 1]
    assert pairwise.pairwise_accuracy(f, s, groups) == 0.5  # pair (0, 1) swapped, pair (2, 3) right
    assert pairwise.pairwise_accuracy(f, s) == pytest.approx(5 / 6)
    assert pairwise.n_pairs(groups) == 2 and pairwise.n_pairs(n=4) == 6
    assert pairwise.n_pairs([0, 0, 0, 1, 1, 1, 2, 2, 2]) == 9


def test_pick_archs_spreads_sizes_and_shapes():
    space = space_for(Arch.parse("4-256-1024-4-256"), "heads")
    picked = pairwise.pick_archs(space, 12, 3, macs, seed=0, pool=3000)
    archs, levels = [a for a, _ in picked], [lv for _, lv in picked]
    assert len(set(archs)) == 12 and all(a in space for a in archs)
    assert levels == sorted(levels) and sorted(set(levels)) == [0, 1, 2, 3]
    cost = np.log(macs(archs))
    for lv in range(4):  # one level: within 10% of its target, so within ~20% of each other, but unlike shapes
        c = cost[np.array(levels) == lv]
        assert c.max() - c.min() <= 2 * np.log(1.1) + 1e-9
        assert len({(a.layers, a.hidden, a.ffn, a.heads) for a, l_ in picked if l_ == lv}) == 3
    assert cost[:3].max() < cost[-3:].min()  # small to large
    assert picked == pairwise.pick_archs(space, 12, 3, macs, seed=0, pool=3000)  # deterministic
    dims = space_for(Arch.parse("4-256-1024-4-256"), "dims")
    assert all(pairwise.as_dims(a, dims) in dims and pairwise.as_dims(a, dims).qkv == a.qkv for a in archs)


def test_proxy_rows_score_larger_as_better_with_luos_loop():
    """summarize's rows of the training-free proxies, the predictor's among them, on made-up stand-alone losses."""
    archs = [Arch.parse(a) for a in ("2-64-128-1-64", "2-64-256-1-64", "2-128-128-2-128", "2-128-512-2-128")]
    picked, loss = [(a, i // 2) for i, a in enumerate(archs)], [6.3, 6.4, 6.0, 5.9]  # (arch, level); 6.3: 1 swap
    done = {f"standalone-{a}": dict(scores={str(a): dict(mlm_loss=x)}) for a, x in zip(archs, loss)}
    ms = [1.0, 1.5, 2.0, 3.0]
    info = dict(proxies=dict(params=dict(zip(map(str, archs), params(archs).tolist())),
                             latency=dict(zip(map(str, archs), ms))))
    rows = pairwise.summarize(picked, {"heads": archs}, done, pairwise.Config(mha=["heads"]), 10, info)
    assert [r["variant"] for r in rows] == ["heads-params", "heads-latency"]  # no SuperPLM trained yet: no row
    s, same = [-x for x in loss], [(0, 1), (2, 3)]
    for r, f in zip(rows, (params(archs).tolist(), ms)):
        assert r["pairwise"] == luo(f, s) == 5 / 6 and r["pairwise_same_latency"] == luo(f, s, same) == 0.5
        assert r["tau"] == pytest.approx(scipy.stats.kendalltau(f, s).statistic, abs=1e-12)
        assert r["steps"] == r["tokens"] == 0 and [a["proxy"] for a in r["archs"]] == f


@pytest.mark.slow
def test_whole_study_runs_and_resumes(tmp_path, small_corpus):
    corpus = small_corpus
    out = tmp_path / "study"
    argv = ["--train-args", f"--superplm-arch 2-64-128-2-64 --corpus {corpus} --vocab-size 300 --seq-len 32 "
            f"--batch-size 8 --cache-dir {tmp_path / 'cache'} --log-every 100",
            "--tokens", str(8 * 32 * 6), "--archs", "4", "--group", "2", "--pool", "300", "--out", str(out)]
    pairwise.main(argv)
    results = json.loads((out / "results.json").read_text())
    image = png(out / "pairwise.png")  # Figure 4: one 4 x 4 inch panel per variant at 130 dpi
    assert image.shape == (520, 2080, 4)
    # each panel's y = x line in black, the dots coloured by latency level (viridis: 0 purple, 1 yellow)
    assert pixels(image, "black") > 200 and pixels(image, "#440154") > 20 and pixels(image, "#fde725") > 20
    rows = results["variants"]
    assert [r["variant"] for r in rows] == ["heads-m3", "heads-m1", "dims-m3", "dims-m1", "heads-params",
                                            "heads-macs", "dims-params", "dims-macs"]  # no --latency: no predictor
    for r in rows:  # Eq. 5 and tau of the scores it lists, as Luo et al.'s loop and scipy compute them (no ties)
        f = [-a["one_shot"] if r["steps"] else a["proxy"] for a in r["archs"]]  # higher predicts better
        s = [-a["stand_alone"] for a in r["archs"]]
        assert len(set(f)) == len(set(s)) == 4 and all(np.isfinite(f + s))
        levels = [a["level"] for a in r["archs"]]
        same = [(i, j) for i, j in itertools.combinations(range(4), 2) if levels[i] == levels[j]]
        assert r["pairs"] == 6 and r["pairs_same_latency"] == len(same) == 2  # 4 archs; 2 levels of 2
        assert r["pairwise"] == pytest.approx(luo(f, s), abs=1e-12)
        assert r["pairwise_same_latency"] == pytest.approx(luo(f, s, same), abs=1e-12)
        assert r["tau"] == pytest.approx(scipy.stats.kendalltau(f, s).statistic, abs=1e-12)
    assert {r["steps"] for r in rows} == {6, 18, 0}  # M=1 takes M times the steps (equal compute); proxies none
    for r in rows[4:]:  # the proxies: counted for the archs of the study, each against that slicing's stand-alone
        one_shot = next(o for o in rows if o["mha"] == r["mha"])
        assert [a["stand_alone"] for a in r["archs"]] == [a["stand_alone"] for a in one_shot["archs"]]
        count = params if r["variant"].endswith("params") else macs
        assert [a["proxy"] for a in r["archs"]] == count([Arch.parse(a["arch"]) for a in r["archs"]]).tolist()
    heads = [Arch.parse(a["arch"]) for a in rows[0]["archs"]]
    dims = [Arch.parse(a["arch"]) for a in rows[2]["archs"]]
    assert [a.qkv for a in heads] == [a.qkv for a in dims] and {a.heads for a in dims} == {2}
    assert len(results["runs"]) == 4 + len(set(heads) | set(dims))  # 4 SuperPLMs; an arch of both sets trains once
    packed = json.loads(next((tmp_path / "cache").glob("packed-*.json")).read_text())
    assert results["info"]["heldout_rows"] == min(256, packed["rows"] // 10)  # data.split's held-out tail

    # the one-shot score is the arch run inside that SuperPLM's checkpoint, on the held-out rows
    model, space, tok = load_superplm(out / "superplm-dims-m3")
    assert model.mha == "dims" and space == space_for(Arch.parse("2-64-128-2-64"), "dims")
    arch = dims[-1]
    score = MLMScore(model, tok, str(corpus), 32, str(tmp_path / "cache"), results["info"]["heldout_rows"])
    assert -score(arch) == pytest.approx(rows[2]["archs"][-1]["one_shot"], rel=1e-5)

    stamp = (out / "superplm-heads-m3" / "checkpoint.pt").stat().st_mtime_ns
    pairwise.main(argv + ["--resume"])  # nothing left to train: the same numbers again
    assert (out / "superplm-heads-m3" / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["variants"] == rows
    with pytest.raises(pairwise.UserError, match="other settings"):
        pairwise.main(argv[:-2] + ["--out", str(out), "--archs", "6", "--resume"])
    with pytest.raises(pairwise.UserError, match="--resume"):
        pairwise.main(argv)
