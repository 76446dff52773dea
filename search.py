"""Search a SuperPLM for the best architecture under a latency target (AutoTinyBERT stage 2: §3.5, App. C, §4.4).

    evolve        Algorithm 2 with the paper's settings: roulette-wheel parents, mutate (pm) or sample afresh (pe),
                  T x S candidates (the mutation's step sizes and the roulette's shift for negative scores are ours)
    evolve-elite  the same loop with pm/pe 0.8/0.2, parents by rank among the best so far, a wider mutation and a
                  latency window of 0.85-1x the budget (the default: beats random search, bench/search_quality.py)
    random        the baseline: as many random candidates within the budget
    fast          AutoTinyBERT-Fast (§4.4): one candidate per layer count following the paper's shape rule

Every method takes a plain callable `score(arch) -> float` (higher is better) and a Budget over any
`latency(arch) -> ms`; the command line builds them from a SuperPLM checkpoint and a latency predictor (latency.py):

    python search.py --target 7x --superplm runs/superplm --latency runs/predictor [--method evolve] [--extract]

Each scored candidate is appended to OUT/candidates.jsonl at once; --resume replays the same seeded search over
those scores (SIGINT/SIGTERM let the candidate being scored finish first). On N GPUs each worker scores its share:

    torchrun --nproc_per_node 8 search.py --evaluator finetune --mnli-data glue_data/MNLI --squad-data squad ...
"""

import argparse
import dataclasses
import random
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from tqdm import tqdm

import finetune
from common import (COUNT, DEVICE_HELP, DTYPE_HELP, DTYPES, Interrupted, NONNEGATIVE, RunFolder, SHARE, THREADS_HELP,
                    UserError, append_jsonl, command_line, end_distributed, flag, free_folder, init_distributed,
                    no_such, parse_flags, rank0_first, read_appended, read_jsonl, resolve_compute, run_main, save_json,
                    seed_everything, stop_after_step, to_device, torch_load)
from data import build_dataset, load_tokenizer, mask_tokens, masked_positions, split, tokenizer_files
from latency import LatencyPredictor, params, parse_target, space_from
from model import Arch, MLM, SearchSpace, extract, save_pretrained
from superplm import checkpoint_path, load_superplm


# -------------------------------------------------------------------------------------------- Algorithm 2 (Appendix C)

def evolve(space, score, budget, generations=4, population=25, p_mutate=0.5, p_explore=0.5, seed=0, parents=None,
           scale=None, window=0.0, cache=None, on_generation=None, max_draws=None):
    """Algorithm 2: T = `generations` generations of S = `population` architectures of `space` within the latency
    `budget` (a Budget); returns every scored Candidate, best first. pm and pe are exclusive (Algorithm 2 does not
    say how they combine): mutate with probability pm, sample afresh with pe, else keep the parent (not rescored).
    The defaults are the paper's; evolve_elite sets parents (by_rank), scale (mutate) and window (Budget.window)."""
    if not (0 <= p_mutate <= 1 and 0 <= p_explore <= 1 and p_mutate + p_explore <= 1):
        raise UserError(f"p_mutate={p_mutate} and p_explore={p_explore} must be probabilities summing to <= 1")
    evals, low, rng = Evaluations(score, budget, cache, on_generation), budget.window(window), random.Random(seed)
    max_draws = max_draws or 1000 * population
    # Line 2: sample the first generation G1 from A; the evaluator produces its performance V1.
    prev = evals(fill(lambda: space.sample(rng), population, budget, low, evals, max_draws), generation=1)
    if not prev:
        raise UserError(f"no architecture within {budget.budget_ms:.4g} ms found in {max_draws} random draws: "
                        f"{budget.advice(low)}")
    for t in range(2, generations + 1):  # line 3
        scored = list(evals.done)

        def propose():
            # Line 5: a parent by the Russian roulette on G_{t-1} and V_{t-1} (evolve-elite: by rank, all so far).
            parent = (roulette(prev, rng) if parents is None else by_rank(scored, rng, parents)).arch
            r = rng.random()
            if r < p_mutate:  # line 6: with probability pm, mut(α)
                return mutate(parent, space, rng, scale)
            if r < p_mutate + p_explore:  # line 7: with probability pe, a new architecture sampled from A
                return space.sample(rng)
            return parent

        # Lines 4 and 8-10: G_t <- {}, append new candidates until |G_t| = S; line 11: the evaluator gives V_t.
        prev = evals(fill(propose, population, budget, low, evals, max_draws), generation=t) or prev
    return ranked(evals.done)  # line 13: the best first


# Our default (bench/search_quality.py); the authors' code keeps a 0.85-1.1x window, which can exceed the target.
ELITE = dict(p_mutate=0.8, p_explore=0.2, parents=5, scale=0.1, window=0.85)
evolve_elite = partial(evolve, **ELITE)  # Algorithm 2's loop with ELITE's settings (any of them can be overridden)


def roulette(candidates, rng):
    """Line 5: the Russian roulette wheel, P(parent) proportional to its score. The paper's scores (accuracy, F1)
    are positive; when some are negative (e.g. -loss) the wheel is shifted so the worst score sits at 0."""
    low = min(0.0, min(c.score for c in candidates))
    weights = [c.score - low for c in candidates]
    return rng.choices(candidates, weights=weights if sum(weights) > 0 else None)[0]


def by_rank(candidates, rng, k):
    """evolve-elite's parent: one of the k best so far, P proportional to k, k-1, ..., 1 (blind to score scale)."""
    best = ranked(candidates)[:k]
    return rng.choices(best, weights=range(len(best), 0, -1))[0]


def mutate(arch, space, rng, scale=None):
    """mut(·) of Algorithm 2: each free dimension moves with probability 1/2 (at least one) by one or two grid steps
    (the authors' code), or with scale=s by a Gaussian number of steps of std s x the grid's length (evolve-elite)."""
    if arch not in space:
        raise ValueError(f"cannot mutate {arch}: it is not in the search space")
    dims = free_dims(space)
    for _ in range(100 if dims else 0):
        values = dataclasses.asdict(arch)
        for d in [d for d in dims if rng.random() < 0.5] or [rng.choice(dims)]:
            grid_ = space.choices(d)
            step = rng.choice((1, 2)) if scale is None else max(1, round(abs(rng.gauss(0, scale * len(grid_)))))
            i = grid_.index(values[d]) + rng.choice((-1, 1)) * step
            values[d] = grid_[min(max(i, 0), len(grid_) - 1)]
        new = with_values(space, values)
        if new != arch:
            return new
    return arch


def free_dims(space):
    """The dimensions a search may change: qkv is tied to heads in the pre-training space (Table B.1)."""
    return [d for d in SearchSpace.DIMS if len(space.choices(d)) > 1 and not (d == "qkv" and space.qkv is None)]


def with_values(space, values):
    if space.qkv is None:
        values = dict(values, qkv=space.head_dim * values["heads"])
    return Arch(**values)


# --------------------------------------------------------------------------------------- the latency constraint (§3.5)

class Budget:
    """The latency constraint of §3.5, lat(arch) <= budget_ms, cached; a budget no arch of `space` meets fails here."""

    def __init__(self, space, latency, budget_ms):
        self.space, self.latency, self.budget_ms, self.ms = space, latency, float(budget_ms), {}
        smallest, base = space.smallest(), getattr(latency, "base_ms", None)  # a LatencyPredictor's: BERT-base ms
        if self(smallest) > self.budget_ms:  # every arch is at least as slow as the smallest one
            fix = f"a speedup target of at most {base / self(smallest):.3g}x" if base else "a lower speedup target"
            raise UserError(f"no architecture of the search space meets the budget of {self.budget_ms:.4g} ms: "
                            f"even the smallest, {smallest}, takes {self(smallest):.4g} ms; choose {fix}")

    def __call__(self, arch):
        if arch not in self.ms:
            self.ms[arch] = float(self.latency(arch))
        return self.ms[arch]

    def meets(self, arch):
        return self(arch) <= self.budget_ms

    def window(self, w):
        """The window's low end, w x budget_ms (evolve-elite), or 0 and a warning if even the largest arch is faster."""
        largest = self.space.largest()
        if self(largest) < w * self.budget_ms:  # every arch is at most as slow as the largest one
            warnings.warn(f"every architecture meets {self.budget_ms:.4g} ms (the largest, {largest}, takes "
                          f"{self(largest):.4g} ms): the latency window {w:g}-1x is dropped and the whole "
                          "space searched")
            return 0.0
        return w * self.budget_ms

    def advice(self, low):
        """Which way to move the target when (almost) no architecture is admitted."""
        if low and self(self.space.largest()) <= self.budget_ms:  # few archs reach the window: a smaller budget helps
            return f"choose a higher speedup target (the window asks >= {low:.4g} ms), or --method evolve (no window)"
        return "choose a lower speedup target"


def fill(propose, size, budget, low, evals, max_draws):
    """Algorithm 2, lines 4-9 (with §3.5's latency filter): up to `size` new archs in low-budget ms from propose()."""
    chosen = []
    for _ in range(max_draws):
        if len(chosen) == size:
            break
        arch = propose()
        if arch not in chosen and arch not in evals and low <= budget(arch) <= budget.budget_ms:
            chosen.append(arch)
    if len(chosen) < size:
        within = f"{low:.4g}-{budget.budget_ms:.4g}" if low else f"{budget.budget_ms:.4g}"
        warnings.warn(f"only {len(chosen)} of {size} new architectures within {within} ms found in {max_draws} draws: "
                      "the budget leaves little of the search space")
    return chosen


def random_search(space, score, budget, n=100, seed=0, window=0.0, cache=None, on_generation=None, max_draws=None):
    """The baseline: n distinct architectures sampled uniformly from the space within the budget, all scored."""
    evals, low, rng = Evaluations(score, budget, cache, on_generation), budget.window(window), random.Random(seed)
    archs = fill(lambda: space.sample(rng), n, budget, low, evals, max_draws or 1000 * n)
    if not archs:
        raise UserError(f"no architecture within {budget.budget_ms:.4g} ms found by random sampling: "
                        f"{budget.advice(low)}")
    return ranked(evals(archs, generation=1))


# ----------------------------------------------------------------------- AutoTinyBERT-Fast (§4.4) and BERT-S (Table 1)

FFN_RULE, QKV_RULE = (1.6, 1.9), (0.7, 1.0)  # §4.4: 1.6 dm <= df <= 1.9 dm and 0.7 dm <= dqkv <= 1.0 dm


def fast_candidates(space, budget):
    """For each layer count, the rule's architecture nearest the budget from below (§4.4: "we only need to test one
    architecture at each layer number"): per (hidden, heads, qkv) the largest ffn within budget, by bisection."""
    attention = sorted(((q, h) for h in space.heads for q in (space.qkv or (space.head_dim * h,)) if q % h == 0))
    out = []
    for layers in space.layers:
        best = None
        for hidden in sorted(space.hidden, reverse=True):
            ffns = [f for f in space.ffn if FFN_RULE[0] * hidden <= f <= FFN_RULE[1] * hidden]
            qhs = [(q, h) for q, h in attention if QKV_RULE[0] * hidden <= q <= QKV_RULE[1] * hidden]
            shape = lambda f, qh: Arch(layers, hidden, f, qh[1], qh[0])  # noqa: E731
            if not ffns or not qhs or not budget.meets(shape(ffns[0], qhs[0])):
                continue  # even this hidden's smallest rule shape is too slow
            for qh in qhs:
                lo, hi = 0, len(ffns)  # bisection: ffns[:lo] meet the budget, ffns[hi:] do not
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (mid + 1, hi) if budget.meets(shape(ffns[mid], qh)) else (lo, mid)
                if lo and (best is None or budget(shape(ffns[lo - 1], qh)) > budget(best)):
                    best = shape(ffns[lo - 1], qh)
            if budget.meets(shape(ffns[-1], qhs[-1])):
                break
        if best is not None:
            out.append(best)
    return out


def fast_search(space, score, budget, seed=0, cache=None, on_generation=None):
    """AutoTinyBERT-Fast (§4.4): score only the rule's candidate of each layer count and rank them."""
    archs = fast_candidates(space, budget)
    if not archs:
        raise UserError(f"no architecture following the rule of §4.4 meets {budget.budget_ms:.3g} ms; choose a "
                        "lower speedup target or --method evolve")
    return ranked(Evaluations(score, budget, cache, on_generation)(archs, generation=1))


def bert_s(ms, latency, layers=4):
    """BERT-S (Table 1): the default-rule shape of `layers` layers, predicted latency nearest `ms` from below."""
    shapes = [Arch.default_rule(layers, 64 * k) for k in range(1, 13)]
    pred = latency.predict(shapes)
    below = [k for k in range(len(shapes)) if pred[k] <= ms]
    return shapes[max(below, key=lambda k: pred[k]) if below else 0]


METHODS = {"evolve": evolve, "evolve-elite": evolve_elite, "random": random_search, "fast": fast_search}


# ----------------------------------------------------------------- the evaluator (§3.5): score(arch), higher is better

@dataclass
class Candidate:
    """One scored architecture: its score (higher is better), predicted latency and the generation it entered."""
    arch: Arch
    score: float
    latency: float
    generation: int = 1


def ranked(candidates):
    """Best first; ties keep the order in which they were scored (so results are deterministic)."""
    return sorted(candidates, key=lambda c: -c.score)


class Evaluations:
    """The evaluator of Algorithm 2 behind a cache (arch -> score, a resumed run's first): no arch is scored twice."""

    def __init__(self, score, budget, cache=None, on_generation=None):
        self.score, self.budget, self.cache, self.on_generation = score, budget, dict(cache or {}), on_generation
        self.done, self.seen = [], set()  # Candidates in the order they were scored, and their archs

    def __contains__(self, arch):
        return arch in self.seen

    def __call__(self, archs, generation):
        new = [a for a in archs if a not in self.cache]  # shared out over the workers if `score` can (Shared)
        values = self.score.many(new) if hasattr(self.score, "many") else [self.score(a) for a in new]
        self.cache.update(zip(new, map(float, values)))
        out = [Candidate(arch, self.cache[arch], self.budget(arch), generation) for arch in archs]
        self.seen.update(archs)
        self.done += out
        if self.on_generation and self.done:
            self.on_generation(ranked(self.done))
        return out


class MLMScore:
    """score(arch) = -(masked-LM loss) of the sub-model inside the SuperPLM (§3.4) on held-out rows with fixed masks.
    Loss, not accuracy: it moves with every masked token, not in steps of 1/n, so close candidates are told apart."""

    def __init__(self, model, tokenizer_path, corpus, seq_len, cache_dir, rows=256, batch_size=32, seed=0,
                 compute=None):
        compute = compute or resolve_compute("cpu")
        data, heldout = split(build_dataset(corpus, load_tokenizer(tokenizer_path), seq_len, cache_dir))
        rows = min(rows, len(heldout))  # a small corpus holds out fewer: score what there is
        ids = heldout[list(range(rows))]  # (rows, T)
        inputs, labels = mask_tokens(ids, heldout.specials, torch.Generator().manual_seed(seed))
        if not (labels != -100).any():
            raise UserError(f"corpus {corpus} gives {len(data) + len(heldout)} packed sequences, which leaves "
                            f"{rows} held-out ones{' with no masked token' if rows else ''} to score sub-models on "
                            "(data.split): use a larger corpus, or another one with --eval-corpus")
        parts = zip(*(t.split(batch_size) for t in (inputs, labels, (ids != heldout.specials.pad).long())))
        self.batches = [to_device(dict(input_ids=x, labels=y, attention_mask=m, masked=masked_positions(y)),
                                  compute.device) for x, y, m in parts]  # (batch_size, T) each
        self.model, self.objective, self.metrics = model.to(compute.device).eval(), MLM(), {}
        self.autocast = compute.autocast

    @torch.no_grad()
    def __call__(self, arch):
        sums, n = 0, 0  # (loss, acc) summed over masked tokens on the device: read once, not every batch
        for batch in self.batches:
            k = batch["masked"].numel()  # masked tokens: MLM averages over them
            with self.autocast():
                batch_loss, stats = self.objective(self.model, batch, arch)
            sums, n = sums + torch.stack([batch_loss, stats["acc"]]).double() * k, n + k
        loss, acc = sums.tolist()
        self.metrics[arch] = dict(mlm_loss=loss / n, mlm_acc=100 * acc / n)
        return -loss / n


class ParamsScore:
    """score(arch) = non-embedding parameters in millions (latency.params): training-free, no SuperPLM, no data."""

    def __init__(self):
        self.metrics = {}

    def __call__(self, arch):
        return float(params([arch])[0]) / 1e6


class FinetuneScore:
    """The paper's evaluator (§3.5): (MNLI accuracy + SQuAD v1.1 F1) / 2 after a brief fine-tuning (finetune.py)."""

    def __init__(self, model, tokenizer_path, work, cfg):
        self.model, self.tokenizer, self.work, self.cfg, self.metrics = model.eval(), tokenizer_path, work, cfg, {}

    def __call__(self, arch):
        folder = Path(self.work) / f"candidate-{arch}"
        save_model(self.model, arch, self.tokenizer, folder)
        c, scores = self.cfg, {}
        for task, data in (("mnli", c.mnli_data), ("squad", c.squad_data)):
            scores[task] = finetune.run(finetune.Config(task=task, model=str(folder), data=data, epochs=[c.ft_epochs],
                                                        max_train_examples=c.ft_train_examples or None,
                                                        max_eval_examples=c.ft_eval_examples or None, seed=c.seed,
                                                        device=c.device, dtype=c.dtype))["score"]
        shutil.rmtree(folder)
        self.metrics[arch] = dict(mnli_acc=scores["mnli"], squad_f1=scores["squad"])
        return (scores["mnli"] + scores["squad"]) / 2


def save_model(superplm, arch, tokenizer_path, folder):
    """The sub-model as a stand-alone Hugging Face BERT folder with its vocabulary (§3.6: superplm.py --init)."""
    save_pretrained(extract(superplm, arch), folder)
    for f in tokenizer_files(Path(tokenizer_path).parent):
        shutil.copyfile(f, Path(folder) / f.name)
    return folder


def make_score(cfg, model, tokenizer, ckpt, compute):
    """--evaluator's score of SuperPLM `model` (ckpt: its checkpoint); mlm: its own corpus unless --eval-corpus."""
    if cfg.evaluator == "params":
        return ParamsScore()
    if cfg.evaluator == "finetune":
        return FinetuneScore(model, tokenizer, cfg.out, dataclasses.replace(cfg, device=str(compute.device)))
    if ckpt.get("objective") != "mlm":
        raise UserError(f"{cfg.superplm} was trained by {ckpt.get('objective')}, so its masked-LM head is untrained: "
                        "use --evaluator finetune")
    c = ckpt["config"]
    return MLMScore(model, tokenizer, cfg.eval_corpus or c["corpus"], c["seq_len"], c["cache_dir"], cfg.eval_rows,
                    seed=cfg.seed, compute=compute)


class Shared:
    """An evaluator shared out over torch.distributed workers: worker 0 runs the search, each worker scores one
    candidate per round, worker 0 records them in order (same files for any number of workers); the others serve()."""

    def __init__(self, score, rank, world, record):
        self.score, self.rank, self.world, self.record = score, rank, world, record

    def many(self, archs):  # worker 0, inside the search
        if self.world > 1:
            dist.broadcast_object_list([archs])
        values = []
        for arch, (value, metrics) in zip(archs, self._rounds(archs)):
            self.score.metrics[arch] = metrics
            self.record(arch, value)
            values.append(value)
        return values

    def serve(self):  # workers 1..N-1: score shares until worker 0 says the search is over
        while True:
            archs = [None]
            dist.broadcast_object_list(archs)
            if archs[0] is None:
                return
            list(self._rounds(archs[0]))  # this worker's share of each round

    def stop(self):  # worker 0, after the search
        if self.world > 1:
            dist.broadcast_object_list([None])

    def _rounds(self, archs):
        """Yield (score, metrics) of every arch, computed round by round, worker k taking the k-th of each round."""
        for i in range(0, len(archs), self.world):
            this_round = archs[i:i + self.world]
            mine = None
            if self.rank < len(this_round):
                arch = this_round[self.rank]
                mine = (float(self.score(arch)), self.score.metrics.get(arch, {}))
            got = [mine] if self.world == 1 else [None] * self.world
            if self.world > 1:
                dist.all_gather_object(got, mine)
            yield from got[:len(this_round)]


# ------------------------------------------------- the run folder: candidates.jsonl, scored.json, top.json, search.png

def open_search(cfg, folder):
    """(cfg, the records of the candidates scored before): on --resume, parse_flags gave cfg the saved settings."""
    return cfg, {Arch.parse(r["arch"]): r for r in read_appended(folder.path / "candidates.jsonl")}


class SearchRecord:
    """What worker 0 writes: each candidate at once, scored.json per generation; `stop` ends it after a candidate."""

    def __init__(self, folder, command, latency, base_ms, metrics, bar, stop):
        self.folder, self.command, self.latency, self.base_ms = folder, command, latency, base_ms
        self.metrics, self.bar, self.stop, self.path = metrics, bar, stop, folder.path / "candidates.jsonl"

    def rows(self, candidates):
        """The records of scored.json and top.json: a candidate with its speedup and its metrics."""
        return [dict(dataclasses.asdict(c), arch=str(c.arch), speedup=self.base_ms / c.latency,
                     **self.metrics.get(c.arch, {})) for c in candidates]

    def scored(self, arch, score):
        append_jsonl(self.path, dict(arch=str(arch), score=score, latency=self.latency(arch),
                                     metrics=self.metrics.get(arch, {})))
        self.folder.done_first()
        self.bar.update()
        if self.stop.signal:
            self.bar.close()
            n = len(read_jsonl(self.path))
            raise Interrupted(f"{self.stop.signal}: {n} scored candidate{'s' * (n != 1)} kept in {self.path}; resume "
                              f"with: {self.command}")

    def generation(self, best_first):
        save_json(self.rows(best_first), self.folder.path / "scored.json")
        self.bar.write(f"generation {max(c.generation for c in best_first)}: {len(best_first)} scored, best "
                       f"{best_first[0].arch} score {best_first[0].score:.4f}")


def search_figure(rows, top, target_speedup, path, title, ylabel):
    """Speedup against score of every scored architecture, the top ones circled: the paper's Figure 1 for one search."""
    fig = Figure(figsize=(6, 4))  # matplotlib's object API: no pyplot state, no display backend
    ax = fig.subplots()
    gens = sorted({r["generation"] for r in rows})
    for g in gens:
        rs = [r for r in rows if r["generation"] == g]
        ax.scatter([r["speedup"] for r in rs], [r["score"] for r in rs], s=14, alpha=0.7,
                   label=f"generation {g}" if len(gens) > 1 else "scored")
    ax.scatter([r["speedup"] for r in top], [r["score"] for r in top], s=80, facecolors="none",
               edgecolors="red", label="top: " + ", ".join(f"{i} {r['arch']}" for i, r in enumerate(top, 1)))
    for i, r in enumerate(top, 1):
        ax.annotate(str(i), (r["speedup"], r["score"]), fontsize=8, xytext=(5, -3 - 4 * i),
                    textcoords="offset points", color="red")
    ax.axvline(target_speedup, color="grey", linestyle="--", label=f"target {target_speedup:.3g}x")
    ax.set(xlabel="speedup over BERT-base (predicted)", ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------- settings and the command line

PRESETS = {"default": {}, "tiny": dict(target="40x", superplm="runs/superplm-tiny", out="runs/search-tiny"),
           "paper": dict(method="evolve", evaluator="finetune", ft_train_examples=0, ft_eval_examples=0)}


@dataclass
class Config:
    preset: str = flag("default", "default: the settings shown; tiny: 100 candidates of `superplm.py --preset tiny`'s "
                                  "SuperPLM, about 2 minutes on 2 CPU cores; paper: Algorithm 2 as in App. C (evolve, "
                                  "T = 4, S = 25, pm = pe = 1/2), the paper's evaluator on all of MNLI and SQuAD. A "
                                  "preset changes the defaults; flags given still win", choices=list(PRESETS))
    target: str = flag("7x", "latency target: a speedup over BERT-base ('7x', Table 4) or a budget in ms ('40ms')")
    superplm: str = flag("runs/superplm", "SuperPLM run folder or checkpoint.pt (superplm.py)")
    latency: str = flag("runs/predictor", "latency predictor: `latency.py fit`'s run folder or its predictor.pt")
    method: str = flag("evolve-elite", "evolve: Algorithm 2 with the paper's settings; evolve-elite: pm/pe 0.8/0.2, "
                                       "elitist rank parents, wider mutation, latency window 0.85-1x; random; fast: "
                                       "§4.4's rule", choices=["evolve", "evolve-elite", "random", "fast"])
    evaluator: str = flag("mlm", "mlm: -(masked-LM loss) of the sub-model inside the SuperPLM (fast); finetune: the "
                                 "paper's (MNLI accuracy + SQuAD F1) / 2 after a short fine-tuning; params: non-"
                                 "embedding parameters, training-free (--space)", choices=["mlm", "finetune", "params"])
    space: str = flag("", "params: pretrain or kd (Table B.1) or a SuperPLM run folder to search; empty: --superplm's")
    generations: int = flag(4, "T of Algorithm 2 (random search scores T x S archs)", **COUNT)
    population: int = flag(25, "S of Algorithm 2: architectures per generation", **COUNT)
    p_mutate: Optional[float] = flag(None, "pm of Algorithm 2 (random and fast have none); the default follows "
                                           "--method: evolve 0.5 (the paper's), evolve-elite 0.8", **SHARE)
    p_explore: Optional[float] = flag(None, "pe of Algorithm 2 (random and fast have none); the default follows "
                                            "--method: evolve 0.5 (the paper's), evolve-elite 0.2", **SHARE)
    top: int = flag(3, "architectures reported and extracted (§3.6: the top three)", **COUNT)
    extract: bool = flag(False, "save the top architectures as Hugging Face BERT folders in OUT/top/")
    out: str = flag("runs/search", "run folder: results, state, figure")
    resume: bool = flag(False, "continue an interrupted search in --out")
    overwrite: bool = flag(False, "replace the search in --out")
    seed: int = flag(0, "seed of the search, the masks and the fine-tuning", **NONNEGATIVE)
    device: str = flag("auto", "the evaluator's device. " + DEVICE_HELP)
    dtype: str = flag("auto", DTYPE_HELP, choices=["auto", *DTYPES])
    eval_corpus: str = flag("", "mlm: corpus spec of the scored text (data.py); empty: the SuperPLM's own")
    eval_rows: int = flag(256, "mlm: held-out sequences scored (at most the held-out tail, data.split)", **COUNT)
    mnli_data: str = flag("", "finetune: MNLI folder (GLUE layout); empty: datasets")
    squad_data: str = flag("", "finetune: folder of SQuAD v1.1 JSON; empty: datasets")
    ft_epochs: int = flag(1, "finetune: epochs per task", **COUNT)
    ft_train_examples: int = flag(2000, "finetune: training examples per task (0: all)", **NONNEGATIVE)
    ft_eval_examples: int = flag(1000, "finetune: dev examples per task (0: all)", **NONNEGATIVE)
    threads: Optional[int] = flag(None, THREADS_HELP, **COUNT)
    RESUMABLE = ("extract", "top")  # --resume may change these too (besides where and how fast: parse_flags)


PROBABILITIES = {"evolve": dict(p_mutate=0.5, p_explore=0.5),  # pm and pe of each method, as --help shows them
                 "evolve-elite": dict(p_mutate=ELITE["p_mutate"], p_explore=ELITE["p_explore"])}


def defaults(first, argv=None):
    """The defaults a command line starts from: the preset's, and pm/pe of the method (given, else the preset's)."""
    preset = PRESETS[first.preset]
    method = argparse.ArgumentParser(add_help=False)
    method.add_argument("--method", default=preset.get("method", Config.method))
    return {**PROBABILITIES.get(method.parse_known_args(argv)[0].method, {}), **preset}


def parse_config(argv=None):
    return parse_flags(Config, argv, __doc__.split("\n")[0], defaults=partial(defaults, argv=argv))


# Each SuperPLM's speedup over BERT-base here (latency.measure, one thread): a target T needs one of at most 0.8 T.
SUPERPLMS = {"4-256-1024-4-256": 25.5, "4-384-1536-6-384": 11.9, "4-512-2048-8-512": 6.7, "6-512-2048-8-512": 5.2,
             "8-768-3072-12-768": 1.6}


def train_superplm_for(speedup):
    """The command that trains, in minutes, the smallest SuperPLM of SUPERPLMS whose space can meet `speedup`."""
    arch = next((a for a, s in SUPERPLMS.items() if s <= 0.8 * speedup), "8-768-3072-12-768") if speedup else ""
    steps = "" if arch in ("", "4-256-1024-4-256") else " --steps 100 --batch-size 16"  # larger: fewer, smaller steps
    return (f"python superplm.py --preset tiny{f' --superplm-arch {arch}' if arch else ''}{steps} --out "
            f"{free_folder(Config.superplm)}")


def check_inputs(cfg):
    """Before any work: (the speedup asked, None for a budget in ms; the SuperPLM's checkpoint.pt) or how to make it."""
    speedup = None if cfg.target.strip().lower().endswith("ms") else 1 / parse_target(cfg.target, 1.0)
    if cfg.evaluator == "params" and cfg.space:
        return speedup, None  # training-free: no SuperPLM needed
    if not Path(cfg.superplm).exists():
        raise no_such("--superplm", cfg.superplm, f"train one (minutes): {train_superplm_for(speedup)}")
    return speedup, checkpoint_path(cfg.superplm, "--superplm")


def check_reach(cfg, speedup, arch, largest, smallest=None):
    """Refuse a target that every arch of the SuperPLM `arch` beats (its largest `largest` x faster than BERT-base)."""
    low = ELITE["window"] * largest  # the lowest target whose latency window the space still reaches
    if speedup and speedup < low:
        high = f" to {smallest:.3g}x" if smallest else " and up"
        raise UserError(f"--target {cfg.target}: every architecture of the {arch} SuperPLM is faster (the largest "
                        f"{largest:.3g}x); it supports targets of {low:.3g}x{high}; for {cfg.target}, train a larger "
                        f"one: {train_superplm_for(speedup)}")


def load_predictor(cfg, space, speedup):
    """The latency predictor; if there is none, and the SuperPLM can meet the target, the commands that make one."""
    if not Path(cfg.latency).exists():
        check_reach(cfg, speedup, space.largest(), SUPERPLMS.get(str(space.largest()), 0))
        timings = free_folder("runs/latency")
        raise no_such("--latency", cfg.latency, f"measure and fit one (minutes): python latency.py measure --space "
                      f"{cfg.superplm} --samples 200 --out {timings} && python latency.py fit --timings {timings} "
                      f"--out {free_folder(Config.latency)}")
    predictor = LatencyPredictor.load(cfg.latency)
    check_reach(cfg, predictor.base_ms / parse_target(cfg.target, predictor.base_ms), space.largest(),
                predictor.speedup(space.largest()), predictor.speedup(space.smallest()))
    return predictor


def run_method(cfg, space, score, budget, cache, on_generation):
    """The chosen method at T x S evaluations (random) or its own count (fast: one per layer count)."""
    common = dict(seed=cfg.seed, cache=cache, on_generation=on_generation)
    if cfg.method == "random":
        return random_search(space, score, budget, n=cfg.generations * cfg.population, **common)
    if cfg.method == "fast":
        return fast_search(space, score, budget, **common)
    probs = {k: v for k, v in dict(p_mutate=cfg.p_mutate, p_explore=cfg.p_explore).items() if v is not None}
    return METHODS[cfg.method](space, score, budget, generations=cfg.generations, population=cfg.population,
                               **probs, **common)


def main(argv=None):
    cfg = parse_config(argv)
    speedup, checkpoint = check_inputs(cfg)
    rank, world, device = init_distributed(cfg.device)  # a candidate may take hours: 24 h timeout
    folder = RunFolder(cfg.out, cfg, cfg.resume, cfg.overwrite, marker="candidates.jsonl", argv=argv) if rank == 0 \
        else nullcontext()  # worker 0 owns the run folder
    with folder:
        opened = [open_search(cfg, folder) if rank == 0 else None]  # a resumed search: its saved settings
        if world > 1:
            dist.broadcast_object_list(opened)
        cfg, records = opened[0]
        if cfg.evaluator == "params":  # training-free: a space (--space, else the SuperPLM's), no weights
            if cfg.extract:
                raise UserError("--extract copies a SuperPLM's weights, which --evaluator params does not use: drop "
                                "--extract and train the pick from scratch with `python superplm.py --arch ARCH`")
            model = tokenizer = ckpt = None
            space = space_from(cfg.space or str(checkpoint))
        else:
            if cfg.space:
                raise UserError(f"--space is for --evaluator params: --evaluator {cfg.evaluator} searches the "
                                "space of --superplm")
            ckpt = torch_load(checkpoint)  # read once: the SuperPLM, and the corpus settings of the mlm evaluator
            model, space, tokenizer = load_superplm(checkpoint, ckpt)
        predictor = load_predictor(cfg, space, speedup)
        budget = Budget(space, predictor, parse_target(cfg.target, predictor.base_ms))
        seed_everything(cfg.seed)
        compute = resolve_compute(str(device), cfg.dtype, cfg.threads)
        score = rank0_first(rank, world, partial(make_score, cfg, model, tokenizer, ckpt, compute))
        score.metrics.update({a: r.get("metrics", {}) for a, r in records.items()})
        if rank:  # the other workers score what worker 0's search asks for
            Shared(score, rank, world, record=None).serve()
            end_distributed(world)
            return None
        print(f"searching {space.size():,} architectures of {space.largest()} ({cfg.method}, {cfg.evaluator} "
              f"evaluator) for {cfg.target}: latency <= {budget.budget_ms:.4g} ms on {predictor.backend} (BERT-base "
              f"{predictor.base_ms:.4g} ms) on {world} worker(s), {compute}"
              + (f"; {len(records)} scored before, replayed" if records else ""))
        n_evals = len(space.layers) if cfg.method == "fast" else cfg.generations * cfg.population
        bar = tqdm(total=n_evals, initial=len(records), desc="scoring", unit="arch")
        with warnings.catch_warnings(), stop_after_step("candidate") as stop:
            warnings.simplefilter("always")  # a search's warnings (a dropped window, a short generation): one line each
            warnings.showwarning = lambda message, *_, **__: bar.write(f"warning: {message}")
            record = SearchRecord(folder, command_line(["--out", cfg.out, "--resume"], "search.py"), budget,
                                  predictor.base_ms, score.metrics, bar, stop)
            shared = Shared(score, rank, world, record.scored)
            try:
                results = run_method(cfg, space, shared, budget, {a: r["score"] for a, r in records.items()},
                                     record.generation)
            finally:
                shared.stop()
        bar.close()
        end_distributed(world)
        return finish(cfg, results, record.rows, budget, predictor, model, tokenizer, ckpt["config"] if ckpt else {})


def finish(cfg, results, rows, budget, predictor, model, tokenizer, trained):
    """Worker 0 after the search: scored.json, top.json, the figure, the printed top and (--extract) the models."""
    out, top = Path(cfg.out), results[:cfg.top]
    scored, best = rows(results), rows(top)
    save_json(scored, out / "scored.json")
    save_json(dict(target=cfg.target, budget_ms=budget.budget_ms, base_ms=predictor.base_ms, backend=predictor.backend,
                   method=cfg.method, evaluator=cfg.evaluator, superplm=str(cfg.superplm) if model else None,
                   best=str(top[0].arch), top=best), out / "top.json")
    ylabel = {"mlm": "score = -(masked-LM loss)", "finetune": "score = (MNLI acc + SQuAD F1) / 2",
              "params": "score = non-embedding parameters (M)"}[cfg.evaluator]
    made = [out / "top.json", out / "scored.json", out / "candidates.jsonl",
            search_figure(scored, best, predictor.base_ms / budget.budget_ms, out / "search.png",
                          f"{cfg.method} search for {cfg.target}", ylabel)]
    extra = sorted({k for r in best for k in r} - {"arch", "score", "latency", "generation", "speedup"})
    print(f"\ntop {len(top)} of {len(results)} scored architectures (layers-hidden-ffn-heads-qkv) for {cfg.target} = "
          f"{budget.budget_ms:.4g} ms, by {cfg.method} with the {cfg.evaluator} evaluator:")
    print(f"{'rank':>4}  {'architecture':20s} {'latency ms':>10} {'speedup':>8} {'score':>9}"
          + "".join(f" {k + ' %' * k.endswith(('acc', 'f1')):>9}" for k in extra))  # mlm_acc %, squad_f1 %
    for i, r in enumerate(best, 1):
        print(f"{i:>4}  {r['arch']:20s} {r['latency']:10.4g} {r['speedup']:7.2f}x {r['score']:9.4f}"
              + "".join(f" {r.get(k, float('nan')):9.4f}" for k in extra))
    if cfg.extract:
        made += [save_model(model, c.arch, tokenizer, out / "top" / f"{i}-{c.arch}") for i, c in enumerate(top, 1)]
    if model is None:  # the params evaluator's pick has no weights yet
        print(f"\nnext (pre-training from scratch): python superplm.py --arch {top[0].arch} --out "
              f"{free_folder('runs/scratch')}")
    else:  # §3.6 further training with the one-shot run's preset, for a third of its steps (as the demo)
        steps = f" --steps {max(1, trained['steps'] // 3)}" if trained.get("steps") else ""
        print(f"\nnext (§3.6, further training): python superplm.py --init {cfg.superplm} --arch {top[0].arch} "
              f"--preset {trained.get('preset', 'paper')}{steps} --out {free_folder('runs/further')}")
    print(f"wrote {out}/: " + ", ".join(str(Path(p).relative_to(out)) for p in made))
    return top


if __name__ == "__main__":
    run_main(main)
