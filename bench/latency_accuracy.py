"""Benchmark: how well the latency predictor lat(·) of §3.5 predicts latency on this CPU.

Times >= 1,000 architectures of the pre-training space (Table B.1) with latency.py (resumable, under bench/out/),
fits the predictor on 80% and scores the held-out 20% (issue targets: MAPE <= 3%, Kendall tau >= 0.95), beside
two ceilings: the noise of timing one architecture ten times, and the agreement of two separate timings of the
same 100 architectures (no predictor can rank better than the data it is scored on). Two ablations: HAT's four
input features (no head count, no FLOP terms), and fitting raw timings instead of the ratio to the reference.

    python bench/latency_accuracy.py          # about 45 min on 2 shared cores; re-running resumes
"""

import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import append_jsonl, parse_flags, read_jsonl, run_main, save_json  # noqa: E402
from latency import (FitConfig, MeasureConfig, TimingConfig, accuracy, archs_to_time, collect, cpu_model,  # noqa: E402
                     fit_data, load_data, relative, run_measure)
from model import PRETRAIN_SPACE, Arch  # noqa: E402

HAT_FEATURES = ("hidden", "layers", "ffn", "qkv")  # HAT's and the authors' predictor inputs


@dataclass
class BenchCfg(TimingConfig):
    samples: int = field(default=1000, metadata={"help": "architectures timed for the predictor (issue: >= 1000)"})
    pairs: int = field(default=100, metadata={"help": "architectures timed twice, in two random orders"})
    noise_runs: int = field(default=10, metadata={"help": "times the noise architecture is timed"})
    noise_arch: str = field(default="5-564-1054-8-512", metadata={"help": "arch timed repeatedly (AutoTinyBERT-S1)"})
    out: str = field(default="bench/out", metadata={"help": "folder of the timings (git-ignored) and the results"})
    seed: int = field(default=0, metadata={"help": "seed of the sampled architectures and of the fit"})


def timed_once(path, archs, cfg):
    """Records of `archs` timed in the given order, kept in `path` (reused when complete, else timed afresh)."""
    path = Path(path)
    if path.exists():
        records = read_jsonl(path)
        if [r["arch"] for r in records if r["kind"] == "arch"] == [str(a) for a in archs]:
            return records
        path.unlink()
    records = []
    for r in collect(archs, cfg):
        append_jsonl(path, r)
        records.append(r)
    return records


def main():
    cfg = parse_flags(BenchCfg, description=__doc__.splitlines()[0])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timing = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TimingConfig)}

    # the data set: resumes where an earlier run stopped
    data_path = out / "latency_pretrain"  # latency.py measure's run folder
    run_measure(MeasureConfig(**timing, space="pretrain", samples=cfg.samples, out=str(data_path), seed=cfg.seed,
                              resume=(data_path / "timings.jsonl").exists()))
    collect_s = sum(r.get("seconds", 0.0) for r in read_jsonl(data_path / "timings.jsonl"))
    data = load_data(data_path)
    fit_cfg = FitConfig(seed=cfg.seed)
    t0 = time.time()
    predictor, ours = fit_data(data, fit_cfg)
    fit_s = time.time() - t0
    _, hat = fit_data(data, fit_cfg, names=HAT_FEATURES)
    _, raw = fit_data(dict(data, ratio=data["ms"] / data["ref_ms"]), fit_cfg)

    # noise: one architecture timed cfg.noise_runs times, each a fresh model as `measure` builds it
    noise = [r for r in timed_once(out / "latency_noise.jsonl", [Arch.parse(cfg.noise_arch)] * cfg.noise_runs, cfg)
             if r["kind"] == "arch"]
    ms, rel = np.array([r["ms"] for r in noise]), np.array([relative(r) for r in noise])

    # the ceiling: the same archs timed twice, in two different random orders
    archs = archs_to_time(PRETRAIN_SPACE, cfg.pairs, cfg.seed + 1)
    shuffled = random.Random(cfg.seed + 1).sample(archs, len(archs))
    first, second = ({r["arch"]: r for r in timed_once(out / f"latency_pass{p}.jsonl", a, cfg) if r["kind"] == "arch"}
                     for p, a in ((1, archs), (2, shuffled)))
    keys = [str(a) for a in archs]
    twice = accuracy([relative(second[k]) for k in keys], [relative(first[k]) for k in keys])
    twice_raw = accuracy([second[k]["ms"] for k in keys], [first[k]["ms"] for k in keys])
    vs_pass = accuracy(predictor.predict(archs), [relative(first[k]) * data["ref_ms"] for k in keys])

    h = ours["heldout"]
    rows = [  # (what, value, target or None, higher is better)
        ("held-out MAPE, %", h["mape"], 3.0, False),
        ("held-out Kendall tau", h["tau"], 0.95, True),
        ("held-out RMSE, ms", h["rmse"], None, False),
        ("held-out MAPE against raw timings, %", ours["heldout_raw"]["mape"], None, False),
        ("HAT features (no heads): MAPE, %", hat["heldout"]["mape"], None, False),
        ("HAT features (no heads): tau", hat["heldout"]["tau"], None, True),
        ("fit raw timings (no reference): MAPE vs raw, %", raw["heldout_raw"]["mape"], None, False),
        ("fit raw timings (no reference): tau vs raw", raw["heldout_raw"]["tau"], None, True),
        (f"one arch x{len(ms)}: coefficient of variation of ms, %", ms.std() / ms.mean() * 100, None, False),
        (f"one arch x{len(ms)}: (max-min)/median of ms, %", np.ptp(ms) / np.median(ms) * 100, None, False),
        (f"one arch x{len(ms)}: CV of ratio to reference, %", rel.std() / rel.mean() * 100, None, False),
        (f"{cfg.pairs} archs timed twice: MAPE of ratio, %", twice["mape"], None, False),
        (f"{cfg.pairs} archs timed twice: tau of ratio", twice["tau"], None, True),
        (f"{cfg.pairs} archs timed twice: MAPE of raw ms, %", twice_raw["mape"], None, False),
        (f"{cfg.pairs} archs timed twice: tau of raw ms", twice_raw["tau"], None, True),
        (f"predictor vs first timing of those {cfg.pairs}: MAPE, %", vs_pass["mape"], None, False),
        (f"predictor vs first timing of those {cfg.pairs}: tau", vs_pass["tau"], None, True),
        ("BERT-base latency, ms", data["base_ms"], None, False),
        (f"collection of {len(data['archs'])} archs, minutes", collect_s / 60, None, False),
        ("seconds per arch", collect_s / len(data["archs"]), None, False),
        ("fit, seconds", fit_s, None, False),
    ]
    print(f"\nlatency predictor on {cpu_model()}, {cfg.threads} thread(s), batch {cfg.batch_size}, {cfg.seq_len} "
          f"tokens; {ours['train']} archs to fit, {h['n']} held out")
    print(f"{'metric':58s} {'value':>9s} {'target':>8s} {'ratio':>6s}")
    for what, value, target, higher in rows:
        if target is None:
            print(f"{what:58s} {value:9.3f}")
        else:
            ok = value >= target if higher else value <= target
            print(f"{what:58s} {value:9.3f} {('>= ' if higher else '<= ') + str(target):>8s} {value / target:6.2f}"
                  f"  {'ok' if ok else 'MISSED'}")
    save_json(dict(config=dataclasses.asdict(cfg), cpu=cpu_model(), fit=ours, hat_features=hat, raw_timings=raw,
                   rows=[dict(metric=w, value=float(v), target=t) for w, v, t, _ in rows]),
              out / "latency_accuracy.json")


if __name__ == "__main__":
    run_main(main)
