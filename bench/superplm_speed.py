"""Speed of one-shot training (§3.4): is a sub-model trained through the SuperPLM as fast as the same model alone?

Part 1: forward + backward (masked LM, logits only at the masked positions) of sampled sub-models run through the
8-768-3072-12-768 SuperPLM, against each one extracted and trained as a plain Bert, interleaved in one run; medians.
Target: a median of at most 1.05x the plain model's time over the sampled sub-models, none above 1.15x. The
optimizer step is timed apart: it updates the whole SuperPLM by design (fused AdamW where torch has it), while the
plain model's step updates only its own parameters.
Part 2: a full 8-768-3072-12-768 training step as superplm.py takes it (gradients added into one buffer; forward,
backward, AdamW) against transformers' BertForMaskedLM of the same shape (which computes logits at every position).
Target: ratio <= 0.70.

    python bench/superplm_speed.py                 # CPU: small batches; on a GPU raise --batch-size
"""

import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import parse_flags, resolve_device, seed_everything  # noqa: E402
from data import Specials, mask_tokens  # noqa: E402
from model import PRETRAIN_SPACE, SUPERPLM, Bert, extract, in_place_grads, make_optimizer  # noqa: E402
from model import MLM  # noqa: E402
from superplm import flat_grads  # noqa: E402


@dataclass
class BenchConfig:
    batch_size: int = field(default=4, metadata={"help": "sequences per step", "aliases": ("batch",), "min": 1})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    vocab_size: int = field(default=30522, metadata={"help": "vocabulary (BERT's)"})
    archs: int = field(default=8, metadata={"help": "sub-models sampled from PRETRAIN_SPACE"})
    repeats: int = field(default=5, metadata={"help": "timed repeats of each measurement (median reported)"})
    threads: int = field(default=0, metadata={"help": "torch threads; 0: torch's default"})
    full: bool = field(default=True, metadata={"help": "also part 2 (needs transformers)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights, the batch and the sampled archs"})


def make_batch(cfg, device):
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(5, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    inputs, labels = mask_tokens(ids, Specials(0, 1, 2, 3, 4, cfg.vocab_size), g)
    return {k: v.to(device) for k, v in dict(input_ids=inputs, labels=labels,
                                              attention_mask=torch.ones_like(ids)).items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Seconds of fn(): on a GPU wall-clock time; on the CPU this process's CPU time, which does not count the
    time other processes hold the core (a shared machine), while memory stalls and page faults still count."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    sync(device)
    t = clock()
    fn()
    sync(device)
    return clock() - t


def fwd_bwd(model, batch, arch=None):
    loss, _ = MLM()(model, batch, arch)
    loss.backward()


def part1(cfg, device, batch):
    """Sub-model through the SuperPLM (gradients in the trainer's flat buffer) vs the same model extracted."""
    superplm = Bert(SUPERPLM, vocab_size=cfg.vocab_size).to(device).train()
    flat = flat_grads(list(superplm.parameters()))  # as superplm.py keeps them
    opt = make_optimizer(superplm.parameters(), 1e-5, 0.01)
    rng = random.Random(cfg.seed)
    archs = [PRETRAIN_SPACE.sample(rng) for _ in range(cfg.archs)]
    tokens = cfg.batch_size * cfg.seq_len
    print(f"part 1: fwd+bwd of sub-models, {cfg.batch_size}x{cfg.seq_len} tokens, {cfg.repeats} repeats, medians")
    print(f"{'arch':<22}{'SuperPLM tok/s':>16}{'plain tok/s':>14}{'ratio':>8}{'step Super ms':>15}"
          f"{'step plain ms':>15}")
    ratios = []
    for arch in archs:
        plain = extract(superplm, arch).train()
        plain_opt = make_optimizer(plain.parameters(), 1e-5, 0.01)
        times = {k: [] for k in ("super", "plain", "super_step", "plain_step")}
        for r in range(cfg.repeats + 1):  # the first round warms up
            flat.zero_()
            with in_place_grads():  # as superplm.accumulate trains
                t_super = timed(lambda: fwd_bwd(superplm, batch, arch), device)
            t_super_step = timed(opt.step, device)
            plain.zero_grad(set_to_none=True)
            t_plain = timed(lambda: fwd_bwd(plain, batch), device)
            t_plain_step = timed(plain_opt.step, device)
            if r:
                for k, t in zip(times, (t_super, t_plain, t_super_step, t_plain_step)):
                    times[k].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios.append(med["super"] / med["plain"])
        print(f"{str(arch):<22}{tokens / med['super']:>16,.0f}{tokens / med['plain']:>14,.0f}{ratios[-1]:>8.3f}"
              f"{1e3 * med['super_step']:>15.1f}{1e3 * med['plain_step']:>15.1f}")
    print(f"median ratio SuperPLM / plain: {statistics.median(ratios):.3f} (target <= 1.05), highest "
          f"{max(ratios):.3f} (target <= 1.15)")


def part2(cfg, device, batch):
    """A full 8-768-3072-12-768 training step: ours vs transformers' BertForMaskedLM."""
    from transformers import BertConfig, BertForMaskedLM
    a = SUPERPLM
    hf = BertForMaskedLM(BertConfig(vocab_size=cfg.vocab_size, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                    num_attention_heads=a.heads, intermediate_size=a.ffn)).to(device).train()
    ours = Bert(a, vocab_size=cfg.vocab_size).to(device).train()
    flat = flat_grads(list(ours.parameters()))  # as superplm.py trains: gradients in one buffer, added in place
    opts = {"ours": make_optimizer(ours.parameters(), 1e-5, 0.01), "hf": make_optimizer(hf.parameters(), 1e-5, 0.01)}

    def step_ours():
        flat.zero_()
        with in_place_grads():
            fwd_bwd(ours, batch)
        opts["ours"].step()

    def step_hf():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        opts["hf"].step()

    times = {"ours": [], "hf": []}
    for r in range(cfg.repeats + 1):
        t_ours, t_hf = timed(step_ours, device), timed(step_hf, device)
        if r:
            times["ours"].append(t_ours)
            times["hf"].append(t_hf)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = cfg.batch_size * cfg.seq_len
    print(f"\npart 2: full {a} training step (fwd+bwd+AdamW), {cfg.batch_size}x{cfg.seq_len} tokens, medians")
    print(f"{'model':<28}{'ms':>10}{'tok/s':>10}")
    for k, name in (("ours", "model.Bert"), ("hf", "transformers BertForMaskedLM")):
        print(f"{name:<28}{1e3 * med[k]:>10.1f}{tokens / med[k]:>10,.0f}")
    print(f"ratio ours / transformers: {med['ours'] / med['hf']:.3f} (target <= 0.70)")


def main():
    cfg = parse_flags(BenchConfig, description=__doc__.split("\n")[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device()
    seed_everything(cfg.seed)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    batch = make_batch(cfg, device)
    part1(cfg, device, batch)
    if cfg.full:
        part2(cfg, device, batch)


if __name__ == "__main__":
    main()
