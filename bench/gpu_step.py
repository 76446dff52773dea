"""Training throughput against the hardware's limit: tokens/s and MFU of the paper's steps, in one run, medians.

  1. the paper's SuperPLM step (§3.4, §4.1): 8-768-3072-12-768, M = 3 sampled sub-models, 16 x 128 tokens per GPU
     (batch 256 over 16 GPUs), forward + backward of each sample, one AdamW step: superplm.py's own functions
  2. one sampled sub-model trained through the SuperPLM (in-place slice gradients) against the same model alone
  3. BERT-base's masked-LM step (fwd + bwd + AdamW): model.Bert against transformers' BertForMaskedLM
  4. fine-tuning steps: finetune.train_epoch on BERT-base with MNLI's Table D.1 batch (32 x 128)
  5. the data path: time per batch of data.batches (BERT masking, row by row in Python) against the step of part 1,
     and part 1's loop fed by data.batches directly against data.prefetch (a background thread prepares and pins
     the next batches while the GPU computes)

MFU = model FLOPs / step time / the device's stated dense bf16 peak (PEAKS). Model FLOPs: 3 x the forward's
matmuls (latency.features' encoder multiply-adds x 2, the MLM head at the masked positions only, for both models
of part 3 although transformers computes it at every position).

    python bench/gpu_step.py                       # on a GPU: the paper's sizes, bf16
    python bench/gpu_step.py --superplm-arch 4-256-1024-4-256 --bert 4-256-1024-4-256 --batch-size 4 \\
        --seq-len 64 --vocab-size 4096 --ft-batch 8 --steps 3      # the same on a CPU, small
"""

import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (COUNT, DTYPES, NONNEGATIVE, parse_flags, resolve_compute, save_json, seed_everything,  # noqa: E402
                    to_device)
from data import Specials, batches, mask_tokens, masked_positions, prefetch  # noqa: E402
from finetune import Finetuner, optimizer_and_schedule, train_epoch  # noqa: E402
from latency import features  # noqa: E402
from model import BERT_BASE, SUPERPLM, Arch, Bert, extract, in_place_grads, make_optimizer  # noqa: E402
from model import MLM  # noqa: E402
from superplm import accumulate, flat_grads, sample_arch, space_for, update  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks as the vendors state them, TFLOP/s; the first name found in
# torch.cuda.get_device_name() wins, so the more specific come first. NVL boards (other clocks) are left unknown.
PEAKS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L4", 121.0))


@dataclass
class BenchConfig:
    superplm_arch: str = field(default=str(SUPERPLM), metadata={"help": "the SuperPLM of parts 1, 2 and 5"})
    bert: str = field(default=str(BERT_BASE), metadata={"help": "the model of parts 3 and 4 (BERT-base)"})
    sub_models: int = field(default=3, metadata={"help": "M of Algorithm 1", **COUNT})
    batch_size: int = field(default=16, metadata={"help": "sequences per step and GPU (256 over 16 GPUs)", **COUNT})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    ft_batch: int = field(default=32, metadata={"help": "fine-tuning batch (Table D.1, MNLI)"})
    vocab_size: int = field(default=30522, metadata={"help": "vocabulary (BERT's)"})
    steps: int = field(default=10, metadata={"help": "timed steps of each measurement (median reported)"})
    warmup_steps: int = field(default=3, metadata={"help": "untimed steps first", **NONNEGATIVE})
    device: str = field(default="auto", metadata={"help": "auto: cuda if there is one, else cpu"})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 on cuda, fp32 on cpu",
                                                 "choices": ["auto", *DTYPES]})
    peak_tflops: float = field(default=0.0, metadata={"help": "the device's peak for MFU; 0: from PEAKS"})
    transformers: bool = field(default=True, metadata={"help": "part 3's transformers reference"})
    out: str = field(default="bench/out/gpu_step.json", metadata={"help": "the figures as JSON"})
    seed: int = field(default=0, metadata={"help": "seed of weights, batches and sampled sub-models"})


def peak_tflops(cfg, device):
    """(peak TFLOP/s or None, where it came from)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "no stated peak for a CPU: MFU not computed (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAKS:
        if key in name and "NVL" not in name:
            return tflops, f"{name}: {tflops:g} TFLOP/s dense bf16 (vendor's figure)"
    return None, f"{name}: peak unknown, MFU not computed (pass --peak-tflops)"


def train_flops(arch, tokens, masked, vocab_size, seq_len):
    """Forward + backward (3 x the forward's matmuls) of one MLM step: encoder over `tokens`, head at `masked`."""
    f = features([arch], seq_len=seq_len, batch=tokens // seq_len)
    encoder = float(f["ffn_macs"][0] + f["proj_macs"][0] + f["attn_macs"][0])
    head = masked * (arch.hidden * arch.hidden + vocab_size * arch.hidden)  # dense + decoder tied to the embedding
    return 3 * 2 * (encoder + head)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """The peak GPU memory of each part above what was allocated when it started, in GiB: what its steps needed,
    with the optimizer's state (nothing on a CPU)."""

    def __init__(self, device):
        self.device, self.gib, self.base = device, {}, 0

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)

    def record(self, key):
        if self.device.type == "cuda":
            self.gib[key] = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**30


def median_time(fn, cfg, device):
    """Median seconds of fn() over cfg.steps runs after cfg.warmup_steps; fn(i) gets the run's index."""
    times = []
    for i in range(cfg.warmup_steps + cfg.steps):
        sync(device)
        t = time.perf_counter()
        fn(i)
        sync(device)
        if i >= cfg.warmup_steps:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


class RandomRows:
    """A packed corpus stand-in for data.batches: random token rows [CLS] ... [SEP]."""

    def __init__(self, n, seq_len, vocab_size, seed):
        self.ids = torch.randint(5, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))
        self.ids[:, 0], self.ids[:, -1] = 2, 3
        self.specials = Specials(0, 1, 2, 3, 4, vocab_size)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, rows):
        return self.ids[torch.as_tensor(rows)]


def mlm_batch(cfg, batch, seed, device):
    ids = RandomRows(batch, cfg.seq_len, cfg.vocab_size, seed).ids
    inputs, labels = mask_tokens(ids, Specials(0, 1, 2, 3, 4, cfg.vocab_size), torch.Generator().manual_seed(seed))
    return to_device(dict(input_ids=inputs, labels=labels, attention_mask=torch.ones_like(ids),
                          masked=masked_positions(labels)), device)


class Row:
    """One line of the table: ms per step, tokens/s, MFU."""

    def __init__(self, table, peak, name, seconds, tokens, flops):
        self.ms, self.tok_s = 1e3 * seconds, tokens / seconds
        self.mfu = flops / seconds / (peak * 1e12) if peak else None
        table.append(dict(name=name, ms=self.ms, tokens_per_s=self.tok_s, tflops=flops / seconds / 1e12,
                          mfu=self.mfu))
        mfu = f"{100 * self.mfu:.1f}%" if self.mfu is not None else "-"
        print(f"{name:<60}{self.ms:>10.1f}{self.tok_s:>12,.0f}{flops / seconds / 1e12:>9.2f}{mfu:>7}")


def main(argv=None):
    cfg = parse_flags(BenchConfig, argv, __doc__.split("\n")[0])
    compute = resolve_compute(cfg.device, cfg.dtype)
    device, autocast = compute.device, compute.autocast
    seed_everything(cfg.seed)
    peak, peak_note = peak_tflops(cfg, device)
    big, bert = Arch.parse(cfg.superplm_arch), Arch.parse(cfg.bert)
    B, T, V, M = cfg.batch_size, cfg.seq_len, cfg.vocab_size, cfg.sub_models
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{name} ({compute}), torch {torch.__version__}, {torch.get_num_threads()} threads; peak: {peak_note}")
    print(f"medians of {cfg.steps} steps after {cfg.warmup_steps}\n")
    print(f"{'':<60}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}")
    table, ratios, memory = [], {}, PeakMemory(device)

    # 1. the paper's SuperPLM step: superplm.py's accumulate + update on one worker's 16 x 128 sub-batch
    superplm = Bert(big, vocab_size=V).to(device).train()
    space = space_for(big)
    flat = flat_grads(list(superplm.parameters()))
    opt = make_optimizer(superplm.parameters(), 1e-5, 0.01)
    batch = mlm_batch(cfg, B, cfg.seed, device)
    masked = batch["masked"].numel()

    def step(i, batch=batch):
        flat.zero_()
        accumulate(superplm, MLM(), batch, space, M, cfg.seed, i, 0, autocast)
        update(flat, 1, opt, 1e-5, 1.0)

    flops = statistics.mean(sum(train_flops(sample_arch(space, cfg.seed, i, 0, m), B * T, masked, V, T)
                                for m in range(M)) for i in range(cfg.warmup_steps, cfg.warmup_steps + cfg.steps))
    memory.start()
    t_step = median_time(step, cfg, device)
    Row(table, peak, f"1. SuperPLM {big} step, M={M}, {B}x{T}", t_step, B * T, flops)
    memory.record("1. SuperPLM step")

    # 2. one sampled sub-model: through the SuperPLM (flat gradient buffer) against the same model alone
    arch = sample_arch(space, cfg.seed, 0, 0, 0)
    alone = extract(superplm, arch).to(device).train()
    f2 = train_flops(arch, B * T, masked, V, T)

    def through(i):  # the flat buffer is cleared once per step of M samples (part 1), not timed here
        with in_place_grads():  # as superplm.accumulate trains
            with autocast():
                loss, _ = MLM()(superplm, batch, arch)
            loss.backward()

    def by_itself(i):
        alone.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = MLM()(alone, batch)
        loss.backward()

    flat.zero_()
    rounds = [(median_time(through, cfg, device), median_time(by_itself, cfg, device)) for _ in range(3)]
    t_through, t_alone = (statistics.median(r[k] for r in rounds) for k in (0, 1))  # interleaved
    Row(table, peak, f"2. sub-model {arch} fwd+bwd through the SuperPLM", t_through, B * T, f2)
    Row(table, peak, "   the same model alone", t_alone, B * T, f2)
    ratios["sub-model: through the SuperPLM / alone"] = t_through / t_alone

    # 3. BERT-base masked-LM step: ours against transformers' BertForMaskedLM, both under the same autocast
    ours = Bert(bert, vocab_size=V).to(device).train()
    opts = {"ours": make_optimizer(ours.parameters(), 1e-5, 0.01)}
    f3 = train_flops(bert, B * T, masked, V, T)

    def ours_step(i):
        ours.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = MLM()(ours, batch)
        loss.backward()
        opts["ours"].step()

    memory.start()
    t_ours = median_time(ours_step, cfg, device)
    Row(table, peak, f"3. {bert} MLM step, model.Bert", t_ours, B * T, f3)
    memory.record("3. model.Bert")
    if cfg.transformers:
        from transformers import BertConfig, BertForMaskedLM
        hf = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=bert.hidden, num_hidden_layers=bert.layers,
                                        num_attention_heads=bert.heads, intermediate_size=bert.ffn,
                                        max_position_embeddings=max(512, T))).to(device).train()
        opts["hf"] = make_optimizer(hf.parameters(), 1e-5, 0.01)

        def hf_step(i):
            hf.zero_grad(set_to_none=True)
            with autocast():
                loss = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
            loss.backward()
            opts["hf"].step()

        memory.start()
        t_hf = median_time(hf_step, cfg, device)
        Row(table, peak, "   transformers BertForMaskedLM", t_hf, B * T, f3)
        memory.record("3. transformers")
        ratios[f"{bert} MLM step: ours / transformers"] = t_ours / t_hf

    # 4. fine-tuning steps: finetune.train_epoch (collate, fwd, bwd, clip, AdamW) on BERT-base, 3 classes
    model = Finetuner(ours, 3).to(device)
    n = cfg.ft_batch * (cfg.warmup_steps + cfg.steps)
    ids = RandomRows(n, T, V, cfg.seed + 1).ids
    feats, targets = [(row.tolist(), [0] * T) for row in ids], torch.randint(3, (n,))
    opt_ft, sched = optimizer_and_schedule(model, 2e-5, 10 ** 6, 0.0, 0.01)
    g = torch.Generator().manual_seed(cfg.seed)
    train_epoch(model, feats[:cfg.ft_batch * cfg.warmup_steps], targets, cfg.ft_batch, opt_ft, sched, g, 0, device,
                "warm", autocast)
    sync(device)
    memory.start()
    t = time.perf_counter()
    train_epoch(model, feats[:cfg.ft_batch * cfg.steps], targets, cfg.ft_batch, opt_ft, sched, g, 0, device, "ft",
                autocast)  # returns the mean loss as a float: waits for the GPU
    t_ft = (time.perf_counter() - t) / cfg.steps
    f4 = 3 * 2 * float(sum(features([bert], T, cfg.ft_batch)[k][0] for k in ("ffn_macs", "proj_macs", "attn_macs")))
    Row(table, peak, f"4. fine-tuning {bert}, {cfg.ft_batch}x{T} (mean)", t_ft, cfg.ft_batch * T, f4)
    memory.record("4. fine-tuning")

    # 5. the data path: data.batches' masking per batch, and part 1's loop fed directly or through prefetch
    rows = RandomRows(B * (2 * (cfg.warmup_steps + cfg.steps) + 2), T, V, cfg.seed)
    stream = batches(rows, B, 0, cfg.seed)
    t_data = median_time(lambda i: next(stream), cfg, torch.device("cpu"))
    print(f"\n5. data.batches: {1e3 * t_data:.2f} ms per {B}x{T} batch = {100 * t_data / t_step:.1f}% of part 1's "
          "step (at most what the device waits for it per step when the host does not run ahead)")
    def loop(kind):  # seconds per step of part 1's loop, no host sync inside, as superplm.py runs it
        source = batches(rows, B, 0, cfg.seed)
        source = prefetch(source, device) if kind == "prefetch" else (  # as superplm.py fed them before
            {k: v.to(device, non_blocking=True) for k, v in b.items()} for b in source)
        sync(device)
        t = time.perf_counter()
        for i, b in enumerate(source):
            step(i, b)
            if i + 1 == cfg.warmup_steps + cfg.steps:
                break
        sync(device)
        return (time.perf_counter() - t) / (cfg.warmup_steps + cfg.steps)

    rounds = [(loop("direct"), loop("prefetch")) for _ in range(3)]  # interleaved
    loops = {k: statistics.median(r[i] for r in rounds) for i, k in enumerate(("direct", "prefetch"))}
    for kind, seconds in loops.items():
        print(f"   part 1's loop fed by data.batches {kind:<9}: {1e3 * seconds:8.1f} ms/step (median of 3 runs)")
    ratios["SuperPLM loop: prefetched / direct batches"] = loops["prefetch"] / loops["direct"]

    print()
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.3f}")
    if memory.gib:
        print("peak GPU memory of each part: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in memory.gib.items()))
    save_json(dict(device=name, compute=str(compute), peak_tflops=peak, config=asdict(cfg), rows=table,
                   ratios=ratios, data_ms=1e3 * t_data, loop_ms={k: 1e3 * v for k, v in loops.items()},
                   memory_gib=memory.gib, torch=torch.__version__), cfg.out)
    print(f"wrote {cfg.out}")
    return dict(rows=table, ratios=ratios)


if __name__ == "__main__":
    main()
