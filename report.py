"""What the stages print and draw: tables, log lines and figures, kept out of the algorithms they report on.

Functions here take plain values (architectures, numbers, records) and import nothing from the stages, so any
stage can use them without running the pipeline backwards.
"""

# ----------------------------------------------------------------------------- superplm.py


def superplm_line(step, total, means, lr, rate, archs):
    """superplm.py's log line: the window's mean loss and statistics, the learning rate, global tokens/s, and rank
    0's sub-models of this step."""
    return (f"step {step}/{total} | " + " | ".join(f"{k} {v:.4f}" for k, v in means.items())
            + f" | lr {lr:.2e} | {rate:,.0f} tok/s | archs {' '.join(archs)}")


# ----------------------------------------------------------------------------- latency.py


# ----------------------------------------------------------------------------- finetune.py


# ----------------------------------------------------------------------------- search.py
