"""Does the searched shape beat BERT's default rule at equal latency? Table 1, Figures 1 and 5 in miniature.

AutoTinyBERT's claim (Table 1): at the same latency, the architecture its search finds, further-trained from the
SuperPLM, beats BERT-S, the shape of BERT's default rule (qkv = hidden, ffn = 4 x hidden, heads of 64 dimensions,
4 layers as in Table 1's BERT-S rows) pre-trained from scratch on as many tokens (the paper: 5 one-shot + 5 further
epochs against 10). And (§4.4, Figure 5: "2x the convergence speedup") that the searched model inherits enough from
the SuperPLM to need about half the training of the same model from scratch. For each seed and target:
  1. superplm.py  the one-shot SuperPLM, Algorithm 1 (one per seed: every target searches it)
  2. latency.py   the latency predictor (one per study: it describes this CPU, not a seed)
  3. search.py    the default search (evolve-elite, masked-LM evaluator) for the target
  4. superplm.py  further training of the winner from its SuperPLM weights (§3.6)           -> AutoTinyBERT
  5. superplm.py  BERT-S from scratch for the one-shot + further steps (as many tokens)       -> BERT-S
  6. superplm.py  the winner from scratch for as many steps (Figure 5's curve from scratch)   -> searched, scratch
  7. search.py    --evaluator params: the most non-embedding parameters within the same budget, a training-free
     superplm.py  pick (no SuperPLM scored), from scratch for as many steps                   -> params pick, scratch
The table then sets side by side the searched shape against BERT-S's (both from scratch), the params pick against
both (is the SuperPLM worth it?), and the inherited weights against scratch (the same shape).
Every trained model is scored by held-out masked-LM loss (data.split's tail, fixed masks) along its training, and by
dev accuracy on a sentence-pair task built from the corpus (coherence_task) after fine-tuning with finetune.py.

A target is named by a default-rule shape: the latency budget is --slack x its predicted latency. BERT-S is the
default-rule shape whose predicted latency is closest to the budget from below (the target's shape): both models
meet the same latency constraint, as Table 1's pairs do (its BERT-S is sometimes the slower of the two). The
searched model can land below the target's shape (4-180-532-4-256 did at 4-192-768-3-192's budget), and the
default rule's next shape down is then about half as fast: no comparison at equal latency.

    python bench/table1_mini.py                   # defaults: about 90 min on 2 idle CPU cores (see README)
    python bench/table1_mini.py --resume          # continue a stopped study: finished stages are skipped
    python bench/table1_mini.py --oneshot-epochs 5 --further-epochs 5 --targets 4-192-768-3-192 \\
        --out bench/out/table1_5x5      # the paper's ratio of epochs on the tiny preset: ~4 CPU-hours, resumable
    python bench/table1_mini.py --oneshot-epochs 5 --further-epochs 5 --targets 4-256-1024-4-256 4-192-768-3-192 \\
        --train-args "--superplm-arch 6-384-1536-6-384 --corpus wiki.txt --seq-len 128"   # GPU: the paper's epochs
"""

import dataclasses
import json
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import finetune  # noqa: E402
import latency  # noqa: E402
import search  # noqa: E402
import superplm  # noqa: E402
from common import UserError, append_jsonl, read_jsonl, resolve_compute, run_main, save_json  # noqa: E402
from data import load_corpus, prepare, split, steps_per_epoch  # noqa: E402
from model import Arch  # noqa: E402
from pairwise import Study, machine, open_study, study_config  # noqa: E402
from search import MLMScore, bert_s  # noqa: E402
from superplm import load_superplm  # noqa: E402

# Table 1 (pre-training setting): speedup over BERT-base and GLUE dev average without SQuAD ("score")
PAPER = [("S1", "5-564-1054-8-512", 7.2, 78.3, "4-512-2048-8-512", 7.1, 76.5),
         ("S2", "4-396-624-6-384", 15.7, 76.4, "4-320-1280-5-320", 14.8, 75.1),
         ("S3", "4-432-384-4-256", 20.2, 75.3, "4-256-1024-4-256", 20.1, 74.3),
         ("S4", "3-320-608-4-256", 31.0, 73.0, "4-192-768-3-192", 31.3, 71.0)]


@dataclass
class Config(Study):
    train_args: str = field(default="", metadata={
        "help": "more superplm.py flags for every run, e.g. \"--corpus my.txt --superplm-arch 6-384-1536-6-384\" (this "
                "study sets --out, --arch, --init, --steps, --seed, --save-every)"})
    targets: list[str] = field(default_factory=lambda: ["4-192-768-3-192", "4-128-512-2-128"], metadata={
        "help": "latency targets, each named by a default-rule shape (layers-hidden-4xhidden-hidden/64-hidden)"})
    slack: float = field(default=1.1, metadata={"help": "budget = slack x the target shape's predicted latency"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "seeds of every stage"})
    oneshot_epochs: float = field(default=1.0, metadata={"help": "one-shot SuperPLM training (the paper: 5)"})
    further_epochs: float = field(default=1.0, metadata={"help": "further training of the winner (the paper: 5); "
                                                                "the models from scratch train for both"})
    bert_layers: int = field(default=4, metadata={"help": "BERT-S depth (Table 1's BERT-S rows: 4)"})
    scratch_searched: bool = field(default=True, metadata={"help": "also train the winner from scratch (Figure 5)"})
    curve_points: int = field(default=8, metadata={"help": "held-out evaluations along each trained run"})
    latency_samples: int = field(default=200, metadata={"help": "architectures timed for the latency predictor"})
    generations: int = field(default=4, metadata={"help": "T of Algorithm 2"})
    population: int = field(default=25, metadata={"help": "S of Algorithm 2"})
    task_train: int = field(default=1000, metadata={"help": "training pairs of the coherence task (0: no task)"})
    task_dev: int = field(default=400, metadata={"help": "dev pairs of the coherence task"})
    ft_epochs: int = field(default=3, metadata={"help": "fine-tuning epochs (the best epoch on dev counts)"})
    ft_lr: list[float] = field(default_factory=lambda: [3e-4], metadata={
        "help": "fine-tuning learning rates: the best on dev counts, as the grid of §4.1"})
    eval_batch: int = field(default=32, metadata={"help": "held-out sequences per forward pass when scoring"})
    out: str = field(default="bench/out/table1_mini", metadata={"help": "study folder: runs, results.json, PNGs"})
    resume: bool = field(default=False, metadata={"help": "continue the study in --out (finished stages are kept)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the study in --out"})


# ----------------------------------------------------------------------------- BERT's default rule


def is_default_rule(arch):
    return arch.hidden % 64 == 0 and arch == Arch.default_rule(arch.layers, arch.hidden)


# ----------------------------------------------------------------------------- the downstream task


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 4 <= len(s.split()) <= 40]


def coherence_task(docs, n_train, n_dev, seed=0):
    """A sentence-pair task from the corpus in RTE's layout (finetune.py reads it): does sentence 2 follow sentence
    1 in the same document ("entailment"), or was it drawn from another document ("not_entailment")? BERT's
    next-sentence prediction, balanced, with train and dev taken from disjoint documents. Returns (train, dev)
    rows with a header."""
    rng = random.Random(seed)
    docs = [s for s in (sentences(d) for d in docs) if len(s) >= 2]
    rng.shuffle(docs)
    cut = max(1, len(docs) * n_dev // (n_train + n_dev))
    out = []
    for part, n in ((docs[cut:], n_train), (docs[:cut], n_dev)):
        pairs = [(d, i) for d in range(len(part)) for i in range(len(part[d]) - 1)]
        if len(pairs) < n:
            raise UserError(f"the corpus gives only {len(pairs)} sentence pairs for {n}: lower --task-train / "
                            "--task-dev")
        rows = [["index", "sentence1", "sentence2", "label"]]
        for k, (d, i) in enumerate(rng.sample(pairs, n)):
            if k % 2 == 0:  # the next sentence
                rows.append([k, part[d][i], part[d][i + 1], "entailment"])
            else:  # a sentence of another document
                other = rng.choice([j for j in rng.sample(range(len(part)), 2) if j != d])
                rows.append([k, part[d][i], rng.choice(part[other]), "not_entailment"])
        out.append(rows)
    return out


def write_task(base, out, cfg):
    """OUT/task/RTE/{train,dev}.tsv, and the dev set's majority-class accuracy (%)."""
    docs = load_corpus(base.corpus, base.cache_dir)
    docs = docs if isinstance(docs, (list, tuple)) else [row["text"] for row in docs]
    train, dev = coherence_task(docs, cfg.task_train, cfg.task_dev)
    for name, rows in (("train", train), ("dev", dev)):
        path = out / "task" / "RTE" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join("\t".join(str(c).replace("\t", " ") for c in r) + "\n" for r in rows))
    labels = [r[3] for r in dev[1:]]
    return out / "task", 100 * max(labels.count(y) for y in set(labels)) / len(labels)


# ----------------------------------------------------------------------------- stages


class HeldOut:
    """Held-out masked-LM loss of a whole model (or a sub-model) with fixed masks: every model of the study is
    scored on the same tokens, as search.py scores sub-models."""

    def __init__(self, base, tok_path, rows, batch):
        self.args, self.score = (tok_path, base.corpus, base.seq_len, base.cache_dir, rows, batch, 0), None

    def __call__(self, model, arch=None):
        training, compute = model.training, resolve_compute()
        if self.score is None:
            self.score = MLMScore(model, *self.args, compute=compute)
        self.score.model = model.to(compute.device).eval()
        loss = -self.score(arch or model.arch)
        model.train(training)
        return loss


def stage(out, done, name, make):
    """Run make() -> record once: a stage already in runs.jsonl is skipped; wall and CPU seconds are added."""
    if name not in done:
        t, c = time.time(), time.process_time()
        record = make()
        done[name] = dict(record, run=name, wall_s=time.time() - t, cpu_s=time.process_time() - c)
        append_jsonl(out / "runs.jsonl", done[name])
    return done[name]


def resuming(folder, marker):
    """--resume where a stopped run left its marker file: the study continues what it had started."""
    return ["--resume"] if (folder / marker).exists() else []


def trained(out, name, argv, heldout, points):
    """Train one superplm.py run (continuing it if stopped) with held-out loss measured `points` times along it;
    returns its record: arch, steps and the curve [(step, loss)]."""
    cfg, init = superplm.configure(argv + ["--out", str(out / name), *resuming(out / name, "checkpoint.pt")])
    every = max(1, cfg.steps // points)
    cfg = dataclasses.replace(cfg, save_every=every, log_every=every)
    curve_path = out / name / "curve.jsonl"

    def on_save(step, model):
        append_jsonl(curve_path, dict(step=step, loss=heldout(model)))

    superplm.run(cfg, on_save=on_save, init=init)  # --init's checkpoint: read once, by configure
    curve = sorted({r["step"]: r["loss"] for r in read_jsonl(curve_path)}.items())
    return dict(arch=cfg.arch, steps=cfg.steps, curve=curve, loss=curve[-1][1])


def fit_latency(out, space, samples):
    """latency.py measure + fit on the SuperPLM's space: OUT/predictor/; returns its held-out accuracy."""
    latency.main(["measure", "--space", str(space), "--samples", str(samples), "--out", str(out / "latency"),
                  *resuming(out / "latency", "timings.jsonl")])
    latency.main(["fit", "--timings", str(out / "latency"), "--out", str(out / "predictor"), "--overwrite"])
    return json.loads((out / "predictor" / "metrics.json").read_text())["heldout"]


def measured_ms(out, archs):
    """Latency of each arch measured here (latency.py's timing: 1 thread, one 128-token input), cached."""
    path = out / "latency_measured.json"
    ms = json.loads(path.read_text()) if path.exists() else {}
    for a in dict.fromkeys(str(a) for a in archs):
        if a not in ms:
            ms[a] = latency.measure(Arch.parse(a))
    save_json(ms, path)
    return ms


def steps_to_reach(curve, loss):
    """The step at which a held-out curve [(step, loss)] first reaches `loss` (linear between points); None if
    it never does."""
    prev = (0, float("inf"))
    for step, value in curve:
        if value <= loss:
            if not np.isfinite(prev[1]):
                return step
            return prev[0] + (step - prev[0]) * (prev[1] - loss) / (prev[1] - value)
        prev = (step, value)
    return None


# ----------------------------------------------------------------------------- results


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    return (float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs)) if xs else None


def fmt(m, digits=3):
    return "-" if m is None else f"{m[0]:.{digits}f} ± {m[1]:.{digits}f}"


def summarize(done, cfg, steps, ms):
    """Per target: each model kind over the seeds finished so far, the paired differences, Figure 5's counts."""
    rows = []
    for target in cfg.targets:
        seeds = [s for s in cfg.seeds if f"pair-s{s}-{target}" in done]
        if not seeds:
            continue
        pairs = [done[f"pair-s{s}-{target}"] for s in seeds]
        kinds = {"AutoTinyBERT": "auto", "BERT-S (scratch)": "bert"}
        if cfg.scratch_searched:
            kinds["searched (scratch)"] = "alone"
        kinds["params pick (scratch)"] = "proxy"
        models = []
        for label, key in kinds.items():
            runs = [done[p[key]] for p in pairs]
            cpu = [r["cpu_s"] for r in runs]
            if key == "auto":  # its share of the one-shot run, its search, its further training
                cpu = [c + done[f"superplm-s{s}"]["cpu_s"] / len(cfg.targets) + done[f"search-s{s}-{target}"]["cpu_s"]
                       for c, s in zip(cpu, seeds)]
            models.append(dict(model=label, archs=[r["arch"] for r in runs],
                               pred_ms=[p[key + "_pred_ms"] for p in pairs], ms=[ms[r["arch"]] for r in runs],
                               loss=[r["loss"] for r in runs], acc=[p.get(key + "_acc") for p in pairs],
                               cpu_s=cpu, steps=runs[0]["steps"]))
        auto, bert = models[0], models[1]
        row = dict(target=target, budget_ms=[p["budget_ms"] for p in pairs], seeds=seeds, models=models,
                   majority=pairs[0].get("majority"),
                   loss_gain=[b - a for a, b in zip(auto["loss"], bert["loss"])],
                   acc_gain=[None if a is None else a - b for a, b in zip(auto["acc"], bert["acc"])])
        loss = {m["model"]: m["loss"] for m in models}  # below: how much lower the first's loss is, seed by seed
        row["vs"] = {f"{a} vs {b}": [y - x for x, y in zip(loss[a], loss[b])] for a, b in VERSUS
                     if a in loss and b in loss}
        if cfg.scratch_searched:
            reach = [steps_to_reach(done[p["alone"]]["curve"], done[p["auto"]]["loss"]) for p in pairs]
            row.update(reach=reach, further_steps=steps["further"],
                       alone_at_further=[float(np.interp(steps["further"], *zip(*done[p["alone"]]["curve"])))
                                         for p in pairs])
        rows.append(row)
    return rows


# the comparisons the table answers: shape against shape (from scratch), the proxy's pick, inherited against scratch
VERSUS = [("searched (scratch)", "BERT-S (scratch)"), ("params pick (scratch)", "BERT-S (scratch)"),
          ("params pick (scratch)", "searched (scratch)"), ("AutoTinyBERT", "searched (scratch)")]


def print_table(rows, info):
    print(f"\nTable 1 in miniature: {info['superplm']} SuperPLM on {info['corpus']}; held-out masked-LM loss on "
          f"{info['heldout_rows']} sequences (lower is better) and coherence-task dev accuracy, mean ± sd over seeds")
    print(f"AutoTinyBERT: {info['steps']['oneshot']} one-shot + {info['steps']['further']} further steps; models from "
          f"scratch: {info['steps']['total']} steps; {info['batch_size']} x {info['seq_len']} tokens a step "
          f"({info['epoch_steps']} steps an epoch)")
    print("CPU min: of training (AutoTinyBERT: its share of the one-shot run, its search and its further training)")
    print(f"{'target':16} {'model':21} {'archs (one per seed)':56} {'pred ms':>7} {'meas ms':>7} "
          f"{'MLM loss':>15} {'task acc %':>12} {'CPU min':>7}")
    for r in rows:
        for m in r["models"]:
            print(f"{r['target']:16} {m['model']:21} {' '.join(m['archs']):56} {np.mean(m['pred_ms']):7.2f} "
                  f"{np.mean(m['ms']):7.2f} {fmt(mean_sd(m['loss'])):>15} {fmt(mean_sd(m['acc']), 1):>12} "
                  f"{np.mean(m['cpu_s']) / 60:7.1f}")
        g, a = mean_sd(r["loss_gain"]), mean_sd(r["acc_gain"])
        wins = sum(x > 0 for x in r["loss_gain"])
        print(f"{'':16} BERT-S minus AutoTinyBERT loss {fmt(g)} (AutoTinyBERT lower in {wins}/{len(r['seeds'])} "
              f"seeds); accuracy AutoTinyBERT minus BERT-S {fmt(a, 1)} points; majority class "
              f"{r['majority'] if r['majority'] is None else format(r['majority'], '.1f')}%")
        for name, d in r["vs"].items():
            print(f"{'':16} {name}: loss lower by {fmt(mean_sd(d))} (lower in {sum(x > 0 for x in d)}/{len(d)} seeds)")
    if rows and "reach" in rows[0]:
        print("\nFigure 5 in miniature: steps the searched arch from scratch needs to reach the held-out loss the "
              "inherited one ends with")
        for r in rows:
            got = [x for x in r["reach"] if x is not None]
            ratio = " ".join("never" if x is None else f"{x / r['further_steps']:.2f}x" for x in r["reach"])
            print(f"{r['target']:16} inherited: {r['further_steps']} steps; from scratch: "
                  f"{' '.join('>' + str(info['steps']['total']) if x is None else f'{x:.0f}' for x in r['reach'])}"
                  f" steps ({ratio}; mean {np.mean(got) / r['further_steps'] if got else float('nan'):.2f}x); "
                  f"scratch loss at {r['further_steps']} steps {fmt(mean_sd(r['alone_at_further']))}")
    print("paper (Table 1, GLUE score, speedup): " + "; ".join(
        f"{s} AutoTinyBERT {a} {sa}x {pa} vs BERT {b} {sb}x {pb}" for s, a, sa, pa, b, sb, pb in PAPER)
          + "; Figure 5: 2x convergence speedup")


def figures(rows, done, cfg, out):
    """figure1.png: loss against measured latency (Figure 1's layout); figure5.png: held-out curves."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ms = json.loads((out / "latency_measured.json").read_text())
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    cand = [(ms[c["arch"]], c["loss"]) for s in cfg.seeds for t in cfg.targets if f"search-s{s}-{t}" in done
            for c in done[f"search-s{s}-{t}"]["candidates"] if c["arch"] in ms]
    if cand:
        ax.scatter(*zip(*cand), s=8, c="lightgrey", label="scored candidates (one-shot, inside the SuperPLM)")
    styles = {"AutoTinyBERT": ("o", "C3"), "BERT-S (scratch)": ("s", "C0"), "searched (scratch)": ("^", "C2"),
              "params pick (scratch)": ("D", "C1")}
    for r in rows:
        for m in r["models"]:
            marker, color = styles[m["model"]]
            ax.scatter(m["ms"], m["loss"], marker=marker, color=color, s=30,
                       label=m["model"] + " (trained)" if r is rows[0] else None)
    for r in rows:
        ax.axvline(np.mean(r["budget_ms"]), color="grey", ls=":", lw=1)
        ax.annotate(f"budget {r['target']}", (np.mean(r["budget_ms"]), ax.get_ylim()[1]), fontsize=6, rotation=90,
                    va="top", ha="right")
    ax.set(xlabel="measured latency (ms, one 128-token input, 1 thread)", ylabel="held-out masked-LM loss",
           title="Figure 1 in miniature: loss against latency, every seed and target")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out / "figure1.png", dpi=130)
    plt.close(fig)
    made = [out / "figure1.png"]
    if rows and "reach" in rows[0]:
        fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
        for ax, r in zip(axes[0], rows):
            for k, s in enumerate(r["seeds"]):
                p = done[f"pair-s{s}-{r['target']}"]
                one_shot = done[f"search-s{s}-{r['target']}"]["best_loss"]
                ax.plot(*zip(*[(0, one_shot)] + done[p["auto"]]["curve"]), "C3-", lw=1,
                        label="inherited from the SuperPLM" if k == 0 else None)
                ax.plot(*zip(*done[p["alone"]]["curve"]), "C2--", lw=1, label="from scratch" if k == 0 else None)
            ax.set(xlabel="training steps of the searched arch", ylabel="held-out masked-LM loss",
                   title=f"target {r['target']}, seeds {' '.join(map(str, r['seeds']))}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "figure5.png", dpi=130)
        plt.close(fig)
        made.append(out / "figure5.png")
    return made


def stage_minutes(done):
    """CPU minutes of each kind of stage, summed over the study."""
    kinds = dict(superplm="one-shot SuperPLMs", latency="latency predictor", search="searches", proxy="params searches",
                 further="further training", scratch="training from scratch", task="fine-tuning")
    return {label: sum(r.get("cpu_s", 0) for name, r in done.items() if name.split("-")[0] == kind) / 60
            for kind, label in kinds.items()}


def report(out, done, cfg, steps, info, t0):
    rows = summarize(done, cfg, steps, json.loads((out / "latency_measured.json").read_text()))
    print_table(rows, info)
    print("CPU minutes by stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stage_minutes(done).items()))
    cpu = sum(r.get("cpu_s", 0) for r in done.values())
    save_json(dict(config=dataclasses.asdict(cfg), info=info, targets=rows, runs=list(done.values()),
                   cpu_s=cpu, session_s=time.time() - t0, paper_table1=PAPER), out / "results.json")
    made = [out / "results.json"] + figures(rows, done, cfg, out)
    print(f"CPU time of all stages {cpu / 60:.1f} min; this session {(time.time() - t0) / 60:.1f} min wall; "
          f"wrote {', '.join(map(str, made))}", flush=True)
    return rows


# ----------------------------------------------------------------------------- the study


MADE = ("config.json", "runs.jsonl", "results.json", "figure1.png", "figure5.png", "latency", "predictor",
        "latency_measured.json", "task")
PREFIXES = ("superplm-", "search-", "proxy-", "further-", "scratch-")


def main(argv=None):
    cfg, base = study_config(Config, argv, __doc__)
    targets = [Arch.parse(t) for t in cfg.targets]
    if not all(is_default_rule(t) for t in targets):
        raise UserError(f"--targets {' '.join(cfg.targets)}: name each target by a default-rule shape, e.g. "
                        "4-192-768-3-192 (qkv = hidden, ffn = 4 x hidden, heads = hidden / 64)")
    if min(cfg.oneshot_epochs, cfg.further_epochs) <= 0 or not cfg.seeds or cfg.curve_points < 1:
        raise UserError("--oneshot-epochs and --further-epochs must be > 0, --seeds non-empty, --curve-points >= 1")
    t0 = time.time()
    out = open_study(cfg, MADE, PREFIXES)
    tok_path, tok, dataset = prepare(base)
    tok_path = Path(tok_path).resolve()
    train_rows, heldout_rows = split(dataset)
    spe = steps_per_epoch(train_rows, base.batch_size)
    steps = dict(oneshot=max(1, round(cfg.oneshot_epochs * spe)), further=max(1, round(cfg.further_epochs * spe)))
    steps["total"] = steps["oneshot"] + steps["further"]
    done = {r["run"]: r for r in read_jsonl(out / "runs.jsonl")} if (out / "runs.jsonl").exists() else {}
    heldout = HeldOut(base, str(tok_path), len(heldout_rows), cfg.eval_batch)
    common = ["--preset", cfg.preset, *shlex.split(cfg.train_args), "--tokenizer", str(tok_path)]
    info = dict(machine(), superplm=base.superplm_arch, corpus=base.corpus, steps=steps,
                epoch_steps=spe, heldout_rows=len(heldout_rows), seq_len=base.seq_len, batch_size=base.batch_size)
    task_dir, majority = write_task(base, out, cfg) if cfg.task_train else (None, None)

    def task_acc(run, seed):
        if task_dir is None:
            return None
        return stage(out, done, f"task-{run}", lambda: dict(acc=finetune.run(finetune.Config(
            task="rte", model=str(out / run), data=str(task_dir), lr=list(cfg.ft_lr), epochs=[cfg.ft_epochs],
            batch_size=32, seed=seed, max_len=128))["accuracy"]))["acc"]

    print(f"Table 1 in miniature: seeds {cfg.seeds}, targets {cfg.targets}; {steps['oneshot']} one-shot + "
          f"{steps['further']} further steps against {steps['total']} from scratch ({spe} steps an epoch)", flush=True)
    for seed in cfg.seeds:
        splm = f"superplm-s{seed}"
        stage(out, done, splm, lambda: dict(arch=str(superplm.run(superplm.parse_config(
            common + ["--out", str(out / splm), "--steps", str(steps["oneshot"]), "--seed", str(seed),
                      *resuming(out / splm, "checkpoint.pt")])).arch), steps=steps["oneshot"]))
        stage(out, done, "latency", lambda: fit_latency(out, out / splm / "checkpoint.pt", cfg.latency_samples))
        predictor = latency.LatencyPredictor.load(out / "predictor")
        for target in cfg.targets:
            budget = cfg.slack * predictor(Arch.parse(target))
            name = f"search-s{seed}-{target}"

            def searched():
                search.main(["--target", f"{budget:.4f}ms", "--superplm", str(out / splm), "--latency",
                             str(out / "predictor"), "--generations", str(cfg.generations), "--population",
                             str(cfg.population), "--seed", str(seed), "--eval-rows", str(len(heldout_rows)),
                             "--out", str(out / name), *resuming(out / name, "candidates.jsonl")])
                top = json.loads((out / name / "top.json").read_text())
                scored = json.loads((out / name / "scored.json").read_text())
                best_loss = heldout(load_superplm(out / splm)[0], Arch.parse(top["best"]))
                return dict(best=top["best"], best_loss=best_loss, budget_ms=top["budget_ms"],
                            candidates=[dict(arch=c["arch"], loss=-c["score"], pred_ms=c["latency"]) for c in scored])

            found = stage(out, done, name, searched)
            pick = f"proxy-s{seed}-{target}"  # the training-free pick under the same budget
            proxy = stage(out, done, pick, lambda: dict(best=str(search.main([
                "--target", f"{budget:.4f}ms", "--superplm", str(out / splm), "--evaluator", "params", "--latency",
                str(out / "predictor"), "--generations", str(cfg.generations), "--population", str(cfg.population),
                "--seed", str(seed), "--out", str(out / pick), *resuming(out / pick, "candidates.jsonl")])[0].arch)))
            best = Arch.parse(found["best"])
            bert = bert_s(found["budget_ms"], predictor, cfg.bert_layers)  # the same constraint as the search
            pair = dict(budget_ms=found["budget_ms"], auto=f"further-s{seed}-{best}", bert=f"scratch-s{seed}-{bert}",
                        auto_pred_ms=predictor(best), bert_pred_ms=predictor(bert), majority=majority)
            stage(out, done, pair["auto"], lambda: trained(
                out, pair["auto"], ["--init", str(out / splm), "--arch", str(best), "--steps",
                                    str(steps["further"]), "--seed", str(seed)], heldout, cfg.curve_points))
            scratch = [("bert", bert)] + ([("alone", best)] if cfg.scratch_searched else [])
            scratch += [("proxy", Arch.parse(proxy["best"]))]  # a run of the same name is trained once
            for key, arch in scratch:
                pair[key], pair[key + "_pred_ms"] = f"scratch-s{seed}-{arch}", predictor(arch)
                stage(out, done, pair[key], lambda: trained(
                    out, pair[key], common + ["--arch", str(arch), "--steps", str(steps["total"]), "--seed",
                                              str(seed)], heldout, cfg.curve_points))
            for key in ("auto",) + tuple(k for k, _ in scratch):
                pair[key + "_acc"] = task_acc(pair[key], seed)
            done[f"pair-s{seed}-{target}"] = dict(pair, run=f"pair-s{seed}-{target}")  # not in runs.jsonl
            candidates = [c["arch"] for c in found["candidates"]]
            measured_ms(out, [best, bert, proxy["best"], *candidates])
        report(out, done, cfg, steps, info, t0)


if __name__ == "__main__":
    run_main(main)
