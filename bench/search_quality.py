"""Search quality at equal evaluations: regret to the known best architecture and win rate against random search.

Methods: Algorithm 2 with the paper's settings (search.evolve: T = 4, S = 25, pm = pe = 1/2), evolve-elite (our
default) and its ablation without the latency window, random search with and without that window, and
AutoTinyBERT-Fast (§4.4).

Synthetic (default): the paper's pre-training space (Table B.1, 11.4M archs) is brute-forced in numpy for every
objective. The objective is GLUE-like: it grows with the parameter count with diminishing returns, loses points for
shapes away from a preferred ffn/hidden, qkv/hidden and hidden/layers ratio (drawn anew for every seed, so the
§4.4 rule is not baked in), and carries a fixed per-arch noise of 0.3 points (fine-tuning seeds). Latency is a
FLOPs model of one 128-token input (Eq. 1-3) plus per-layer and per-head overheads, so BERT-base = 1x.
Regret is measured on the noise-free objective of the arch each search ranks first.

mlm (--superplm): the real mlm evaluator of a trained SuperPLM, brute-forced over a grid of its space (every layer
and head count, --grid values of hidden and of ffn), with 4 x 10 evaluations as the grid is small; it has no noise.

    python bench/search_quality.py                      # synthetic: 20 seeds x 4 targets, ~1-3 min
    python bench/search_quality.py --superplm toy       # + the mlm evaluator of a toy SuperPLM trained here, ~8 min
    python bench/search_quality.py --superplm runs/superplm-tiny --grid 7    # + any pre-training SuperPLM's
"""

import dataclasses
import json
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import search  # noqa: E402
import superplm  # noqa: E402
from common import UserError, config_from_args, config_parser, run_main, save_json, torch_load  # noqa: E402
from model import BERT_BASE, PRETRAIN_SPACE, Arch, SearchSpace  # noqa: E402
from superplm import checkpoint_path, load_superplm  # noqa: E402


@dataclass
class Config:
    seeds: int = field(default=20, metadata={"help": "objective instances (and search seeds) per target"})
    targets: list[float] = field(default_factory=lambda: [4.0, 7.0, 15.0, 30.0],
                                 metadata={"help": "speedups over BERT-base (Table 4 spans 4x-30x)"})
    noise: float = field(default=0.3, metadata={"help": "synthetic: std of the fixed per-arch noise (points)"})
    superplm: str = field(default="", metadata={
        "help": "also study the mlm evaluator of this SuperPLM run; 'toy': train a 4-64-256-4-64 SuperPLM on a "
                "generated topic corpus first (~2 min, kept in bench/out/toy-superplm)"})
    grid: int = field(default=10, metadata={"help": "mlm: values of hidden and of ffn on the brute-forced grid"})
    mlm_generations: int = field(default=4, metadata={"help": "mlm: T (random search scores T x S)"})
    mlm_population: int = field(default=10, metadata={"help": "mlm: S, smaller than 25 as the grid is small"})
    mlm_budgets: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7], metadata={
        "help": "mlm: latency budgets as quantiles of the grid's latencies"})
    eval_rows: int = field(default=64, metadata={"help": "mlm: sequences per evaluation"})
    cache: str = field(default="bench/out/mlm_table.json", metadata={"help": "mlm: brute-force scores kept here"})
    out: str = field(default="bench/out/search_quality.json", metadata={"help": "results (JSON)"})


# Every method at 100 scored archs (Fast: one per layer count). The ablations separate evolve-elite's changes.
METHODS = {
    "evolve (Algorithm 2)": search.evolve,
    "evolve-elite": search.evolve_elite,
    "  elite w/o window": partial(search.evolve_elite, window=0.0),
    "random": search.random_search,
    "random + window": partial(search.random_search, window=search.ELITE["window"]),
    "fast (§4.4)": search.fast_search,
}

# ----------------------------------------------------------------------------- the synthetic objective


def latency_ms(L, d, f, h, q, T=128):
    """FLOPs of one T-token input (Eq. 1-3: QKV + output projections, FFN, attention) + overheads; numpy or float."""
    return 5 + L * (T * (4 * d * q + 2 * d * f) + 2 * T * T * q) / 1e7 + L * (1 + 0.1 * h)


def objective(L, d, f, h, q, rf, rq, dl):
    """GLUE-like points: diminishing returns in parameters (millions), minus squared log-distances of the shape from
    the instance's preferred ratios (ffn/hidden rf, qkv/hidden rq, hidden/layers dl) and of the head width from 64."""
    P = L * (4 * d * q + 2 * d * f) / 1e6
    return (85 - 25 * P ** -0.45 - 6 * (np.log(f / d / rf)) ** 2 - 6 * (np.log(q / d / rq)) ** 2
            - 1.5 * (np.log(d / L / dl)) ** 2 - 2 * (np.log(q / h / 64)) ** 2)


def instance(seed):
    r = random.Random(seed)
    return dict(rf=r.uniform(1.2, 2.6), rq=r.uniform(0.6, 1.1), dl=float(np.exp(r.uniform(np.log(60), np.log(200)))))


def grid_arrays(space):
    """Every arch of a (tied-qkv) space as flat arrays L, d, f, h, q."""
    axes = (np.array(space.choices(k), float) for k in ("layers", "hidden", "ffn", "heads"))
    L, d, f, h = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
    return L, d, f, h, space.head_dim * h


def of(arch):
    return arch.layers, arch.hidden, arch.ffn, arch.heads, arch.qkv


# ----------------------------------------------------------------------------- running the methods


def regrets(space, true, noisy, latency, best_at, budgets, seed, T=4, S=25):
    """{method: {target: regret}} of one objective instance; best_at(budget) is its brute-forced optimum."""
    out = {}
    for name, method in METHODS.items():
        out[name] = {}
        size = {} if "fast" in name else dict(n=T * S) if "random" in name else dict(generations=T, population=S)
        for target, budget in budgets.items():
            try:
                found = method(space, noisy, search.Budget(space, latency, budget), seed=seed, **size)
            except UserError:  # fast on a grid without an arch of its rule
                out[name][target] = (float("nan"), 0)
                continue
            out[name][target] = (best_at(budget) - true(found[0].arch), len(found))
    return out


def synthetic(cfg):
    space = PRETRAIN_SPACE
    arrays = grid_arrays(space)
    lat_all = latency_ms(*arrays)
    base = latency_ms(*of(BERT_BASE))
    budgets = {f"{t:g}x": base / t for t in cfg.targets}
    runs = []
    for seed in range(cfg.seeds):
        p = instance(seed)
        score_all = objective(*arrays, **p)

        def true(a, p=p):
            return float(objective(*of(a), **p))

        def noisy(a, p=p, seed=seed):
            return true(a, p) + random.Random(f"{seed}:{a}").gauss(0, cfg.noise)

        runs.append(regrets(space, true, noisy, lambda a: float(latency_ms(*of(a))),
                            lambda b, s=score_all: float(s[lat_all <= b].max()), budgets, seed))
    return runs


# ----------------------------------------------------------------------------- a SuperPLM's mlm evaluator


def coarse(space, n):
    """n values of hidden and of ffn (evenly spaced along their grids), every layer count and head count."""
    pick = lambda g: tuple(sorted({g[round(i * (len(g) - 1) / (n - 1))] for i in range(n)}))  # noqa: E731
    return SearchSpace(space.layers, pick(space.hidden), pick(space.ffn), space.heads, space.qkv, space.head_dim)


def toy_superplm(folder):
    """A 4-64-256-4-64 SuperPLM trained with Algorithm 1 on a corpus whose lines each draw 12 words from one of six
    topics: a masked word is guessable from its context, and bigger sub-models guess better."""
    folder = Path(folder)
    if (folder / "checkpoint.pt").exists():
        return folder
    words = ("the a cat dog bird fish tree house river city runs sits eats sees red blue green small big old new "
             "quick slow and but in on of to with is was good bad man woman child book car road").split()
    topics, rng = [words[i::6] for i in range(6)], random.Random(0)
    corpus = folder.with_name("toy-corpus.txt")
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n\n".join(" ".join(rng.choices(rng.choice(topics), k=12)) + " ." for _ in range(3000)))
    superplm.run(superplm.Config(corpus=str(corpus), vocab_size=200, seq_len=32, out=str(folder),
                                   cache_dir=str(folder.parent / "cache"), superplm_arch="4-64-256-4-64",
                                   batch_size=32, lr=3e-3, steps=600, save_every=600, log_every=200, dropout=0.0,
                                   seed=0))
    return folder


def mlm_table(cfg, space, model, tokenizer, ckpt):
    """-(masked-LM loss) of every arch of the grid, computed once and cached."""
    path = Path(cfg.cache)
    key = f"{Path(cfg.superplm).resolve()}|{ckpt['step']}|{cfg.eval_rows}|{cfg.grid}"
    if path.exists() and json.loads(path.read_text()).get("key") == key:
        return {Arch.parse(a): s for a, s in json.loads(path.read_text())["scores"].items()}
    c = ckpt["config"]
    score = search.MLMScore(model, tokenizer, c["corpus"], c["seq_len"], c["cache_dir"], cfg.eval_rows)
    archs = [search.with_values(space, dict(layers=L, hidden=d, ffn=f, heads=h))
             for L in space.layers for d in space.hidden for f in space.ffn for h in space.heads]
    t0, table = time.time(), {}
    for i, a in enumerate(archs):
        table[a] = score(a)
        if i % 200 == 0:
            print(f"mlm table: {i}/{len(archs)} archs, {time.time() - t0:.0f}s", file=sys.stderr)
    save_json(dict(key=key, scores={str(a): s for a, s in table.items()}), path)
    return table


def mlm(cfg):
    if cfg.superplm == "toy":
        cfg = dataclasses.replace(cfg, superplm=str(toy_superplm(Path(cfg.out).parent / "toy-superplm")))
    ckpt = torch_load(checkpoint_path(cfg.superplm))  # read once
    model, full_space, tokenizer = load_superplm(cfg.superplm, ckpt)
    if full_space.qkv is not None:
        raise UserError("the mlm study covers pre-training SuperPLMs (tied qkv); this one was trained by distillation")
    space = coarse(full_space, cfg.grid)
    table = mlm_table(cfg, space, model, tokenizer, ckpt)
    lat = {a: float(latency_ms(*of(a))) for a in table}
    budgets = {f"q{q:g}": float(np.quantile(list(lat.values()), q)) for q in cfg.mlm_budgets}
    runs = [regrets(space, table.__getitem__, table.__getitem__, lat.__getitem__,
                    lambda b: max(s for a, s in table.items() if lat[a] <= b), budgets, seed, cfg.mlm_generations,
                    cfg.mlm_population) for seed in range(cfg.seeds)]
    spread = np.array(list(table.values()))
    return cfg, space, runs, f"scores {spread.min():.3f} .. {spread.max():.3f}"


# ----------------------------------------------------------------------------- the table


def report(title, runs, tol):
    targets = list(next(iter(runs[0].values())))
    print(f"\n{title}: {len(runs)} seeds x targets {', '.join(targets)}")
    print(f"{'method':24s} {'evals':>5} {'mean regret':>12} {'median':>8} {f'regret<={tol:g}':>12} "
          f"{'win vs random':>14} {'win vs random+window':>21}")
    rows = {}
    for name in METHODS:
        r, rnd, rw = (np.array([[run[m][t][0] for t in targets] for run in runs])  # (seeds, targets)
                      for m in (name, "random", "random + window"))
        ok = ~np.isnan(r)  # fast has no candidate where no arch of its rule is on the grid
        if not ok.any():
            print(f"{name:24s} n/a: no architecture of the rule on this grid")
            continue
        r, rnd, rw = r[ok], rnd[ok], rw[ok]
        evals = np.mean([[run[name][t][1] for t in targets] for run in runs])
        win = lambda other: float(np.mean((r < other - 1e-9) + 0.5 * (np.abs(r - other) <= 1e-9)))  # noqa: E731
        rows[name] = dict(evals=float(evals), runs=int(ok.sum()), mean_regret=float(r.mean()),
                          median_regret=float(np.median(r)), within_tol=float(np.mean(r <= tol + 1e-9)),
                          win_vs_random=win(rnd), win_vs_random_window=win(rw))
        x = rows[name]
        print(f"{name:24s} {evals:5.0f} {x['mean_regret']:12.3f} {x['median_regret']:8.3f} {x['within_tol']:12.0%} "
              f"{x['win_vs_random']:14.0%} {x['win_vs_random_window']:21.0%}"
              + (f"  ({ok.sum()} of {ok.size} runs)" if not ok.all() else ""))
        all_r = np.array([[run[name][t][0] for t in targets] for run in runs])
        rows[name]["per_target"] = {t: float(np.nanmean(all_r[:, i])) for i, t in enumerate(targets)}
    print("regret by target: " + "; ".join(
        f"{n.strip()} " + " ".join(f"{t} {v:.2f}" for t, v in rows[n]["per_target"].items())
        for n in ("evolve (Algorithm 2)", "evolve-elite", "random")))
    return rows


def main(argv=None):
    cfg = config_from_args(Config, config_parser(Config, __doc__.split("\n")[0]).parse_args(argv))
    warnings.simplefilter("ignore")
    t0 = time.time()
    results = dict(config=dataclasses.asdict(cfg))
    results["synthetic"] = report("synthetic objective, pre-training space (11.4M archs, optimum by brute force), "
                                  f"noise {cfg.noise}", synthetic(cfg), cfg.noise)
    if cfg.superplm:
        mcfg, space, runs, spread = mlm(cfg)
        results["mlm"] = report(f"mlm evaluator of {mcfg.superplm} on a grid of its space ({space.size()} archs, "
                                f"{spread}, optimum by brute force), FLOPs latency, "
                                f"{mcfg.mlm_generations} x {mcfg.mlm_population} evaluations", runs, 0.0)
    save_json(results, cfg.out)
    print(f"\nwin = the arch the method ranks first is truly better than random search's at the same seed and target "
          f"(ties count half); {time.time() - t0:.0f}s; wrote {cfg.out}")


if __name__ == "__main__":
    run_main(main)
