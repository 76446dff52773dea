"""What the stages print and draw: tables, log lines and figures, kept out of the algorithms they report on.

Functions here take plain values (architectures, numbers, records) and import nothing from the stages, so any
stage can use them without running the pipeline backwards.
"""

# ----------------------------------------------------------------------------- superplm.py


# ----------------------------------------------------------------------------- latency.py


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
