"""One way to configure a script: a dataclass of settings becomes its command-line flags.

Each stage keeps a dataclass with the paper's defaults; `parse_config` builds the argparse flags from it and
resolves, in this order, field defaults < a preset (`--preset tiny|paper`) or inherited values < `--config FILE`
(a run's config.json) < the flags given. A field's metadata says everything about its flag: help, choices, type (a
converter such as task_name), aliases (older spellings: still accepted for one release, with a one-line deprecation
note on stderr) and the range every value must lie in (min / max inclusive, gt exclusive), checked once where the
config is built.
"""

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from common import UserError


COUNT = dict(min=1)  # a number of things or steps
NONNEGATIVE = dict(min=0)
POSITIVE = dict(gt=0)  # a rate, a size
SHARE = dict(min=0, max=1)  # a probability, a share of the steps


def _flag(name):
    return "--" + name.replace("_", "-")


class _Deprecated(argparse.Action):
    """An old spelling of a flag: sets the same value; config_from_args then says which name replaces it."""

    def __init__(self, option_strings, dest, new=None, store=None, **kw):
        self.new, self.store = new, store
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.store if self.store is not None else values)
        notes = getattr(namespace, "_deprecated", [])
        setattr(namespace, "_deprecated", notes + [f"note: {option_string} is deprecated, use {self.new}"])


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default; a default of None is one that the run works out (a task's Table D.1 value,
    a method's pm, the steps of --epochs): its help says which, instead of "(default: None)"."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def config_parser(cls, description=None, parser=None):
    """Add one flag per dataclass field (the field's metadata['help'] is its help, the default is shown), and
    --config FILE: start from the settings of a run's config.json (flags given still win)."""
    parser = parser or argparse.ArgumentParser(description=description, formatter_class=_Defaults)
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
        flag, old = _flag(f.name), [_flag(a) for a in f.metadata.get("aliases", ())]
        if kind is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_)
            for o in old:
                parser.add_argument(o, dest=f.name, action=_Deprecated, new=flag, store=True, nargs=0,
                                    default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        spec = dict(nargs="+", type=args[0]) if origin in (list, tuple) else \
            dict(type=f.metadata.get("type", kind), choices=f.metadata.get("choices"))
        parser.add_argument(flag, default=default, help=help_, **spec)
        for o in old:
            parser.add_argument(o, dest=f.name, action=_Deprecated, new=flag, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS, **{k: v for k, v in spec.items() if k != "choices"})
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",  # no default to show
                            help="start from the settings in a run's config.json (flags given still win)")
    return parser


def check_config(cfg):
    """Every number within its field's range (metadata min / max / gt), else one line naming the flag."""
    for f in dataclasses.fields(cfg):
        m, value = f.metadata, getattr(cfg, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None or isinstance(v, (bool, str)):
                continue
            low, high, gt = m.get("min"), m.get("max"), m.get("gt")
            bad = (low is not None and v < low) or (high is not None and v > high) or (gt is not None and v <= gt)
            if bad:
                need = " and ".join(s for s in (f">= {low}" if low is not None else "", f"> {gt}" if gt is not None
                                                else "", f"<= {high}" if high is not None else "") if s)
                raise UserError(f"{_flag(f.name)} {v} is out of range: it must be {need}")
    return cfg


def config_from_args(cls, args):
    """Build the dataclass from a parsed namespace (fields that the namespace lacks keep their defaults) and
    check every number."""
    for note in dict.fromkeys(getattr(args, "_deprecated", [])):
        print(note, file=sys.stderr)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(values[f.name], list) and f.type is not list:
            if typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple:
                values[f.name] = tuple(values[f.name])
    return check_config(cls(**values))


def config_values(cls, saved):
    """The settings of a saved config (a run's config.json, or the "config" of a checkpoint) as field values of
    `cls`: older field names are read as their new ones, keys `cls` lacks are left out."""
    saved = dict(saved.get("config", saved)) if isinstance(saved.get("config"), dict) else dict(saved)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for f in fields.values():
        for old in f.metadata.get("aliases", ()):
            old = old.replace("-", "_")
            if old in saved and f.name not in saved:
                value = saved.pop(old)
                # an old "0: unset" of a count that is now Optional (None: unset)
                saved[f.name] = None if value == 0 and f.default is None else value
    return {k: tuple(v) if isinstance(v, list) and isinstance(fields[k].default, tuple) else v
            for k, v in saved.items() if k in fields}


def read_config_file(path):
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"--config {path} does not exist: pass a config.json from a run folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--config {path} is not JSON ({e}): pass a config.json from a run folder") from None


def parse_config(cls, argv=None, description=None, parser=None, defaults=None):
    """The config from the command line: field defaults < `defaults(first parse)` (presets, inherited values) <
    --config FILE < flags given. For a script of several commands, `cls` is {command: (dataclass, help)} and the
    result (command, config): `script.py COMMAND --flag ...`, each command with its own flags."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if isinstance(cls, dict):
        top = argparse.ArgumentParser(description=description)
        commands = top.add_subparsers(dest="command", required=True)
        parsers = {name: config_parser(c, parser=commands.add_parser(
            name, help=help_, description=help_, formatter_class=_Defaults))
            for name, (c, help_) in cls.items()}
        name = top.parse_known_args([a for a in argv if a not in ("-h", "--help")] or argv)[0].command
        return name, parse_config(cls[name][0], argv[argv.index(name) + 1:], parser=parsers[name], defaults=defaults)
    parser = parser or config_parser(cls, description)
    first, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])  # --help shows the preset's
    preset = dict(defaults(first) if defaults else {})
    if getattr(first, "config", None):  # the run's settings; what to do with a folder (--resume, ...) is asked anew
        saved = config_values(cls, read_config_file(first.config))
        preset.update({k: v for k, v in saved.items() if k not in ("resume", "overwrite")})
    parser.set_defaults(**preset)
    return config_from_args(cls, parser.parse_args(argv))


