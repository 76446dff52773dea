"""The GPU check, one command (about 10 minutes on one H100/H200): what the CUDA dry run (tests/test_cuda_dryrun.py)
cannot prove, measured, with every figure in one JSON file (README, "On GPUs", says what each is compared with).

  1. the precision tests on cuda: tests/test_precision.py and tests/test_gpu_step.py (each runs on cpu and cuda)
  2. torchrun over NCCL, one worker per visible GPU: superplm.py killed by SIGTERM (as a cluster preempts), resumed
     with --resume to the end, and the same run uninterrupted: the two final losses and weights compared
  3. bench/gpu_step.py at the paper's sizes: ms/step, tokens/s, MFU, memory
  4. a short search: latency.py measure + fit on this machine's CPU, then search.py under torchrun; the paper's
     fine-tuning evaluator where --mnli-data and --squad-data are given (local GLUE/SQuAD folders), else mlm

    python bench/gpu_check.py --mnli-data glue_data/MNLI --squad-data squad      # writes bench/out/gpu_check.json

A step that fails is recorded (its exit status and last lines) and the check goes on to the next.
"""

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import COUNT, UserError, flag, parse_flags, read_jsonl, run_main, save_json, torch_load  # noqa: E402


def command(args, log, timeout):
    """Run args in the repository root; (exit status, seconds, last lines of its output)."""
    t = time.time()
    with open(log, "w") as f:
        try:
            code = subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return dict(status=code, seconds=round(time.time() - t, 1), tail=Path(log).read_text()[-1500:].splitlines())


def torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def superplm_run(n, out, steps, extra=()):
    return torchrun(n) + ["superplm.py", "--out", str(out), "--steps", str(steps), "--batch-size", str(16 * n),
                          "--log-every", "50", "--save-every", "100", *extra]


def killed_and_resumed(n, work, steps, timeout):
    """superplm.py under torchrun: SIGTERM once the first checkpoint is written, then --resume; and the same run
    whole. Figures: where it stopped, that it ended at `steps`, both final losses and the largest weight difference."""
    broken, whole = work / "superplm-broken", work / "superplm-whole"
    t = time.time()
    with open(work / "superplm-broken.log", "w") as log:
        proc = subprocess.Popen(superplm_run(n, broken, steps), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while not (broken / "checkpoint.pt").exists() and proc.poll() is None and time.time() - t < timeout:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it to each worker: they finish the step, save, stop
        stopped = proc.wait(timeout=300)
    out = dict(stopped_status=stopped, stopped_at=torch_load(broken / "checkpoint.pt")["step"] if
               (broken / "checkpoint.pt").exists() else None, stop_seconds=round(time.time() - t, 1))
    out["resume"] = command(torchrun(n) + ["superplm.py", "--out", str(broken), "--resume"],
                            work / "superplm-resume.log", timeout)
    out["whole"] = command(superplm_run(n, whole, steps), work / "superplm-whole.log", timeout)
    if out["resume"]["status"] == 0 and out["whole"]["status"] == 0:
        a, b = torch_load(broken / "checkpoint.pt"), torch_load(whole / "checkpoint.pt")
        metrics = {k: read_jsonl(p / "metrics.jsonl") for k, p in (("resumed", broken), ("whole", whole))}
        out.update(final_step=[a["step"], b["step"]], final_loss={k: m[-1]["loss"] for k, m in metrics.items()},
                   tokens_per_s={k: m[-1]["tokens_per_s"] for k, m in metrics.items()},
                   max_weight_diff=max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"]))
    return out


@dataclass
class Config:
    out: str = flag("bench/out/gpu_check.json", "the figures as JSON")
    work: str = flag("runs/gpu-check", "run folders and logs")
    steps: int = flag(300, "steps of each SuperPLM run", **COUNT)
    mnli_data: str = flag("", "GLUE's MNLI folder: the search uses the paper's evaluator")
    squad_data: str = flag("", "SQuAD v1.1's folder (train-v1.1.json, dev-v1.1.json)")
    timeout: int = flag(240, "seconds any one command may take", **COUNT)


def main(argv=None):
    args = parse_flags(Config, argv, __doc__.split("\n")[0])
    if not torch.cuda.is_available():
        raise UserError("torch sees no GPU here: the GPU check runs on a GPU machine (the CPU's counterpart is "
                        "tests/test_cuda_dryrun.py)")
    n, work = torch.cuda.device_count(), ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name(0), gpus=n, torch=torch.__version__,
                  cuda=torch.version.cuda, started=time.strftime("%Y-%m-%d %H:%M:%S"))

    def record(name, value):
        report[name] = value
        save_json(report, ROOT / args.out)  # after every step: a check cut short keeps what it measured
        print(f"{name}: {json.dumps(value)[:300]}", flush=True)

    # 1. the precision tests, on cpu and cuda
    record("precision_tests", command([sys.executable, "-m", "pytest", "-q", "tests/test_precision.py",
                                       "tests/test_gpu_step.py"], work / "pytest.log", args.timeout))
    # 2. torchrun over NCCL: killed, resumed, against the same run whole
    record("superplm_torchrun", killed_and_resumed(n, work, args.steps, args.timeout))
    # 3. the paper's step
    step = command([sys.executable, "bench/gpu_step.py", "--out", str(work / "gpu_step.json")],
                   work / "gpu_step.log", args.timeout)
    if (work / "gpu_step.json").exists():
        step["figures"] = json.loads((work / "gpu_step.json").read_text())
    record("gpu_step", step)
    # 4. a short search over the SuperPLM of part 2
    superplm = work / "superplm-whole"
    latency = [command([sys.executable, "latency.py", "measure", "--space", str(superplm), "--samples", "20",
                        "--repeats", "3", "--warmup-passes", "1", "--out", str(work / "latency"), "--overwrite"],
                       work / "latency-measure.log", args.timeout),
               command([sys.executable, "latency.py", "fit", "--timings", str(work / "latency"), "--steps", "300",
                        "--out", str(work / "predictor"), "--overwrite"], work / "latency-fit.log", args.timeout)]
    evaluator = ["--evaluator", "finetune", "--mnli-data", args.mnli_data, "--squad-data", args.squad_data,
                 "--ft-train-examples", "2000", "--ft-eval-examples", "1000"] if args.mnli_data and args.squad_data \
        else ["--evaluator", "mlm"]
    search = command(torchrun(n) + ["search.py", "--target", "2x", "--superplm", str(superplm), "--latency",
                                    str(work / "predictor"), *evaluator, "--generations", "2", "--population", "4",
                                    "--out", str(work / "search"), "--overwrite"],
                     work / "search.log", 2 * args.timeout)
    scored = work / "search" / "scored.json"
    if scored.exists():
        search["best"] = json.loads(scored.read_text())[0]
    record("search", dict(evaluator=evaluator[1], latency=latency, run=search))
    record("ended", time.strftime("%Y-%m-%d %H:%M:%S"))


if __name__ == "__main__":
    run_main(main)
