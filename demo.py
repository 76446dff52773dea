"""The whole AutoTinyBERT pipeline at demo scale on a CPU, in about 10 minutes (the README's first command).

Each stage runs as its own command, printed first, so that the demo doubles as a recipe:
    1. superplm.py  train a tiny SuperPLM on the stdlib corpus with Algorithm 1 (§3.4)
    2. latency.py   time sampled architectures on this CPU and fit the latency predictor (§3.5)
    3. search.py    evolutionary search for the latency target, sub-models scored inside the SuperPLM (§3.5)
    4. superplm.py  further-train the winner alone, initialised from its SuperPLM weights (§3.6)
    5. superplm.py  BERT-S, BERT's default-rule shape at the same latency, from scratch for the steps of 1 + 4 (Table 1)
then a summary table, the two models side by side, and the files it made. Ctrl-C stops the stage in progress as
it stops alone (saving); `python demo.py --resume` then skips the finished stages and resumes that one."""

import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from common import (COUNT, Interrupted, NONNEGATIVE, RunFolder, THREADS_HELP, UserError, flag, parse_flags, read_jsonl,
                    run_main, save_json, torch_load)
from latency import LatencyPredictor, measure
from model import Arch
from search import MLMScore, bert_s
from superplm import load_superplm


def run_stage(*args):
    """Run one stage as a user would type it, in a session of its own: the demo passes Ctrl-C on to it once."""
    cmd = ["python", *map(str, args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    stage = subprocess.Popen([sys.executable, *cmd[1:]], cwd=Path(__file__).parent, start_new_session=True)
    before = {s: signal.signal(s, lambda signum, _: stage.send_signal(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = stage.wait()
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    if code in (130, -signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt
    if code:
        raise UserError(f"the stage `{shlex.join(cmd)}` failed (its message is above)")


def held_out_loss(run_dir):
    """Masked-LM loss of a trained model on the held-out sequences, as search.py scores it."""
    model, _, tok = load_superplm(Path(run_dir) / "checkpoint.pt")
    cfg = torch_load(Path(run_dir) / "checkpoint.pt")["config"]
    return -MLMScore(model, tok, cfg["corpus"], cfg["seq_len"], cfg["cache_dir"])(model.arch)


def summary(cfg, out, found, t, bert):
    splm_log, further_log, bert_log = ([r for r in read_jsonl(out / name / "metrics.jsonl") if "loss" in r]
                                       for name in ("superplm", "further", "bert-s"))
    held = json.loads((out / "predictor" / "metrics.json").read_text()).get("heldout", {})
    best = Arch.parse(found["best"])
    print("\n" + "=" * 100)
    print(f"AutoTinyBERT demo: a tiny SuperPLM searched for {cfg.target} (latency <= {found['budget_ms']:.2f} ms; "
          f"BERT-base {found['base_ms']:.0f} ms on this CPU)\n")
    print(f"{'stage':<12}{'what happened':<62}{'minutes':>8}")
    rows = [("1 SuperPLM", f"masked-LM loss {splm_log[0]['loss']:.2f} -> {splm_log[-1]['loss']:.2f} over "
                           f"{splm_log[-1]['step']} steps, 3 sub-models per batch"),
            ("2 latency", f"predictor held-out MAPE {held.get('mape', float('nan')):.1f}%, Kendall tau "
                          f"{held.get('tau', float('nan')):.2f}"),
            ("3 search", f"{len(json.loads((out / 'search' / 'scored.json').read_text()))} architectures scored "
                         f"inside the SuperPLM; best {best}"),
            ("4 further", f"{best} trained alone: loss {further_log[0]['loss']:.2f} -> {further_log[-1]['loss']:.2f}"),
            ("5 BERT-S", f"{bert} from scratch: loss {bert_log[0]['loss']:.2f} -> {bert_log[-1]['loss']:.2f}")]
    for name, what in rows:
        print(f"{name:<12}{what:<62}{t[name] / 60:>8.1f}")
    print("\ntop architectures (layers-hidden-ffn-heads-qkv, Table 4's notation):")
    print(f"{'arch':<22}{'speedup':>9}{'held-out MLM loss':>20}")
    for r in found["top"]:
        print(f"{r['arch']:<22}{r['speedup']:>8.1f}x{-r['score']:>20.3f}")
    after = held_out_loss(out / "further")
    print(f"\nafter further training, {best} reaches held-out MLM loss {after:.3f} "
          f"(inside the SuperPLM: {-found['top'][0]['score']:.3f})")
    print("\nat the same latency, as many training steps (Table 1 in miniature; bench/table1_mini.py adds seeds):")
    print(f"{'model':<14}{'arch':<20}{'training steps':<32}{'held-out MLM loss':>18}{'measured ms':>13}")
    for name, arch, steps, loss in (
            ("AutoTinyBERT", best, f"{cfg.steps} one-shot + {cfg.further_steps} further", after),
            ("BERT-S", bert, f"{cfg.steps + cfg.further_steps} from scratch", held_out_loss(out / "bert-s"))):
        print(f"{name:<14}{str(arch):<20}{steps:<32}{loss:>18.3f}{measure(arch):>13.2f}")
    print(f"\nfiles: {out}/superplm/checkpoint.pt (SuperPLM), {out}/predictor/ (latency predictor), "
          f"{out}/search/top.json and search.png (search), {out}/search/top/ (Hugging Face folders), "
          f"{out}/further/ (further-trained model), {out}/bert-s/ (BERT-S)")


@dataclass
class Config:
    out: str = flag("runs/demo", "folder for everything the demo makes")
    target: str = flag("40x", "latency target: speedup over BERT-base on this CPU")
    steps: int = flag(300, "optimizer steps of one-shot SuperPLM training", **COUNT)
    latency_samples: int = flag(200, "architectures timed for the latency predictor", min=10)
    generations: int = flag(4, "T of Algorithm 2", **COUNT)
    population: int = flag(25, "S of Algorithm 2", **COUNT)
    further_steps: int = flag(100, "optimizer steps of further training (stage 3)", **COUNT)
    seed: int = flag(0, "seed of every stage", **NONNEGATIVE)
    threads: Optional[int] = flag(None, THREADS_HELP + " (passed to the training and search stages)", **COUNT)
    resume: bool = flag(False, "continue an interrupted demo in --out (finished stages are skipped)")
    overwrite: bool = flag(False, "replace an earlier demo in --out")


def main(argv=None):
    cfg = parse_flags(Config, argv, __doc__.split("\n")[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # the summary's held-out losses; the stages get --threads
    with RunFolder(cfg.out, cfg, cfg.resume, cfg.overwrite, marker="superplm", argv=argv) as folder:
        out = folder.path
        splm, lat, pred, search, further = (out / n for n in ("superplm", "latency", "predictor", "search", "further"))
        t = json.loads((out / "times.json").read_text()) if (out / "times.json").exists() else {}  # minutes column
        now = None

        def stage(name, *args, again="--resume"):
            """A command of stage `name`: skipped if it finished before, continued (`again`) if it began."""
            nonlocal now
            now, run, started = name, Path(args[args.index("--out") + 1]), time.time()
            if (run / "config.json").exists() and json.loads((run / "config.json").read_text())["status"] == "finished":
                return
            threads = ["--threads", cfg.threads] if cfg.threads and args[0] != "latency.py" else []  # timing: 1
            try:
                run_stage(*args, *[again] * run.exists(), *threads)
            finally:
                if run.exists():  # the stage kept what it did: so does the demo
                    folder.done_first()
                t[name] = t.get(name, 0) + time.time() - started
                save_json(t, out / "times.json")
        try:
            stage("1 SuperPLM", "superplm.py", "--preset", "tiny", "--out", splm, "--steps", cfg.steps, "--seed",
                  cfg.seed)
            stage("2 latency", "latency.py", "measure", "--space", splm, "--samples", cfg.latency_samples, "--seed",
                  cfg.seed, "--out", lat)
            stage("2 latency", "latency.py", "fit", "--timings", lat, "--out", pred, again="--overwrite")
            stage("3 search", "search.py", "--target", cfg.target, "--superplm", splm, "--latency", pred,
                  "--generations", cfg.generations, "--population", cfg.population, "--seed", cfg.seed, "--out",
                  search, "--extract")
            found = json.loads((search / "top.json").read_text())
            stage("4 further", "superplm.py", "--init", splm, "--arch", found["best"], "--out", further, "--steps",
                  cfg.further_steps, "--seed", cfg.seed)
            bert = bert_s(found["budget_ms"], LatencyPredictor.load(pred))  # default rule, 4 layers, same budget
            stage("5 BERT-S", "superplm.py", "--preset", "tiny", "--arch", bert, "--tokenizer", splm / "tokenizer.json",
                  "--out", out / "bert-s", "--steps", cfg.steps + cfg.further_steps, "--seed", cfg.seed)
        except KeyboardInterrupt:
            if not folder.first:
                raise Interrupted(f"stopped before any stage saved: {out} is as it was") from None
            raise Interrupted(f"stopped in stage {now}, stages before it done, its work kept; continue with: "
                              f"python demo.py --out {out} --resume") from None
        summary(cfg, out, found, t, bert)


if __name__ == "__main__":
    run_main(main)
