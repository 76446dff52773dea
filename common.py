"""Plumbing shared by every stage, below all of them: one-line errors, interrupts, atomic files and JSONL logs, the
Hugging Face hub offline, seeds, devices and compute dtypes, torchrun's workers.

What every script must do the same way lives here once: fail with one clear line (`UserError`, `run_main`), stop
cleanly on SIGINT/SIGTERM (`stop_after_step`), write files atomically. Flags come from config.py, run folders and
checkpoints from runs.py.
"""

import contextlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import types
import urllib.parse
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


class UserError(ValueError):
    """Bad input from the user: printed as one line, exit status 2, no traceback. Raised where input is validated
    (a ValueError, so library callers that catch ValueError keep working)."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after saving what it had: the message says what was kept and how to go on."""


def run_main(main):
    """Call main(); a UserError becomes `error: ...` on stderr and exit status 2. Anything else is a bug and keeps
    its traceback (a ValueError deep inside the code is not the user's fault). SIGTERM (how a cluster preempts) is
    treated as Ctrl-C; a loop inside `stop_after_step` finishes its step and saves first."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return main()
    except UserError as e:
        _close_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        _close_bars()
        print(f"interrupted: {e}" if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
        sys.exit(130)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _close_bars():
    """End every progress bar's line, so that the message after it starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@contextlib.contextmanager
def stop_after_step():
    """Inside: the first SIGINT/SIGTERM only sets `stop.signal` (the loop finishes its step, saves, and stops);
    a second one interrupts at once."""
    stop = types.SimpleNamespace(signal=None)

    def handler(signum, frame):
        if stop.signal:
            raise KeyboardInterrupt
        stop.signal = signal.Signals(signum).name
        if os.environ.get("RANK", "0") == "0":  # one line for a torchrun job, not one per worker
            print(f"\n{stop.signal}: finishing the step in progress, then saving and stopping (send it again to "
                  "stop at once)", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return
    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in before.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- files written atomically

def atomic_write(path, write):
    """write(tmp_path) then rename over `path`: a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    return atomic_write(path, write)


def torch_save(obj, path):
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def torch_load(path):
    """Checkpoints hold tensors and plain data only: never unpickle code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def append_jsonl(path, record):
    """One JSON object per line, flushed at once so that an interrupted run keeps what it measured."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path):
    """Read the complete lines of a JSONL file (a torn last line from a killed run is ignored)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


# ----------------------------------------------------------------------------- the Hugging Face hub, offline


def hub_reachable(timeout=3.0):
    """Whether the hub (HF_ENDPOINT, else huggingface.co) takes a connection within `timeout` seconds. False in
    offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); behind a proxy, assumed true (the proxy decides)."""
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                               "HF_DATASETS_OFFLINE")):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    answered = []

    def probe():  # in a thread: a name lookup can hang past any socket timeout
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def load_hub_dataset(what, instead, *args, **kwargs):
    """datasets.load_dataset(*args, **kwargs) for a hub dataset. When the hub cannot be reached, only the local
    datasets cache is tried (no minute of retries); failing that, one line naming `what` and what to pass `instead`."""
    import datasets
    import huggingface_hub
    online = hub_reachable()
    offline = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    if not online:
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        if online:
            raise UserError(f"{what} does not load from the Hugging Face hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): check the name, or {instead}") from None
        raise UserError(f"{what} is not in the local datasets cache and the Hugging Face hub cannot be reached "
                        f"(offline): {instead}, or go online once (it is cached then)") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = offline


# ----------------------------------------------------------------------------- seeds

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def subset_indices(n_total, n, seed):
    """A seeded random choice of n of range(n_total) (all of them when n is None), in order."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(np.random.default_rng(seed).choice(n_total, n, replace=False).tolist())


# ----------------------------------------------------------------------------- device and compute dtype

DEVICE_HELP = "auto: cuda if torch sees a GPU (under torchrun cuda:LOCAL_RANK), else cpu; or cpu, cuda, cuda:N"
DTYPE_HELP = ("compute dtype of matmuls and attention (torch.autocast); weights, gradients and AdamW's state stay "
              "fp32. auto: bf16 on a GPU that has it (A100, H100, ...), else fp32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Compute:
    """Where and in what precision a stage computes: one device and one autocast dtype (fp32: no autocast)."""
    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        """Mixed precision: matmuls in bf16, softmax/LayerNorm/losses in fp32 (autocast's lists), master weights
        untouched. A fresh context each call, so it can wrap any number of forward passes."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def __str__(self):
        return f"{self.device} {next(k for k, v in DTYPES.items() if v == self.dtype)}"


def resolve_device(spec="auto"):
    """--device of every stage. Under torchrun, auto and cuda mean this worker's GPU, cuda:LOCAL_RANK."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: torch sees no GPU here (torch {torch.__version__}); use --device cpu")
        device = torch.device("cuda", local if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec} is cuda:{device.index}, but there are only {torch.cuda.device_count()} "
                            "GPUs: start at most that many workers per machine, or pass --device cpu")
    return device


def resolve_compute(device="auto", dtype="auto"):
    """Compute for --device and --dtype (the one place where the defaults are decided)."""
    device = resolve_device(device)
    native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere on
    if dtype == "auto":
        dtype = "bf16" if native_bf16 else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    if dtype == "bf16" and device.type == "cuda" and not native_bf16:
        raise UserError(f"--dtype bf16: {torch.cuda.get_device_name(device)} computes bf16 only by emulation "
                        "(it came with compute capability 8.0); use --dtype fp32")
    return Compute(device, DTYPES[dtype])


def to_device(batch, device):
    """A dict of CPU tensors on `device`. On a GPU through page-locked memory, so the copy does not block the host
    (a copy from ordinary memory waits for the GPU to finish what it is doing)."""
    device = torch.device(device)
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------- workers (torchrun)


def init_distributed(device="auto", timeout_h=None):
    """(rank, world, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain run is one worker. Workers
    on GPUs talk over NCCL, workers on CPUs (--device cpu, or no GPU) over gloo. timeout_h: how long a collective
    may wait for a slower worker (torch's default is minutes)."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels and NCCL's buffers on this worker's GPU
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(hours=timeout_h) if timeout_h else None)
    return dist.get_rank(), dist.get_world_size(), device


def end_distributed(world):
    """Leave the process group together: a worker that left while another still waited on its last message would
    take that worker down (gloo aborts on a closed connection)."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def rank0_first(rank, world, make):
    """Run make() on rank 0 (which may build a cache), then on the others (which then read it)."""
    if rank == 0:
        result = make()
    if world > 1:
        dist.barrier()
    return make() if rank else result
