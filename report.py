"""What the stages print and draw: tables, log lines and figures, kept out of the algorithms they report on.

Functions here take plain values (architectures, numbers, records) and import nothing from the stages, so any
stage can use them without running the pipeline backwards.
"""

from matplotlib.figure import Figure

# ----------------------------------------------------------------------------- superplm.py


def superplm_line(step, total, means, lr, rate, archs):
    """superplm.py's log line: the window's mean loss and statistics, the learning rate, global tokens/s, and rank
    0's sub-models of this step."""
    return (f"step {step}/{total} | " + " | ".join(f"{k} {v:.4f}" for k, v in means.items())
            + f" | lr {lr:.2e} | {rate:,.0f} tok/s | archs {' '.join(archs)}")


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


def finetune_epoch_line(task, lr, epochs, epoch, loss, metrics, seconds):
    """finetune.py's line after each epoch: the run (lr, epochs), the epoch's training loss, the dev metrics."""
    return (f"{task} lr {lr:g} epochs {epochs} | epoch {epoch} loss {loss:.4f} | "
            + " ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + f" | {seconds:.0f}s")


def finetune_best_line(best):
    """finetune.py's last line: the best epoch of the grid (a record of its metrics.jsonl)."""
    return (f"{best['task']} best: lr {best['lr']:g} epochs {best['epochs']} epoch {best['epoch']} "
            f"score {best['score']:.2f}")


def finetune_stopped(signal, out, best=None):
    """What an interrupted fine-tuning kept: nothing before its first epoch ended (best None), else every finished
    epoch and the best checkpoint (best: its dev_metrics.json)."""
    if best is None:
        return f"{signal} before the first epoch ended: nothing kept, {out} is as it was"
    return (f"{signal}: kept {out}/metrics.jsonl (every finished epoch) and {out}/best/ (lr {best['lr']:g} epochs "
            f"{best['epochs']} epoch {best['epoch']}, score {best['score']:.2f}); a grid does not resume: run it "
            "again with --overwrite (or only the missing --lr/--epochs with another --out)")


# ----------------------------------------------------------------------------- search.py


def search_figure(rows, top, target_speedup, path, title, ylabel):
    """Speedup against score of every scored architecture (rows of scored.json), the top ones circled: the paper's
    Figure 1 for one search."""
    fig = Figure(figsize=(6, 4))  # matplotlib's object API: no pyplot state, no display backend
    ax = fig.subplots()
    gens = sorted({r["generation"] for r in rows})
    for g in gens:
        rs = [r for r in rows if r["generation"] == g]
        ax.scatter([r["speedup"] for r in rs], [r["score"] for r in rs], s=14, alpha=0.7,
                   label=f"generation {g}" if len(gens) > 1 else "scored")
    ax.scatter([r["speedup"] for r in top], [r["score"] for r in top], s=80, facecolors="none",
               edgecolors="red", label="top: " + ", ".join(f"{i} {r['arch']}" for i, r in enumerate(top, 1)))
    for i, r in enumerate(top, 1):
        ax.annotate(str(i), (r["speedup"], r["score"]), fontsize=8, xytext=(5, -3 - 4 * i),
                    textcoords="offset points", color="red")
    ax.axvline(target_speedup, color="grey", linestyle="--", label=f"target {target_speedup:.3g}x")
    ax.set(xlabel="speedup over BERT-base (predicted)", ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


SEARCH_COLUMNS = ("arch", "score", "latency", "generation", "speedup")  # a row's own; the rest: the evaluator's


def print_search_top(top, n_scored, target, budget_ms, method, evaluator):
    """The top rows of a search, with the evaluator's own numbers (masked-LM loss, MNLI accuracy, ...) beside."""
    extra = sorted({k for r in top for k in r} - set(SEARCH_COLUMNS))
    print(f"\ntop {len(top)} of {n_scored} scored architectures (layers-hidden-ffn-heads-qkv) for {target} = "
          f"{budget_ms:.4g} ms, by {method} with the {evaluator} evaluator:")
    print(f"{'rank':>4}  {'architecture':20s} {'latency ms':>10} {'speedup':>8} {'score':>9}"
          + "".join(f" {k:>9}" for k in extra))
    for i, r in enumerate(top, 1):
        print(f"{i:>4}  {r['arch']:20s} {r['latency']:10.4g} {r['speedup']:7.2f}x {r['score']:9.4f}"
              + "".join(f" {r.get(k, float('nan')):9.4f}" for k in extra))
