"""Plumbing shared by every stage: config dataclass -> argparse, one-line errors, atomic files, seeds, logs.

Each stage script (superplm.py, latency.py, search.py, ...) keeps its own config dataclass with the paper's
defaults; this file only turns such a dataclass into command-line flags and handles what every script must do
the same way (write files atomically, fail with one clear line, log JSONL).
"""

import argparse
import dataclasses
import json
import os
import random
import socket
import sys
import tempfile
import threading
import typing
import urllib.parse
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class UserError(ValueError):
    """Bad input from the user: printed as one line, exit status 2, no traceback. Raised where input is validated
    (a ValueError, so library callers that catch ValueError keep working)."""


def run_main(main):
    """Call main(); a UserError becomes `error: ...` on stderr and exit status 2. Anything else is a bug and keeps
    its traceback (a ValueError deep inside the code is not the user's fault)."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- config dataclass -> argparse

def _flag(name):
    return "--" + name.replace("_", "-")


def config_parser(cls, description=None, parser=None):
    """Add one flag per dataclass field; the field's metadata['help'] is its help, the default is shown."""
    parser = parser or argparse.ArgumentParser(description=description,
                                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, default = hints[f.name], f.default
        if default is dataclasses.MISSING:
            default = f.default_factory()
        help_ = f.metadata.get("help", " ")
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin is typing.Union:  # Optional[X] -> X with default None
            kind = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(kind), typing.get_args(kind)
        if kind is bool:
            parser.add_argument(_flag(f.name), default=default, action=argparse.BooleanOptionalAction, help=help_)
        elif origin in (list, tuple):
            parser.add_argument(_flag(f.name), default=default, type=args[0], nargs="+", help=help_)
        else:
            parser.add_argument(_flag(f.name), default=default, type=kind, help=help_,
                                choices=f.metadata.get("choices"))
    return parser


def config_from_args(cls, args):
    """Build the dataclass from a parsed namespace (fields that the namespace lacks keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(values[f.name], list) and f.type is not list:
            if typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple:
                values[f.name] = tuple(values[f.name])
    return cls(**values)


def parse_config(cls, argv=None, description=None):
    return config_from_args(cls, config_parser(cls, description).parse_args(argv))


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


def fresh_out_dir(out, resume=False, overwrite=False, marker=None):
    """An output folder that is never silently overwritten: an existing run needs --resume or --overwrite."""
    out = Path(out)
    taken = out.exists() and any(out.iterdir()) if marker is None else (out / marker).exists()
    if taken and not (resume or overwrite):
        raise UserError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
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
