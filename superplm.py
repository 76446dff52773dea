"""One-shot training of the SuperPLM (paper §3.4, Algorithm 1), and further training of a searched sub-model (§3.6).

Algorithm 1, batch-wise training: for every batch, each of N workers takes its own sub-batch, clears the gradients,
and M times samples its own sub-model and adds that sub-model's gradients on its sub-batch; the gradients are then
averaged over the workers and one optimizer step updates the whole SuperPLM. A worker is a torch.distributed rank:

    python superplm.py --preset tiny                           # one process: a small SuperPLM on 2 CPU cores
    torchrun --nproc_per_node 16 superplm.py                   # the paper's N = 16 (nccl on GPUs, gloo on CPUs)
    python superplm.py --objective kd --teacher runs/teacher   # task-agnostic distillation (distill.py)
    python superplm.py --arch 5-564-1054-8-512 --init runs/superplm --out runs/s1   # stage 3: further training

The run folder (--out) holds checkpoint.pt (what search.py, latency.py and finetune.py read, see load_superplm),
metrics.jsonl and the vocabulary (tokenizer.json, vocab.txt); a stage-3 run also leaves a Hugging Face BERT there.
"""

import dataclasses
import os
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (UserError, append_jsonl, config_from_args, config_parser, fresh_out_dir, run_main,
                    seed_everything, torch_load, torch_save)
from data import DataConfig, batches, split, derive_seed, prepare, save_tokenizer, steps_per_epoch
from model import SUPERPLM, Arch, Bert, SearchSpace, extract, grid, sub


@dataclass
class Config(DataConfig):  # the corpus flags (--corpus, --tokenizer, --vocab-size, --seq-len, --cache-dir) first
    preset: str = field(default="paper", metadata={
        "help": "paper: the settings of §4.1 (shown here); tiny: a 4-256-1024-4-256 SuperPLM that learns on two "
                "CPU cores in minutes. A preset changes the defaults; flags given still win",
        "choices": ["paper", "tiny"]})
    out: str = field(default="runs/superplm", metadata={"help": "run folder: checkpoint, metrics, vocabulary"})
    superplm: str = field(default=str(SUPERPLM), metadata={
        "help": "the SuperPLM layers-hidden-ffn-heads-qkv (§3.4); sampling uses Table B.1's ranges scaled to it"})
    objective: str = field(default="mlm", metadata={
        "help": "mlm: BERT pre-training; kd: TinyBERT's last-layer distillation from --teacher (§4.1)",
        "choices": ["mlm", "kd"]})
    teacher: str = field(default="", metadata={"help": "kd: the teacher's folder (the paper's: ELECTRA-base)"})
    mha: str = field(default="", metadata={
        "help": "attention slicing (Figure 3): heads keeps the head width, dims keeps every head; empty: heads for "
                "mlm, dims for kd (§3.4)", "choices": ["", "heads", "dims"]})
    arch: str = field(default="", metadata={"help": "train only this architecture, e.g. 5-564-1054-8-512: with "
                                                    "--init, the stage-3 further training of §3.6 (no warm-up)"})
    init: str = field(default="", metadata={"help": "start from this SuperPLM (run folder or checkpoint.pt)"})
    batch_size: int = field(default=256, metadata={"help": "global batch, split over the ranks (§4.1)"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate of AdamW (§4.1)"})
    warmup: float = field(default=0.1, metadata={"help": "share of the steps with linear warm-up, then linear "
                                                         "decay to 0 (§4.1)"})
    epochs: int = field(default=5, metadata={"help": "passes over the corpus (§4.1), unless --max-steps"})
    max_steps: int = field(default=0, metadata={"help": "the run's length in optimizer steps (the schedule is "
                                                        "laid over it); 0: --epochs"})
    samples: int = field(default=3, metadata={"help": "M: sub-models each rank samples per batch (Algorithm 1)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases, LayerNorm)"})
    adam_eps: float = field(default=1e-6, metadata={"help": "AdamW epsilon (BERT's)"})
    clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this"})
    dropout: float = field(default=0.1, metadata={"help": "dropout of a new model"})
    seed: int = field(default=0, metadata={"help": "seeds the weights, the data order, masks, sub-models"})
    save_every: int = field(default=1000, metadata={"help": "write the checkpoint every K steps (and at the end)"})
    log_every: int = field(default=50, metadata={"help": "one log line every N steps"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoint, with its "
                                                          "saved settings"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run in --out"})


# Small runs: a SuperPLM of BERT-S3's shape (Table 4) on the stdlib corpus, with a learning rate that shows
# progress within minutes rather than the paper's 1e-5 over days.
PRESETS = {"paper": {},
           "tiny": dict(superplm="4-256-1024-4-256", vocab_size=4096, seq_len=64, batch_size=32, lr=1e-3,
                        max_steps=600, save_every=100, log_every=20, out="runs/superplm-tiny")}


INHERITED = ("objective", "teacher", "corpus", "tokenizer", "vocab_size", "seq_len", "cache_dir", "batch_size", "lr", "samples",
             "weight_decay", "adam_eps", "clip", "dropout", "log_every", "save_every")  # what --init carries over


def parse_config(argv=None):
    parser = config_parser(Config, __doc__.split("\n")[0])
    first, _ = parser.parse_known_args(argv)
    defaults = dict(PRESETS[first.preset])
    if first.init:  # §4.1: further training keeps the one-shot run's settings (corpus, batch, lr, ...)
        path = Path(first.init) / "checkpoint.pt" if Path(first.init).is_dir() else Path(first.init)
        if not path.exists():
            raise FileNotFoundError(f"--init {path} does not exist: train a SuperPLM first (python superplm.py "
                                    "--out DIR)")
        saved = torch_load(path).get("config", {})
        defaults.update({k: saved[k] for k in INHERITED if k in saved})
    if first.arch:
        defaults["samples"] = 1  # one architecture: nothing to sample
        if first.init:
            defaults["warmup"] = 0.0  # §4.1: further training is the one-shot setting without warm-up
    parser.set_defaults(**defaults)
    return config_from_args(Config, parser.parse_args(argv))


# ----------------------------------------------------------------------------- search space and sampling


def space_for(superplm: Arch, mha="heads") -> SearchSpace:
    """Table B.1's ranges scaled to a SuperPLM: for 8-768-3072-12-768 exactly PRETRAIN_SPACE ("heads") or
    KD_SPACE ("dims"). Hidden from 1/6 and ffn from 1/24 of the maximum in steps of 4; "dims" keeps every head
    and takes from 15/64 of the head width up in steps of one dimension per head."""
    L, H, F_, h, D = superplm.layers, superplm.hidden, superplm.ffn, superplm.heads, superplm.head_dim
    common = dict(layers=grid(1, L, 1), hidden=grid(-(-H // 24) * 4, H, 4), ffn=grid(-(-F_ // 96) * 4, F_, 4))
    if mha == "heads":
        return SearchSpace(**common, heads=grid(1, h, 1), head_dim=D)
    return SearchSpace(**common, heads=(h,), qkv=grid(h * -(-D * 15 // 64), h * D, h), head_dim=D)


def single(arch: Arch) -> SearchSpace:
    """The space of one architecture (stage 3 trains it alone)."""
    return SearchSpace((arch.layers,), (arch.hidden,), (arch.ffn,), (arch.heads,), (arch.qkv,), arch.head_dim)


def sample_arch(space, seed, step, rank, m) -> Arch:
    """Algorithm 1, line 7: the m-th sub-model of worker `rank` at `step`. The authors' code seeded with (step, m)
    alone, so every GPU trained the same sub-model; with the rank, each worker samples its own as the paper says."""
    return space.sample(random.Random(derive_seed(seed, step, rank, m)))


# ----------------------------------------------------------------------------- objectives


class MLM(nn.Module):
    """BERT's masked-LM loss (pre-training, §4.1). Logits are computed only at the masked positions."""

    def forward(self, model, batch, arch=None):
        hidden = model(batch["input_ids"], batch["attention_mask"], arch=arch)  # (B, T, C)
        where = batch["labels"] != -100  # (B, T)
        labels = batch["labels"][where]  # (n,)
        logits = model.mlm_logits(hidden[where], arch)  # (n, vocab)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum") / where.sum().clamp(min=1)
        return loss, {"acc": ((logits.argmax(-1) == labels).sum() / where.sum().clamp(min=1)).detach()}


def make_objective(cfg, model, space, teacher):
    if cfg.objective == "mlm":
        return MLM()
    import distill  # only the distillation setting needs it
    distill.check_compatible(teacher, model, space)
    return distill.KDObjective(teacher, model.arch.hidden)


# ----------------------------------------------------------------------------- Algorithm 1


def flat_grads(params):
    """Give every parameter a .grad that is a view into one flat buffer: zeroing the buffer clears the gradients
    (Algorithm 1, line 5) and one all-reduce of it averages them all over the workers (line 11)."""
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    i = 0
    for p in params:
        p.grad = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return flat


def accumulate(model, objective, batch, space, M, seed, step, rank, autocast=nullcontext):
    """Algorithm 1, lines 6-10 on one worker: M times sample a sub-model and add its gradients on this sub-batch.
    Each loss is divided by M, so the update uses the average gradient of all N*M sampled sub-models."""
    archs, stats = [], defaultdict(float)
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


def update(flat, world, optimizer, lr, clip):
    """Algorithm 1, line 11: average the gradients over the workers, clip them, one AdamW step."""
    if world > 1:
        dist.all_reduce(flat)  # sum of every worker's gradients, parameters a sample missed count as zero
        flat.div_(world)
    flat.mul_((clip / (flat.norm() + 1e-6)).clamp(max=1.0))  # = clip_grad_norm_ over all parameters
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()


def learning_rate(step, total, peak, warmup):
    """§4.1: linear warm-up over the first `warmup` share of the steps, then linear decay to 0."""
    w = int(warmup * total)
    if step < w:
        return peak * (step + 1) / w
    return peak * max(0.0, (total - step) / max(1, total - w))


def adamw(params, **kw):
    """AdamW with fused kernels (one kernel over all parameters) where torch has them: CUDA, and CPU since 2.4."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except RuntimeError:
        return torch.optim.AdamW(params, **kw)


def make_optimizer(params, lr, weight_decay, eps=1e-6):
    """AdamW; no weight decay on biases and LayerNorm (BERT)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return adamw([dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)], lr=lr, eps=eps)


# ----------------------------------------------------------------------------- checkpoints


def load_superplm(path):
    """(SuperPLM as a Bert in eval mode, its SearchSpace, path of its tokenizer) from a run folder or checkpoint."""
    path = Path(path)
    path = path / "checkpoint.pt" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: train a SuperPLM first (python superplm.py --out DIR)")
    ckpt = torch_load(path)
    model = Bert.from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    space = SearchSpace(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in ckpt["space"].items()})
    beside = path.parent / Path(ckpt["tokenizer"]).name  # the run folder may have moved
    return model.eval(), space, str(beside if beside.exists() else ckpt["tokenizer"])


def rng_states():
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- the run


def window_means(window, n, world, device):
    """The mean of each statistic over n = steps x workers: one small all-reduce per log line."""
    keys = sorted(window)
    sums = torch.stack([torch.as_tensor(window[k], device=device, dtype=torch.float32) for k in keys])
    if world > 1:
        dist.all_reduce(sums)
    return dict(zip(keys, (sums / n).tolist()))


def init_distributed():
    """(rank, world, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain run is one worker."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def rank0_first(rank, world, make):
    """Run make() on rank 0 (which may build a cache), then on the others (which then read it)."""
    if rank == 0:
        result = make()
    if world > 1:
        dist.barrier()
    return make() if rank else result


def build_model(cfg, vocab_size, init=None):
    """(model, space): a new SuperPLM, the one loaded by --init, or one architecture of it alone (--arch)."""
    if init:
        model, space, _ = init
        if cfg.arch:
            model = extract(model, Arch.parse(cfg.arch))
            space = single(model.arch)
        return model, space
    mha = cfg.mha or ("dims" if cfg.objective == "kd" else "heads")  # Figure 3: (c) distillation, (b) pre-training
    arch = Arch.parse(cfg.arch or cfg.superplm)
    model = Bert(arch, vocab_size=vocab_size, mha=mha, max_position=max(512, cfg.seq_len), dropout=cfg.dropout)
    return model, single(arch) if cfg.arch else space_for(arch, mha)


def train(cfg, on_save=None):
    """Algorithm 1 (one architecture with --arch); returns the model. on_save(step, model), if given, runs on rank 0
    after each checkpoint is written (bench/table1_mini.py measures held-out loss curves there)."""
    rank, world, device = init_distributed()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if rank == 0:
        fresh_out_dir(out, cfg.resume, cfg.overwrite)
        if cfg.overwrite and not cfg.resume:
            for name in ("checkpoint.pt", "metrics.jsonl"):
                (out / name).unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    ckpt = torch_load(ckpt_path) if cfg.resume and ckpt_path.exists() else None
    if ckpt:  # the saved configuration wins, so that the run continues exactly
        cfg = dataclasses.replace(Config(**ckpt["config"]), out=cfg.out, resume=True)

    teacher, vocab = None, cfg.tokenizer  # the vocabulary: the run's own, the teacher's, the init's, or trained
    if cfg.objective == "kd":
        if not cfg.teacher:
            raise UserError("--objective kd needs --teacher DIR (python distill.py make-teacher writes a tiny one)")
        import distill
        teacher, vocab = distill.load_teacher(cfg.teacher)
        if not cfg.init:  # fail before the corpus is tokenised
            distill.check_compatible(teacher, Arch.parse(cfg.arch or cfg.superplm))
    source = ckpt_path if ckpt else cfg.init  # weights to start from: the run's own, or --init's SuperPLM
    init = load_superplm(source) if source else None
    vocab = init[2] if init else vocab
    _, tok, dataset = rank0_first(rank, world, lambda: prepare(dataclasses.replace(cfg, tokenizer=str(vocab or ""))))
    dataset = split(dataset)[0]  # the held-out tail is for scoring sub-models (search.py), never trained on
    if rank == 0 and ckpt is None:
        save_tokenizer(tok, out)

    seed_everything(cfg.seed)  # the new weights
    model, space = build_model(cfg, tok.get_vocab_size(), init)
    objective = make_objective(cfg, model, space, teacher)
    if ckpt:
        objective.load_state_dict(ckpt["objective_state"])
    elif cfg.init and cfg.objective == "kd":  # the trained projection, its leading block for a narrower model
        saved = torch_load(Path(cfg.init) / "checkpoint.pt" if Path(cfg.init).is_dir() else cfg.init)
        own = objective.state_dict()
        if saved.get("objective") == "kd":  # an MLM SuperPLM has no projection: this one starts fresh
            objective.load_state_dict({k: sub(v, *own[k].shape) for k, v in saved["objective_state"].items()})
    model.to(device).train()
    objective.to(device).train()
    params = list(model.parameters()) + [p for p in objective.parameters() if p.requires_grad]
    if world > 1:
        for p in params:
            dist.broadcast(p.data, 0)
    flat = flat_grads(params)
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay, cfg.adam_eps)
    spe = steps_per_epoch(dataset, cfg.batch_size)
    total = cfg.max_steps or cfg.epochs * spe
    step = 0
    if ckpt:
        if ckpt["data"]["rows"] != len(dataset):
            raise UserError(f"the corpus now gives {len(dataset)} sequences, the checkpoint's {ckpt['data']['rows']}: "
                            "resume with the corpus and --seq-len the run started with")
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_states(ckpt["rng"])
        step = ckpt["step"]

    def save():
        torch_save(dict(model_config=model.config(), model=model.state_dict(), space=dataclasses.asdict(space),
                        objective=cfg.objective, objective_state=objective.state_dict(),
                        tokenizer=str((out / "tokenizer.json").resolve()), optimizer=optimizer.state_dict(),
                        schedule=dict(total=total, warmup=cfg.warmup, peak=cfg.lr), step=step,
                        data=dict(epoch=step // spe, batch=step % spe, rows=len(dataset)), rng=rng_states(),
                        config=dataclasses.asdict(cfg)), ckpt_path)

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    M = cfg.samples
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"{'resuming at step ' + str(step) if ckpt else 'training'} {model.arch} ({n / 1e6:.1f}M parameters, "
              f"{cfg.objective}) on {world} worker(s), {device}: {total} steps of {cfg.batch_size} x {cfg.seq_len} "
              f"tokens, {len(dataset)} sequences ({spe} steps/epoch), M={M}, space of {space.size():,} archs")
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="superplm", unit="step")
    window, t0, steps0 = defaultdict(float), time.time(), step
    while step < total:
        epoch, pos = divmod(step, spe)
        for batch in batches(dataset, cfg.batch_size, epoch, cfg.seed, rank, world, start=pos):  # lines 2-4
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            flat.zero_()  # line 5: clear the gradients
            archs, stats = accumulate(model, objective, batch, space, M, cfg.seed, step, rank, autocast)
            lr = learning_rate(step, total, cfg.lr, cfg.warmup)
            update(flat, world, optimizer, lr, cfg.clip)  # line 11
            step += 1
            bar.update()
            for k, v in stats.items():
                window[k] += v
            if step % cfg.log_every == 0 or step == total:
                means = window_means(window, (step - steps0) * world, world, device)
                rate = cfg.batch_size * cfg.seq_len * (step - steps0) / (time.time() - t0)  # global tokens/s
                if rank == 0:
                    record = dict(step=step, epoch=epoch, lr=lr, tokens_per_s=rate, **means,
                                  archs=[str(a) for a in archs])  # rank 0's sub-models of this step
                    append_jsonl(out / "metrics.jsonl", record)
                    bar.write(f"step {step}/{total} | " + " | ".join(f"{k} {v:.4f}" for k, v in means.items())
                              + f" | lr {lr:.2e} | {rate:,.0f} tok/s | archs {' '.join(record['archs'])}")
                window, t0, steps0 = defaultdict(float), time.time(), step
            if rank == 0 and (step % cfg.save_every == 0 or step == total):
                save()
                if on_save:
                    on_save(step, model)
            if step == total:
                break
    bar.close()
    if rank == 0 and cfg.arch:  # a stand-alone model: the run folder is also a Hugging Face BERT folder
        model.save_pretrained(out)
    if world > 1:
        dist.destroy_process_group()
    return model


def main(argv=None):
    train(parse_config(argv))


if __name__ == "__main__":
    run_main(main)
