"""Ctrl-C in the demo keeps the work: the stage in progress saves as it does alone, the demo says how to continue,
and `demo.py --resume` skips what finished, resumes the rest, and ends with an uninterrupted run's numbers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import read_jsonl, torch_load

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "40", "--latency-samples", "10", "--generations", "1", "--population", "4", "--further-steps", "4",
         "--threads", "1"]  # every stage, in seconds


def python(*args, **kwargs):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          **kwargs)


@pytest.mark.slow
def test_ctrl_c_in_the_demo_keeps_the_work_and_resume_ends_as_an_uninterrupted_run(tmp_path):
    out = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "demo.py", "--out", str(out), *SMALL], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "superplm" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):  # stage 1 has logged step 20 of 40
        assert demo.poll() is None, demo.communicate()
        time.sleep(0.1)
    os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C as a terminal sends it: to the demo's process group
    _, err = demo.communicate(timeout=300)
    assert demo.returncode == 130
    assert err.splitlines()[-1] == (f"interrupted: stopped in stage 1 SuperPLM, stages before it done, its work kept; "
                                    f"continue with: python demo.py --out {out} --resume")
    assert 20 <= torch_load(out / "superplm" / "checkpoint.pt")["step"] < 40  # the stage saved as it does alone
    assert [r["step"] for r in read_jsonl(metrics)] == [20]

    resumed = python("demo.py", "--out", out, "--resume", "--threads", 1)  # the saved settings (SMALL's); threads anew
    assert resumed.returncode == 0, resumed.stderr
    assert f"$ python superplm.py --preset tiny --out {out / 'superplm'} --steps 40 --seed 0 --resume --threads 1" \
        in resumed.stdout and resumed.stdout.splitlines()[-1].startswith(f"files: {out}/superplm/checkpoint.pt")

    # The seeded stages (1 and 4) equal the same commands run without an interruption, to the last digit.
    ref = tmp_path / "ref"
    best = json.loads((out / "search" / "top.json").read_text())["best"]
    assert python("superplm.py", "--preset", "tiny", "--out", ref / "superplm", "--steps", 40, "--seed", 0,
                  "--threads", 1).returncode == 0
    assert python("superplm.py", "--init", ref / "superplm", "--arch", best, "--out", ref / "further", "--steps", 4,
                  "--seed", 0, "--threads", 1).returncode == 0
    for name in ("superplm", "further"):
        a, b = (torch_load(run / name / "checkpoint.pt")["model"] for run in (out, ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        # the log lines; of stage 1 those before the interruption (the line after it averages the resumed steps)
        n = 1 if name == "superplm" else None
        logged, whole = ([(r["step"], r["loss"]) for r in read_jsonl(run / name / "metrics.jsonl")] for run in (out, ref))
        assert logged[:n] == whole[:n] and len(logged) == len(whole), name
