"""The CUDA dry run: superplm.py's training step, a fine-tuning step and the MLM evaluator, run on fake CUDA tensors
on a CPU-only machine (tests/test_cuda_dryrun.py runs it and checks its report):

    python -c "import dryrun; dryrun.build('DIR')"         # DIR/libfakecuda.so, from fake_cuda.cpp
    LD_PRELOAD=DIR/libfakecuda.so python tests/fakecuda/dryrun.py WORK REPORT.json [--plant cpu|sync] [--only mlm]

How it works:
  - fake_cuda.cpp, preloaded, gives torch's CPU build a CUDA device guard and CUDA hooks (one device), which
    autograd, autocast("cuda") and fused AdamW need before they will touch a CUDA tensor;
  - torch.cuda is patched to report one bf16-capable GPU, so the code takes its GPU paths (--device auto is cuda:0,
    --dtype auto bf16, pinned memory in data.prefetch);
  - FakeCUDA, a FakeTensorMode: CPU work stays real (the corpus, masks, the tokenizer, the models as built), and
    whatever is on CUDA is a fake tensor: shape, dtype and device, no data. An op that mixes a CPU tensor with a
    CUDA one (other than a CPU scalar, as on a GPU) raises FakeTensorDeviceMismatchError, as a GPU would;
  - torchrun's two workers: this process is rank 0 of 2 in torch's "fake" process group, which stands for NCCL
    (its collectives return at once); the calls and the devices they name are recorded;
  - every read of a CUDA value on the host (.item(), float(), bool(), int(), .tolist(), a blocking .cpu()) is
    recorded with the phase and the training step it happens in: a read makes the host wait for the GPU.

The report (JSON) says what ran where and every read; the test compares it with what the code should do.
"""

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The project's names this driver uses, all here: when files move, only these lines change.
import finetune  # noqa: E402  (Finetuner, optimizer_and_schedule, train_epoch, predict)
import superplm  # noqa: E402  (run, parse_config, accumulate, prefetch, make_optimizer, space_for, sample_arch)
from common import resolve_compute  # noqa: E402
from distill import make_tiny_teacher  # noqa: E402
from model import MLM, Arch, Bert  # noqa: E402
from search import MLMScore  # noqa: E402
from superplm import save_superplm  # noqa: E402  (its module's torch_save is replaced: fake tensors have no data)

SOURCE = Path(__file__).with_name("fake_cuda.cpp")
ARCH, TEACHER = Arch(2, 64, 128, 2, 64), Arch(2, 48, 96, 2, 48)
aten = torch.ops.aten


def build(folder):
    """Compile fake_cuda.cpp against the headers inside the installed torch wheel; returns the library's path.
    No compiler is an error, never a skip: the dry run must run wherever the tests run."""
    from torch.utils.cpp_extension import include_paths
    lib = Path(torch.__file__).parent / "lib"
    out = Path(folder) / "libfakecuda.so"
    cmd = ["g++", "-shared", "-fPIC", "-O1", "-std=c++20", *[f"-I{p}" for p in include_paths()], str(SOURCE),
           f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}", "-o", str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("the CUDA dry run needs a C++ compiler (g++): install one (apt-get install g++)") from None
    if done.returncode:
        raise RuntimeError(f"building {SOURCE.name} failed:\n{done.stderr[-4000:]}")
    return out


# ----------------------------------------------------------------------------- one GPU, as torch.cuda reports it


def fake_torch_cuda():
    """torch.cuda as on one bf16-capable GPU (an H100's answers). Its RNG state is a CPU generator's state."""
    state = torch.Generator().get_state()
    for name, value in dict(is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
                            set_device=lambda device: None, synchronize=lambda device=None: None,
                            get_device_capability=lambda device=None: (9, 0), is_bf16_supported=lambda *a, **k: True,
                            get_device_name=lambda device=None: "fake H100 (tests/fakecuda)",
                            get_rng_state=lambda device="cuda": state.clone(),
                            set_rng_state=lambda new, device="cuda": None).items():
        setattr(torch.cuda, name, value)
    for name in ("get_rng_state_all", "set_rng_state_all"):  # one state per visible GPU: not for checkpoints
        setattr(torch.cuda, name, lambda *a, name=name: refuse(f"torch.cuda.{name}"))


def refuse(what):
    raise RuntimeError(f"{what} was called: a checkpoint must not depend on the number of visible GPUs")


def on_cuda(x):
    if isinstance(x, FakeTensor):
        return x.device.type == "cuda"
    return (isinstance(x, torch.device) and x.type == "cuda") or (isinstance(x, str) and x.startswith("cuda"))


class FakeCUDA(FakeTensorMode):
    """CPU work real, CUDA tensors fake; every host read of a CUDA value recorded in self.reads with self.where."""
    avoid_device_init = True  # never run a real CUDA kernel (FakeTensorMode would constant-fold small copies)

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.where, self.quiet = ("setup", 0), False
        self.reads = defaultdict(list)  # "phase step" -> ["item", "tolist", "cpu", ...]
        self.matmuls = defaultdict(set)  # phase -> dtypes of the matmuls run on CUDA

    def swap_tensors(self, original):
        """Module.to() swaps a fake parameter for its moved copy, which refuses while the converter's memo holds a
        weak reference to it: forget the memo (a cache) first."""
        def swap(a, b):
            self.fake_tensor_converter.meta_converter.tensor_memo.clear()
            return original(a, b)
        return swap

    def tolist(self, original):
        """A CUDA tensor's .tolist() is one read (FakeTensor's reads element by element)."""
        def tolist(t):
            self.read("tolist")
            self.quiet = True
            try:
                return original(t)
            finally:
                self.quiet = False
        return tolist

    def read(self, kind):
        if not self.quiet:
            self.reads[f"{self.where[0]} {self.where[1]}"].append(kind)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        if not any(isinstance(x, FakeTensor) or on_cuda(x) for x in leaves):
            return func(*args, **kwargs)  # nothing on CUDA: the real CPU op
        if func is aten._local_scalar_dense.default:  # .item(), float(), bool(), int()
            self.read("item")
            return False if args[0].dtype == torch.bool else 0 if not args[0].is_floating_point() else 0.0
        if func is aten._to_copy.default and on_cuda(args[0]) and str(kwargs.get("device")) == "cpu":
            if not kwargs.get("non_blocking"):
                self.read("cpu")
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is aten.copy_.default and not isinstance(args[0], FakeTensor) and on_cuda(args[1]):
            if not (args[2:] or kwargs.get("non_blocking")):
                self.read("cpu")
            return args[0].zero_()
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            self.matmuls[self.where[0]].add(str(out.dtype).removeprefix("torch."))
        return out


@contextmanager
def patched(obj, name, wrap):
    """obj.name = wrap(the original) inside."""
    original = getattr(obj, name)
    setattr(obj, name, wrap(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


# ----------------------------------------------------------------------------- the run


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("report")
    parser.add_argument("--plant", choices=["cpu", "sync"], help="a test of the test: a CPU tensor in the loss, or "
                                                                  "a host read per sub-model")
    parser.add_argument("--only", choices=["mlm"], help="the mlm run only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    if torch.accelerator.current_accelerator() is None:
        sys.exit("error: the fake CUDA library is not loaded: run with LD_PRELOAD=.../libfakecuda.so")
    fake_torch_cuda()
    mode, report = FakeCUDA(), defaultdict(list)

    # torchrun with two workers on one node: this process is rank 0, the fake group stands for NCCL
    os.environ.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2")
    from torch.testing._internal.distributed.fake_pg import FakeStore
    init, barrier = dist.init_process_group, dist.barrier

    def init_process_group(backend, **kwargs):
        report["init_process_group"].append(dict(backend=backend, timeout_h=kwargs["timeout"].total_seconds() / 3600,
                                                 device_id=str(kwargs.get("device_id"))))
        init("fake", store=FakeStore(), rank=0, world_size=2, **kwargs)

    def named_barrier(*a, **kwargs):
        report["barrier"].append(dict(device_ids=kwargs.get("device_ids")))
        return barrier(*a, **kwargs)
    dist.init_process_group, dist.barrier, dist.get_backend = init_process_group, named_barrier, lambda g=None: "nccl"

    # the inputs, real and on disk: a corpus and a teacher
    texts = [t for t in (ROOT / "README.md").read_text().split("\n\n") if t.strip()]  # quicker than the stdlib's
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(texts))
    teacher = None if args.only else make_tiny_teacher(work / "teacher", TEACHER, vocab_size=300, texts=texts)

    # what superplm.run uses, watched: each call of accumulate is a new step
    def accumulate(original):
        def counted(*a, **k):
            mode.where = (mode.where[0], mode.where[1] + 1)
            return original(*a, **k)
        return counted

    def make_optimizer(original):
        def made(*a, **k):
            opt = original(*a, **k)
            report["fused"].append(bool(opt.defaults.get("fused")))
            return opt
        return made

    def prefetch(original):
        def counted(rows, device, *a, **k):
            report["prefetch"].append(str(device))
            return original(rows, device, *a, **k)
        return counted

    def forward(original):  # --plant
        def planted(self, model, batch, arch=None):
            loss, stats = original(self, model, batch, arch)
            if args.plant == "cpu":
                return loss + torch.zeros(1), stats  # a (1,) CPU tensor: a GPU would refuse it
            float(loss)  # "sync": the host waits for every sub-model
            return loss, stats
        return planted

    saver = sys.modules[save_superplm.__module__]  # where the checkpoint is written (superplm.py)

    def torch_save(original):
        def recorded(obj, path):
            report["saved"].append(dict(step=obj["step"], cuda_rng=list(obj["rng"]["cuda"].shape)))
        return recorded

    with (patched(superplm, "accumulate", accumulate), patched(superplm, "make_optimizer", make_optimizer),
          patched(superplm, "prefetch", prefetch), patched(saver, "torch_save", torch_save),
          patched(torch.utils, "swap_tensors", mode.swap_tensors), patched(FakeTensor, "tolist", mode.tolist),
          patched(MLM, "forward", forward) if args.plant else nullcontext(), mode):
        # 1. superplm.run: two steps, M = 3, bf16, for both objectives (rank 0 of 2); and mlm in fp32, where
        #    model.linear and model.embedding add the blocks' gradients in place
        models = {}
        for name in ["mlm"] + ["mlm-fp32", "kd"] * (args.only is None):
            objective, dtype = name.split("-")[0], "fp32" if name.endswith("fp32") else "bf16"
            mode.where = (name, 0)
            flags = ["--corpus", str(corpus), "--cache-dir", str(work / "cache"), "--vocab-size", "300",
                     "--superplm-arch", str(ARCH), "--seq-len", "32", "--batch-size", "8", "--steps", "2",
                     "--sub-models", "3", "--log-every", "2", "--save-every", "1000", "--dtype", dtype,
                     "--out", str(work / name), "--objective", objective]
            cfg = superplm.parse_config(flags + (["--teacher", str(teacher)] if objective == "kd" else []))
            models[name] = superplm.run(cfg, argv=flags)
            report["log"].append((work / name / "log.txt").read_text().splitlines()[0])
        if args.only:
            return finish(mode, report, args.report)
        compute = resolve_compute("auto", "bf16")
        report["compute"] = str(compute)

        # 2. fine-tuning: one epoch of three steps (finetune.train_epoch), then predict on three batches
        mode.where = ("finetune", 0)
        feats = [(list(range(5, 5 + n)), [0] * n) for n in (10, 12, 9, 16, 11, 8)]
        model = finetune.Finetuner(Bert(ARCH, vocab_size=300), 3).to(compute.device)
        opt, sched = finetune.optimizer_and_schedule(model, 2e-5, 3, 0.1, 0.01)
        report["fused"].append(bool(opt.defaults.get("fused")))
        finetune.train_epoch(model, feats, torch.tensor([0, 1, 2, 0, 1, 2]), 2, opt, sched,
                             torch.Generator().manual_seed(0), 0, compute.device, "dry run", compute.autocast)
        mode.where = ("predict", 0)
        logits = finetune.predict(model, feats, 2, 0, compute.device, compute.autocast)
        squad = finetune.Finetuner(model.bert, 2, span=True).to(compute.device)
        spans = finetune.predict(squad, feats, 2, 0, compute.device, compute.autocast)
        report["predict"] = dict(glue=list(logits.shape), squad=[[len(s), len(e)] for s, e in spans])

        # 3. the MLM evaluator of search.py: one candidate, scored on three batches
        mode.where = ("evaluator", 0)
        score = MLMScore(models["mlm"], str(work / "mlm" / "tokenizer.json"), str(corpus), 32,
                                    str(work / "cache"), rows=24, batch_size=8, compute=compute)
        report["evaluator_batches"] = len(score.batches)
        arch = superplm.sample_arch(superplm.space_for(ARCH), 0, 0, 0, 0)
        mode.where = ("evaluator", 1)
        report["score"] = score(arch)
    return finish(mode, report, args.report)


def finish(mode, report, path):
    report.update(reads=dict(mode.reads), matmuls={k: sorted(v) for k, v in mode.matmuls.items()})
    Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
