import copy
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common import UserError
from distill import KDObjective, check_compatible, load_teacher, make_tiny_teacher
from model import KD_SPACE, Arch, Bert, SearchSpace, in_place_grads, save_pretrained

VOCAB = 120
TEACHER = Arch(2, 64, 128, 4, 64)


def batch(lengths, T, seed=0, vocab=VOCAB):
    """Sequences of the given lengths, padded (with junk ids) to T."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=g)
    out = torch.randint(5, vocab, (len(lengths), T), generator=g)  # junk in the padding: must not matter
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    types = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, :n], mask[i, :n], types[i, n // 2:n] = ids[i, :n], 1, 1
    return dict(input_ids=out, attention_mask=mask, token_type_ids=types)


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return Bert(TEACHER, vocab_size=VOCAB, max_position=64).eval()


def identity_objective(teacher):
    objective = KDObjective(teacher, teacher.arch.hidden)
    with torch.no_grad():
        objective.proj.weight.copy_(torch.eye(teacher.arch.hidden))
        objective.proj.bias.zero_()
    return objective


# ----------------------------------------------------------------------------- the loss

def test_loss_is_zero_when_the_student_is_the_teacher_and_positive_otherwise(teacher):
    b = batch([9, 14, 5], T=16)
    objective = identity_objective(teacher)
    student = copy.deepcopy(teacher).requires_grad_(True).eval()
    loss, stats = objective(student, b, student.arch)
    assert loss.item() == 0 and stats["att"].item() == 0 and stats["hid"].item() == 0  # the same numbers, exactly

    torch.manual_seed(1)
    other = Bert(TEACHER, vocab_size=VOCAB, max_position=64).eval()  # different weights
    loss, stats = objective(other, b, other.arch)
    t_hidden, t_scores = teacher(b["input_ids"], attention_mask=b["attention_mask"],
                                 token_type_ids=b["token_type_ids"], return_scores=True)
    s_hidden, s_scores = other(b["input_ids"], attention_mask=b["attention_mask"],
                               token_type_ids=b["token_type_ids"], return_scores=True)
    real = [9, 14, 5]  # the mean squared error over real tokens (hidden) and real (query, key) pairs (scores)
    att = torch.cat([(s_scores[i, :, :n, :n] - t_scores[i, :, :n, :n]).flatten() for i, n in enumerate(real)])
    hid = torch.cat([(s_hidden[i, :n] - t_hidden[i, :n]).flatten() for i, n in enumerate(real)])
    assert stats["att"].item() == pytest.approx(att.square().mean().item(), rel=1e-5)
    assert stats["hid"].item() == pytest.approx(hid.square().mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(stats["att"].item() + stats["hid"].item(), rel=1e-6)
    with torch.no_grad():
        objective.proj.weight.mul_(0.5)  # same student, another projection: only the hidden term moves
    loss, stats = objective(student, b, student.arch)
    half = torch.cat([0.5 * t_hidden[i, :n].flatten() for i, n in enumerate(real)])  # (H/2 - H)^2 = (H/2)^2
    assert stats["att"].item() == 0 and stats["hid"].item() == pytest.approx(half.square().mean().item(), rel=1e-5)


def test_gradients_reach_the_student_and_the_projection_never_the_teacher(teacher):
    torch.manual_seed(2)
    student = Bert(Arch(3, 96, 160, 4, 96), vocab_size=VOCAB, mha="dims", max_position=64).train()
    objective = KDObjective(teacher, student_hidden_max=96).train()
    assert not teacher.training, "objective.train() must not switch on the teacher's dropout"
    assert set(objective.state_dict()) == {"proj.weight", "proj.bias"}  # the teacher is not checkpointed
    assert [n for n, _ in objective.named_parameters()] == ["proj.weight", "proj.bias"]

    arch = Arch(2, 64, 96, 4, 48)  # a sub-model: 2 layers, width 64, 12 dims in each of the 4 heads
    loss, _ = objective(student, batch([10, 6], T=12), arch)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    g = objective.proj.weight.grad  # (teacher hidden, student hidden max)
    assert g[:, :64].abs().sum() > 0 and torch.all(g[:, 64:] == 0)  # sliced on its input: first dm columns
    assert objective.proj.bias.grad.abs().sum() > 0
    assert student.layers[1].fc1.weight.grad[:96, :64].abs().sum() > 0  # the last sampled layer learns
    assert student.layers[2].fc1.weight.grad is None  # the layer the sub-model leaves out does not

    # superplm.py keeps every .grad in one preallocated buffer, and model.sub then adds a block's gradient straight
    # into it: the projection must get the same gradient that way.
    params = list(student.parameters()) + list(objective.parameters())
    student.eval()  # no dropout: both passes see the same network
    got = {}
    for preallocated in (False, True):
        for p in params:
            p.grad = torch.zeros_like(p) if preallocated else None
        with in_place_grads() if preallocated else nullcontext():
            objective(student, batch([10, 6], T=12), arch)[0].backward()
        got[preallocated] = objective.proj.weight.grad.clone()
    assert got[False][:, 64:].abs().sum() == 0 and torch.allclose(got[True], got[False], atol=1e-7)


def test_extra_padding_changes_nothing(teacher):
    torch.manual_seed(3)
    student = Bert(Arch(2, 48, 96, 4, 32), vocab_size=VOCAB, mha="dims", max_position=64).eval()
    objective = KDObjective(teacher, 48)
    lengths = [7, 11, 3]
    ref_loss, ref = objective(student, batch(lengths, T=11), student.arch)
    for T in (16, 40):  # the same sentences (same seed), more padding with other junk ids in it
        loss, stats = objective(student, batch(lengths, T=T), student.arch)
        assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
        assert abs(stats["att"] - ref["att"]) <= 1e-5 * ref["att"]
        assert abs(stats["hid"] - ref["hid"]) <= 1e-5 * ref["hid"]


def test_the_teacher_follows_the_objective_across_dtypes(teacher):
    objective = KDObjective(teacher, 64).double()
    assert objective.teacher.word.weight.dtype == torch.float64 == objective.proj.weight.dtype


def test_head_counts_must_match(teacher):
    with pytest.raises(UserError, match="4 attention heads"):
        check_compatible(teacher, Bert(Arch(1, 64, 64, 2, 64), vocab_size=VOCAB))
    student = Bert(Arch(2, 64, 128, 4, 64), vocab_size=VOCAB, mha="heads")
    check_compatible(teacher, student, SearchSpace(layers=(1, 2), hidden=(64,), ffn=(128,), heads=(4,)))
    with pytest.raises(UserError, match="samples heads"):
        check_compatible(teacher, student, SearchSpace(layers=(1, 2), hidden=(64,), ffn=(128,), heads=(2, 4)))
    with pytest.raises(UserError, match="has 12"):
        check_compatible(teacher, Bert(KD_SPACE.smallest(), vocab_size=VOCAB), KD_SPACE)
    with pytest.raises(UserError, match="equal head counts"):
        KDObjective(teacher, 64)(student, batch([4], T=4), Arch(1, 64, 64, 2, 32))


def test_masked_lm_batches_are_distilled_on_the_original_text(teacher):
    b = batch([9, 14], T=16)
    labels = torch.full_like(b["input_ids"], -100)
    corrupted = b["input_ids"].clone()
    labels[:, 2:5], corrupted[:, 2:5] = corrupted[:, 2:5], 4  # three tokens replaced by a [MASK]-like id
    objective = KDObjective(teacher, 64)
    student = Bert(TEACHER, vocab_size=VOCAB, max_position=64).eval()
    want, _ = objective(student, b, student.arch)
    got, _ = objective(student, b | dict(input_ids=corrupted, labels=labels), student.arch)
    assert torch.allclose(got, want)


# ----------------------------------------------------------------------------- the teacher on disk

import transformers  # noqa: E402  (test-time reference, in requirements-test.txt)


def sentences(n=400, seed=0):
    """Paragraphs of seeded random words: a corpus for a random teacher's vocabulary and a few training steps."""
    import random
    rng = random.Random(seed)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


def electra_teacher(folder, hidden=256, heads=4, embedding_size=256, seed=0):
    """A tiny random ELECTRA discriminator saved by transformers, with its own WordPiece vocabulary."""
    from data import train_tokenizer
    tok = train_tokenizer(sentences(), 600, folder)
    torch.manual_seed(seed)
    cfg = transformers.ElectraConfig(vocab_size=tok.get_vocab_size(), embedding_size=embedding_size,
                                     hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                     intermediate_size=4 * hidden, max_position_embeddings=128,
                                     attn_implementation="eager")
    hf = transformers.ElectraForPreTraining(cfg).eval()
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("embedding_size", [256, 128])
def test_an_electra_discriminator_loads_as_the_teacher(tmp_path, embedding_size):
    hf = electra_teacher(tmp_path, embedding_size=embedding_size)
    teacher, vocab = load_teacher(tmp_path)
    assert vocab == str(tmp_path / "tokenizer.json")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    b = batch([12, 7], T=12, vocab=hf.config.vocab_size)
    ids, mask, types = b["input_ids"], b["attention_mask"], b["token_type_ids"]
    with torch.no_grad():
        ref = hf.electra(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True)
        hidden, scores = teacher(ids, attention_mask=mask, token_type_ids=types, return_scores=True)
    assert (hidden - ref.last_hidden_state).abs().max() <= 1e-5
    probs = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf")).softmax(-1)  # (B, heads, T, T)
    assert (probs - ref.attentions[-1]).abs().max() <= 1e-5  # the scores are the last layer's, before the softmax


def test_teacher_folders_that_cannot_teach_fail_with_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(tmp_path / "missing")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(dict(model_type="gpt2")))
    with pytest.raises(UserError, match="'gpt2' model"):
        load_teacher(tmp_path / "gpt")
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(dict(model_type="bert", hidden_size=64)))
    (tmp_path / "gpt" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="do not load"):
        load_teacher(tmp_path / "gpt")
    save_file({}, tmp_path / "gpt" / "model.safetensors")
    with pytest.raises(UserError, match="num_hidden_layers"):
        load_teacher(tmp_path / "gpt")

    torch.manual_seed(0)
    save_pretrained(Bert(TEACHER, vocab_size=VOCAB), tmp_path / "novocab")
    with pytest.raises(UserError, match="no vocab.txt or tokenizer.json"):
        load_teacher(tmp_path / "novocab")
    from data import train_tokenizer
    train_tokenizer(sentences(), 600, tmp_path / "novocab")  # more tokens than the teacher embeds
    with pytest.raises(UserError, match=f"embeds only {VOCAB}"):
        load_teacher(tmp_path / "novocab")


def test_make_teacher_writes_a_teacher_that_loads(tmp_path, monkeypatch, capsys):
    import distill
    monkeypatch.setattr(distill, "stdlib_corpus", sentences)  # the real corpus takes seconds to harvest
    distill.main(["make-teacher", "--out", str(tmp_path / "t"), "--arch", "2-64-128-4-64", "--vocab-size", "300"])
    teacher, vocab = load_teacher(tmp_path / "t")
    assert teacher.arch == Arch(2, 64, 128, 4, 64) and Path(vocab).name == "tokenizer.json"
    assert teacher.word.num_embeddings == 300
    distill.main(["check", "--teacher", str(tmp_path / "t")])
    assert "students need 4 heads" in capsys.readouterr().out
    with pytest.raises(UserError, match="--overwrite"):
        distill.main(["make-teacher", "--out", str(tmp_path / "t")])
    assert make_tiny_teacher(tmp_path / "u", Arch(1, 32, 64, 2, 32), 300, texts=sentences()) == tmp_path / "u"


# ----------------------------------------------------------------------------- with superplm.py (§3.4, Algorithm 1)

def test_superplm_distils_from_a_transformers_electra_teacher(tmp_path):
    import superplm
    from common import read_jsonl, torch_load
    electra_teacher(tmp_path / "teacher")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(sentences(600, seed=1)))
    out = tmp_path / "run"
    superplm.main(["--preset", "tiny", "--objective", "kd", "--teacher", str(tmp_path / "teacher"),
                   "--corpus", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                   "--superplm-arch", "2-96-192-4-96", "--seq-len", "32", "--batch-size", "8", "--steps", "24",
                   "--log-every", "4", "--sub-models", "2"])
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    ckpt = torch_load(out / "checkpoint.pt")
    assert ckpt["objective"] == "kd" and set(ckpt["objective_state"]) == {"proj.weight", "proj.bias"}
    assert ckpt["objective_state"]["proj.weight"].shape == (256, 96)  # student width -> teacher width
    assert not any(k.startswith("teacher") or "proj" in k for k in ckpt["model"])  # the teacher is not saved
    assert (out / "tokenizer.json").read_text() == (tmp_path / "teacher" / "tokenizer.json").read_text()
