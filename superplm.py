"""One-shot training of the SuperPLM (paper §3.4, Algorithm 1), and further training of a searched sub-model (§3.6).

Algorithm 1, batch-wise training: for every batch, each of N workers takes its own sub-batch, clears the gradients,
and M times samples its own sub-model and adds that sub-model's gradients on its sub-batch; the gradients are then
averaged over the workers and one optimizer step updates the whole SuperPLM. A worker is a torch.distributed rank:

    python superplm.py --preset tiny                           # one process: a small SuperPLM on 2 CPU cores
    torchrun --nproc_per_node 16 superplm.py                   # the paper's N = 16 (nccl on GPUs, gloo on CPUs)
    python superplm.py --objective kd --teacher runs/teacher   # task-agnostic distillation (distill.py)
    python superplm.py --arch 5-564-1054-8-512 --init runs/superplm --out runs/s1   # stage 3: further training
    python superplm.py --init bert-base-uncased/ --out runs/superplm   # start from BERT's weights, not from scratch

The run folder (--out) holds checkpoint.pt (what later stages read, see load_superplm), metrics.jsonl, log.txt,
config.json and the vocabulary; a stage-3 run also a Hugging Face BERT (model.safetensors). SIGINT or SIGTERM
finishes the step, writes the checkpoint and prints the command that resumes."""

import dataclasses
import os
import random
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from common import (COUNT, DEVICE_HELP, DTYPE_HELP, DTYPES, Interrupted, NONNEGATIVE, POSITIVE, RunFolder, SHARE,
                    THREADS_HELP, UserError, append_jsonl, barrier, command_line, config_parser, config_values,
                    end_distributed, flag, free_folder, init_distributed, keep_jsonl, no_such, parse_flags, rank0_first,
                    resolve_compute, run_main, seed_everything, stop_after_step, torch_load, torch_save)
from data import DataConfig, batches, derive_seed, prefetch, prepare, save_tokenizer, split, steps_per_epoch
from distill import KDObjective, check_compatible, load_teacher
from model import (Arch, Bert, MLM, SearchSpace, SUPERPLM, extract, grid, in_place_grads, learning_rate, make_optimizer,
                   save_pretrained, sub)


# --------------------------------------------------------------------------------------------------------- Algorithm 1

def sample_arch(space, seed, step, rank, m) -> Arch:
    """Algorithm 1, line 7: the m-th sub-model of worker `rank` at `step`. The authors' code seeded with (step, m)
    alone, so every GPU trained the same sub-model; with the rank, each worker samples its own as the paper says."""
    return space.sample(random.Random(derive_seed(seed, step, rank, m)))


def flat_grads(params):
    """Give every parameter a .grad that is a view into one flat buffer: zeroing the buffer clears the gradients
    (Algorithm 1, line 5) and one all-reduce of it averages them all over the workers (line 11)."""
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)
    return flat


def accumulate(model, objective, batch, space, M, seed, step, rank, autocast=nullcontext):
    """Algorithm 1, lines 6-10 on one worker: M times sample a sub-model and add its gradients on this sub-batch.
    Each loss is divided by M, so the update uses the average gradient of all N*M sampled sub-models."""
    archs, stats = [], defaultdict(float)
    with in_place_grads():  # each slice's gradient straight into the flat buffer, not via a zero-padded full copy
        for m in range(M):  # line 6
            arch = sample_arch(space, seed, step, rank, m)  # lines 7-8: this worker's own sub-model
            torch.manual_seed(derive_seed(seed, step, rank, m, 1))  # its dropout: replayable, resumable
            with autocast():
                loss, more = objective(model, batch, arch)
            (loss / M).backward()  # line 9: parameters outside the sub-model get zero
            archs.append(arch)
            for k, v in {"loss": loss.detach(), **more}.items():
                stats[k] += v / M
    return archs, stats


def update(flat, world, optimizer, lr, clip=1.0):
    """Algorithm 1, line 11: average the gradients over the workers, clip to BERT's global norm 1, one AdamW step."""
    if world > 1:
        dist.all_reduce(flat)  # sum of every worker's gradients, parameters a sample missed count as zero
        flat.div_(world)
    flat.mul_((clip / (flat.norm() + 1e-6)).clamp(max=1.0))  # = clip_grad_norm_ over all parameters
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()


def run(cfg, argv=None, on_save=None, init=None):
    """Algorithm 1 in cfg.out (one architecture with --arch); returns the model. argv goes into config.json; init:
    --init's checkpoint if already read; on_save(step, model) runs on rank 0 after each checkpoint is written."""
    rank, world, device = init_distributed(cfg.device)
    folder = RunFolder(cfg.out, cfg, cfg.resume, cfg.overwrite, marker="checkpoint.pt", argv=argv) if rank == 0 \
        else nullcontext()
    if world > 1:
        barrier()
    with folder:
        ckpt, cfg = resume_superplm(cfg, folder, rank)  # --resume: the run's checkpoint, and its settings
        compute = resolve_compute(str(device), cfg.dtype, cfg.threads)
        model, space, objective, dataset = setup(cfg, rank, world, device, ckpt, init)
        params = list(model.parameters()) + [p for p in objective.parameters() if p.requires_grad]
        if world > 1:  # every worker starts from rank 0's weights
            for p in params:
                dist.broadcast(p.data, 0)
        flat = flat_grads(params)
        optimizer = make_optimizer(params, cfg.lr)  # BERT's weight decay and epsilon
        spe = steps_per_epoch(dataset, cfg.batch_size)
        total = cfg.steps or cfg.epochs * spe
        step = restore_superplm(ckpt, optimizer, len(dataset)) if ckpt else 0
        log = Log(cfg, rank, world, device, step, total)
        if rank == 0:  # the run's first line
            n = sum(p.numel() for p in model.parameters())
            log.write(f"{f'resuming at step {step}' if ckpt else 'training'} {model.arch} ({n / 1e6:.1f}M parameters, "
                      f"{cfg.objective}) on {world} worker(s), {compute}: {total} steps of {cfg.batch_size} x "
                      f"{cfg.seq_len} tokens, {len(dataset)} sequences ({spe} steps/epoch), M={cfg.sub_models}, "
                      f"space of {space.size():,} archs")
        with stop_after_step() as stop:
            while step < total:
                epoch, pos = divmod(step, spe)
                # lines 2-4: this worker's sub-batches, masked by a background thread while the step before computes
                rows = batches(dataset, cfg.batch_size, epoch, cfg.seed, rank, world, start=pos)
                for batch in prefetch(rows, device):
                    flat.zero_()  # line 5: clear the gradients
                    archs, stats = accumulate(model, objective, batch, space, cfg.sub_models, cfg.seed, step, rank,
                                              compute.autocast)  # lines 6-10
                    lr = learning_rate(step, total, cfg.lr, cfg.warmup)
                    update(flat, world, optimizer, lr)  # line 11
                    step += 1
                    log.step(step, epoch, lr, stats, archs)
                    due = step % cfg.log_every == 0 or step % cfg.save_every == 0 or step == total
                    stopping = stopped(stop, world, device, due)  # no host sync on the steps between
                    if rank == 0 and (step % cfg.save_every == 0 or step == total or stopping):
                        save_superplm(Path(cfg.out), model, space, objective, optimizer, cfg, step, total, spe,
                                      len(dataset))
                        folder.done_first()
                        if on_save:
                            on_save(step, model)
                    if stopping and step < total:
                        log.bar.close()
                        interrupt(cfg, stop, step, total, rank, world)
                    if step == total:
                        break
        log.bar.close()
        if rank == 0 and cfg.arch:  # a stand-alone model: the run folder is also a Hugging Face BERT folder
            save_pretrained(model, Path(cfg.out))
        if rank == 0:
            print(f"trained {model.arch} for {total} steps -> {cfg.out}/ (checkpoint.pt, metrics.jsonl, log.txt"
                  f"{', model.safetensors' if cfg.arch else ''})")
    end_distributed(world)
    return model


# ------------------------------------------------------------------------------------------- search space and sampling

def space_for(superplm: Arch, mha="heads") -> SearchSpace:
    """Table B.1's ranges scaled to a SuperPLM (8-768-3072-12-768: PRETRAIN_SPACE "heads", KD_SPACE "dims"): hidden
    from 1/6, ffn from 1/24 of the maximum in steps of 4; "dims" keeps every head, qkv from 15/64 of it up."""
    L, H, F_, h, D = superplm.layers, superplm.hidden, superplm.ffn, superplm.heads, superplm.head_dim
    common = dict(layers=grid(1, L, 1), hidden=grid(-(-H // 24) * 4, H, 4), ffn=grid(-(-F_ // 96) * 4, F_, 4))
    if mha == "heads":
        return SearchSpace(**common, heads=grid(1, h, 1), head_dim=D)
    return SearchSpace(**common, heads=(h,), qkv=grid(h * -(-D * 15 // 64), h * D, h), head_dim=D)


def single(arch: Arch) -> SearchSpace:
    """The space of one architecture (stage 3 trains it alone)."""
    return SearchSpace((arch.layers,), (arch.hidden,), (arch.ffn,), (arch.heads,), (arch.qkv,), arch.head_dim)


# -------------------------------------------------------------------------------------------- what the run starts from

def setup(cfg, rank, world, device, ckpt=None, init=None):
    """(model, space, objective, training rows) of a run, from its checkpoint (ckpt, --resume), --init's (init: read
    here if not yet) or new; its vocabulary the run's own, the teacher's, --init's or trained on the corpus."""
    arch = Arch.parse(cfg.arch or cfg.superplm_arch)  # a shape that does not parse fails before the corpus is read
    teacher, vocab = None, cfg.tokenizer
    if cfg.objective == "kd":
        if not cfg.teacher:
            raise UserError("--objective kd needs --teacher DIR (python distill.py make-teacher writes a tiny one)")
        teacher, vocab = load_teacher(cfg.teacher)
        if not cfg.init:  # fail before the corpus is tokenised
            check_compatible(teacher, arch)
    start = load_superplm(cfg.out, ckpt) if ckpt else None
    if cfg.init and not ckpt:
        init = init or read_init(cfg.init)
        start = from_bert(cfg) if "pretrained" in init else load_superplm(cfg.init, init)
    vocab = start[2] if start else vocab
    _, tok, dataset = rank0_first(rank, world, lambda: prepare(dataclasses.replace(cfg, tokenizer=str(vocab or ""))))
    dataset = split(dataset)[0]  # the held-out tail is for scoring sub-models (search.py), never trained on
    seed_everything(cfg.seed)  # the new weights
    model, space = build_model(cfg, tok.get_vocab_size(), start)
    if rank == 0 and not ckpt:
        save_tokenizer(tok, Path(cfg.out))
    if teacher is not None:
        check_compatible(teacher, model, space)
    objective = MLM() if teacher is None else KDObjective(teacher, model.arch.hidden)
    if ckpt:
        objective.load_state_dict(ckpt["objective_state"])
    elif cfg.init and cfg.objective == "kd" and init.get("objective") == "kd":  # an MLM SuperPLM has none
        own = objective.state_dict()  # the trained projection, its leading block for a narrower model
        objective.load_state_dict({k: sub(v, *own[k].shape) for k, v in init["objective_state"].items()})
    model.to(device).train()
    objective.to(device).train()
    return model, space, objective, dataset


def from_bert(cfg):
    """--init from a Hugging Face BERT/ELECTRA folder: (its leading layers and blocks as the SuperPLM, space, vocab)."""
    mha, arch = cfg.mha or ("dims" if cfg.objective == "kd" else "heads"), Arch.parse(cfg.superplm_arch)
    bert, vocab = load_teacher(cfg.init, "--init", mha)
    try:
        return extract(bert, arch), space_for(arch, mha), vocab
    except UserError as e:
        raise UserError(f"--init {cfg.init}: {e}; pass a --superplm-arch that fits in {bert.arch}") from None


def build_model(cfg, vocab_size, init=None):
    """(model, space): a new SuperPLM, the one loaded by --init, or one architecture of it alone (--arch)."""
    if init:
        model, space, _ = init
        if cfg.arch:
            model = extract(model, Arch.parse(cfg.arch))
        return model, single(model.arch) if cfg.arch else space
    mha = cfg.mha or ("dims" if cfg.objective == "kd" else "heads")  # Figure 3: (c) distillation, (b) pre-training
    arch = Arch.parse(cfg.arch or cfg.superplm_arch)
    model = Bert(arch, vocab_size=vocab_size, mha=mha, max_position=max(512, cfg.seq_len), dropout=cfg.dropout)
    return model, single(arch) if cfg.arch else space_for(arch, mha)


# ------------------------------------------------------------ the checkpoint (what every later stage reads) and resume

def save_superplm(out, model, space, objective, optimizer, cfg, step, total, spe, rows):
    """Write out/checkpoint.pt: the SuperPLM, its space, vocabulary path, objective and what --resume needs."""
    torch_save(dict(model_config=model.config(), model=model.state_dict(), space=dataclasses.asdict(space),
                    objective=cfg.objective, objective_state=objective.state_dict(),
                    tokenizer=str((Path(out) / "tokenizer.json").resolve()), optimizer=optimizer.state_dict(),
                    schedule=dict(total=total, warmup=cfg.warmup, peak=cfg.lr), step=step,
                    data=dict(epoch=step // spe, batch=step % spe, rows=rows), rng=rng_states(),
                    config=dataclasses.asdict(cfg)), Path(out) / "checkpoint.pt")


def checkpoint_path(path, flag=""):
    """checkpoint.pt of a SuperPLM run folder (or the file itself); if none, one line with the command making one."""
    given = Path(path)
    path = given / "checkpoint.pt" if given.is_dir() else given
    if not given.exists():
        raise no_such(flag or "SuperPLM", given, "train one with python superplm.py --preset tiny --out "
                      + free_folder("runs/superplm"))
    if not path.exists():
        raise UserError(f"{flag + ' ' if flag else ''}{given} holds no checkpoint.pt: pass a superplm.py run folder")
    return path


def saved_space(fields):
    """The SearchSpace a checkpoint saved as dataclasses.asdict(space)."""
    return SearchSpace(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()})


def load_superplm(path, ckpt=None):
    """(SuperPLM as a Bert in eval mode, its SearchSpace, its tokenizer's path) from a run folder or checkpoint."""
    path = checkpoint_path(path)
    ckpt = ckpt or torch_load(path)
    model = Bert.from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    beside = path.parent / Path(ckpt["tokenizer"]).name  # the run folder may have moved
    return model.eval(), saved_space(ckpt["space"]), str(beside if beside.exists() else ckpt["tokenizer"])


def resume_superplm(cfg, folder, rank):
    """--resume: (the run's checkpoint, its saved settings), metrics.jsonl cut back to it; else (None, cfg)."""
    if not cfg.resume:
        return None, cfg
    out = Path(cfg.out)
    ckpt = torch_load(out / "checkpoint.pt")
    cfg = dataclasses.replace(type(cfg)(**config_values(type(cfg), ckpt["config"])), out=cfg.out, resume=True,
                              device=cfg.device, dtype=cfg.dtype, threads=cfg.threads)  # where and how: this run's
    if rank == 0:
        folder.update(cfg)
        keep_jsonl(out / "metrics.jsonl", lambda r: r["step"] <= ckpt["step"])
    return ckpt, cfg


def restore_superplm(ckpt, optimizer, rows):
    """Restore the optimizer and the generators (rank 0's GPU one: 8 GPUs resume on 1); returns the step to go on
    from. Dropout is reseeded from (seed, step, rank, m), masks from (seed, epoch, row): nothing else to restore."""
    if ckpt["data"]["rows"] != rows:
        raise UserError(f"the corpus now gives {rows} sequences, the checkpoint's {ckpt['data']['rows']}: "
                        "resume with the corpus and --seq-len the run started with")
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_states(ckpt["rng"])
    return ckpt["step"]


def rng_states():
    """Python's, torch's CPU and the current GPU's generator states (see restore_superplm)."""
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else [])


def set_rng_states(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    cuda = s["cuda"][0] if isinstance(s["cuda"], (list, tuple)) and s["cuda"] else s["cuda"]  # older: one per GPU
    if len(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def stopped(stop, world, device, due=True):
    """Whether any worker got SIGINT/SIGTERM, asked across workers only where `due` (a host sync stalls the GPU)."""
    if world == 1:
        return stop.signal is not None
    if not due:
        return False
    flag = torch.tensor([float(stop.signal is not None)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def interrupt(cfg, stop, step, total, rank, world):
    """Stop after a signal, the step saved: rank 0 says how to resume (same torchrun workers), the others leave."""
    if world > 1:
        barrier()
        if rank:
            sys.exit(130)
    command = command_line(["--out", cfg.out, "--resume"], "superplm.py")
    if "WORLD_SIZE" in os.environ:
        command = command.replace("python", f"torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']}", 1)
    raise Interrupted(f"{stop.signal or 'a signal'} at step {step}/{total}: saved {Path(cfg.out) / 'checkpoint.pt'}; "
                      f"resume with: {command}")


# ------------------------------------------------------------------------------------------------------------ progress

class Log:
    """Rank 0's progress bar and, every log_every steps, a line and a metrics.jsonl record (means over steps, ranks)."""

    def __init__(self, cfg, rank, world, device, step, total):
        self.cfg, self.rank, self.world, self.device, self.total = cfg, rank, world, device, total
        self.bar = tqdm(total=total, initial=step, disable=rank != 0, desc="superplm", unit="step")
        self.window, self.t0, self.steps0 = defaultdict(float), time.time(), step

    def write(self, line):  # on the terminal (above the progress bar) and in log.txt
        self.bar.write(line)
        with open(Path(self.cfg.out) / "log.txt", "a") as f:
            f.write(line + "\n")

    def step(self, step, epoch, lr, stats, archs):
        self.bar.update()
        for k, v in stats.items():
            self.window[k] += v
        if step % self.cfg.log_every and step != self.total:
            return
        keys = sorted(self.window)
        sums = torch.stack([torch.as_tensor(self.window[k], device=self.device, dtype=torch.float32) for k in keys])
        if self.world > 1:
            dist.all_reduce(sums)
        means = dict(zip(keys, (sums / ((step - self.steps0) * self.world)).tolist()))  # over steps x workers
        rate = self.cfg.batch_size * self.cfg.seq_len * (step - self.steps0) / (time.time() - self.t0)  # global
        if self.rank == 0:
            record = dict(step=step, epoch=epoch, lr=lr, tokens_per_s=rate, **means,
                          archs=[str(a) for a in archs])  # rank 0's sub-models of this step
            append_jsonl(Path(self.cfg.out) / "metrics.jsonl", record)
            self.write(f"step {step}/{self.total} | " + " | ".join(f"{k} {v:.4f}" for k, v in means.items())
                       + f" | lr {lr:.2e} | {rate:,.0f} tok/s | archs {' '.join(record['archs'])}")
        self.window, self.t0, self.steps0 = defaultdict(float), time.time(), step


# --------------------------------------------------------------------------------------- settings and the command line

@dataclass
class Config(DataConfig):  # the corpus flags (--corpus, --tokenizer, --vocab-size, --seq-len, --cache-dir) first
    preset: str = flag("paper", "paper: §4.1's settings (shown); tiny: a 4-256-1024-4-256 SuperPLM, minutes on 2 "
                                "CPUs. A preset changes the defaults; flags given still win", choices=["paper", "tiny"])
    out: str = flag("runs/superplm", "run folder: checkpoint, metrics, vocabulary")
    superplm_arch: str = flag(str(SUPERPLM), "the SuperPLM's shape (§3.4); sampling scales Table B.1's ranges to it")
    objective: str = flag("mlm", "mlm: BERT's pre-training; kd: TinyBERT's distillation (§4.1)", choices=["mlm", "kd"])
    teacher: str = flag("", "kd: the teacher's folder (the paper's: ELECTRA-base)")
    mha: str = flag("", "attention slicing (Figure 3): heads keeps the head width, dims keeps every head; empty: heads "
                        "for mlm, dims for kd (§3.4)", choices=["", "heads", "dims"])
    arch: str = flag("", "train only this architecture (with --init: §3.6's further training, no warm-up)")
    init: str = flag("", "start from this SuperPLM (run folder or checkpoint.pt), or from a Hugging Face BERT/ELECTRA "
                         "folder: the SuperPLM takes its leading layers and blocks")
    batch_size: int = flag(256, "global batch, split over the ranks (§4.1)", **COUNT)
    lr: float = flag(1e-5, "peak learning rate of AdamW (§4.1)", **POSITIVE)
    warmup: float = flag(0.1, "share of the steps with linear warm-up, then linear decay to 0 (§4.1)", **SHARE)
    epochs: int = flag(5, "passes over the corpus (§4.1), unless --steps", **COUNT)
    steps: Optional[int] = flag(None, "optimizer steps (the schedule is laid over them); unset: --epochs", **COUNT)
    sub_models: int = flag(3, "M of Algorithm 1: sub-models each worker samples per batch", **COUNT)
    dropout: float = flag(0.1, "dropout of a new model", min=0, max=0.99)
    seed: int = flag(0, "seeds the weights, the data order, masks, sub-models", **NONNEGATIVE)
    save_every: int = flag(1000, "write the checkpoint every K steps (and at the end)", **COUNT)
    device: str = flag("auto", DEVICE_HELP)
    dtype: str = flag("auto", DTYPE_HELP, choices=["auto", *DTYPES])
    threads: Optional[int] = flag(None, THREADS_HELP, **COUNT)
    log_every: int = flag(50, "one log line every N steps", **COUNT)
    resume: bool = flag(False, "continue the run in --out from its checkpoint, with its saved settings")
    overwrite: bool = flag(False, "replace the run in --out")
    RESUMED = "; to train on from its weights under a new schedule: python superplm.py --init {out} --steps N --out NEW"


# Small runs: BERT-S3's shape (Table 4) on the stdlib corpus, a learning rate that shows progress in minutes.
PRESETS = {"paper": {}, "tiny": dict(superplm_arch="4-256-1024-4-256", vocab_size=4096, seq_len=64, batch_size=32,
                                     lr=1e-3, steps=600, save_every=100, log_every=20, out="runs/superplm-tiny")}
INHERITED = ("superplm_arch", "objective", "teacher", "corpus", "tokenizer", "vocab_size", "seq_len", "cache_dir",
             "batch_size", "lr", "sub_models", "dropout", "log_every", "save_every")  # what --init carries over


def read_init(path):
    """--init's checkpoint (run folder or checkpoint.pt), read once; {"pretrained": path} for a Hugging Face folder."""
    given = Path(path)
    if (given / "config.json").exists() and not (given / "checkpoint.pt").exists():
        return {"pretrained": str(given)}
    run = given / "checkpoint.pt" if given.is_dir() else given
    ours = not given.exists() or (run.exists() and run.suffix == ".pt")  # missing: checkpoint_path says so
    ckpt = torch_load(checkpoint_path(path, "--init")) if ours else {}
    if "model_config" not in ckpt:
        raise UserError(f"--init {path} is neither a SuperPLM run folder (or its checkpoint.pt) nor a Hugging Face "
                        "BERT/ELECTRA folder (config.json and its weights): --init takes one of those")
    return ckpt


def defaults(first, init=None):
    """The defaults a command line starts from: the preset's, --init's settings (init: its checkpoint), --arch's."""
    out = dict(PRESETS[first.preset])
    if init:  # §4.1: further training keeps the one-shot run's settings (corpus, batch, lr, ...)
        saved = config_values(Config, init.get("config", {}))
        out.update({k: saved[k] for k in INHERITED if k in saved})
    if first.arch:
        out["sub_models"] = 1  # one architecture: nothing to sample
        if first.init:
            out["warmup"] = 0.0  # §4.1: further training is the one-shot setting without warm-up
    return out


def configure(argv=None):
    """(config, --init's checkpoint or None); settings: defaults < --preset < --init's < --arch's < --config < flags."""
    parser = config_parser(Config, __doc__.split("\n")[0])
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    path = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0].init  # --help: after the read
    init = read_init(path) if path else None
    return parse_flags(Config, argv, parser=parser, defaults=lambda first: defaults(first, init)), init


def parse_config(argv=None):
    return configure(argv)[0]


def main(argv=None):
    cfg, init = configure(argv)
    run(cfg, argv, init=init)


if __name__ == "__main__":
    run_main(main)
