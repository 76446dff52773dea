"""What the stages print and draw: tables, log lines and figures, kept out of the algorithms they report on.

Functions here take plain values (architectures, numbers, records) and import nothing from the stages, so any
stage can use them without running the pipeline backwards.
"""

# ----------------------------------------------------------------------------- superplm.py


# ----------------------------------------------------------------------------- latency.py

# Table 4 (and Table F.1 for S5): (setting, model, arch, the paper's speedup over BERT-base)
TABLE4 = [("S1", "BERT", "4-512-2048-8-512", 7.1), ("S1", "AutoTinyBERT", "5-564-1054-8-512", 7.2),
          ("S2", "BERT", "4-320-1280-5-320", 14.8), ("S2", "AutoTinyBERT", "4-396-624-6-384", 15.7),
          ("S3", "BERT", "4-256-1024-4-256", 20.1), ("S3", "AutoTinyBERT", "4-432-384-4-256", 20.2),
          ("S4", "BERT", "4-192-768-3-192", 28.4), ("S4", "AutoTinyBERT", "3-320-608-4-256", 27.2),
          ("KD-S1", "BERT", "4-512-2048-12-516", 4.9), ("KD-S1", "AutoTinyBERT", "5-564-1024-12-528", 4.6),
          ("KD-S2", "BERT", "4-312-1200-12-312", 9.8), ("KD-S2", "AutoTinyBERT", "5-324-600-12-324", 9.0),
          ("KD-S3", "BERT", "4-264-1056-12-264", 11.7), ("KD-S3", "AutoTinyBERT", "5-280-512-12-276", 10.7),
          ("KD-S4", "BERT", "4-192-768-12-192", 17.0), ("KD-S4", "AutoTinyBERT", "4-256-480-12-192", 17.0),
          ("S5", "BERT", "4-384-1536-6-384", 9.3), ("S5", "AutoTinyBERT", "5-450-636-6-384", 10.8),
          ("S5", "AutoTinyBERT-Fast", "5-432-720-6-384", 10.3)]


def fitted_line(m, seconds, backend, path):
    """`latency.py fit`'s line: the held-out accuracy of the predictor just fitted (m: its metrics.json)."""
    h, r = m["heldout"], m["heldout_raw"]
    print(f"fit on {m['train']} archs in {seconds:.1f}s; held-out {h['n']}: MAPE {h['mape']:.2f}%  "
          f"RMSE {h['rmse']:.2f}ms  Kendall tau {h['tau']:.3f}  (against raw timings: MAPE {r['mape']:.2f}%, "
          f"tau {r['tau']:.3f}); BERT-base {m['base_ms']:.1f}ms on {backend} -> {path}")


def speedup_table(title, rows, measured, predicted=None):
    """Table 4 beside this machine (`latency.py table`): rows as TABLE4's; measured and predicted (or None):
    arch -> speedup over BERT-base."""
    print(title)
    print(f"{'setting':8s} {'model':18s} {'arch':18s} {'paper':>7s} {'measured':>9s}"
          + (" predicted" if predicted is not None else ""))
    for setting, name, arch, paper in rows:
        row = f"{setting:8s} {name:18s} {arch:18s} {paper:6.1f}x {measured[arch]:8.1f}x"
        print(row + (f" {predicted[arch]:8.1f}x" if predicted is not None else ""))


# ----------------------------------------------------------------------------- finetune.py


# ----------------------------------------------------------------------------- search.py
