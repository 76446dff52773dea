import json
import math
import os
import random
import signal
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

import latency
import search
import superplm
from common import UserError, parse_flags, read_jsonl
from conftest import pixels, png
from data import build_dataset, load_tokenizer
from model import BERT_BASE, KD_SPACE, PRETRAIN_SPACE, Arch, SearchSpace, from_pretrained, grid
from search import Candidate
from superplm import load_superplm

SMALL = SearchSpace(layers=grid(1, 6, 1), hidden=grid(64, 384, 16), ffn=grid(64, 1536, 32), heads=grid(1, 6, 1))


def flops_ms(a):
    """A synthetic latency: the multiply-adds of one 128-token input (Eq. 1-3) plus a per-layer overhead."""
    T = 128
    return 1.0 + a.layers * (T * (4 * a.hidden * a.qkv + 2 * a.hidden * a.ffn + 2 * T * a.qkv) / 1e7 + 0.2)


def quality(a, noise=0.3):
    """A synthetic score: grows with size, prefers ffn ~ 1.75 hidden and qkv ~ 0.85 hidden, plus a fixed noise."""
    size = math.log(a.layers * a.hidden * (4 * a.qkv + 2 * a.ffn))
    shape = (math.log(a.ffn / a.hidden) - math.log(1.75)) ** 2 + (math.log(a.qkv / a.hidden) - math.log(0.85)) ** 2
    return 10 * size - 6 * shape + random.Random(str(a)).gauss(0, noise)


class Counted:
    def __init__(self, f):
        self.f, self.calls = f, Counter()

    def __call__(self, arch):
        self.calls[arch] += 1
        return self.f(arch)


BUDGET = flops_ms(Arch(3, 256, 512, 4, 256))


def budget(ms=BUDGET, space=SMALL, latency=flops_ms):
    return search.Budget(space, latency, ms)


@pytest.mark.parametrize("method", ["evolve", "evolve-elite"])
def test_evolve_generations_budget_no_repeats(method):
    score = Counted(quality)
    out = search.METHODS[method](SMALL, score, budget(), seed=1)
    assert len(out) == 100 and [c.score for c in out] == sorted((c.score for c in out), reverse=True)
    assert Counter(c.generation for c in out) == {1: 25, 2: 25, 3: 25, 4: 25}  # T = 4 generations of S = 25
    assert len({c.arch for c in out}) == 100 and set(score.calls.values()) == {1}  # no arch scored twice
    for c in out:
        assert c.arch in SMALL and c.latency == flops_ms(c.arch) <= BUDGET and c.score == quality(c.arch)


def test_evolve_is_reproducible_and_seeded():
    runs = [search.evolve(SMALL, quality, budget(), generations=3, population=10, seed=s) for s in (4, 4, 5)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_later_generations_come_from_parents_and_fresh_samples():
    """With pm = 1 every member of a later generation is a mutant of the previous generation's members."""
    out = search.evolve(SMALL, quality, budget(), generations=2, population=20, p_mutate=1.0, p_explore=0.0)
    gen1 = [c.arch for c in out if c.generation == 1]
    nearest = []  # grid steps from each child of generation 2 to its nearest member of generation 1
    for c in (c for c in out if c.generation == 2):
        nearest.append(min(sum(abs(SMALL.choices(d).index(getattr(c.arch, d)) - SMALL.choices(d).index(getattr(p, d)))
                               for d in ("layers", "hidden", "ffn", "heads")) for p in gen1))
    # one or two grid steps in up to four dimensions (at most 8), never none; under seed 0 exactly these:
    assert nearest == [3, 1, 5, 3, 3, 2, 3, 2, 2, 1, 5, 5, 1, 5, 2, 4, 3, 6, 2, 4]


def test_impossible_budget_is_a_clear_error_before_any_search():
    for ms in (flops_ms(SMALL.smallest()) * 0.99, 0.5):
        with pytest.raises(UserError, match="even the smallest, 1-64-64-1-64, takes .* choose a lower speedup target"):
            budget(ms)
    # The smallest shape of §4.4's rule here is 1-80-128-1-64 (ffn 1.6-1.9 x 80, qkv 64 >= 0.7 x 80): slower.
    with pytest.raises(UserError, match="no architecture following the rule of §4.4 meets"):
        search.fast_search(SMALL, quality, budget(flops_ms(Arch(1, 80, 128, 1, 64)) * 0.999))
    assert search.fast_candidates(SMALL, budget(flops_ms(Arch(1, 80, 128, 1, 64)))) == [Arch(1, 80, 128, 1, 64)]


class Predictor:
    """flops_ms with BERT-base's time beside it, as a latency.LatencyPredictor has."""
    base_ms = 1000.0

    def __call__(self, arch):
        return flops_ms(arch)


def test_a_target_no_architecture_meets_says_what_the_fastest_reaches():
    fastest = flops_ms(SMALL.smallest())
    with pytest.raises(UserError, match=f"even the smallest, 1-64-64-1-64, takes {fastest:.4g} ms; choose a speedup "
                                        f"target of at most {1000 / fastest:.3g}x"):
        budget(fastest * 0.99, latency=Predictor())


def test_a_target_every_architecture_meets_searches_the_whole_space():
    """The window of evolve-elite (>= 0.85 x the budget) holds nothing when even the largest architecture is faster:
    the request is valid, the window is dropped with one warning, and the search runs as without it."""
    ms = flops_ms(SMALL.largest()) / 0.8
    with pytest.warns(UserWarning, match=r"every architecture meets .* the latency window 0.85-1x is dropped") as w:
        out = search.evolve_elite(SMALL, quality, budget(ms), generations=2, population=10)
    assert len(w) == 1 and len(out) == 20 and len({c.arch for c in out}) == 20
    assert out == search.evolve_elite(SMALL, quality, budget(ms), generations=2, population=10, window=0.0)


def test_a_window_that_only_a_sliver_reaches_advises_a_higher_target():
    ms = flops_ms(SMALL.largest()) * 1.1  # the window starts at 0.935 x the largest: a sliver of the space
    with pytest.warns(UserWarning, match=f"only 0 of 25 new architectures within {0.85 * ms:.4g}-{ms:.4g} ms"):
        with pytest.raises(UserError, match="choose a higher speedup target .* or --method evolve"):
            search.evolve_elite(SMALL, quality, budget(ms), max_draws=200)

def test_a_sliver_of_a_budget_ends_short_instead_of_looping():
    tight = flops_ms(Arch(1, 128, 256, 2, 128))
    fits = [a for a in map(Arch.parse, all_archs(SMALL)) if flops_ms(a) <= tight]
    assert len(fits) == 316  # of 6 x 21 x 47 x 6 = 35,532: fewer than 4 generations x 100
    with pytest.warns(UserWarning, match="new architectures"):
        out = search.evolve(SMALL, quality, budget(tight), population=100, max_draws=3000)
    assert len(out) == len({c.arch for c in out}) < len(fits) and {c.arch for c in out} <= set(fits)


def all_archs(space):
    return (f"{L}-{d}-{f}-{h}-{64 * h}" for L in space.layers for d in space.hidden for f in space.ffn
            for h in space.heads)


def test_random_search_scores_n_distinct_archs_within_budget():
    score = Counted(quality)
    out = search.random_search(SMALL, score, budget(), n=60, seed=3)
    assert len(out) == 60 and len(score.calls) == 60 and all(c.latency <= BUDGET for c in out)
    assert out == search.random_search(SMALL, quality, budget(), n=60, seed=3)


@pytest.mark.parametrize("space", [PRETRAIN_SPACE, KD_SPACE, SMALL], ids=["pretrain", "kd", "small"])
def test_mutate_moves_a_step_or_two_inside_the_space(space):
    rng = random.Random(0)
    for _ in range(300):
        a = space.sample(rng)
        b = search.mutate(a, space, rng)
        assert b != a and b in space  # the pre-training space's qkv stays 64 x heads, the KD space's on its grid
        for d in search.free_dims(space):
            assert abs(space.choices(d).index(getattr(a, d)) - space.choices(d).index(getattr(b, d))) <= 2
        assert search.mutate(a, space, rng, scale=0.1) in space
    assert "qkv" in search.free_dims(KD_SPACE) and "heads" not in search.free_dims(KD_SPACE)
    with pytest.raises(ValueError, match="not in the search space"):
        search.mutate(Arch(9, 64, 64, 1, 64), SMALL, rng)


def test_roulette_is_proportional_and_shifts_negative_scores():
    rng = random.Random(0)
    pos = [Candidate(Arch(1, 64, 64, 1, 64), 1.0, 1.0), Candidate(Arch(2, 64, 64, 1, 64), 3.0, 1.0)]
    picks = Counter(search.roulette(pos, rng).score for _ in range(4000))
    assert abs(picks[3.0] / 4000 - 0.75) < 0.03  # P proportional to the raw score, as written
    neg = [Candidate(a.arch, c, 1.0) for a, c in zip(pos * 2, (-5.0, -4.0, -3.0, -4.0))]
    picks = Counter(search.roulette(neg, rng).score for _ in range(4000))
    assert picks[-5.0] == 0 and abs(picks[-3.0] / 4000 - 0.5) < 0.03  # weights 0, 1, 2, 1
    same = [Candidate(a.arch, -2.0, 1.0) for a in pos]
    assert {search.roulette(same, rng).arch for _ in range(100)} == {a.arch for a in pos}


@pytest.mark.parametrize("space", [PRETRAIN_SPACE, KD_SPACE], ids=["pretrain", "kd"])
@pytest.mark.parametrize("speedup", [4, 10, 30])
def test_fast_candidates_follow_the_rule_and_sit_nearest_the_budget(space, speedup):
    ms = flops_ms(Arch(12, 768, 3072, 12, 768)) / speedup
    archs = search.fast_candidates(space, budget(ms, space))
    assert len({a.layers for a in archs}) == len(archs) >= 3  # one per layer count
    assert search.FFN_RULE == (1.6, 1.9) and search.QKV_RULE == (0.7, 1.0)  # §4.4: df / dm and dqkv / dm
    for a in archs:
        assert a in space and flops_ms(a) <= ms
        assert 1.6 * a.hidden <= a.ffn <= 1.9 * a.hidden and 0.7 * a.hidden <= a.qkv <= a.hidden
    if space is PRETRAIN_SPACE:  # brute force: no arch of the rule with as many layers comes nearer the budget
        for a in archs:
            nearest = max(flops_ms(b) for b in rule_archs(space, a.layers) if flops_ms(b) <= ms)
            assert flops_ms(a) == pytest.approx(nearest)
    score = Counted(quality)
    out = search.fast_search(space, score, budget(ms, space))
    assert {c.arch for c in out} == set(archs) and len(score.calls) == len(archs)


def rule_archs(space, layers):
    for hidden in space.hidden:
        for ffn in (f for f in space.ffn if 1.6 * hidden <= f <= 1.9 * hidden):
            for heads in space.heads:
                if 0.7 * hidden <= 64 * heads <= hidden:
                    yield Arch(layers, hidden, ffn, heads, 64 * heads)


class Stop(Exception):
    pass


@pytest.mark.parametrize("method, after", [("evolve", 50), ("evolve-elite", 50), ("random", 37), ("evolve", 60)])
def test_resume_equals_the_uninterrupted_search(method, after):
    """A run killed after `after` evaluations (50: after generation 2) and resumed from the scores it saved."""
    whole = search.METHODS[method](SMALL, quality, budget(), seed=7)
    saved = {}

    def dies(arch):
        if len(saved) == after:
            raise Stop
        saved[arch] = quality(arch)
        return saved[arch]

    with pytest.raises(Stop):
        search.METHODS[method](SMALL, dies, budget(), seed=7)
    score = Counted(quality)
    assert search.METHODS[method](SMALL, score, budget(), seed=7, cache=saved) == whole
    assert not set(score.calls) & set(saved) and len(score.calls) == len(whole) - after


# ----------------------------------------------------------------------------- a trained tiny SuperPLM end to end

WORDS = ("the a cat dog bird fish tree house river city runs sits eats sees red blue green small big old new quick "
         "slow and but in on of to with is was good bad man woman child book car road").split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-64-128-2-64 SuperPLM briefly trained with Algorithm 1 on a small generated corpus, and a latency
    predictor fitted on the synthetic latency of its space."""
    root = tmp_path_factory.mktemp("search")
    rng = random.Random(0)
    topics = [WORDS[i::6] for i in range(6)]  # a line's words come from one topic: the context tells which
    lines = [" ".join(rng.choices(rng.choice(topics), k=12)) + " ." for _ in range(1500)]
    (root / "corpus.txt").write_text("\n\n".join(lines) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = superplm.Config(corpus=str(root / "corpus.txt"), vocab_size=200, seq_len=32, cache_dir=str(root / "cache"),
                          out=str(root / "superplm"), superplm_arch="2-64-128-2-64", batch_size=32, lr=3e-3,
                          steps=300, save_every=300, log_every=1000, dropout=0.0)
    superplm.run(cfg)
    model, space, _ = load_superplm(root / "superplm")
    archs = list({space.sample(rng) for _ in range(200)})
    ref = flops_ms(latency.REFERENCE)
    predictor = latency.LatencyPredictor.fit(archs, torch.tensor([flops_ms(a) / ref for a in archs]).numpy(), ref,
                                             flops_ms(BERT_BASE), dict(cpu=latency.cpu_model(), seq_len=128, batch=1),
                                             steps=300)
    predictor.save(root / "latency.pt")
    yield root, model, space, cfg
    torch.set_num_threads(threads)


def test_mlm_evaluator_prefers_the_full_superplm_to_one_layer(trained):
    root, model, space, cfg = trained
    score = search.MLMScore(model, root / "superplm" / "tokenizer.json", cfg.corpus, cfg.seq_len, cfg.cache_dir,
                            rows=64)
    full, one, smallest = (score(a) for a in (space.largest(), Arch(1, 32, 64, 1, 32), space.smallest()))
    assert full > one + 0.1 > smallest + 0.2  # -(masked-LM loss): the full 2-64-128 learned the topics best
    assert score.metrics[space.largest()]["mlm_acc"] > score.metrics[space.smallest()]["mlm_acc"]
    assert score(space.largest()) == full  # fixed masks: the same score every time



def small_corpus(path, lines, seed=1):
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choices(WORDS, k=12)) + " ." for _ in range(lines)) + "\n")
    return str(path)


def test_mlm_evaluator_scores_the_held_out_rows_a_small_corpus_has(trained, tmp_path):
    """A corpus of 299 sequences holds out 29 (data.split): --eval-rows 256 scores those 29, as asking for 29 does;
    a corpus too small to hold any out is one line."""
    root, model, space, cfg = trained
    tokenizer = root / "superplm" / "tokenizer.json"
    corpus = small_corpus(tmp_path / "small.txt", 640)
    lines = Path(corpus).read_text().split("\n\n")
    assert {len(load_tokenizer(tokenizer).encode(line, add_special_tokens=False).ids) for line in lines} == {13}
    # By hand: 640 lines of 13 tokens (12 words and '.') with a [SEP] between two, 30 per row ([CLS] ... [SEP] of
    # --seq-len 32): 640 x 13 + 639 = 8959 tokens, 299 rows (the last one padded), of which the last tenth, 29, are
    # held out.
    assert len(build_dataset(corpus, load_tokenizer(tokenizer), cfg.seq_len, cfg.cache_dir)) == 299
    score = search.MLMScore(model, tokenizer, corpus, cfg.seq_len, cfg.cache_dir, rows=256, batch_size=8)
    assert sum(len(b["input_ids"]) for b in score.batches) == 29
    exact = search.MLMScore(model, tokenizer, corpus, cfg.seq_len, cfg.cache_dir, rows=29, batch_size=8)
    assert score(space.largest()) == exact(space.largest())
    tiny = small_corpus(tmp_path / "tiny.txt", 10)
    with pytest.raises(UserError, match=r"gives \d packed sequences, which leaves 0 held-out ones to score"):
        search.MLMScore(model, tokenizer, tiny, cfg.seq_len, cfg.cache_dir)


def test_cli_a_target_every_architecture_meets_and_one_none_meets(trained, tmp_path, capsys):
    root = trained[0]
    corpus = small_corpus(tmp_path / "small.txt", 640)
    args = ["--superplm", root / "superplm", "--latency", root / "latency.pt", "--generations", 1, "--population", 3,
            "--eval-corpus", corpus, "--device", "cpu"]
    for target in ("1000ms", "7x"):  # every architecture is faster: refused before any work, not searched whole
        with pytest.raises(SystemExit):
            search.run_main(lambda: run_cli(*args, "--target", target, "--out", tmp_path / "all"))
        err = capsys.readouterr().err
        assert err.startswith(f"error: --target {target}: every architecture of the 2-64-128-2-64 SuperPLM is "
                              "faster") and "it supports targets of " in err and err.count("\n") == 1
        assert "train a larger one: python superplm.py --preset tiny --superplm-arch " in err
        assert not (tmp_path / "all").exists()
    with pytest.raises(SystemExit) as e:
        search.run_main(lambda: run_cli(*args, "--target", "0.001ms", "--out", tmp_path / "none"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: no architecture of the search space meets the budget of "
                                                "0.001 ms") and err.count("\n") == 1 and "x\n" in err

def test_cli_hints_lead_to_a_searchable_target_and_never_into_a_typed_path(trained, tmp_path, capsys, monkeypatch):
    """From a fresh clone, `search.py --target 7x` names a SuperPLM that can meet 7x; a SuperPLM known to be too
    fast for it is refused before a latency predictor is made for it; a typo'd path gets the names nearest to it;
    the target is checked first."""
    root = trained[0]
    monkeypatch.chdir(tmp_path)

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            search.run_main(lambda: run_cli(*argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1
        return err

    assert error("--target", "7x") == ("error: --superplm runs/superplm: no such folder; train one (minutes): python "
                                       "superplm.py --preset tiny --superplm-arch 6-512-2048-8-512 --steps 100 "
                                       "--batch-size 16 --out runs/superplm\n")
    assert error("--target", "abc", "--superplm", "runs/none").startswith("error: latency target 'abc'")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "superplm").symlink_to(root / "superplm")
    typo = error("--superplm", "runs/superpml")
    assert "--superplm runs/superpml: no such folder; nearest under runs/: runs/superplm" in typo
    assert "--out runs/superpml" not in typo and "--out runs/superplm-2" in typo  # a free folder
    monkeypatch.setitem(search.SUPERPLMS, "2-64-128-2-64", 25.5)  # as if it were the tiny preset's SuperPLM
    assert "train a larger one: python superplm.py --preset tiny --superplm-arch 6-512-2048-8-512" in error()
    assert error("--target", "40x").startswith("error: --latency runs/predictor: no such folder; measure and fit one "
                                               "(minutes): python latency.py measure --space runs/superplm --samples "
                                               "200 --out runs/latency && python latency.py fit")


def run_cli(*argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the latency predictor was "measured" on a synthetic device
        return search.main([str(a) for a in argv])


def test_cli_searches_writes_extracts_and_resumes(trained, tmp_path, capsys):
    root, model, space, cfg = trained
    args = ["--superplm", root / "superplm", "--latency", root / "latency.pt", "--target", "2ms", "--generations", 2,
            "--population", 4, "--eval-rows", 32, "--top", 2, "--device", "cpu"]
    top = run_cli(*args, "--out", tmp_path / "a", "--extract")
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "a" / "top.json").read_text())
    scored = json.loads((tmp_path / "a" / "scored.json").read_text())
    assert [r["arch"] for r in saved["top"]] == [str(c.arch) for c in top] == [r["arch"] for r in scored[:2]]
    assert len(scored) == 8 and all(r["latency"] <= 2.0 and r["score"] == -r["mlm_loss"] for r in scored)
    assert saved["budget_ms"] == 2.0 and str(top[0].arch) in printed and "speedup" in printed
    # next: the one-shot run's preset, a third of its 300 steps, a free folder; the last line names the run folder
    assert f"--arch {top[0].arch} --preset paper --steps 100 --out runs/further" in printed
    assert printed.splitlines()[-1].startswith(f"wrote {tmp_path / 'a'}/: top.json, scored.json")
    image = png(tmp_path / "a" / "search.png")  # Figure 1 of this search: 6 x 4 inches at 120 dpi
    assert image.shape == (480, 720, 4) and pixels(image, "white") > image.shape[0] * image.shape[1] // 2
    assert pixels(image, "red") > 50 and pixels(image, "grey") > 50  # the top ones circled; the target's line
    folder = tmp_path / "a" / "top" / f"1-{top[0].arch}"  # a stand-alone BERT equal to the SuperPLM's slice
    assert (folder / "tokenizer.json").exists() and (folder / "vocab.txt").exists()
    ids = torch.randint(5, model.word.num_embeddings, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(folder).eval()(ids), model(ids, arch=top[0].arch))

    # A search killed after 5 evaluations (the 6th line torn) and resumed equals the uninterrupted one.
    (tmp_path / "b").mkdir()
    lines = (tmp_path / "a" / "candidates.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b" / "candidates.jsonl").write_text("".join(lines[:5]) + lines[5][:20])
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(search.UserError, match="--resume"):
        run_cli(*args, "--out", tmp_path / "b")
    assert run_cli(*args, "--out", tmp_path / "b", "--resume") == top
    assert json.loads((tmp_path / "b" / "scored.json").read_text()) == scored
    assert "5 scored before" in capsys.readouterr().out
    assert read_jsonl(tmp_path / "b" / "candidates.jsonl") == read_jsonl(tmp_path / "a" / "candidates.jsonl")


def test_params_evaluator_maximises_non_embedding_parameters_without_a_superplm(trained, tmp_path, capsys):
    root, model, space, _ = trained
    args = ["--latency", root / "latency.pt", "--target", "2ms", "--evaluator", "params", "--generations", 2,
            "--population", 4, "--top", 2]
    top = run_cli(*args, "--superplm", root / "superplm", "--out", tmp_path / "a")  # the SuperPLM's space
    scored = json.loads((tmp_path / "a" / "scored.json").read_text())
    assert len(scored) == 8 and all(Arch.parse(r["arch"]) in space and r["latency"] <= 2.0 for r in scored)
    assert [r["score"] for r in scored] == [latency.params([Arch.parse(r["arch"])])[0] / 1e6 for r in scored]
    assert scored[0]["score"] == max(r["score"] for r in scored) and str(top[0].arch) == scored[0]["arch"]
    printed = capsys.readouterr().out
    assert f"next (pre-training from scratch): python superplm.py --arch {top[0].arch}" in printed
    assert json.loads((tmp_path / "a" / "top.json").read_text())["superplm"] is None  # no weights were used
    # --space names the space: no SuperPLM at all, and the same search
    again = run_cli(*args, "--superplm", tmp_path / "nothing", "--space", root / "superplm", "--out", tmp_path / "b")
    assert again == top and json.loads((tmp_path / "b" / "scored.json").read_text()) == scored
    for extra, message in ((["--extract"], "--extract copies a SuperPLM's weights"),
                           (["--evaluator", "mlm", "--space", "pretrain"], "--space is for --evaluator params")):
        with pytest.raises(UserError, match=message):
            run_cli(*args, "--superplm", root / "superplm", "--out", tmp_path / "c", *extra)


@pytest.mark.parametrize("missing, command", [("superplm", "python superplm.py"),
                                              ("latency", "python latency.py measure")])
def test_cli_names_the_command_that_makes_a_missing_input(trained, tmp_path, capsys, missing, command):
    root = trained[0]
    paths = {"superplm": root / "superplm", "latency": root / "latency.pt", missing: tmp_path / "nothing"}
    with pytest.raises(SystemExit) as e:
        search.run_main(lambda: run_cli("--superplm", paths["superplm"], "--latency", paths["latency"], "--out",
                                        tmp_path / "out"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and command in err
    assert not (tmp_path / "out").exists()  # a failed start leaves nothing behind


def write_finetune_data(root, seed=1):
    """Tiny MNLI (GLUE layout) and SQuAD v1.1 (official JSON) folders in root/MNLI and root/SQuAD."""
    rng = random.Random(seed)
    labels = ("entailment", "neutral", "contradiction")
    for stem in ("train", "dev_matched", "dev_mismatched"):
        rows = [["index", "sentence1", "sentence2", "gold_label"]] + [
            [i, " ".join(rng.choices(WORDS, k=6)), " ".join(rng.choices(WORDS, k=4)), rng.choice(labels)]
            for i in range(24)]
        (root / "MNLI").mkdir(exist_ok=True)
        (root / "MNLI" / f"{stem}.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    for which in ("train", "dev"):
        paragraphs = []
        for i in range(12):
            words = rng.choices(WORDS, k=10)
            context, answer = " ".join(words), words[4]
            paragraphs.append(dict(context=context, qas=[dict(id=f"{which}{i}", question="which word is fifth",
                                                              answers=[dict(text=answer,
                                                                            answer_start=context.index(
                                                                                " " + answer + " ") + 1)])]))
        (root / "SQuAD").mkdir(exist_ok=True)
        (root / "SQuAD" / f"{which}-v1.1.json").write_text(json.dumps(dict(version="1.1", data=[
            dict(title="t", paragraphs=paragraphs)])))
    return root / "MNLI", root / "SQuAD"


def test_finetune_evaluator_averages_mnli_accuracy_and_squad_f1(trained, tmp_path):
    root, model, space, _ = trained
    mnli, squad = write_finetune_data(tmp_path)
    cfg = search.Config(mnli_data=str(mnli), squad_data=str(squad), ft_epochs=1, ft_train_examples=0,
                        ft_eval_examples=0, device="cpu")
    score = search.FinetuneScore(model, root / "superplm" / "tokenizer.json", tmp_path / "work", cfg)
    arch = Arch(1, 32, 64, 1, 32)
    value = score(arch)
    m = score.metrics[arch]
    assert value == (m["mnli_acc"] + m["squad_f1"]) / 2 and 0 <= m["mnli_acc"] <= 100 and 0 <= m["squad_f1"] <= 100
    assert not any((tmp_path / "work").iterdir())  # the extracted candidate is not left behind


@pytest.mark.slow
def test_two_workers_share_the_finetune_search_and_equal_one_process(trained, tmp_path):
    """torchrun (gloo, 2 CPU workers): each scores its share of every generation; the files equal one process's,
    and a resumed two-worker search replays what was scored."""
    root = trained[0]
    mnli, squad = write_finetune_data(tmp_path)
    args = ["--superplm", root / "superplm", "--latency", root / "latency.pt", "--target", "2ms", "--generations", 2,
            "--population", 3, "--evaluator", "finetune", "--mnli-data", mnli, "--squad-data", squad,
            "--ft-train-examples", 0, "--ft-eval-examples", 0, "--device", "cpu", "--dtype", "fp32"]
    args = [str(a) for a in args]
    one = subprocess_search(args + ["--out", str(tmp_path / "one")])
    two = subprocess_search(args + ["--out", str(tmp_path / "two")], workers=2)
    assert "on 1 worker(s), cpu fp32" in one and "on 2 worker(s), cpu fp32" in two
    assert one.count("mnli best") == two.count("mnli best") == 6  # each candidate fine-tuned once, not per worker
    for name in ("candidates.jsonl", "scored.json", "top.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    scored = json.loads((tmp_path / "one" / "scored.json").read_text())
    assert len(scored) == 6 and len({r["score"] for r in scored}) > 1  # real, different fine-tuning scores
    assert all(r["score"] == (r["mnli_acc"] + r["squad_f1"]) / 2 for r in scored)
    # Killed after 3 candidates: two workers resume, replay those 3 and score the other 3.
    lines = (tmp_path / "two" / "candidates.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "two" / "candidates.jsonl").write_text("".join(lines[:3]))
    again = subprocess_search(args + ["--out", str(tmp_path / "two"), "--resume"], workers=2)
    assert "3 scored before, replayed" in again
    assert again.count("mnli best") == 3
    for name in ("candidates.jsonl", "scored.json", "top.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name


def subprocess_search(args, workers=0):
    root = Path(search.__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root), PYTHONWARNINGS="ignore")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}"] \
        if workers else [sys.executable]
    done = subprocess.run(launcher + [str(root / "search.py"), *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
def test_sigterm_keeps_the_scored_candidates_and_resume_ends_as_an_uninterrupted_search(trained, tmp_path,
                                                                                        monkeypatch, capsys):
    root = trained[0]
    args = ["--superplm", root / "superplm", "--latency", root / "latency.pt", "--target", "2ms", "--generations", 2,
            "--population", 4, "--eval-rows", 32, "--device", "cpu"]
    top = run_cli(*args, "--out", tmp_path / "whole")
    score, calls = search.MLMScore.__call__, []

    def preempted(self, arch):  # SIGTERM arrives while the third candidate is scored
        calls.append(arch)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return score(self, arch)

    monkeypatch.setattr(search.MLMScore, "__call__", preempted)
    with pytest.raises(KeyboardInterrupt, match="3 scored candidates kept") as e:
        run_cli(*args, "--out", tmp_path / "cut")
    assert str(e.value).endswith(f"resume with: python search.py --out {tmp_path / 'cut'} --resume")
    assert len(read_jsonl(tmp_path / "cut" / "candidates.jsonl")) == 3 == len(calls)
    monkeypatch.setattr(search.MLMScore, "__call__", score)
    assert run_cli("--out", tmp_path / "cut", "--resume") == top  # the printed command: its settings are saved
    assert read_jsonl(tmp_path / "cut" / "candidates.jsonl") == read_jsonl(tmp_path / "whole" / "candidates.jsonl")
    record = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert record["config"]["resume"] and record["status"] == "finished"  # --resume itself is not a setting:
    assert parse_flags(search.Config, ["--config", str(tmp_path / "cut" / "config.json")]) == \
        search.Config(**dict(record["config"], resume=False))
    with pytest.raises(search.UserError, match="no run to resume"):
        run_cli(*args, "--out", tmp_path / "empty", "--resume")
    assert not (tmp_path / "empty").exists()
