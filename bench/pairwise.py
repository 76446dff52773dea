"""Does the one-shot SuperPLM rank architectures as stand-alone training does? §4.3, Table 3 and Figure 4 in miniature.

The search (§3.5) trusts a sub-model taken out of the SuperPLM, untrained further, to rank like the same architecture
trained alone. Here both are measured on the same held-out sequences (data.split: never trained on):
  one-shot     f(α): the masked-LM loss of α run inside a SuperPLM trained by Algorithm 1 for a token budget;
  stand-alone  s(α): the masked-LM loss of α trained alone from scratch, same objective, data and token budget.
Agreement is Appendix E's pairwise accuracy (Eq. 5) and Kendall's τ, over all pairs and over the pairs of similar
latency (the comparisons a latency-constrained search makes); the plot is Figure 4's one-shot against stand-alone.

The evaluated architectures span the space from small to large in levels of equal estimated cost (multiply-adds of one
128-token input, or a latency.py predictor), `--group` different shapes per level. The ablation of Table 3 at this
scale: batch-wise training (M sub-models per batch, Algorithm 1) against one sub-model per batch with M times the
steps (equal compute: as many sub-model forward/backward passes, M times the tokens), for both attention slicings
of Figure 3 ("heads" (b) and "dims" (c)). A "dims" SuperPLM keeps every head, so its architectures are the same
ones with their attention width split over all heads, and have stand-alone models of their own.

Beside the SuperPLMs, the same agreement for training-free proxies, from the same stand-alone runs: non-embedding
parameters (the proxy of LiteTransformerSearch), multiply-adds of one 128-token input (Eq. 1-3) and, with
--latency, the predictor's estimate. Each ranks a larger value as a lower loss; none trains anything.

    python bench/pairwise.py                         # tiny preset, stdlib corpus: 30-55 min on 2 CPU cores
    python bench/pairwise.py --resume                # continue a stopped study: finished runs are skipped
    python bench/pairwise.py --preset paper --tokens 200_000_000 --train-args "--corpus wiki.txt --lr 1e-4"  # GPU
"""

import dataclasses
import json
import os
import platform
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import latency  # noqa: E402
import superplm  # noqa: E402
from common import UserError, append_jsonl, parse_flags, read_jsonl, resolve_compute, run_main, save_json  # noqa: E402
from data import prepare, split  # noqa: E402
from model import Arch  # noqa: E402
from search import MLMScore  # noqa: E402

PAPER = {"HAT baseline": 90.0, "ILS": 91.6, "ILS + SME": 94.2, "ILS + SME + EBL (ours)": 96.7}  # Table 3, %


@dataclass
class Study:
    """The settings every study of bench/ starts with: the superplm.py runs it trains (see study_config)."""
    preset: str = field(default="tiny", metadata={"help": "superplm.py preset of every training run",
                                                  "choices": list(superplm.PRESETS)})
    train_args: str = field(default="", metadata={"help": "more superplm.py flags for every run"})


@dataclass
class Config(Study):
    train_args: str = field(default="", metadata={
        "help": "more superplm.py flags for every run, e.g. \"--corpus my.txt --superplm-arch 6-384-1536-6-384 "
                "--batch-size 64\" (this study sets --out, --arch, --mha, --sub-models, --steps)"})
    tokens: int = field(default=819_200, metadata={
        "help": "token budget: the batch-wise SuperPLMs and every stand-alone model train on this many tokens "
                "(rounded to whole batches; the default is 400 steps of the tiny preset)"})
    sub_models: int = field(default=3, metadata={"help": "M of Algorithm 1 for the batch-wise SuperPLMs (the "
                                                         "paper's)", "aliases": ("samples",), "min": 1})
    ablation: bool = field(default=True, metadata={
        "help": "also train SuperPLMs with one sub-model per batch and M x the steps (Table 3's EBL ablation)"})
    mha: list[str] = field(default_factory=lambda: ["heads", "dims"], metadata={
        "help": "attention slicings to study (Figure 3: heads (b), dims (c))", "choices": ["heads", "dims"]})
    archs: int = field(default=12, metadata={"help": "architectures evaluated (a multiple of --group)"})
    group: int = field(default=3, metadata={"help": "architectures per latency level: different shapes, similar "
                                                    "estimated latency"})
    latency: str = field(default="", metadata={"help": "a latency.py predictor to level architectures by; empty: "
                                                       "by multiply-adds of one 128-token input (Eq. 1-3)"})
    pool: int = field(default=20000, metadata={"help": "architectures sampled to pick the evaluated ones from"})
    eval_batch: int = field(default=32, metadata={"help": "held-out sequences per forward pass when scoring"})
    seed: int = field(default=0, metadata={"help": "seeds the choice of architectures, weights, data order, masks"})
    out: str = field(default="bench/out/pairwise", metadata={"help": "study folder: runs, results.json, PNG"})
    resume: bool = field(default=False, metadata={"help": "continue the study in --out (finished runs are kept)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the study in --out"})


# ----------------------------------------------------------------------------- Appendix E


def pairwise_accuracy(f, s, groups=None):
    """Eq. 5: the share of pairs of architectures that the one-shot scores f and the stand-alone scores s order the
    same way (higher is better in both). A pair counts when 1[f_i >= f_j] = 1[s_i >= s_j], as in the code of Luo et
    al. (2018) that §4.3 cites; that test is taken in both orientations of the pair and averaged, so that a tie on
    one side only earns half a pair, a tie on both sides a whole one, whatever the order of the list (without ties
    this is exactly Eq. 5). groups: only the pairs within the same group count."""
    f, s = np.asarray(f, dtype=np.float64), np.asarray(s, dtype=np.float64)
    if f.shape != s.shape or f.ndim != 1 or len(f) < 2:
        raise ValueError(f"pairwise accuracy needs two score lists of one length >= 2, got {f.shape} and {s.shape}")
    agree = ((f[:, None] >= f[None, :]) == (s[:, None] >= s[None, :])).astype(np.float64)  # (n, n): (i, j) one way
    credit = (agree + agree.T) / 2  # (n, n): both orientations
    i, j = np.triu_indices(len(f), 1)  # every unordered pair once
    if groups is not None:
        g = np.asarray(groups)
        i, j = i[g[i] == g[j]], j[g[i] == g[j]]
    return float(credit[i, j].mean()) if len(i) else float("nan")


def n_pairs(groups=None, n=None):
    """The pairs pairwise_accuracy counts: n(n-1)/2, or within the groups."""
    sizes = [n] if groups is None else list(np.unique(groups, return_counts=True)[1])
    return int(sum(k * (k - 1) // 2 for k in sizes))


# ----------------------------------------------------------------------------- the evaluated architectures


def shape_coords(archs, space):
    """(N, 4) position of each arch along the grids of layers, hidden, ffn, heads (0 = smallest, 1 = largest)."""
    dims = ("layers", "hidden", "ffn", "heads" if len(space.heads) > 1 else "qkv")
    return np.array([[space.choices(d).index(getattr(a, d)) / max(1, len(space.choices(d)) - 1) for d in dims]
                     for a in archs])


def pick_archs(space, n, group, cost, seed=0, pool=20000, keep=None):
    """n archs in n/group levels of cost, log-spaced from the pool's 1st to its 99th percentile (small to large).
    A level takes the arch nearest its cost, then, among the archs within 10% of it, repeatedly the one farthest in
    shape from those taken (deep and narrow against shallow and wide): similar latency, different shapes.
    cost(list of archs) -> array; keep(arch) -> bool filters the pool. Returns [(arch, level)]."""
    if n < 2 or group < 1 or n % group:
        raise UserError(f"--archs {n} must be at least 2 and a multiple of --group {group}")
    rng = random.Random(seed)
    cands = sorted({a for a in (space.sample(rng) for _ in range(pool)) if keep is None or keep(a)})
    if len(cands) < n:
        raise UserError(f"the space gives only {len(cands)} distinct archs in --pool {pool}: raise --pool or lower "
                        "--archs")
    c = np.log(np.asarray(cost(cands), dtype=np.float64))  # (N,)
    x = shape_coords(cands, space)  # (N, 4)
    taken, out = set(), []
    for level, t in enumerate(np.linspace(*np.quantile(c, [0.01, 0.99]), n // group)):
        order = [k for k in np.argsort(np.abs(c - t), kind="stable") if k not in taken]
        near = [k for k in order if abs(c[k] - t) <= np.log(1.1)]
        near = near if len(near) >= group else order[:group]  # a sparse level: the nearest archs, whatever shape
        chosen = [near[0]]
        while len(chosen) < group:
            spread = [np.min(np.abs(x[k] - x[chosen]).sum(1)) for k in near]  # L1 distance to the nearest taken
            chosen.append(near[int(np.argmax(spread))])
        taken.update(chosen)
        out += [(cands[k], level) for k in chosen]
    return out


def as_dims(arch, space):
    """The same arch under the "dims" slicing: its attention width split over all of the space's heads."""
    return Arch(arch.layers, arch.hidden, arch.ffn, space.heads[0], arch.qkv)


# ----------------------------------------------------------------------------- training and scoring


def variants(cfg, steps):
    """Table 3's rows at this scale: (name, mha, M, optimizer steps, label)."""
    out = []
    for mha in cfg.mha:
        out.append((f"{mha}-m{cfg.sub_models}", mha, cfg.sub_models, steps,
                    f"{mha}, batch-wise M={cfg.sub_models} (Alg. 1)"))
        if cfg.ablation:
            out.append((f"{mha}-m1", mha, 1, cfg.sub_models * steps,
                        f"{mha}, one sub-model per batch ({cfg.sub_models}x steps)"))
    return out


def scores(model, archs, base, tok_path, rows, cfg):
    """{arch: dict(mlm_loss, mlm_acc)} of each arch run inside `model` on the held-out rows, fixed masks."""
    evaluator = MLMScore(model, tok_path, base.corpus, base.seq_len, base.cache_dir, rows, cfg.eval_batch, cfg.seed,
                         resolve_compute())
    for a in archs:
        evaluator(a)
    return {str(a): evaluator.metrics[a] for a in archs}


def run(name, out, done, base, archs, tok_path, rows, cfg, **changes):
    """Train one superplm.py run in OUT/name (continuing it if stopped) and score `archs` in it: a run already in
    runs.jsonl is skipped. Returns its record."""
    if name in done:
        return done[name]
    t0 = time.time()
    again = (out / name / "checkpoint.pt").exists()  # a run stopped part-way continues
    model = superplm.run(dataclasses.replace(base, out=str(out / name), resume=again, overwrite=not again,
                                               **changes))
    train_s = time.time() - t0
    record = dict(run=name, steps=changes["steps"], samples=changes["sub_models"], train_s=train_s,
                  tokens=changes["steps"] * base.batch_size * base.seq_len,
                  scores=scores(model, archs, base, tok_path, rows, cfg))
    append_jsonl(out / "runs.jsonl", record)
    done[name] = record
    loss = " ".join(f"{v['mlm_loss']:.3f}" for v in record["scores"].values())
    print(f"== {name}: {record['steps']} steps in {train_s:.0f}s; held-out masked-LM loss {loss}", flush=True)
    return record


# ----------------------------------------------------------------------------- results

# The training-free proxies beside the one-shot SuperPLM (info["proxies"]): larger predicts a lower loss.
PROXIES = {"params": "non-embedding parameters", "macs": "multiply-adds, 128 tokens", "latency": "predicted latency"}


def agreement(f, s, levels):
    """Eq. 5 over all pairs and within each latency level, and Kendall's tau, of scores f against s."""
    return dict(pairwise=pairwise_accuracy(f, s), pairs=n_pairs(n=len(f)), tau=latency.kendall_tau(f, s),
                pairwise_same_latency=pairwise_accuracy(f, s, levels), pairs_same_latency=n_pairs(levels))


def summarize(picked, sets, done, cfg, steps, info):
    """Table 3 at this scale: for each variant trained so far, its agreement with the stand-alone models; then the
    same for each training-free proxy, on every slicing whose stand-alone models are all trained."""
    levels = [lv for _, lv in picked]
    rows = []
    for name, mha, M, n_steps, label in variants(cfg, steps):
        stand, sup = [done.get(f"standalone-{a}") for a in sets[mha]], done.get(f"superplm-{name}")
        if sup is None or None in stand:
            continue
        one_shot = [sup["scores"][str(a)]["mlm_loss"] for a in sets[mha]]
        alone = [r["scores"][str(a)]["mlm_loss"] for r, a in zip(stand, sets[mha])]
        f, s = -np.asarray(one_shot), -np.asarray(alone)  # scores: higher is better
        rows.append(dict(variant=name, label=label, mha=mha, samples=M, steps=n_steps, tokens=sup["tokens"],
                         **agreement(f, s, levels),
                         archs=[dict(arch=str(a), level=lv, one_shot=o, stand_alone=al)
                                for a, lv, o, al in zip(sets[mha], levels, one_shot, alone)]))
    for mha in cfg.mha:
        stand = [done.get(f"standalone-{a}") for a in sets[mha]]
        if None in stand:
            continue
        alone = [r["scores"][str(a)]["mlm_loss"] for r, a in zip(stand, sets[mha])]
        for name in (p for p in PROXIES if p in info["proxies"]):
            proxy = [info["proxies"][name][str(a)] for a in sets[mha]]
            rows.append(dict(variant=f"{mha}-{name}", label=f"{mha} archs: {PROXIES[name]}", mha=mha, samples=0,
                             steps=0, tokens=0, **agreement(proxy, -np.asarray(alone), levels),
                             archs=[dict(arch=str(a), level=lv, proxy=v, stand_alone=al)
                                    for a, lv, v, al in zip(sets[mha], levels, proxy, alone)]))
    return rows


def print_table(rows, picked, sets, done, info):
    print(f"\nper architecture: held-out masked-LM loss (lower is better), level = similar {info['cost']}")
    names = [r["variant"] for r in rows if r["steps"]]
    for mha, archs in sets.items():
        print(f"{'level':>5} {'arch (' + mha + ')':22} {info['cost']:>10} {'ms':>7} {'params M':>8} "
              f"{'stand-alone':>11}"
              + "".join(f" {n:>10}" for n in names if n.startswith(mha)))
        for (_, lv), a in zip(picked, archs):
            alone = done.get(f"standalone-{a}", {}).get("scores", {}).get(str(a), {}).get("mlm_loss", float("nan"))
            print(f"{lv:>5} {str(a):22} {info['arch_cost'][str(a)]:10.3g} {info['arch_ms'][str(a)]:7.2f} "
                  f"{info['proxies']['params'][str(a)] / 1e6:8.3f} {alone:11.3f}"
                  + "".join(f" {done['superplm-' + n]['scores'][str(a)]['mlm_loss']:10.3f}"
                            for n in names if n.startswith(mha)))
    print(f"\npairwise accuracy (Eq. 5) and Kendall tau against stand-alone training, {info['n_archs']} archs: the "
          "one-shot SuperPLMs, then the proxies counted without training (larger predicts better)")
    print(f"{'proxy':44} {'steps':>6} {'tokens':>9} {'pairwise':>15} {'same latency':>15} {'tau':>6}")
    for r in rows:
        cost = f"{r['steps']:6d} {r['tokens']:9,d}" if r["steps"] else f"{'-':>6} {'-':>9}"
        print(f"{r['label']:44} {cost} {r['pairwise']:7.1%} ({r['pairs']:3d} pairs) "
              f"{r['pairwise_same_latency']:7.1%} ({r['pairs_same_latency']:2d} p.) {r['tau']:6.3f}")
    print("paper (Table 3, 16 BERT sizes, SQuAD/MNLI after fine-tuning): "
          + ", ".join(f"{k} {v}%" for k, v in PAPER.items()))


def figure(rows, path):
    """Figure 4: one-shot against stand-alone, one panel per SuperPLM variant."""
    fig = Figure(figsize=(4 * len(rows), 4))  # matplotlib's object API: no pyplot state, no display backend
    axes = fig.subplots(1, len(rows), squeeze=False)
    for ax, r in zip(axes[0], rows):
        x = [a["stand_alone"] for a in r["archs"]]
        y = [a["one_shot"] for a in r["archs"]]
        dots = ax.scatter(x, y, c=[a["level"] for a in r["archs"]], cmap="viridis", s=25)
        for a in r["archs"]:
            ax.annotate(a["arch"], (a["stand_alone"], a["one_shot"]), fontsize=5, xytext=(3, 2),
                        textcoords="offset points")
        lo, hi = min(x + y), max(x + y)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)  # y = x
        ax.set(xlabel="stand-alone masked-LM loss", ylabel="one-shot masked-LM loss",
               title=f"{r['label']}\npairwise {r['pairwise']:.1%}, tau {r['tau']:.2f}")
        ax.title.set_fontsize(8)
    fig.colorbar(dots, ax=axes[0, -1], label="latency level (0: smallest)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def report(out, picked, sets, done, cfg, steps, info, t0):
    rows = summarize(picked, sets, done, cfg, steps, info)
    print_table(rows, picked, sets, done, info)
    train_s = sum(r["train_s"] for r in done.values())
    save_json(dict(config=dataclasses.asdict(cfg), info=info, variants=rows, runs=list(done.values()),
                   train_s=train_s, session_s=time.time() - t0, paper_table3=PAPER), out / "results.json")
    one_shot = [r for r in rows if r["steps"]]
    made = [out / "results.json"] + ([figure(one_shot, out / "pairwise.png")] if one_shot else [])
    print(f"training time of all runs {train_s / 60:.1f} min; this session {(time.time() - t0) / 60:.1f} min; "
          f"wrote {', '.join(str(p) for p in made if p)}", flush=True)
    return rows


# ----------------------------------------------------------------------------- the study


MADE = ("config.json", "runs.jsonl", "results.json", "pairwise.png")


def fresh_out_dir(out, resume=None, overwrite=False, marker=None):
    """The study's folder, never silently overwritten: an existing one needs --resume or --overwrite. (A study
    holds many runs, each a RunFolder of its own; this guards the study around them.)"""
    out = Path(out)
    taken = out.exists() and any(out.iterdir()) if marker is None else (out / marker).exists()
    if resume and not taken:
        raise UserError(f"--resume: {out} holds nothing to resume: drop --resume to start")
    if taken and not (resume or overwrite):
        how = "pass --resume to continue it, --overwrite to replace it" if resume is not None else \
            "pass --overwrite to replace it"
        raise UserError(f"{out} already holds a run: {how}, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def open_study(cfg, made=MADE, prefixes=("init-", "superplm-", "standalone-")):
    """The study folder; --resume needs the settings it was started with (its runs depend on them). --overwrite
    removes what a study makes (the files `made`, the runs named with `prefixes`), nothing else."""
    out = fresh_out_dir(cfg.out, cfg.resume, cfg.overwrite, marker="config.json")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "overwrite")}
    if cfg.resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        if saved != settings:
            changed = sorted(k for k in settings if saved.get(k) != settings[k])
            raise UserError(f"{out} holds a study with other settings ({', '.join(changed)}): resume it with its "
                            "own flags (see its config.json) or pass --overwrite")
    elif cfg.overwrite:  # what a study makes, nothing else
        for p in out.iterdir():
            if p.name in made or p.name.startswith(prefixes):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    save_json(settings, out / "config.json")
    return out


def study_config(cls, argv, doc):
    """(the study's config, the superplm.py config every run starts from: --preset and --train-args) from the
    command line. Every study scores masked-LM loss."""
    cfg = parse_flags(cls, argv, doc.split("\n")[0])
    base = superplm.parse_config(["--preset", cfg.preset, *shlex.split(cfg.train_args)])
    if base.objective != "mlm":
        raise UserError("this study scores masked-LM loss: drop --objective from --train-args")
    return cfg, base


def machine():
    """Where a study ran, for its results.json."""
    return dict(cpu=latency.cpu_model(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, torch=torch.__version__,
                python=platform.python_version())


def main(argv=None):
    cfg, base = study_config(Config, argv, __doc__)
    if cfg.ablation and cfg.sub_models < 2:
        raise UserError("--ablation compares M sub-models per batch with one: use --sub-models >= 2 or --no-ablation")
    t0 = time.time()
    out = open_study(cfg)
    tok_path, tok, dataset = prepare(base)
    tok_path = Path(tok_path).resolve()
    rows = len(split(dataset)[1])  # MLMScore scores the first `rows` of the held-out tail: all of it
    steps = max(1, round(cfg.tokens / (base.batch_size * base.seq_len)))
    big = Arch.parse(base.superplm_arch)
    spaces = {mha: superplm.space_for(big, mha) for mha in ("heads", "dims")}
    cost_name, cost = ("MACs", latency.macs) if not cfg.latency else \
        ("pred. ms", latency.LatencyPredictor.load(cfg.latency).predict)
    keep = (lambda a: a.qkv in spaces["dims"].qkv) if "dims" in cfg.mha else None  # archs both slicings hold
    picked = pick_archs(spaces["heads"], cfg.archs, cfg.group, cost, cfg.seed, cfg.pool, keep)
    sets = {mha: [a if mha == "heads" else as_dims(a, spaces["dims"]) for a, _ in picked] for mha in cfg.mha}
    every = [a for archs in sets.values() for a in archs]
    proxies = dict(params=latency.params, macs=latency.macs, **({"latency": cost} if cfg.latency else {}))
    info = dict(machine(), superplm=str(big), steps=steps,
                tokens=steps * base.batch_size * base.seq_len, heldout_rows=rows, seq_len=base.seq_len,
                batch_size=base.batch_size, cost=cost_name, n_archs=len(picked),
                arch_cost={str(a): float(c) for a, c in zip(every, cost(every))},
                arch_ms={str(a): latency.measure(a) for a in every},  # 1 thread, 128 tokens: as latency.py times
                proxies={name: {str(a): float(v) for a, v in zip(every, f(every))} for name, f in proxies.items()})
    print(f"pairwise study: SuperPLM {big}, {len(picked)} archs per slicing, {steps} steps x {base.batch_size} x "
          f"{base.seq_len} = {info['tokens']:,} tokens per run, scored on {rows} held-out sequences\n"
          + "\n".join(f"  level {lv}: {a}  {info['arch_cost'][str(a)]:.3g} {cost_name}, {info['arch_ms'][str(a)]:.2f} "
                      "ms" for a, lv in picked), flush=True)
    done = {r["run"]: r for r in read_jsonl(out / "runs.jsonl")} if (out / "runs.jsonl").exists() else {}
    for mha in cfg.mha:
        for name, m, M, n_steps, _ in variants(cfg, steps):
            if m == mha:  # one-shot: every arch inside this SuperPLM, no further training
                run(f"superplm-{name}", out, done, base, sets[mha], tok_path, rows, cfg, arch="", init="", mha=mha,
                    sub_models=M, steps=n_steps, tokenizer=str(tok_path))
        for a in sets[mha]:  # stand-alone: each arch alone from scratch, as many tokens as the batch-wise SuperPLM
            run(f"standalone-{a}", out, done, base, [a], tok_path, rows, cfg, arch=str(a), init="", sub_models=1,
                steps=steps, tokenizer=str(tok_path))
        report(out, picked, sets, done, cfg, steps, info, t0)


if __name__ == "__main__":
    run_main(main)
