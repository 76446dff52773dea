"""What the stages print and draw: tables, log lines and figures, kept out of the algorithms they report on.

Functions here take plain values (architectures, numbers, records) and import nothing from the stages, so any
stage can use them without running the pipeline backwards.
"""

# ----------------------------------------------------------------------------- superplm.py


# ----------------------------------------------------------------------------- latency.py


# ----------------------------------------------------------------------------- finetune.py


# ----------------------------------------------------------------------------- search.py
