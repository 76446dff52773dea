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
import sys
import tempfile
import typing
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def run_main(main):
    """Call main(); turn user errors into `error: ...` on stderr and a non-zero exit."""
    try:
        return main()
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as e:
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


# ----------------------------------------------------------------------------- seeds

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
