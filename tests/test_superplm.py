import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distill
import superplm
from common import UserError, read_jsonl, seed_everything, torch_load
from data import batches, build_dataset, load_tokenizer, split, stdlib_corpus
from model import (KD_SPACE, PRETRAIN_SPACE, SUPERPLM, Arch, Bert, SearchSpace, extract, from_pretrained,
                   in_place_grads, learning_rate, make_optimizer)
from model import MLM
from superplm import accumulate, flat_grads, load_superplm, sample_arch, space_for, update

ROOT = Path(__file__).resolve().parents[1]
TINY = Arch(2, 64, 128, 2, 64)  # head width 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small slice of the default corpus as a local JSONL file, and a cache folder shared by the runs."""
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_corpus()[:150]))
    return path, folder / "cache"


@pytest.fixture
def one_thread():
    """Compute as each torchrun worker does (OMP_NUM_THREADS=1), then give the other tests their threads back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flags(corpus, out, *more):
    path, cache = corpus
    return ["--corpus", str(path), "--cache-dir", str(cache), "--vocab-size", "300", "--superplm-arch", str(TINY),
            "--seq-len", "32", "--batch-size", "8", "--lr", "1e-3", "--log-every", "1", "--out", str(out), *more]


def run(args, torchrun=0, stdout=subprocess.PIPE):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return subprocess.Popen(launcher + [str(ROOT / "superplm.py"), *args], env=env, stdout=stdout,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


# ----------------------------------------------------------------------------- search space and sampling


def test_space_for_the_paper_superplm_is_table_b1():
    assert space_for(SUPERPLM, "heads") == PRETRAIN_SPACE
    assert space_for(SUPERPLM, "dims") == KD_SPACE
    tiny = space_for(Arch.parse(superplm.PRESETS["tiny"]["superplm_arch"]))
    assert tiny.largest() == Arch(4, 256, 1024, 4, 256) and tiny.head_dim == 64


def test_sampled_archs_cover_every_value_and_differ_between_ranks():
    for space in (space_for(TINY, "heads"), space_for(TINY, "dims")):
        archs = [sample_arch(space, 0, step, rank, m) for step in range(300) for rank in range(2) for m in range(3)]
        assert all(a in space for a in archs)
        for dim in SearchSpace.DIMS:
            assert {getattr(a, dim) for a in archs} == set(space.choices(dim)), dim
        assert sample_arch(space, 0, 5, 1, 2) == sample_arch(space, 0, 5, 1, 2)  # reproducible
    space = space_for(TINY)
    same = sum(sample_arch(space, 0, s, 0, 0) == sample_arch(space, 0, s, 1, 0) for s in range(50))
    assert same == 0  # line 7: each worker its own sub-model (the authors' code gave all the same); seed 0: none


def test_learning_rate_warms_up_then_decays_linearly():
    lrs = [learning_rate(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and max(lrs) == lrs[9]
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5) and lrs[-1] == pytest.approx(1 / 90)
    assert learning_rate(0, 100, 1.0, 0.0) == 1.0  # stage 3: no warm-up


# ----------------------------------------------------------------------------- gradients of a sampled sub-model


def used(model, arch):
    """For each parameter of `model`, a bool tensor: which entries sub-model `arch` reads (via extract)."""
    index = Bert.from_config(model.config())
    with torch.no_grad():
        for p in index.parameters():
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view_as(p) + 1)
    picked = dict(extract(index, arch).named_parameters())
    masks = {}
    for name, p in index.named_parameters():
        m = torch.zeros(p.numel(), dtype=torch.bool)
        if name in picked:
            m[picked[name].detach().long().flatten() - 1] = True
        masks[name] = m.view_as(p)
    return masks


def test_a_batch_without_a_masked_token_trains_on_nothing_and_does_not_crash():
    """A short corpus can give a sub-batch in which no token was chosen for masking: its loss is 0 and every
    gradient is 0, so Algorithm 1 adds nothing for it (mlm_logits of 0 positions is a (0, vocab) matrix)."""
    torch.manual_seed(0)
    model = Bert(TINY, vocab_size=50)
    ids = torch.randint(5, 50, (2, 8))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.full_like(ids, -100))
    flat = flat_grads(list(model.parameters()))
    loss, stats = MLM()(model, batch, Arch(1, 32, 64, 1, 32))
    loss.backward()
    assert loss.item() == 0.0 and stats["acc"].item() == 0.0 and flat.abs().max().item() == 0.0
    assert model.mlm_logits(torch.zeros(0, 64)).shape == (0, 50)


@pytest.mark.parametrize("mha", ["heads", "dims"])
def test_a_samples_gradient_lives_in_its_slice_and_equals_the_extracted_models(mha):
    torch.manual_seed(0)
    model = Bert(Arch(3, 64, 128, 2, 64), vocab_size=50, mha=mha, dropout=0.0).train()
    plain = Bert.from_config(model.config())
    plain.load_state_dict(model.state_dict())
    flat = flat_grads(list(model.parameters()))  # the trainer's gradients: blocks are added into it
    ids = torch.randint(5, 50, (3, 12))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.where(ids % 3 == 0, ids, -100))
    space = space_for(model.arch, mha)
    for i in range(4):
        arch = sample_arch(space, 0, i, 0, 0)
        flat.zero_()
        with in_place_grads():  # as superplm.accumulate trains
            MLM()(model, batch, arch)[0].backward()
        plain.zero_grad(set_to_none=True)
        MLM()(plain, batch, arch)[0].backward()  # autograd's own slicing gradients
        alone = extract(model, arch).train()
        MLM()(alone, batch)[0].backward()
        masks = used(model, arch)
        for name, p in model.named_parameters():
            other = dict(plain.named_parameters())[name].grad
            assert torch.equal(p.grad, torch.zeros_like(p) if other is None else other), f"{arch}: {name}"
            assert not p.grad[~masks[name]].any(), f"{arch}: {name} has gradient outside its slice"
            assert p.grad[masks[name]].any() or not masks[name].any(), f"{arch}: {name} got no gradient"
            if name.startswith("layers.") and int(name.split(".")[1]) >= arch.layers:
                assert not masks[name].any()  # deeper layers: nothing used, so no gradient
        grads = Bert.from_config(model.config())  # the slices' gradients are the extracted model's
        with torch.no_grad():
            for q, p in zip(grads.parameters(), model.parameters()):
                q.copy_(p.grad)
        for (name, g), q in zip(extract(grads, arch).named_parameters(), alone.parameters()):
            torch.testing.assert_close(g, q.grad, msg=name)


# ----------------------------------------------------------------------------- Algorithm 1 on torch.distributed


@pytest.mark.slow
def test_two_workers_equal_one_process_replaying_their_sub_batches_and_sub_models(tmp_path, corpus, one_thread):
    out = tmp_path / "dist"
    log = finish(run(flags(corpus, out, "--steps", "3", "--sub-models", "2", "--device", "cpu"), torchrun=2))
    assert "on 2 worker(s)" in log
    ckpt = torch_load(out / "checkpoint.pt")
    cfg = superplm.Config(**ckpt["config"])
    # Replay in one process: same init, each rank's sub-batch and sub-models, gradients averaged by hand.
    tok = load_tokenizer(out / "tokenizer.json")
    ds = split(build_dataset(cfg.corpus, tok, cfg.seq_len, cfg.cache_dir))[0]  # what superplm.py trains on
    seed_everything(cfg.seed)
    model, space = superplm.build_model(cfg, tok.get_vocab_size())
    model.train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    flat = flat_grads(list(model.parameters()))
    opt = make_optimizer(list(model.parameters()), cfg.lr)
    streams = [batches(ds, cfg.batch_size, 0, cfg.seed, rank, 2) for rank in range(2)]
    for step in range(3):
        grads = []
        for rank in range(2):
            flat.zero_()
            accumulate(model, MLM(), next(streams[rank]), space, cfg.sub_models, cfg.seed, step, rank)
            grads.append(flat.clone())
        flat.copy_((grads[0] + grads[1]) / 2)
        update(flat, 1, opt, learning_rate(step, 3, cfg.lr, cfg.warmup))
    for name, p in model.state_dict().items():
        torch.testing.assert_close(ckpt["model"][name], p, atol=2e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(start[k], v) for k, v in ckpt["model"].items())


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, corpus):
    steps = ["--steps", "40", "--save-every", "4"]
    whole = run(flags(corpus, tmp_path / "whole", *steps))
    finish(whole)
    broken = run(flags(corpus, tmp_path / "broken", *steps), stdout=subprocess.DEVNULL)
    ckpt, deadline = tmp_path / "broken" / "checkpoint.pt", time.time() + 120
    while not ckpt.exists() and broken.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    broken.send_signal(signal.SIGKILL)  # no clean exit
    broken.wait()
    assert torch_load(ckpt)["step"] < 40, "the run ended before it could be killed"
    again = run(flags(corpus, tmp_path / "broken", *steps))  # without --resume the folder is protected
    assert "--resume" in finish_fail(again)
    log = finish(run(flags(corpus, tmp_path / "broken", *steps, "--resume")))
    assert "resuming at step" in log
    a, b = torch_load(tmp_path / "whole" / "checkpoint.pt"), torch_load(ckpt)
    assert a["step"] == b["step"] == 40
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    # the lines logged after the last checkpoint were dropped on resume: each step once, with the same loss
    assert losses(tmp_path / "broken") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 40
    # What the other stages read: the SuperPLM, its space and its vocabulary.
    model, space, tok = load_superplm(tmp_path / "whole")
    assert model.arch == TINY and space == space_for(TINY) and Path(tok).exists() and not model.training
    assert load_tokenizer(tok).get_vocab_size() == model.word.num_embeddings


def losses(out):
    """{step: loss} of a run's metrics.jsonl, refusing a step logged twice."""
    steps = [(r["step"], r["loss"]) for r in read_jsonl(Path(out) / "metrics.jsonl")]
    assert len({s for s, _ in steps}) == len(steps), f"a step logged twice: {[s for s, _ in steps]}"
    return dict(steps)


@pytest.mark.slow
def test_sigterm_saves_that_step_and_the_printed_command_resumes_to_the_same_run(tmp_path, corpus):
    steps = ["--steps", "30", "--save-every", "10"]
    broken = run(flags(corpus, tmp_path / "broken", *steps))
    metrics, deadline = tmp_path / "broken" / "metrics.jsonl", time.time() + 120
    while (not metrics.exists() or len(read_jsonl(metrics)) < 3) and broken.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    broken.send_signal(signal.SIGTERM)  # as a cluster preempts a job
    printed, _ = broken.communicate(timeout=300)
    assert broken.returncode == 130, printed
    step = torch_load(tmp_path / "broken" / "checkpoint.pt")["step"]  # the step in progress was finished, saved
    assert 3 <= step < 30 and list(losses(tmp_path / "broken")) == list(range(1, step + 1))
    command = shlex.split(printed.split("resume with: ")[1].splitlines()[0])
    assert command == ["python", "superplm.py", "--out", str(tmp_path / "broken"), "--resume"]
    record = json.loads((tmp_path / "broken" / "config.json").read_text())
    assert record["status"] == "interrupted" and record["ended"] and record["versions"]["torch"] == torch.__version__
    # config.json round-trips: its settings, in another folder, make the same run
    finish(run(["--config", str(tmp_path / "broken" / "config.json"), "--out", str(tmp_path / "whole")]))
    assert "resuming at step " + str(step) in finish(run(command[2:]))
    a, b = torch_load(tmp_path / "whole" / "checkpoint.pt"), torch_load(tmp_path / "broken" / "checkpoint.pt")
    assert a["step"] == b["step"] == 30
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert losses(tmp_path / "broken") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 30
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert superplm.Config(**saved["config"]) == superplm.Config(**dict(record["config"], out=str(tmp_path / "whole")))
    assert superplm.parse_config(["--config", str(tmp_path / "whole" / "config.json")]) == \
        superplm.Config(**saved["config"])


def test_resume_refuses_a_setting_the_run_cannot_honour(tmp_path, corpus, capsys):
    """--steps on --resume would lay a new schedule over the saved one: refused, naming --init, which trains on
    from the weights under a new schedule. The saved settings need not be repeated."""
    superplm.main(flags(corpus, tmp_path / "a", "--steps", "3"))
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"trained {TINY} for 3 steps -> {tmp_path / 'a'}/")
    with pytest.raises(UserError, match=r"--resume continues .*a with the settings it began with, and --steps 6 is "
                                        r"not one of them \(it has 3\): .* python superplm.py --init .*a --steps N"):
        superplm.main(["--out", str(tmp_path / "a"), "--resume", "--steps", "6"])
    superplm.main(["--out", str(tmp_path / "a"), "--resume", "--device", "cpu"])  # finished: nothing to do
    assert [r["step"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")] == [1, 2, 3]


def test_a_failed_start_leaves_the_folder_as_it_found_it(tmp_path, corpus):
    empty, new, old = tmp_path / "empty", tmp_path / "new" / "deeper", tmp_path / "old"  # new: two folders made
    empty.mkdir()
    with pytest.raises(UserError, match="no run to resume"):  # never silently a fresh run
        superplm.main(flags(corpus, empty, "--resume"))
    for out in (empty, new):
        with pytest.raises(UserError, match="--teacher"):  # fails after the folder was opened
            superplm.main(flags(corpus, out, "--objective", "kd", "--teacher", str(tmp_path / "nowhere")))
        with pytest.raises(ValueError, match="divisible"):  # an arch that does not fit
            superplm.main(flags(corpus, out, "--superplm-arch", "2-64-128-3-64"))
    assert list(empty.iterdir()) == [] and not (tmp_path / "new").exists()
    old.mkdir()  # an earlier run: --overwrite sets it aside, and a failed start puts it back
    (old / "checkpoint.pt").write_bytes(b"the old run")
    (old / "config.json").write_text("{}")
    with pytest.raises(UserError, match="--teacher"):
        superplm.main(flags(corpus, old, "--overwrite", "--objective", "kd", "--teacher", str(tmp_path / "nowhere")))
    assert sorted(p.name for p in old.iterdir()) == ["checkpoint.pt", "config.json"]
    assert (old / "checkpoint.pt").read_bytes() == b"the old run" and (old / "config.json").read_text() == "{}"


def finish_fail(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in out, out
    return out


# ----------------------------------------------------------------------------- stage 3 and distillation


def test_further_training_of_one_arch_and_the_distillation_seam(tmp_path, corpus, monkeypatch):
    teacher = distill.make_tiny_teacher(tmp_path / "teacher", Arch(2, 48, 96, 2, 48), vocab_size=300,
                                        texts=stdlib_corpus()[:150])
    out = tmp_path / "kd"
    superplm.main(flags(corpus, out, "--objective", "kd", "--teacher", str(teacher), "--steps", "2"))
    ckpt = torch_load(out / "checkpoint.pt")
    assert ckpt["objective"] == "kd" and ckpt["model_config"]["mha"] == "dims"
    assert set(ckpt["objective_state"]) == {"proj.weight", "proj.bias"}  # the projection, not the teacher
    assert ckpt["objective_state"]["proj.weight"].shape == (48, 64)
    assert SearchSpace(**ckpt["space"]).heads == (2,)
    # Stage 3 (§3.6): one architecture of that SuperPLM, trained alone, no warm-up, projection sliced.
    arch = Arch(1, 32, 64, 2, 48)
    stage3 = tmp_path / "s3"
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, *a, **k: reads.append(Path(path)) or load(path, *a, **k))
    superplm.main(flags(corpus, stage3, "--objective", "kd", "--teacher", str(teacher), "--arch", str(arch),
                        "--init", str(out), "--steps", "2"))
    monkeypatch.undo()
    assert reads.count(out / "checkpoint.pt") == 1  # settings, weights and projection from one read
    ckpt3 = torch_load(stage3 / "checkpoint.pt")
    assert ckpt3["config"]["warmup"] == 0.0 and ckpt3["config"]["sub_models"] == 1
    assert Arch.parse(ckpt3["model_config"]["arch"]) == arch
    assert ckpt3["objective_state"]["proj.weight"].shape == (48, 32)
    back = from_pretrained(stage3, mha="dims")  # the run folder is also a Hugging Face BERT
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ckpt3["model"].items())


def test_user_errors_are_one_line(tmp_path, corpus):
    with pytest.raises(UserError, match="--teacher"):
        superplm.main(flags(corpus, tmp_path / "a", "--objective", "kd"))
    with pytest.raises(UserError, match="--init .*none: no such folder"):
        superplm.main(flags(corpus, tmp_path / "b", "--arch", "1-64-128-2-64", "--init", str(tmp_path / "none")))
