"""What every stage does the same way: fail with one line (`UserError`, `run_main`), stop cleanly on SIGINT/SIGTERM
(`stop_after_step`), write files and JSONL logs atomically, never overwrite a run silently (`RunFolder`), take its
settings from a dataclass (`parse_flags`); and the Hugging Face hub offline, seeds, devices, compute dtypes, workers."""

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import types
import typing
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
    """Bad input from the user: one line, exit status 2, no traceback (a ValueError, for library callers)."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after saving what it had: the message says what was kept and how to go on."""


def run_main(main):
    """Call main(): a UserError becomes `error: ...` and exit 2, a bug keeps its traceback; SIGTERM acts as Ctrl-C."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt, as Ctrl-C does
    try:
        return main()
    except (UserError, KeyboardInterrupt) as e:
        for bar in list(getattr(tqdm, "_instances", ())):  # end every progress bar's line: the message gets its own
            bar.close()
        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"interrupted: {e}" if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def stop_after_step(what="step"):
    """Inside, a first SIGINT/SIGTERM sets `stop.signal` (the loop ends its `what`, saves, stops); a second exits."""
    stop = types.SimpleNamespace(signal=None)

    def handler(signum, frame):
        if stop.signal:
            raise KeyboardInterrupt
        stop.signal = signal.Signals(signum).name
        if os.environ.get("RANK", "0") == "0":  # one line for a torchrun job, not one per worker
            print(f"\n{stop.signal}: finishing the {what} in progress, then saving and stopping (send it again to "
                  "stop at once)", file=sys.stderr, flush=True)
    main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield stop
    finally:
        for s, h in before.items():
            signal.signal(s, h)


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
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def torch_save(obj, path):
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def torch_load(path):
    """Checkpoints hold tensors and plain data only: never unpickle code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def append_jsonl(path, record):
    """One JSON object per line, flushed at once so that an interrupted run keeps what it measured."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """Read the complete lines of a JSONL file (a torn last line from a killed run is ignored)."""
    out = []
    with open(path) as f, contextlib.suppress(json.JSONDecodeError):
        for line in f:
            out.append(json.loads(line))
    return out


def read_appended(path):
    """The records of a JSONL file a run appends to ([] if absent), a torn last line cut so later appends parse."""
    if not Path(path).exists():
        return []
    raw = Path(path).read_bytes()
    if raw and not raw.endswith(b"\n"):
        os.truncate(path, raw.rfind(b"\n") + 1)
    return read_jsonl(path)


def keep_jsonl(path, keep):
    """Keep only the records where keep(record): a resumed run drops what its checkpoint does not cover."""
    path = Path(path)
    if path.exists():
        records = [r for r in read_jsonl(path) if keep(r)]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


def command_line(argv=None, script=None):
    """The command that ran (or would run) `script` (default: this process's) with `argv`, quoted for a shell."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return shlex.join(["python", script or Path(sys.argv[0]).name, *argv])


def versions():
    """What a result depends on besides its settings: torch, python, and this repository's commit if any."""
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = commit and bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return dict(torch=str(torch.__version__), python=platform.python_version(), git_commit=commit, git_dirty=dirty)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunFolder:
    """A run's folder (--out): never silently overwritten (needs --resume or --overwrite); config.json records settings,
    command, versions, times. Until `done_first()` a failure puts the folder back as it was found."""

    def __init__(self, out, cfg, resume=None, overwrite=False, marker=None, argv=None):
        path = self.path = Path(out)
        self.cfg, self.first, self.status = cfg, False, None
        module = type(cfg).__module__  # argv given: the stage's own command line, also when main(argv) is called
        self.command = command_line(argv, module + ".py" if argv is not None and module != "__main__" else None)
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file: --out names a folder")
        self.existed, self.created = path.exists(), path
        while not self.created.parent.exists():  # the topmost folder this run makes (runs/ in a fresh clone)
            self.created = self.created.parent
        self.before = set(os.listdir(path)) - {".replaced"} if self.existed else set()
        taken = (path / marker).exists() if marker else bool(self.before)
        if resume and not taken:
            raise UserError(f"--resume: {path} holds no run to resume{f' (no {marker})' if marker else ''}: "
                            "drop --resume to start one")
        if taken and not (resume or overwrite):  # a script without --resume (resume None) is not told to pass it
            how = "--overwrite to replace it or" if resume is None else "--resume to continue it, --overwrite to " \
                "replace it, or"
            raise UserError(f"{path} already holds a run: pass {how} another --out")
        self.old_record = (path / "config.json").read_bytes() if (path / "config.json").exists() else None
        path.mkdir(parents=True, exist_ok=True)
        self.aside = None
        if overwrite and not resume and self.before:  # set the old run aside until this one has a result
            self.aside = path / ".replaced"
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside.mkdir()
            for name in self.before:
                os.replace(path / name, self.aside / name)
            self.before = set()
        self.started = _now()
        self.write_record()

    RECORD = ("config", "command", "versions", "started", "ended", "status")

    def write_record(self, ended=None):
        """config.json; in a folder that is also a Hugging Face model (save_pretrained) its keys stay beside ours."""
        path, model = self.path / "config.json", {}
        if path.exists():
            with contextlib.suppress(json.JSONDecodeError):
                model = json.loads(path.read_text())
            model = {k: v for k, v in model.items() if k not in self.RECORD} if "model_type" in model else {}
        save_json(dict(model, config=dataclasses.asdict(self.cfg), command=self.command, versions=versions(),
                       started=self.started, ended=ended, status=self.status), path)

    def update(self, cfg):
        """The settings changed once known (a resumed run takes its saved ones)."""
        self.cfg = cfg
        self.write_record()

    def done_first(self):
        """The run has written its first result: from now on a failure keeps what is there."""
        if not self.first and self.aside:
            shutil.rmtree(self.aside, ignore_errors=True)
        self.first = True

    def rollback(self):
        for name in set(os.listdir(self.path)) - self.before - {".replaced"}:
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if self.aside:
            for name in os.listdir(self.aside):
                os.replace(self.aside / name, self.path / name)
            self.aside.rmdir()
        if self.old_record is not None:
            (self.path / "config.json").write_bytes(self.old_record)
        if not self.existed:
            shutil.rmtree(self.created, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is not None and not self.first:
            self.rollback()
            return False
        self.status = self.status or ("finished" if kind is None else
                                      "interrupted" if issubclass(kind, KeyboardInterrupt) else f"failed: {error}")
        self.write_record(ended=_now())
        if self.aside:
            shutil.rmtree(self.aside, ignore_errors=True)
        return False


def no_such(flag, path, make=""):
    """A missing input path: the nearest names under runs/ (a typo), and `make` (how to make one elsewhere)."""
    names = [str(p) for p in Path("runs").glob("*")] + [str(p) for p in Path("runs").glob("*/*") if p.is_dir()]
    near = difflib.get_close_matches(str(Path(path)), names, n=3, cutoff=0.6)
    fix = "; ".join([f"nearest under runs/: {', '.join(near)}"] * bool(near) + [make] * bool(make)) or "check it"
    return UserError(f"{flag} {path}: no such {'file' if Path(path).suffix else 'folder'}; {fix}")


def free_folder(base):
    """`base`, else the first of base-2, base-3, ... that does not exist: a folder a suggested command may write."""
    return next(p for p in [str(base), *(f"{base}-{i}" for i in range(2, 1000))] if not Path(p).exists())


def hub_reachable(timeout=3.0):
    """Whether the hub (HF_ENDPOINT) answers within `timeout` s: False offline (HF_HUB_OFFLINE), True via a proxy."""
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in offline):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    answered = []

    def probe():  # in a thread: a name lookup can hang past any socket timeout
        with contextlib.suppress(OSError):
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout).close()
            answered.append(True)
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def subset_indices(n_total, n, seed):
    """A seeded random choice of n of range(n_total) (all of them when n is None), in order."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(np.random.default_rng(seed).choice(n_total, n, replace=False).tolist())


DEVICE_HELP = "auto: cuda if torch sees a GPU (under torchrun cuda:LOCAL_RANK), else cpu; or cpu, cuda, cuda:N"
DTYPE_HELP = ("compute dtype of matmuls and attention (torch.autocast); weights, gradients and AdamW's state stay "
              "fp32. auto: bf16 on a GPU that has it (A100, H100, ...), else fp32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
THREADS_HELP = "CPU threads of torch's kernels; unset: torch's default (one per core); 1 where other jobs share the CPU"


@dataclass(frozen=True)
class Compute:
    """Where and in what precision a stage computes: one device and one autocast dtype (fp32: no autocast)."""
    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        """Mixed precision: matmuls in bf16, softmax/LayerNorm/losses in fp32; a fresh context each call."""
        return nullcontext() if self.dtype == torch.float32 else torch.autocast(self.device.type, dtype=self.dtype)

    def __str__(self):
        return f"{self.device} {next(k for k, v in DTYPES.items() if v == self.dtype)}"


def resolve_device(spec="auto"):
    """--device of every stage. Under torchrun, auto and cuda mean this worker's GPU, cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = None
    with contextlib.suppress(RuntimeError):
        device = torch.device(spec)
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: torch sees no GPU here (torch {torch.__version__}); use --device cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec} is cuda:{device.index}, but there are only {torch.cuda.device_count()} "
                            "GPUs: start at most that many workers per machine, or pass --device cpu")
    return device


def resolve_compute(device="auto", dtype="auto", threads=None):
    """Compute for --device and --dtype (where the defaults are decided); --threads sets torch's CPU threads."""
    if threads:
        torch.set_num_threads(threads)
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
    """A dict of CPU tensors on `device`, on a GPU through page-locked memory so the copy does not block the host."""
    device = torch.device(device)
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def init_distributed(device="auto", timeout_h=24):
    """(rank, world, device) from torchrun's environment (a plain run: one worker); NCCL on GPUs, gloo on CPUs.
    timeout_h is long: the others wait while rank 0 packs a corpus (rank0_first), hours past NCCL's 10 minutes."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels and NCCL's buffers on this worker's GPU
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=timeout_h),
                            device_id=device if device.type == "cuda" else None)  # NCCL: this worker's GPU
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    """dist.barrier() naming this worker's GPU under NCCL (set by init_distributed): else NCCL guesses it."""
    dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


def end_distributed(world):
    """Leave the process group together: gloo aborts a worker still waiting on one that has left."""
    if world > 1:
        barrier()
        dist.destroy_process_group()


def rank0_first(rank, world, make):
    """Run make() on rank 0 (which may build a cache), then on the others (which then read it)."""
    if rank == 0:
        result = make()
    if world > 1:
        barrier()
    return make() if rank else result


COUNT = dict(min=1)  # a number of things or steps
NONNEGATIVE = dict(min=0)
POSITIVE = dict(gt=0)  # a rate, a size
SHARE = dict(min=0, max=1)  # a probability, a share of the steps


def flag(default, text, **meta):
    """A settings field: its default, --help text, and range (COUNT, ...), choices or type (for config_parser)."""
    return dataclasses.field(default=default, metadata=dict(help=text, **meta))


def _flag(name):
    return "--" + name.replace("_", "-")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except None (worked out by the run: its help says how)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse whose every error is one UserError line (`error: --task RTEE: choose one of cola, ...`)."""

    def error(self, message):
        head, _, what = message.partition(": ")
        name = what if head.startswith("the following") else head.removeprefix("argument ").split("/")[0]
        action = next((a for a in self._actions if name in (*a.option_strings, a.dest)), None)
        value = re.search(r"(choice|(\w+) value): '([^']*)'", what)
        if "expected" in what:
            raise UserError(f"{name} needs a value (one that starts with '-' is written {name}=VALUE)")
        if action is not None and action.choices:
            given = f" {value.group(3)}" if value else ""
            raise UserError(f"{name}{given}: choose one of {', '.join(map(str, action.choices))}")
        if value:
            kind = dict(int="a whole number", float="a number").get(value.group(2), "valid")
            raise UserError(f"{name} {value.group(3)}: not {kind}")
        raise UserError(f"{message} ({self.prog} --help lists the flags)")


def config_parser(cls, description=None, parser=None):
    """One flag per dataclass field, and --config FILE; none abbreviated (--batch is refused, not --batch-size)."""
    parser = parser or _Parser(description=description, formatter_class=_Defaults, allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin is typing.Union:  # Optional[X] -> X with default None
            kind = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(kind), typing.get_args(kind)
        spec = dict(action=argparse.BooleanOptionalAction) if kind is bool else \
            dict(nargs="+", type=args[0]) if origin is list else \
            dict(type=f.metadata.get("type", kind), choices=f.metadata.get("choices"))
        parser.add_argument(_flag(f.name), default=default, help=f.metadata.get("help", " "), **spec)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",  # no default to show
                        help="start from the settings in a run's config.json (flags given still win)")
    return parser


def check_config(cfg):
    """Every number within its field's range (metadata min / max / gt), else one line naming the flag."""
    for f in dataclasses.fields(cfg):
        value, low, high, gt = getattr(cfg, f.name), f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("gt")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None or isinstance(v, (bool, str)):
                continue
            if (low is not None and v < low) or (high is not None and v > high) or (gt is not None and v <= gt):
                need = " and ".join(f"{op} {b}" for op, b in ((">=", low), (">", gt), ("<=", high)) if b is not None)
                raise UserError(f"{_flag(f.name)} {v} is out of range: it must be {need}")
    return cfg


def config_from_args(cls, args):
    """The dataclass from a parsed namespace (missing fields keep their defaults), every number checked."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return check_config(cls(**values))


def config_values(cls, saved):
    """A run's config.json or a checkpoint's "config" as field values of `cls` (other keys left out)."""
    saved = saved["config"] if isinstance(saved.get("config"), dict) else saved
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in saved.items() if k in fields}


def parse_flags(cls, argv=None, description=None, parser=None, defaults=None):
    """The config from the command line: field defaults < `defaults(first parse)` (presets) < --config FILE < flags
    given. With `cls` {command: (dataclass, help)}: (command, config) of `script.py COMMAND --flag ...`."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if isinstance(cls, dict):
        top = _Parser(description=description, allow_abbrev=False)
        commands = top.add_subparsers(dest="command", required=True)
        parsers = {name: config_parser(c, parser=commands.add_parser(
            name, help=help_, description=help_, formatter_class=_Defaults, allow_abbrev=False))
            for name, (c, help_) in cls.items()}
        name = top.parse_known_args([a for a in argv if a not in ("-h", "--help")] or argv)[0].command
        return name, parse_flags(cls[name][0], argv[argv.index(name) + 1:], parser=parsers[name], defaults=defaults)
    parser = parser or config_parser(cls, description)
    first, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])  # --help shows the preset's
    preset = dict(defaults(first) if defaults else {})
    if getattr(first, "config", None):  # the run's settings; what to do with a folder (--resume, ...) is asked anew
        path = Path(first.config) / "config.json" if Path(first.config).is_dir() else Path(first.config)
        if not path.exists():
            raise UserError(f"--config {path} does not exist: pass a config.json from a run folder")
        try:
            saved = config_values(cls, json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"--config {path} is not JSON ({e}): pass a config.json from a run folder") from None
        preset.update({k: v for k, v in saved.items() if k not in ("resume", "overwrite")})
    saved, out = {}, Path(getattr(first, "out", "") or ".")
    if getattr(first, "resume", False) and (out / "config.json").exists():  # the settings the run began with
        free = ("out", "resume", "overwrite", "device", "dtype", "threads", *getattr(cls, "RESUMABLE", ()))
        saved = {k: v for k, v in config_values(cls, json.loads((out / "config.json").read_text())).items()
                 if k not in free}
        preset.update(saved)
    parser.set_defaults(**preset)
    cfg = config_from_args(cls, parser.parse_args(argv))
    for k, v in saved.items():  # a flag given on --resume that the run cannot honour
        if getattr(cfg, k) != v:
            raise UserError(f"--resume continues {out} with the settings it began with, and {_flag(k)} "
                            f"{getattr(cfg, k)} is not one of them (it has {v}): drop {_flag(k)}, or start a run with "
                            "other settings in another --out" + getattr(cls, "RESUMED", "").format(out=out))
    return cfg
