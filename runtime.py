"""A model on the runtime it ships on, and the clock that times it there.

The runtimes (BACKENDS): PyTorch eager, or the model's ONNX export on ONNX Runtime, fp32 or dynamically
int8-quantized. latency.py times models on them (--backend), export.py writes the searched model's ONNX graph
with them. onnx and onnxruntime are an optional extra (requirements-onnx.txt), imported when first needed.
"""

import contextlib
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

from common import UserError

BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")  # PyTorch eager; the ONNX export, fp32 or int8-quantized


def onnx_modules():
    """(onnx, onnxruntime, onnxruntime.quantization): the optional extra, imported when first needed."""
    try:
        import onnx
        import onnxruntime
        import onnxruntime.quantization
    except ImportError as e:
        raise UserError(f"{e.name} is not installed: pip install -r requirements-onnx.txt") from None
    return onnx, onnxruntime, onnxruntime.quantization


@contextlib.contextmanager
def quiet():
    """Silence the exporter's and the quantizer's warnings and log chatter (torchvision absent, pre-processing)."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def to_onnx(module, inputs, outputs):
    """The ONNX graph (a ModelProto) of module(**inputs), exported by torch's dynamo exporter with dynamic batch
    and sequence axes. `inputs`: name -> (B, T) example tensor, B and T > 1 (a size of 1 would be specialised);
    `outputs`: names of the returned tensors. (torch's legacy TorchScript exporter cannot export our sliced
    views with dynamic axes.)"""
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
        feed = dict(zip(self.names, args), **kwargs)
        outs = self.session.run(None, {k: v.cpu().numpy() for k, v in feed.items() if v is not None})
        outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def on_backends(model, backends, threads=1):
    """The same Bert on each of `backends` (BACKENDS): itself, or its ONNX graph on ONNX Runtime, exported once
    and quantized once."""
    out = {"torch": model}
    if set(backends) - {"torch"}:
        ids = torch.zeros(2, 16, dtype=torch.long)  # an example input; the graph takes any (B, T)
        proto = to_onnx(model, dict(input_ids=ids), ["hidden"])
        out["onnxruntime"] = OrtModel(proto, threads, model.cfg)
        if "onnxruntime-int8" in backends:
            out["onnxruntime-int8"] = OrtModel(quantize_int8(proto), threads, model.cfg)
    return [out[b] for b in backends]


# ----------------------------------------------------------------------------- timing on a CPU


@contextlib.contextmanager
def num_threads(n):
    """torch's intra-op thread count set to n inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def timings(models, threads=1, seq_len=128, batch=1, warmup=3, repeats=10):
    """ms of `repeats` forward passes of each model after `warmup` untimed ones, on `threads` threads. Models take
    turns pass by pass, so that all of them see the same state of a shared machine. With one thread we read that
    thread's CPU time: on an idle core it equals wall-clock, and on a busy machine it leaves out the time other
    processes hold the core (wall-clock there varies 2x from one second to the next)."""
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


def device_info(cfg):
    """What a latency figure depends on besides the architecture (cfg: latency.TimingCfg's settings)."""
    info = dict(cpu=cpu_model(), cores=os.cpu_count(), threads=cfg.threads, torch=str(torch.__version__),
                seq_len=cfg.seq_len, batch=cfg.batch_size, backend=cfg.backend)
    if cfg.backend != "torch":
        info["onnxruntime"] = onnx_modules()[1].__version__
    return info
