"""Is our hand-written BERT as fast as transformers' on this CPU? (issue 2's benchmark)

1. inference, batch 1 x 128 tokens, one thread: ours against transformers' BertModel;
2. a masked-LM training step (forward, backward, AdamW), batch 8 x 128: ours (logits at the masked positions only)
   against transformers' BertForMaskedLM (logits everywhere, as it does);
3. the speedup over BERT-base of every architecture of Table 4, measured here, beside the paper's.
The two sides of a comparison are timed alternately, run by run, so that machine noise hits both alike;
figures are medians. transformers is a test/bench-time reference only.

    python bench/model_speed.py [--runs 30] [--train-runs 10] [--threads 1]
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


# Table 4 (SPEC.md): the paper's speedups over BERT-base, measured on one CPU thread with 128 tokens.
TABLE4 = [("S1 BERT", "4-512-2048-8-512", 7.1), ("S1 Auto", "5-564-1054-8-512", 7.2),
          ("S2 BERT", "4-320-1280-5-320", 14.8), ("S2 Auto", "4-396-624-6-384", 15.7),
          ("S3 BERT", "4-256-1024-4-256", 20.1), ("S3 Auto", "4-432-384-4-256", 20.2),
          ("S4 BERT", "4-192-768-3-192", 28.4), ("S4 Auto", "3-320-608-4-256", 27.2),
          ("KD-S1 BERT", "4-512-2048-12-516", 4.9), ("KD-S1 Auto", "5-564-1024-12-528", 4.6),
          ("KD-S2 BERT", "4-312-1200-12-312", 9.8), ("KD-S2 Auto", "5-324-600-12-324", 9.0),
          ("KD-S3 BERT", "4-264-1056-12-264", 11.7), ("KD-S3 Auto", "5-280-512-12-276", 10.7),
          ("KD-S4 BERT", "4-192-768-12-192", 17.0), ("KD-S4 Auto", "4-256-480-12-192", 17.0),
          ("S5 BERT", "4-384-1536-6-384", 9.3), ("S5 Auto", "5-450-636-6-384", 10.8),
          ("S5 Fast", "5-432-720-6-384", 10.3)]


def speedups(runs):
    """Every Table 4 model timed in one interleaved loop with BERT-base, so drift cancels in the ratio."""
    models = [Bert(BERT_BASE).eval()] + [Bert(Arch.parse(a)).eval() for _, a, _ in TABLE4]
    ids = torch.randint(1000, 30000, (1, 128))
    with torch.inference_mode():
        ms = alternate([lambda m=m: m(ids) for m in models], runs)
    return ms[0], ms[1:]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30, help="timed inference runs per model (median reported)")
    p.add_argument("--train-runs", type=int, default=10, help="timed training steps per model")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the paper: one CPU)")
    p.add_argument("--skip-train", action="store_true", help="only the inference and speedup tables")
    args = p.parse_args()
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

    print(f"\n3. speedup over BERT-base (Table 4), batch 1 x 128, median of {args.runs} runs")
    base, ms = speedups(args.runs)
    print(f"{'setting':<12}{'arch':<22}{'ms':>8}{'here':>8}{'paper':>8}")
    print(f"{'BERT-base':<12}{str(BERT_BASE):<22}{base:>8.1f}{1.0:>8.1f}{1.0:>8.1f}")
    for (name, arch, paper), t in zip(TABLE4, ms):
        print(f"{name:<12}{arch:<22}{t:>8.1f}{base / t:>8.1f}{paper:>8.1f}")


if __name__ == "__main__":
    main()
