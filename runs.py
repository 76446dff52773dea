"""Run folders: what every stage writes in --out, how a run resumes, and the SuperPLM checkpoint's reader.

A stage's run folder holds config.json (settings, command line, versions, start and end; see RunFolder) beside its
results. superplm.py's also holds checkpoint.pt, which every later stage reads with `load_superplm`:

    model_config, model     the SuperPLM (Bert.config() and its state_dict)
    space                   its SearchSpace (Table B.1 scaled to it)
    tokenizer               the vocabulary's path (tokenizer.json beside the checkpoint)
    objective, objective_state   mlm or kd, and the KD projection's weights
    optimizer, schedule, step, data, rng, config   what --resume needs to continue exactly
"""

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist

from common import Interrupted, UserError, append_jsonl, atomic_write, read_jsonl, save_json, torch_load, torch_save
from config import config_values
from model import KD_SPACE, PRETRAIN_SPACE, Arch, Bert, SearchSpace


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
    return dict(torch=str(torch.__version__), python=platform.python_version(), git_commit=commit,
                git_dirty=dirty)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunFolder:
    """A run's output folder (--out). It is never silently overwritten: a run already there needs --resume (where
    the script has it) or --overwrite. It holds config.json: the resolved settings, the command line, the versions
    and the start and end times. Until `done_first()` (the run's first result is written), a failure or an
    interrupt puts the folder back as it was found: what the run created is removed, what --overwrite set aside
    is restored.

        with RunFolder(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite, marker="checkpoint.pt") as run:
            ...; run.done_first(); ...
    """

    def __init__(self, out, cfg, resume=None, overwrite=False, marker=None, argv=None):
        self.path, self.cfg, self.marker = Path(out), cfg, marker
        module = type(cfg).__module__  # argv given: the stage's own command line, also when main(argv) is called
        self.command = command_line(argv, module + ".py" if argv is not None and module != "__main__" else None)
        self.first, self.status = False, None
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file: --out names a folder")
        self.existed = path.exists()
        self.before = set(os.listdir(path)) if self.existed else set()
        self.before -= {".replaced"}
        taken = (marker is None and bool(self.before)) or (marker is not None and (path / marker).exists())
        how = "pass --resume to continue it, --overwrite to replace it, or another --out" if resume is not None \
            else "pass --overwrite to replace it or another --out"
        if resume and not taken:
            raise UserError(f"--resume: {path} holds no run to resume{f' (no {marker})' if marker else ''}: "
                            "drop --resume to start one")
        if taken and not (resume or overwrite):
            raise UserError(f"{path} already holds a run: {how}")
        self.old_record = (path / "config.json").read_bytes() if (path / "config.json").exists() else None
        self.resume = bool(resume)
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
            try:
                model = json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
            model = {k: v for k, v in model.items() if k not in self.RECORD} if "model_type" in model else {}
        save_json(dict(model, config=dataclasses.asdict(self.cfg), command=self.command, versions=versions(),
                       started=self.started, ended=ended, status=self.status), path)

    def update(self, cfg):
        """The settings changed once known (a resumed run takes its saved ones)."""
        self.cfg = cfg
        self.write_record()

    def done_first(self):
        """The run has written its first result: from now on a failure keeps what is there."""
        if not self.first:
            self.first = True
            if self.aside:
                shutil.rmtree(self.aside, ignore_errors=True)

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
            shutil.rmtree(self.path, ignore_errors=True)

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


def keep_jsonl(path, keep):
    """Rewrite a JSONL file with only the records where keep(record): a resumed run drops the lines its
    checkpoint does not cover (and a torn last line), so that no step is logged twice."""
    path = Path(path)
    if path.exists():
        records = [r for r in read_jsonl(path) if keep(r)]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


# ----------------------------------------------------------------------------- the SuperPLM checkpoint


def checkpoint_path(path, flag=""):
    """checkpoint.pt of a SuperPLM run folder (or the file itself); if there is none, one line saying where it was
    looked for (given by `flag`, e.g. --init) and the command that makes one."""
    given = Path(path)
    path = given / "checkpoint.pt" if given.is_dir() else given
    if not path.exists():
        folder = given if given.suffix != ".pt" else given.parent
        raise UserError(f"{flag + ' ' if flag else ''}{path} does not exist: train a SuperPLM first (python "
                        f"superplm.py --preset tiny --out {folder})")
    return path


def saved_space(fields):
    """The SearchSpace a checkpoint saved as dataclasses.asdict(space)."""
    return SearchSpace(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()})


def load_superplm(path, ckpt=None):
    """(SuperPLM as a Bert in eval mode, its SearchSpace, path of its tokenizer) from a run folder or checkpoint
    (ckpt: the checkpoint's contents, when the caller has already read them)."""
    path = checkpoint_path(path)
    ckpt = ckpt or torch_load(path)
    model = Bert.from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    space = saved_space(ckpt["space"])
    beside = path.parent / Path(ckpt["tokenizer"]).name  # the run folder may have moved
    return model.eval(), space, str(beside if beside.exists() else ckpt["tokenizer"])


def rng_states():
    """Every random generator's state, saved in a checkpoint so that a resumed run draws what it would have."""
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- superplm.py


def resume_command(script, out):
    """The command that continues the run in `out`: as many workers again under torchrun (per node, with the same
    rendezvous flags)."""
    command = command_line(["--out", out, "--resume"], script)
    if "WORLD_SIZE" in os.environ:
        command = command.replace("python", f"torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']}", 1)
    return command


def resume_superplm(cfg, folder, rank):
    """--resume: (the run's checkpoint, its saved settings with this command's --out, --device and --dtype), with
    config.json and metrics.jsonl brought back to that checkpoint (no step logged twice); else (None, cfg)."""
    if not cfg.resume:
        return None, cfg
    out = Path(cfg.out)
    ckpt = torch_load(out / "checkpoint.pt")
    cfg = dataclasses.replace(type(cfg)(**config_values(type(cfg), ckpt["config"])), out=cfg.out, resume=True,
                              device=cfg.device, dtype=cfg.dtype)  # the saved settings, where and how: this run's
    if rank == 0:
        folder.update(cfg)
        keep_jsonl(out / "metrics.jsonl", lambda r: r["step"] <= ckpt["step"])
    return ckpt, cfg


def save_superplm(out, model, space, objective, optimizer, cfg, step, total, spe, rows):
    """Write out/checkpoint.pt (the format above) at `step` of `total` (spe steps per epoch over `rows` sequences)."""
    torch_save(dict(model_config=model.config(), model=model.state_dict(), space=dataclasses.asdict(space),
                    objective=cfg.objective, objective_state=objective.state_dict(),
                    tokenizer=str((Path(out) / "tokenizer.json").resolve()), optimizer=optimizer.state_dict(),
                    schedule=dict(total=total, warmup=cfg.warmup, peak=cfg.lr), step=step,
                    data=dict(epoch=step // spe, batch=step % spe, rows=rows), rng=rng_states(),
                    config=dataclasses.asdict(cfg)), Path(out) / "checkpoint.pt")


def restore_superplm(ckpt, optimizer, rows):
    """Continue from a checkpoint on a corpus of `rows` sequences: the optimizer's state and every random
    generator's as they were; returns the step to go on from."""
    if ckpt["data"]["rows"] != rows:
        raise UserError(f"the corpus now gives {rows} sequences, the checkpoint's {ckpt['data']['rows']}: "
                        "resume with the corpus and --seq-len the run started with")
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_states(ckpt["rng"])
    return ckpt["step"]


def stopped(stop, world, device):
    """Whether a SIGINT/SIGTERM arrived; with several workers, whether any of them got one (all stop together)."""
    if world == 1:
        return stop.signal is not None
    flag = torch.tensor([float(stop.signal is not None)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def interrupt(cfg, stop, step, total, rank, world):
    """superplm.py stops after a signal, its step saved: rank 0 says how to resume, the other workers leave."""
    if world > 1:
        dist.barrier()
        if rank:
            sys.exit(130)
    raise Interrupted(f"{stop.signal or 'a signal'} at step {step}/{total}: saved {Path(cfg.out) / 'checkpoint.pt'}; "
                      f"resume with: {resume_command('superplm.py', cfg.out)}")


# ----------------------------------------------------------------------------- latency.py

SPACES = {"pretrain": PRETRAIN_SPACE, "kd": KD_SPACE}  # Table B.1, by name


def in_folder(path, name, old_suffix):
    """FOLDER/name; a path ending in old_suffix is the file itself, as --out once named (one more release)."""
    path = Path(path)
    if path.suffix == old_suffix:
        return path
    return path / name if path.is_dir() or path.suffix == "" else path


def out_file(cfg, name, old_suffix, argv=None, **run_folder):
    """(the file a command writes, the context to write it in) for cfg.out: FOLDER/name inside a RunFolder
    (run_folder: its resume and marker); an --out ending in old_suffix is that file, with no run folder."""
    path = in_folder(cfg.out, name, old_suffix)
    if path.name == name:
        return path, RunFolder(cfg.out, cfg, overwrite=cfg.overwrite, argv=argv, **run_folder)
    return path, contextlib.nullcontext(types.SimpleNamespace(done_first=lambda: None))


def read_appended(path):
    """The records of a JSONL file that a run appends to (none if it is not there), a half-written last line
    (a killed run) cut first so that the lines appended next stay readable."""
    if not Path(path).exists():
        return []
    raw = Path(path).read_bytes()
    if raw and not raw.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
    return read_jsonl(path)


@contextlib.contextmanager
def kept_on_interrupt(path, kind, what, argv=None, script=None, resume=True):
    """Inside: Ctrl-C (or SIGTERM) becomes Interrupted, saying how many records of `kind` the JSONL file `path`
    keeps and the command that continues: the same one, with --resume where `resume` asks for it."""
    try:
        yield
    except KeyboardInterrupt:
        kept = sum(r["kind"] == kind for r in read_jsonl(path)) if Path(path).exists() else 0
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        again = command_line(argv + (["--resume"] if resume and "--resume" not in argv else []), script)
        raise Interrupted(f"the {kept} {what} so far are kept in {path}; continue with: {again}") from None


def space_from(name):
    """`latency.py measure --space`: a search space by name (Table B.1) or the one saved in a SuperPLM checkpoint."""
    if name in SPACES:
        return SPACES[name]
    if (Path(name) / "checkpoint.pt").is_file():
        name = str(Path(name) / "checkpoint.pt")
    if not Path(name).is_file():
        raise UserError(f"--space {name!r} is neither {' nor '.join(SPACES)} nor a SuperPLM checkpoint file")
    space = torch_load(name).get("space")
    if not isinstance(space, dict):
        raise UserError(f"{name} holds no search space: pass a checkpoint written by superplm.py")
    return saved_space(space)


def read_timings(path):
    """The records of `latency.py measure`'s timings.jsonl (a run folder or the file), checked: a meta line first,
    then >= 10 timed archs and BERT-base."""
    folder, path = path, in_folder(path, "timings.jsonl", ".jsonl")
    if not Path(path).exists():
        raise UserError(f"{path} does not exist: collect it with `python latency.py measure --out {folder}`")
    records = read_jsonl(path)
    if not records or records[0].get("kind") != "meta":
        raise UserError(f"{path} was not written by `latency.py measure`: pass a file that `measure` wrote")
    timed = sum(r["kind"] == "arch" for r in records)
    if timed < 10 or not any(r["kind"] == "base" for r in records):
        raise UserError(f"{path} holds {timed} timed archs: run `latency.py measure` longer (>= 10 needed)")
    return records


def check_resumed(path, saved, now):
    """A file is resumed only with the settings it was begun with: `saved` and `now` (flat dicts) agree on every
    key of `now` but "device"."""
    for key, value in now.items():
        if key != "device" and saved.get(key) != value:
            raise UserError(f"{path} was measured with {key}={saved.get(key)}, not {value}: pass the same flags to "
                            "resume it, or another --out")


# ----------------------------------------------------------------------------- search.py


def open_search(cfg, folder, resumable):
    """(config, records of the candidates scored before) of a search in `folder` (a RunFolder). OUT/candidates.jsonl
    holds one line per scored architecture: --resume replays the same seeded search over those scores, with the
    saved config (only the flags in `resumable` may change), so that it ends as an uninterrupted search would."""
    state = folder.path / "candidates.jsonl"
    if cfg.resume and folder.old_record:  # the saved search wins, so that the replay is exact
        saved = config_values(type(cfg), json.loads(folder.old_record))
        cfg = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k not in resumable})
        folder.update(cfg)
    records = {Arch.parse(r["arch"]): r for r in (read_jsonl(state) if state.exists() else [])}
    if records:  # rewritten whole: a torn last line from a killed run would spoil the lines appended after it
        atomic_write(state, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records.values())))
    return cfg, records


class SearchRecord:
    """What worker 0 of a search writes as it goes: every scored candidate at once as a line of candidates.jsonl
    (an interrupted search loses at most the round in progress), and after each generation scored.json, best
    first. A SIGINT/SIGTERM (`stop`, common.stop_after_step) ends the search once the candidate in progress is
    written. `metrics` (arch -> the evaluator's own numbers) and `latency` (arch -> ms) fill in the records."""

    def __init__(self, folder, command, latency, base_ms, metrics, bar, stop):
        self.folder, self.command, self.latency, self.base_ms = folder, command, latency, base_ms
        self.metrics, self.bar, self.stop = metrics, bar, stop
        self.path = folder.path / "candidates.jsonl"

    def rows(self, candidates):
        """The records of scored.json and top.json: a candidate with its speedup and its metrics."""
        return [dict(c.to_dict(), speedup=self.base_ms / c.latency, **self.metrics.get(c.arch, {}))
                for c in candidates]

    def scored(self, arch, score):
        append_jsonl(self.path, dict(arch=str(arch), score=score, latency=self.latency(arch),
                                     metrics=self.metrics.get(arch, {})))
        self.folder.done_first()
        self.bar.update()
        if self.stop.signal:
            self.bar.close()
            raise Interrupted(f"{self.stop.signal}: the {len(read_jsonl(self.path))} candidates scored so far are "
                              f"kept in {self.path}; resume with: {self.command}")

    def generation(self, best_first):
        save_json(self.rows(best_first), self.folder.path / "scored.json")
        self.bar.write(f"generation {max(c.generation for c in best_first)}: {len(best_first)} scored, best "
                       f"{best_first[0].arch} score {best_first[0].score:.4f}")
