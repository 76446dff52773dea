"""The CUDA paths on a CPU-only machine: the training step, a fine-tuning step and the MLM evaluator run on fake
CUDA tensors (tests/fakecuda/dryrun.py says how), as rank 0 of two NCCL workers. The run fails where a CPU tensor
meets a CUDA one; its report says which process-group calls named which device and every host read of a CUDA value
(a sync: the host waits for the GPU), by training step. No GPU needed, and none skipped: no compiler is a failure."""

import json
import os
import subprocess
import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import common
import superplm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fakecuda"))
import dryrun  # noqa: E402

# Host reads of CUDA values, by "phase step" (none listed: none). superplm.run reads only at its log steps (here
# step 2 of 2): the statistics (one .tolist()) and whether a worker got a signal (one .item()). Step 1 reads nothing.
READS = {"mlm 2": ["tolist", "item"], "mlm-fp32 2": ["tolist", "item"], "kd 2": ["tolist", "item"],
         "finetune 0": ["item", "item"],  # an epoch of 3 steps: the loss at its last step, the epoch's mean
         "predict 0": ["cpu", "cpu"],  # one copy per evaluation (GLUE's logits, then SQuAD's) of 3 batches each
         "evaluator 1": ["tolist"]}  # one candidate scored on 3 batches


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return dryrun.build(tmp_path_factory.mktemp("fakecuda"))


def dry_run(library, work, *flags):
    """(the finished process, its report or None)."""
    work.mkdir()
    env = dict(os.environ, LD_PRELOAD=str(library), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fakecuda" / "dryrun.py"), str(work),
                           str(work / "report.json"), *flags], env=env, capture_output=True, text=True, timeout=600)
    report = work / "report.json"
    return done, json.loads(report.read_text()) if report.exists() else None


def check_reads(report):
    assert report["reads"] == READS


@pytest.mark.slow
def test_the_training_step_fine_tuning_and_the_evaluator_run_on_fake_cuda(library, tmp_path):
    done, report = dry_run(library, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-6000:]
    # torchrun's NCCL group: a long timeout (rank 0 prepares the corpus alone), and every call names cuda:0
    assert report["init_process_group"] == [dict(backend="nccl", timeout_h=24.0, device_id="cuda:0")] * 3
    assert report["barrier"] == [dict(device_ids=[0])] * 9  # per run: the run folder, the corpus, the end
    # the GPU paths: bf16 autocast on cuda:0, fused AdamW, batches pinned and prefetched, one GPU's RNG state saved
    assert [line.startswith("training 2-64-128-2-64") and line.split("on 2 worker(s), ")[1].split(": ")[0]
            for line in report["log"]] == ["cuda:0 bf16", "cuda:0 fp32", "cuda:0 bf16"]
    assert report["compute"] == "cuda:0 bf16" and report["fused"] == [True, True, True, True]
    assert report["prefetch"] == ["cuda:0"] * 3
    assert report["saved"] == [dict(step=2, cuda_rng=[len(torch.Generator().get_state())])] * 3
    assert report["matmuls"].pop("mlm-fp32") == ["float32"]
    assert all("bfloat16" in dtypes for dtypes in report["matmuls"].values())
    assert set(report["matmuls"]) == {"mlm", "kd", "finetune", "predict", "evaluator"}
    assert report["predict"] == dict(glue=[6, 3], squad=[[n, n] for n in (10, 12, 9, 16, 11, 8)])
    assert report["evaluator_batches"] == 3
    check_reads(report)


@pytest.mark.slow
def test_a_cpu_tensor_in_the_loss_fails_the_dry_run(library, tmp_path):
    done, report = dry_run(library, tmp_path / "run", "--plant", "cpu", "--only", "mlm")
    assert done.returncode != 0 and report is None
    assert "FakeTensorDeviceMismatchError" in done.stderr and "cuda:0 and cpu" in done.stderr


@pytest.mark.slow
def test_a_host_read_per_sub_model_fails_the_dry_run(library, tmp_path):
    done, report = dry_run(library, tmp_path / "run", "--plant", "sync", "--only", "mlm")
    assert done.returncode == 0, done.stderr[-6000:]
    assert report["reads"] == {"mlm 1": ["item"] * 3, "mlm 2": ["item"] * 3 + ["tolist", "item"]}  # M = 3
    with pytest.raises(AssertionError):
        check_reads(report)


# ----------------------------------------------------------------------------- the fixes, each on its own


def test_a_checkpoint_of_eight_gpus_resumes_where_one_or_none_is_visible(monkeypatch):
    """rng_states keeps the current GPU's generator only; an older checkpoint's list (one state per GPU rank 0 saw)
    restores its first, rank 0's. Python's and torch's CPU generators are restored exactly."""
    old = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": old[0].clone())
    saved = superplm.rng_states()
    assert torch.equal(saved["cuda"], old[0])
    first = torch.rand(3)
    superplm.set_rng_states(dict(saved, cuda=old))  # written by 8 GPUs, read where one is visible
    assert torch.equal(torch.rand(3), first) and len(restored) == 1 and torch.equal(restored[0], old[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # read on a CPU: the GPU's state has no use
    superplm.set_rng_states(dict(saved, cuda=old))
    superplm.set_rng_states(dict(saved, cuda=[]))  # written on a CPU
    assert len(restored) == 1


def test_workers_ask_each_other_about_a_signal_only_at_due_steps(monkeypatch):
    reduced = []
    monkeypatch.setattr(superplm.dist, "all_reduce", lambda flag, op=None: reduced.append(flag.clone()))
    stop = types.SimpleNamespace(signal="SIGTERM")
    assert superplm.stopped(stop, 2, torch.device("cpu"), due=False) is False and reduced == []  # no sync between
    assert superplm.stopped(stop, 2, torch.device("cpu"), due=True) is True and reduced == [torch.ones(1)]
    assert superplm.stopped(stop, 1, torch.device("cpu"), due=False) is True  # one worker: nothing to ask


def test_torchrun_workers_wait_hours_for_rank_0(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(common.dist, "init_process_group", lambda backend, **k: calls.append((backend, k)))
    monkeypatch.setattr(common.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(common.dist, "get_world_size", lambda: 2)
    assert common.init_distributed("cpu") == (1, 2, torch.device("cpu"))
    assert calls == [("gloo", dict(timeout=timedelta(hours=24), device_id=None))]


def test_the_gpu_check_says_in_one_line_that_it_needs_a_gpu(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: gpu_check.main([]))
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: torch sees no GPU here")
