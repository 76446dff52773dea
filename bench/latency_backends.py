"""Benchmark: latency on the runtime a model ships on: PyTorch eager against ONNX Runtime fp32 and int8 (issue 12).

1. BERT-base and Table 4's shapes, each on the three backends (latency.BACKENDS), all six models (it and the
   reference, per backend) alternated pass by pass: the speedup of ONNX Runtime fp32 / int8 over PyTorch eager
   for the same model, and each backend's speedup over BERT-base beside the paper's.
2. Architectures of the pre-training space (Table B.1), each exported once, quantized once and timed on the three
   backends beside the reference on the same backend (latency.py's protocol): per backend the predictor's
   held-out MAPE and Kendall tau; Kendall tau between the backends' drift-free latencies of the same archs, and
   that of the torch predictor against the ONNX Runtime timings (what searching for the wrong runtime ranks).

    python bench/latency_backends.py --samples 500 --workers 2    # resumable; results in bench/out/
"""

import dataclasses
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import latency  # noqa: E402
from common import append_jsonl, parse_flags, read_jsonl, run_main, save_json  # noqa: E402
from latency import (BACKENDS, REFERENCE, TABLE4, FitConfig, accuracy, cpu_model, fit_data, kendall_tau,  # noqa: E402
                     on_backends, timings)
from model import BERT_BASE, PRETRAIN_SPACE, Arch, Bert  # noqa: E402


@dataclass
class BenchCfg:
    samples: int = field(default=500, metadata={"help": "architectures timed on every backend (issue: >= 500)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per input (the paper: 128)"})
    batch: int = field(default=1, metadata={"help": "inputs per forward pass (the paper: 1)"})
    warmup: int = field(default=2, metadata={"help": "untimed passes per arch"})
    repeats: int = field(default=5, metadata={"help": "timed passes per arch (median)"})
    table_repeats: int = field(default=10, metadata={"help": "timed passes per Table 4 model (median)"})
    workers: int = field(default=1, metadata={"help": "processes timing archs at once, one thread each"})
    seed: int = field(default=0, metadata={"help": "seed of the sampled architectures and of the fits"})
    out: str = field(default="bench/out", metadata={"help": "folder of the timings (git-ignored) and the results"})


def time_backends(arch, refs, cfg, repeats):
    """{backend: (ms, reference ms)} of `arch` built on every backend, the six models alternated pass by pass."""
    models = on_backends(Bert(arch).eval(), BACKENDS)
    times = timings(models + refs, 1, cfg.seq_len, cfg.batch, cfg.warmup, repeats)
    ms = [float(np.median(t)) for t in times]
    return {b: dict(ms=ms[i], ref_ms=ms[len(BACKENDS) + i]) for i, b in enumerate(BACKENDS)}


_refs = None  # each worker's reference, built once on every backend


def _timed(task):
    global _refs
    i, kind, arch, cfg = task
    if _refs is None:
        _refs = on_backends(Bert(REFERENCE).eval(), BACKENDS)
    t0 = time.time()
    timed = time_backends(Arch.parse(arch), _refs, cfg, cfg.repeats)
    return dict(kind=kind, arch=arch, i=i, seconds=time.time() - t0, **timed)


def table4(cfg, path):
    """Part 1, kept in `path`: {arch: {backend: (ms, ref ms)}} for BERT-base and Table 4's archs."""
    if path.exists():
        return read_jsonl(path)[0]
    refs = on_backends(Bert(REFERENCE).eval(), BACKENDS)
    archs = [str(BERT_BASE)] + list(dict.fromkeys(a for _, _, a, _ in TABLE4))
    out = {a: time_backends(Arch.parse(a), refs, cfg, cfg.table_repeats) for a in tqdm(archs, unit="model")}
    append_jsonl(path, out)
    return out


def collect(cfg, path):
    """Part 2, resumable: one record per arch (and BERT-base every latency.BASE_EVERY archs) in `path`."""
    archs = latency.archs_to_time(PRETRAIN_SPACE, cfg.samples, cfg.seed)
    tasks = []
    for n, arch in enumerate(archs):
        if n % latency.BASE_EVERY == 0:
            tasks.append((n, "base", str(BERT_BASE), cfg))
        tasks.append((n, "arch", str(arch), cfg))
    done = {(r["kind"], r["i"]) for r in read_jsonl(path)} if path.exists() else set()
    todo = [t for t in tasks if (t[1], t[0]) not in done]
    if todo:
        print(f"timing {len(todo)} models on {', '.join(BACKENDS)} with {cfg.workers} worker(s) -> {path}")
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(cfg.workers) as pool:
            for r in tqdm(pool.imap_unordered(_timed, todo), total=len(todo), unit="model"):
                append_jsonl(path, r)
    wanted = {(kind, i) for i, kind, _, _ in tasks}  # a smaller --samples reports on a prefix of a longer run
    records = [r for r in read_jsonl(path) if (r["kind"], r["i"]) in wanted]
    return [r for r in records if r["kind"] == "arch"], [r for r in records if r["kind"] == "base"]


def backend_data(timed, bases, backend, cfg):
    """One backend's timings as latency.load_data returns them, for latency.fit_data."""
    rel = lambda r: r[backend]["ms"] / r[backend]["ref_ms"]  # noqa: E731
    ref_ms = float(np.median([r[backend]["ref_ms"] for r in timed + bases]))
    device = dict(cpu=cpu_model(), threads=1, seq_len=cfg.seq_len, batch=cfg.batch, backend=backend)
    meta = dict(device=device, reference=str(REFERENCE), warmup=cfg.warmup, repeats=cfg.repeats, space="pretrain")
    return dict(meta=meta, archs=[Arch.parse(r["arch"]) for r in timed], ratio=np.array([rel(r) for r in timed]),
                ms=np.array([r[backend]["ms"] for r in timed]), ref_ms=ref_ms,
                base_ms=float(np.median([rel(r) for r in bases])) * ref_ms)


def main():
    cfg = parse_flags(BenchCfg, description=__doc__.splitlines()[0])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    table = table4(cfg, out / f"backends_table4_{cfg.seq_len}x{cfg.batch}.jsonl")
    timed, bases = collect(cfg, out / f"backends_archs_{cfg.seq_len}x{cfg.batch}.jsonl")
    timed.sort(key=lambda r: r["i"])

    print(f"\n1. ONNX Runtime against PyTorch eager on {cpu_model()}, 1 thread, batch {cfg.batch}, "
          f"{cfg.seq_len} tokens, median of {cfg.table_repeats} passes alternated")
    base = {b: table[str(BERT_BASE)][b]["ms"] / table[str(BERT_BASE)][b]["ref_ms"] for b in BACKENDS}
    print(f"{'model':24s} {'arch':18s} {'torch ms':>9s} {'ort ms':>8s} {'int8 ms':>8s} {'ort/torch':>9s} "
          f"{'int8/torch':>10s} | speedup over BERT-base: {'paper':>6s} {'torch':>6s} {'ort':>6s} {'int8':>6s}")
    rows = [("", "BERT-base", str(BERT_BASE), None)] + TABLE4
    for setting, name, arch, paper in rows:
        t = table[arch]
        ms = [t[b]["ms"] for b in BACKENDS]
        speed = [base[b] / (t[b]["ms"] / t[b]["ref_ms"]) for b in BACKENDS]
        print(f"{(setting + ' ' + name).strip():24s} {arch:18s} {ms[0]:9.2f} {ms[1]:8.2f} {ms[2]:8.2f} "
              f"{ms[0] / ms[1]:8.2f}x {ms[0] / ms[2]:9.2f}x | {'':23s} {paper or 1.0:5.1f}x "
              + " ".join(f"{s:5.1f}x" for s in speed))
    fp32, int8 = ([table[a]["torch"]["ms"] / table[a][b]["ms"] for a in table] for b in BACKENDS[1:])
    print(f"median over these {len(table)} models: ONNX Runtime fp32 {np.median(fp32):.2f}x, int8 "
          f"{np.median(int8):.2f}x faster than PyTorch eager")

    print(f"\n2. latency predictor per backend: {len(timed)} archs of the pre-training space, 80% to fit, "
          f"20% held out; {cfg.warmup} + {cfg.repeats} passes each, beside the reference on the same backend")
    data = {b: backend_data(timed, bases, b, cfg) for b in BACKENDS}
    fits = {b: fit_data(data[b], FitConfig(seed=cfg.seed)) for b in BACKENDS}
    print(f"{'backend':18s} {'BERT-base ms':>12s} {'MAPE %':>7s} {'tau':>6s} {'held out':>8s}")
    for b in BACKENDS:
        h = fits[b][1]["heldout"]
        print(f"{b:18s} {data[b]['base_ms']:12.2f} {h['mape']:7.2f} {h['tau']:6.3f} {h['n']:8d}")
    drift_free = {b: data[b]["ratio"] * data[b]["ref_ms"] for b in BACKENDS}
    print(f"\nKendall tau between backends, drift-free latencies of the same {len(timed)} archs "
          "(share of pairs ordered differently = (1 - tau) / 2):")
    taus = {}
    for i, a in enumerate(BACKENDS):
        for b in BACKENDS[i + 1:]:
            taus[f"{a} vs {b}"] = tau = kendall_tau(drift_free[a], drift_free[b])
            print(f"  {a:18s} vs {b:18s} tau {tau:.3f}  ({(1 - tau) / 2 * 100:.1f}% of pairs swapped)")
    test = np.random.default_rng(cfg.seed).permutation(len(timed))[:max(1, int(len(timed) * FitConfig.holdout))]
    torch_pred = fits["torch"][0].predict([data["torch"]["archs"][i] for i in test])
    print("the torch predictor scored against other runtimes' timings of the held-out archs:")
    cross = {}
    for b in BACKENDS[1:]:
        cross[b] = accuracy(torch_pred * data[b]["base_ms"] / data["torch"]["base_ms"], drift_free[b][test])
        print(f"  {b:18s} tau {cross[b]['tau']:.3f}  MAPE {cross[b]['mape']:.2f}% (scaled by BERT-base's ratio) "
              f"vs its own predictor: tau {fits[b][1]['heldout']['tau']:.3f}")
    seconds = sum(r["seconds"] for r in timed + bases)
    print(f"\ntiming: {seconds / 60:.0f} worker-minutes for {len(timed) + len(bases)} models on 3 backends "
          f"({seconds / max(len(timed) + len(bases), 1):.1f}s each, export and quantization included); "
          f"this run {(time.time() - t0) / 60:.0f} min")
    save_json(dict(config=dataclasses.asdict(cfg), cpu=cpu_model(), table4=table, taus=taus,
                   fits={b: fits[b][1] for b in BACKENDS}, cross=cross),
              out / f"latency_backends_{cfg.seq_len}x{cfg.batch}.json")


if __name__ == "__main__":
    run_main(main)
