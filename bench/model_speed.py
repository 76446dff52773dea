"""Is our hand-written BERT as fast as transformers' on this CPU? (issue 2's benchmark)

1. inference, batch 1 x 128 tokens, one thread: ours against transformers' BertModel;
2. a masked-LM training step (forward, backward, AdamW), batch 8 x 128: ours (logits at the masked positions only)
   against transformers' BertForMaskedLM (logits everywhere, as it does);
3. the speedup over BERT-base of every architecture of Table 4, measured here, beside the paper's
   (`python latency.py table`: one thread timed by CPU time, a reference model timed alongside).
The two sides of a comparison are timed alternately, run by run, so that machine noise hits both alike;
figures are medians. transformers is a test/bench-time reference only.

    python bench/model_speed.py [--runs 30] [--train-runs 10] [--threads 1]
"""

import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import latency  # noqa: E402
from common import COUNT, parse_flags, run_main  # noqa: E402
from model import BERT_BASE, Arch, Bert  # noqa: E402


def alternate(fns, runs, warmup=3):
    """Time each callable `runs` times, interleaved; return the median ms of each."""
    times = [[] for _ in fns]
    for i in range(warmup + runs):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            if i >= warmup:
                ts.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(ts) for ts in times]


def hf_config(arch, vocab=30522):
    import transformers
    return transformers.BertConfig(vocab_size=vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                                   num_attention_heads=arch.heads, intermediate_size=arch.ffn,
                                   attn_implementation="sdpa")


def inference(arch, runs):
    import transformers
    ours, theirs = Bert(arch).eval(), transformers.BertModel(hf_config(arch)).eval()
    ids = torch.randint(1000, 30000, (1, 128))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        return alternate([lambda: ours(ids, mask), lambda: theirs(input_ids=ids, attention_mask=mask)], runs)


def train_step(arch, runs, B=8, T=128):
    import transformers
    torch.manual_seed(0)
    ours, theirs = Bert(arch), transformers.BertForMaskedLM(hf_config(arch))
    ids = torch.randint(1000, 30000, (B, T))
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(B, T) < 0.15
    labels[chosen] = ids[chosen]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-5)

    def step_ours():
        h = ours(ids, mask)  # (B, T, C)
        logits = ours.mlm_logits(h[chosen])  # (n_masked, V): only where a token is masked
        torch.nn.functional.cross_entropy(logits, labels[chosen]).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        theirs(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    return alternate([step_ours, step_theirs], runs, warmup=2)


@dataclass
class Config:
    runs: int = field(default=30, metadata={"help": "timed inference runs per model (median reported)", **COUNT})
    train_runs: int = field(default=10, metadata={"help": "timed training steps per model", **COUNT})
    threads: int = field(default=1, metadata={"help": "torch threads (the paper: one CPU)", **COUNT})
    skip_train: bool = field(default=False, metadata={"help": "only the inference and speedup tables"})


def main(argv=None):
    args = parse_flags(Config, argv, __doc__.split("\n")[0])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")

    print(f"\n1. inference, batch 1 x 128, median of {args.runs} runs (ms)")
    print(f"{'arch':<22}{'ours':>10}{'transformers':>14}{'ratio':>8}")
    for arch in (BERT_BASE, Arch.parse("4-512-2048-8-512")):
        a, b = inference(arch, args.runs)
        print(f"{str(arch):<22}{a:>10.1f}{b:>14.1f}{a / b:>8.2f}")

    if not args.skip_train:
        print(f"\n2. masked-LM training step, batch 8 x 128, AdamW, median of {args.train_runs} steps (ms)")
        print(f"{'arch':<22}{'ours':>10}{'transformers':>14}{'ratio':>8}")
        for arch in (BERT_BASE, Arch.parse("4-512-2048-8-512")):
            a, b = train_step(arch, args.train_runs)
            print(f"{str(arch):<22}{a:>10.1f}{b:>14.1f}{a / b:>8.2f}")

    print("\n3. speedup over BERT-base of every architecture of Table 4 (latency.py table)")
    latency.run_table(latency.TableConfig(threads=args.threads))


if __name__ == "__main__":
    run_main(main)
