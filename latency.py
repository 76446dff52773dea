"""The latency evaluator lat(·) of §3.5: time sampled architectures on this CPU, fit a small MLP (HAT style).

As in HAT (Wang et al. 2020), archs are timed as stand-alone BERTs on the target device ("a single CPU with a single
input of 128 tokens", Table 1) and an MLP maps their features (Eq. 1-3) to latency. A target "7x" means lat(α) <=
lat(BERT-base) / 7, BERT-base timed in the same file. On a shared machine drift limits accuracy, so archs are timed in
random order, pass by pass beside a fixed reference model, and the predictor learns the drift-free ratio of the two.
--backend: PyTorch eager, or export.py's ONNX graph on ONNX Runtime, fp32 or int8 (the reference runs there too).

    python latency.py measure --space pretrain --samples 2000 --out runs/latency   # hours; --resume continues
    python latency.py measure --preset tiny --out runs/latency   # a quick look: 150 archs, 1-3 minutes
    python latency.py fit --timings runs/latency --out runs/predictor   # predictor.pt, metrics.json
    python latency.py table --predictor runs/predictor
"""

import contextlib
import dataclasses
import logging
import os
import platform
import random
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common import (COUNT, Interrupted, NONNEGATIVE, RunFolder, UserError, append_jsonl, command_line, flag,
                    free_folder, no_such, parse_flags, read_appended, read_jsonl, run_main, save_json, seed_everything,
                    torch_load, torch_save)
from model import Arch, Bert, BERT_BASE, KD_SPACE, PRETRAIN_SPACE
from superplm import saved_space


def features(archs, seq_len, batch):
    """Per-arch terms that cost time on a CPU (Eq. 1-3): the five sizes and the work of each kind of op."""
    a = np.array([[x.layers, x.hidden, x.ffn, x.heads, x.qkv] for x in archs], dtype=np.float64)
    L, dm, df, h, dqkv = a.T
    T, B = seq_len, batch
    return dict(layers=L, hidden=dm, ffn=df, heads=h, qkv=dqkv,
                ffn_macs=B * L * T * 2 * dm * df,  # Eq. 3: two matmuls
                proj_macs=B * L * T * 4 * dm * dqkv,  # Eq. 1-2: Q, K, V and output projections
                attn_macs=B * L * T * T * 2 * dqkv,  # QK^T and attention x V
                softmax=B * L * h * T * T,  # one T x T score map per head (HAT leaves heads out)
                elementwise=B * L * T * (2 * dm + df))  # LayerNorms, residuals, GELU


def macs(archs, seq_len=128):
    """Multiply-adds of one input of seq_len tokens through the encoder (Eq. 1-3's matmuls): a training-free proxy."""
    f = features(archs, seq_len, batch=1)
    return f["ffn_macs"] + f["proj_macs"] + f["attn_macs"]


def params(archs):
    """Non-embedding parameters: the training-free proxy of LiteTransformerSearch (Javaheripi et al. 2022)."""
    L, dm, df, dqkv = np.array([[a.layers, a.hidden, a.ffn, a.qkv] for a in archs], dtype=np.int64).T  # exact
    return L * (3 * (dm * dqkv + dqkv)  # Eq. 1: W_Q, W_K, W_V (dm x dqkv) and their biases
                + dqkv * dm + dm  # Eq. 2: W_O (dqkv x dm) and its bias
                + dm * df + df + df * dm + dm  # Eq. 3: W_1 (dm x df), W_2 (df x dm) and their biases
                + 2 * 2 * dm)  # two LayerNorms: weight and bias each


def log_features(archs, device, names):
    """(N, F) the logs of the features `names` on `device` (seq_len, batch): sizes span two orders of magnitude."""
    f = features(archs, device["seq_len"], device["batch"])
    return np.log(np.stack([f[k] for k in names], 1))


FEATURES = ("layers", "hidden", "ffn", "heads", "qkv", "ffn_macs", "proj_macs", "attn_macs", "softmax", "elementwise")


def mlp(n_in, width):
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


class LatencyPredictor:
    """lat(·) of §3.5: an MLP from log-scaled, standardised features to log(latency / reference latency)."""

    def __init__(self, state, name="the latency predictor"):
        self.state, self.name, self.warned = state, name, False  # state: plain data, what save() writes
        self.net = mlp(len(state["features"]), state["width"]).eval()
        self.net.load_state_dict(state["net"])

    base_ms = property(lambda self: self.state["base_ms"])  # BERT-base's latency on the device measured on
    device = property(lambda self: self.state["device"])  # what its latencies depend on besides the arch
    backend = property(lambda self: self.device.get("backend", "torch"))  # BACKENDS (older files: torch)

    @torch.no_grad()
    def predict(self, archs):
        """Latency in ms of each arch."""
        archs, s = [a if isinstance(a, Arch) else Arch.parse(a) for a in archs], self.state
        self.check_ranges(archs)
        x = log_features(archs, s["device"], s["features"])
        log_ratio = self.net(torch.tensor((x - s["mean"]) / s["std"], dtype=torch.float32)).squeeze(1)  # (N,)
        return np.exp(log_ratio.double().numpy() * s["y_std"] + s["y_mean"]) * s["ref_ms"]

    def __call__(self, arch):
        return float(self.predict([arch])[0])

    def check_ranges(self, archs):
        """Warn once about shapes outside those it was fitted on: an MLP extrapolates badly (20% off on Table 4)."""
        ranges = self.state.get("ranges") or {}
        outside = list(dict.fromkeys(str(a) for a in archs if any(not lo <= getattr(a, d) <= hi
                                                                  for d, (lo, hi) in ranges.items())))
        if outside and not self.warned:
            self.warned = True
            tqdm.write(f"warning: {self.name} was fitted on shapes with " + ", ".join(
                f"{d} {lo}-{hi}" for d, (lo, hi) in ranges.items()) + f"; {len(outside)} of {len(set(archs))} shapes "
                f"are outside ({', '.join(outside)}): its predictions there are extrapolations, fit one on timings "
                "that cover these shapes", file=sys.stderr)  # above a progress bar, never inside its line

    def speedup(self, arch):
        return self.base_ms / self(arch)

    @classmethod
    def fit(cls, archs, ratio, ref_ms, base_ms, device, names=FEATURES, width=128, steps=2000, lr=1e-3, seed=0,
            space=None):
        """HAT's predictor (3 hidden layers, full-batch Adam, cosine decay) fit to log(latency / the reference's)."""
        bounds = list(archs) + ([space.smallest(), space.largest()] if space else [])  # shapes it knows: no warning
        seed_everything(seed)
        x = log_features(archs, device, names)  # (N, F)
        mean, std = x.mean(0), x.std(0) + 1e-8
        y = np.log(ratio)
        state = dict(features=list(names), width=width, mean=mean.tolist(), std=std.tolist(), device=dict(device),
                     y_mean=float(y.mean()), y_std=float(y.std() + 1e-8), ref_ms=float(ref_ms), base_ms=float(base_ms),
                     ranges={d: [min(getattr(a, d) for a in bounds), max(getattr(a, d) for a in bounds)]
                             for d in ("layers", "hidden", "ffn", "heads", "qkv")})
        net = mlp(len(names), width)
        X = torch.tensor((x - mean) / std, dtype=torch.float32)
        Y = torch.tensor((y - state["y_mean"]) / state["y_std"], dtype=torch.float32)[:, None]  # (N, 1)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        with num_threads(1):  # tiny matmuls: more threads only contend on a shared machine
            for _ in range(steps):
                loss = ((net(X) - Y) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        state["net"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        return cls(state)

    def save(self, path):
        torch_save(self.state, path)

    @classmethod
    def load(cls, path):
        file = in_folder(path, "predictor.pt", "--latency", "fit one with python latency.py fit --timings TIMINGS "
                         f"--out {free_folder('runs/predictor')}", "latency.py fit")
        predictor = cls(torch_load(file), str(path))
        if predictor.device["cpu"] != cpu_model():
            warnings.warn(f"{file} was measured on {predictor.device['cpu']!r}, not this {cpu_model()!r}: its "
                          "latencies describe that device; re-measure here with `latency.py measure`")
        return predictor


def kendall_tau(a, b):
    """Kendall's tau-a: the share of concordant minus discordant pairs."""
    a, b = np.asarray(a), np.asarray(b)
    s = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])  # (N, N): +1 concordant, -1 not
    return float(s[np.triu_indices(len(a), 1)].mean())  # over the N (N - 1) / 2 pairs i < j


def accuracy(pred_ms, true_ms):
    """MAPE (%), RMSE (ms) and Kendall tau of predicted against measured latencies."""
    p, t = np.asarray(pred_ms, dtype=np.float64), np.asarray(true_ms, dtype=np.float64)
    return dict(mape=float(np.mean(np.abs(p - t) / t) * 100), rmse=float(np.sqrt(np.mean((p - t) ** 2))),
                tau=kendall_tau(p, t), n=len(t))


def fit_data(data, cfg, names=FEATURES):
    """Fit on a random (1 - holdout) share; score the rest against the drift-free latency and the raw timings."""
    n = len(data["archs"])
    order = np.random.default_rng(cfg.seed).permutation(n)
    test, train = order[:max(1, int(n * cfg.holdout))], order[max(1, int(n * cfg.holdout)):]
    meta = data["meta"]
    device = dict(meta["device"], reference=meta["reference"], warmup=meta["warmup"], repeats=meta["repeats"])
    try:  # the space the archs were sampled from (gone if its checkpoint moved)
        space = space_from(meta["space"])
    except (UserError, OSError):
        space = None
    pred = LatencyPredictor.fit([data["archs"][i] for i in train], data["ratio"][train], data["ref_ms"],
                                data["base_ms"], device, names, steps=cfg.steps, seed=cfg.seed, space=space)
    p = pred.predict([data["archs"][i] for i in test])
    metrics = dict(heldout=accuracy(p, data["ratio"][test] * data["ref_ms"]), heldout_raw=accuracy(p, data["ms"][test]),
                   train=len(train), ref_ms=data["ref_ms"], base_ms=data["base_ms"])
    pred.state["metrics"] = metrics
    return pred, metrics


# ------------------------------------------------------------------------------------------------ timing architectures

REFERENCE = Arch(4, 512, 2048, 8, 512)  # timed alongside every arch: BERT-S1 of Table 4, ~1/7 of BERT-base
BASE_EVERY = 200  # BERT-base is timed at the start of a session and every 200 archs


def build(arch, backend="torch", threads=1):
    """A stand-alone BERT of this shape, as deployed on `backend` (its weights do not change its latency)."""
    return on_backends(Bert(arch).eval(), [backend], threads)[0]


def measure(arch, threads=1, seq_len=128, batch=1, warmup=3, repeats=10, backend="torch"):
    """Latency in ms of `arch` as a stand-alone BERT on `backend`: the median of `repeats` timed forward passes."""
    return float(np.median(timings([build(arch, backend, threads)], threads, seq_len, batch, warmup, repeats)[0]))


def reference_for(space):
    """The reference: BERT-S1, shrunk to fit a smaller space so that it costs about as much as the archs."""
    big, R = space.largest(), REFERENCE
    heads = min(big.heads, R.heads)
    return Arch(min(big.layers, R.layers), min(big.hidden, R.hidden), min(big.ffn, R.ffn), heads,
                heads * min(big.head_dim, R.head_dim))


def collect(archs, cfg, start=0, reference=REFERENCE):
    """Time `archs` pass by pass beside the reference (drift hits both alike), BERT-base every BASE_EVERY archs."""
    ref = build(reference, cfg.backend, cfg.threads)

    def timed(kind, arch, **extra):
        t0 = time.time()
        ms, ref_ms = (np.percentile(t, [25, 50, 75])
                      for t in timings([build(arch, cfg.backend, cfg.threads), ref], cfg.threads, cfg.seq_len,
                                       cfg.batch_size, cfg.warmup_passes, cfg.repeats))
        return dict(kind=kind, arch=str(arch), ms=float(ms[1]), spread=float((ms[2] - ms[0]) / ms[1]),
                    ref_ms=float(ref_ms[1]), ref_spread=float((ref_ms[2] - ref_ms[0]) / ref_ms[1]),
                    time=time.time(), seconds=time.time() - t0, **extra)
    for n, arch in enumerate(archs):
        if n % BASE_EVERY == 0:
            yield timed("base", BERT_BASE)
        yield timed("arch", arch, i=start + n)


def relative(record):
    """The drift-free latency: a model's ms over the reference's ms timed alongside it."""
    return record["ms"] / record["ref_ms"]


def load_data(path):
    """measure's timings.jsonl (run folder or file), checked: archs, drift-free ratios, ms, reference and base ms."""
    path = in_folder(path, "timings.jsonl", "--timings", "time some with python latency.py measure --space SUPERPLM "
                     f"--samples 200 --out {free_folder('runs/latency')}", "latency.py measure")
    records = read_jsonl(path)
    if not records or records[0].get("kind") != "meta":
        raise UserError(f"{path} was not written by `latency.py measure`: pass a file that `measure` wrote")
    timed = [r for r in records if r["kind"] == "arch"]
    bases = [relative(r) for r in records if r["kind"] == "base"]
    if len(timed) < 10 or not bases:
        raise UserError(f"{path} holds {len(timed)} timed archs: run `latency.py measure` longer (>= 10 needed)")
    ref_ms = float(np.median([r["ref_ms"] for r in records[1:]]))
    return dict(meta=records[0], archs=[Arch.parse(r["arch"]) for r in timed],
                ratio=np.array([relative(r) for r in timed]), ms=np.array([r["ms"] for r in timed]),
                ref_ms=ref_ms, base_ms=float(np.median(bases)) * ref_ms)


def archs_to_time(space, n, seed):
    """n distinct architectures in the random order they are drawn (a prefix of the same draw for a larger n)."""
    if n > space.size():
        raise UserError(f"the space holds only {space.size()} architectures: pass --samples <= {space.size()}")
    rng, drawn = random.Random(seed), {}  # a dict: distinct keys in the order first drawn
    while len(drawn) < n:
        drawn.setdefault(space.sample(rng))
    return list(drawn)


# --------------------------------------------------------------------------------- the clock and the backends it times

BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")  # PyTorch eager; the ONNX export, fp32 or int8-quantized


def onnx_modules():
    """(onnx, onnxruntime, onnxruntime.quantization): the optional extra, imported when first needed."""
    try:
        import onnx
        import onnxruntime.quantization  # binds onnxruntime too
    except ImportError as e:
        raise UserError(f"{e.name} is not installed: pip install -r requirements-onnx.txt") from None
    return onnx, onnxruntime, onnxruntime.quantization


@contextlib.contextmanager
def quiet():
    """Silence the exporter's and the quantizer's warnings and log chatter (torchvision absent, pre-processing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # every logger: errors only
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def to_onnx(module, inputs, outputs):
    """The ONNX ModelProto of module(**inputs) by the dynamo exporter (TorchScript's cannot export our sliced views)
    with dynamic batch and sequence. inputs: name -> (B, T), B, T > 1 (1 would be specialised); outputs: names."""
    onnx_modules()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with quiet():
        program = torch.onnx.export(module.eval(), (), kwargs=inputs, dynamo=True, optimize=True,
                                    input_names=list(inputs), output_names=list(outputs), verbose=False,
                                    dynamic_shapes={k: {0: batch, 1: seq} for k in inputs})
    return program.model_proto


def quantize_int8(proto):
    """ONNX Runtime's dynamic quantization: int8 weights, activations quantized on the fly per batch."""
    onnx, _, quantization = onnx_modules()
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.graph.value_info[:]  # the quantizer infers shapes afresh; the exporter's annotations trip it (Gemm)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        quantization.quantize_dynamic(bare, f"{tmp}/int8.onnx", weight_type=quantization.QuantType.QInt8)
        return onnx.load(f"{tmp}/int8.onnx")


class OrtModel:
    """An ONNX graph on an ONNX Runtime CPU session, called like the torch module it was exported from."""

    def __init__(self, proto, threads=1, cfg=None):
        _, ort, _ = onnx_modules()
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1  # 1: run in the calling thread
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.cfg = cfg  # the exported Bert's config, as latency.timings reads it

    def __call__(self, *args, **kwargs):
        feed = {k: v.cpu().numpy() for k, v in dict(zip(self.names, args), **kwargs).items() if v is not None}
        outs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def on_backends(model, backends, threads=1):
    """The same Bert on each of `backends`: itself, or its ONNX graph on ONNX Runtime (exported, quantized once)."""
    out = {"torch": model}
    if set(backends) - {"torch"}:
        ids = torch.zeros(2, 16, dtype=torch.long)  # an example input; the graph takes any (B, T)
        proto = to_onnx(model, dict(input_ids=ids), ["hidden"])
        out["onnxruntime"] = OrtModel(proto, threads, model.cfg)
        if "onnxruntime-int8" in backends:
            out["onnxruntime-int8"] = OrtModel(quantize_int8(proto), threads, model.cfg)
    return [out[b] for b in backends]


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def timings(models, threads=1, seq_len=128, batch=1, warmup=3, repeats=10):
    """ms of `repeats` forward passes of each model after `warmup` untimed ones, models taking turns pass by pass.
    One thread is timed by its CPU time: on a busy machine it leaves out other processes (wall-clock varies 2x)."""
    clock = time.thread_time if threads == 1 else time.perf_counter
    out = [[] for _ in models]
    with num_threads(threads):
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(models[0].cfg["vocab_size"], (batch, seq_len), generator=gen)  # (B, T), no padding
        for n in range(warmup + repeats):
            for model, times in zip(models, out):
                t = clock()
                model(ids)
                if n >= warmup:
                    times.append((clock() - t) * 1e3)
    return out


def cpu_model():
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------- run folders: timings.jsonl, predictor.pt

SPACES = {"pretrain": PRETRAIN_SPACE, "kd": KD_SPACE}  # Table B.1, by name


def in_folder(path, name, flag, make, maker):
    """A run folder's `name` (an input may also be given as the file itself); if missing, one line with `make`."""
    given = Path(path)
    file = given / name if given.is_dir() or given.suffix == "" else given
    if not given.exists():
        raise no_such(flag, path, make)
    if not file.exists():
        raise UserError(f"{flag} {path} holds no {name}: pass the --out of `{maker}`")
    return file


def space_from(name):
    """`latency.py measure --space`: a search space by name (Table B.1) or the one saved in a SuperPLM checkpoint."""
    if name in SPACES:
        return SPACES[name]
    if (Path(name) / "checkpoint.pt").is_file():
        name = str(Path(name) / "checkpoint.pt")
    if not Path(name).exists():
        raise no_such("--space", name, f"--space also takes {' or '.join(SPACES)} (Table B.1)")
    if not Path(name).is_file():
        raise UserError(f"--space {name!r} is neither {' nor '.join(SPACES)} nor a SuperPLM checkpoint file")
    space = torch_load(name).get("space")
    if not isinstance(space, dict):
        raise UserError(f"{name} holds no search space: pass a checkpoint written by superplm.py")
    return saved_space(space)


# --------------------------------------------------------------------------------------------- Table 4 on this machine

# Table 4 (and Table F.1 for S5): (setting, model, arch, the paper's speedup over BERT-base)
TABLE4 = [("S1", "BERT", "4-512-2048-8-512", 7.1), ("S1", "AutoTinyBERT", "5-564-1054-8-512", 7.2),
          ("S2", "BERT", "4-320-1280-5-320", 14.8), ("S2", "AutoTinyBERT", "4-396-624-6-384", 15.7),
          ("S3", "BERT", "4-256-1024-4-256", 20.1), ("S3", "AutoTinyBERT", "4-432-384-4-256", 20.2),
          ("S4", "BERT", "4-192-768-3-192", 28.4), ("S4", "AutoTinyBERT", "3-320-608-4-256", 27.2),
          ("KD-S1", "BERT", "4-512-2048-12-516", 4.9), ("KD-S1", "AutoTinyBERT", "5-564-1024-12-528", 4.6),
          ("KD-S2", "BERT", "4-312-1200-12-312", 9.8), ("KD-S2", "AutoTinyBERT", "5-324-600-12-324", 9.0),
          ("KD-S3", "BERT", "4-264-1056-12-264", 11.7), ("KD-S3", "AutoTinyBERT", "5-280-512-12-276", 10.7),
          ("KD-S4", "BERT", "4-192-768-12-192", 17.0), ("KD-S4", "AutoTinyBERT", "4-256-480-12-192", 17.0),
          ("S5", "BERT", "4-384-1536-6-384", 9.3), ("S5", "AutoTinyBERT", "5-450-636-6-384", 10.8),
          ("S5", "AutoTinyBERT-Fast", "5-432-720-6-384", 10.3)]


def parse_target(text, base_ms):
    """A latency budget in ms from "7x" / "7.5x" (speedup over BERT-base, whose latency is base_ms) or "12ms"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(x|×|ms)\s*", str(text), re.IGNORECASE)
    value = float(m.group(1)) if m else 0.0
    if value <= 0:
        raise UserError(f"latency target {text!r} not understood: use a positive speedup over BERT-base such as "
                        "'7x' or '7.5x', or a budget in milliseconds such as '12ms'")
    return value if m.group(2).lower() == "ms" else base_ms / value


# --------------------------------------------------------------------------------------- settings and the command line

@dataclass
class TimingConfig:
    backend: str = flag("torch", "runtime to time on: PyTorch eager, or the ONNX export on ONNX Runtime, fp32 or int8 "
                                 "(requirements-onnx.txt)", choices=BACKENDS)
    threads: int = flag(1, "CPU threads while timing (the paper: one; one is timed by its CPU time)", **COUNT)
    seq_len: int = flag(128, "tokens per input (the paper: 128)", min=1, max=512)
    batch_size: int = flag(1, "inputs per forward pass (the paper: 1)", **COUNT)
    warmup_passes: int = flag(3, "untimed forward passes before timing", **NONNEGATIVE)
    repeats: int = flag(10, "timed forward passes; their median is the latency", **COUNT)


@dataclass
class MeasureConfig(TimingConfig):
    preset: str = flag("paper", "paper: the settings shown here; tiny: 150 archs, 1 + 3 passes each, in minutes. "
                                "A preset changes the defaults; flags given still win", choices=["paper", "tiny"])
    space: str = flag("pretrain", "pretrain or kd (Table B.1), or a SuperPLM run folder or checkpoint to sample")
    samples: int = flag(2000, "distinct architectures to time", **COUNT)
    out: str = flag("runs/latency", "run folder: timings.jsonl, config.json")
    seed: int = flag(0, "seed of the sampled architectures", **NONNEGATIVE)
    resume: bool = flag(False, "continue (or extend to more --samples) the timings")
    overwrite: bool = flag(False, "replace the timings in --out")
    RESUMABLE = ("samples",)  # --resume may time more


PRESETS = {"paper": {}, "tiny": dict(samples=150, warmup_passes=1, repeats=3)}


@dataclass
class FitConfig:
    timings: str = flag("runs/latency", "`latency.py measure`'s run folder (or file)")
    out: str = flag("runs/predictor", "run folder: predictor.pt, metrics.json, config")
    holdout: float = flag(0.2, "share of archs held out for MAPE/RMSE/Kendall tau", gt=0, max=0.9)
    steps: int = flag(2000, "full-batch Adam steps", **COUNT)
    seed: int = flag(0, "seed of the split and the initialisation", **NONNEGATIVE)
    overwrite: bool = flag(False, "replace the predictor in --out")


@dataclass
class TableConfig(TimingConfig):
    predictor: str = flag("", "a predictor (fit's run folder or its predictor.pt) to add predicted speedups")


def run_measure(cfg, argv=None):
    space = space_from(cfg.space)
    device = dict(cpu=cpu_model(), cores=os.cpu_count(), threads=cfg.threads, torch=str(torch.__version__),
                  seq_len=cfg.seq_len, batch=cfg.batch_size, backend=cfg.backend)  # what a latency depends on
    if cfg.backend != "torch":
        device["onnxruntime"] = onnx_modules()[1].__version__
    meta = dict(kind="meta", space=cfg.space, seed=cfg.seed, warmup=cfg.warmup_passes, repeats=cfg.repeats,
                reference=str(reference_for(space)), device=device)
    path = Path(cfg.out) / "timings.jsonl"
    with RunFolder(cfg.out, cfg, cfg.resume, cfg.overwrite, marker="timings.jsonl", argv=argv) as run:
        records = read_appended(path)
        if records:  # resumed: only with the settings it was begun with (older files: on torch)
            saved = dict(records[0], **{"backend": "torch", **records[0].get("device", {})})
            for key, value in dict(meta, **meta["device"]).items():
                if key != "device" and saved.get(key) != value:
                    raise UserError(f"{path} was measured with {key}={saved.get(key)}, not {value}: pass the same "
                                    "flags to resume it, or another --out")
        done = sum(r["kind"] == "arch" for r in records)
        archs = archs_to_time(space, cfg.samples, cfg.seed)[done:]
        if not archs:
            run.done_first()
            print(f"{path} already holds {done} archs: pass a larger --samples (with --resume) to time more")
            return
        if not records:
            append_jsonl(path, meta)
        print(f"timing {len(archs)} archs ({done} done) on {meta['device']['cpu']}, {cfg.threads} thread(s) -> {path}")
        try:
            with tqdm(total=len(archs), unit="arch") as bar:
                for r in collect(archs, cfg, start=done, reference=reference_for(space)):
                    append_jsonl(path, r)  # every timing is kept at once
                    run.done_first()
                    bar.update(r["kind"] == "arch")
                    bar.set_postfix_str(f"{r['kind']} {r['arch']} {r['ms']:.1f}ms")
            print(f"timed {cfg.samples} archs -> {cfg.out}/timings.jsonl")
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say what is kept and the command that continues
            kept = sum(r["kind"] == "arch" for r in read_jsonl(path))
            argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
            again = command_line(argv + ([] if "--resume" in argv else ["--resume"]), "latency.py")
            raise Interrupted(f"the {kept} archs timed so far are kept in {path}; continue with: {again}") from None


def run_fit(cfg, argv=None):
    path = Path(cfg.out) / "predictor.pt"
    with RunFolder(cfg.out, cfg, overwrite=cfg.overwrite, argv=argv):
        t0 = time.time()
        pred, m = fit_data(load_data(cfg.timings), cfg)
        pred.save(path)
        save_json(dict(m, config=dataclasses.asdict(cfg)), path.with_name("metrics.json"))
    h, r = m["heldout"], m["heldout_raw"]  # the held-out accuracy of the predictor just fitted
    print(f"fit on {m['train']} archs in {time.time() - t0:.1f}s; held-out {h['n']}: MAPE {h['mape']:.2f}%  "
          f"RMSE {h['rmse']:.2f}ms  Kendall tau {h['tau']:.3f}  (against raw timings: MAPE {r['mape']:.2f}%, "
          f"tau {r['tau']:.3f}); BERT-base {m['base_ms']:.1f}ms on {pred.backend} -> {path}")


def run_table(cfg, argv=None):
    pred = LatencyPredictor.load(cfg.predictor) if cfg.predictor else None
    archs = list(dict.fromkeys(Arch.parse(a) for _, _, a, _ in TABLE4))
    if pred:
        described = dict(pred.device, backend=pred.backend)
        for key, name in dict(threads="threads", seq_len="seq_len", batch="batch_size", backend="backend").items():
            if described[key] != getattr(cfg, name):
                raise UserError(f"{cfg.predictor} describes {key}={described[key]}: pass "
                                f"--{name.replace('_', '-')} {described[key]}")
        pred.check_ranges(archs)
    records = list(tqdm(collect(archs, cfg), total=len(archs) + 1, unit="model"))
    base = np.median([relative(r) for r in records if r["kind"] == "base"])
    measured = {r["arch"]: base / relative(r) for r in records if r["kind"] == "arch"}
    print(f"speedup over BERT-base on {cfg.backend}, {cpu_model()}, {cfg.threads} thread(s), batch {cfg.batch_size}, "
          f"{cfg.seq_len} tokens" + (f"; predicted by {cfg.predictor}" if pred else ""))
    print(f"{'setting':8s} {'model':18s} {'arch':18s} {'paper':>7s} {'measured':>9s}" + (" predicted" if pred else ""))
    for setting, name, arch, paper in TABLE4:  # Table 4 beside this machine
        row = f"{setting:8s} {name:18s} {arch:18s} {paper:6.1f}x {measured[arch]:8.1f}x"
        print(row + (f" {pred.speedup(arch):8.1f}x" if pred else ""))


COMMANDS = {"measure": (MeasureConfig, run_measure, "time sampled architectures into OUT/timings.jsonl"),
            "fit": (FitConfig, run_fit, "fit the latency predictor on measured data"),
            "table": (TableConfig, run_table, "Table 4's speedups measured here (and predicted)")}


def parse_command(argv):
    """(command, its config) from `COMMAND FLAGS`, in every stage's grammar: defaults < --preset < --config < flags."""
    return parse_flags({name: (cls, help_) for name, (cls, _, help_) in COMMANDS.items()}, argv,
                       __doc__.splitlines()[0], defaults=lambda first: PRESETS[getattr(first, "preset", "paper")])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    name, cfg = parse_command(argv)
    return COMMANDS[name][1](cfg, argv)


if __name__ == "__main__":
    run_main(main)
