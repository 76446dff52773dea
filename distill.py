"""Task-agnostic distillation (paper §4.1, Table 2): TinyBERT's general stage restricted to the last layer.

In the paper's second setting the SuperPLM and the searched models learn from a teacher (ELECTRA-base) instead of
masked LM, with the loss of TinyBERT's general stage (Jiao et al. 2020) on the last layer only:

    L = MSE(A_student, A_teacher) + MSE(H_student W, H_teacher)

A are the last layer's pre-softmax attention scores (every head), H its hidden states, W a learned projection from
the student's width to the teacher's. Comparing head by head needs the teacher's head count: the distillation
SuperPLM keeps every head and slices inside them (mha="dims", Figure 3(c), KD_SPACE); a sub-model of width dm uses
the first dm input columns of the one shared W, which trains along with it (§3.4). superplm.py runs Algorithm 1
with this loss (`--objective kd --teacher DIR`):
    python distill.py make-teacher --out runs/teacher      # a tiny random teacher for demos and tests
    python distill.py check --teacher path/to/electra-base-discriminator
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError

from common import UserError, flag, parse_flags, run_main, seed_everything
from data import load_tokenizer, stdlib_corpus, train_tokenizer
from model import Arch, Bert, from_pretrained, linear, save_pretrained, sub


def masked_mse(a, b, keep):
    """Mean squared error over the entries where `keep` (broadcast to a's shape) is True. Computed by weighting
    rather than selecting: selecting has a data-dependent size, which makes the host wait for the GPU."""
    keep = keep.expand(a.shape)
    return ((a.float() - b.float()).square() * keep).sum() / keep.sum()


class KDObjective(nn.Module):
    """TinyBERT's general-distillation loss on the last layer (§4.1): objective(model, batch, arch) -> (loss, stats).
    Its only parameters are W: the teacher is outside the module tree (not in state_dict(), never in train mode)."""

    def __init__(self, teacher: Bert, student_hidden_max: int):
        super().__init__()
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())
        self.proj = nn.Linear(student_hidden_max, teacher.arch.hidden)
        nn.init.normal_(self.proj.weight, std=0.02)  # BERT's initialisation, as TinyBERT's fit_dense gets
        nn.init.zeros_(self.proj.bias)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .double() reach the teacher too
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, model, batch, arch=None):
        arch = model.check(arch)
        check_compatible(self.teacher, arch)
        ids = batch["input_ids"]  # (B, T)
        if "labels" in batch:  # a masked-LM batch: distil on the original text, the labels hold what was masked
            ids = torch.where(batch["labels"] != -100, batch["labels"], ids)  # (TinyBERT v2: no [MASK] corpus)
        if ids.shape[1] > self.teacher.position.num_embeddings:
            raise UserError(f"sequences of {ids.shape[1]} tokens are longer than the teacher's "
                            f"{self.teacher.position.num_embeddings} positions: lower --seq-len")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        types = batch.get("token_type_ids")
        # Keyword arguments throughout: the authors' wrappers passed attention_mask and token_type_ids swapped,
        # so teacher and students ran without a padding mask.
        with torch.no_grad():  # the teacher builds no graph (the authors' code never detached it)
            t_hidden, t_scores = self.teacher(ids, attention_mask=mask, token_type_ids=types, return_scores=True)
        s_hidden, s_scores = model(ids, attention_mask=mask, token_type_ids=types, arch=arch, return_scores=True)
        keep = mask.bool()  # (B, T) real tokens
        # Attention loss on the pre-softmax scores (B, heads, T, T) over real (query, key) pairs only. TinyBERT's
        # counts padded keys (in the denominator) and padded queries, so it changes with the padding; ours does not.
        pairs = keep[:, None, :, None] & keep[:, None, None, :]  # (B, 1, T, T)
        att = masked_mse(s_scores, t_scores, pairs)
        # Hidden loss through the projection W, sliced on its input for a sub-model of width dm (§3.4):
        # (B, T, dm) @ W[:, :dm].T -> (B, T, teacher hidden). TinyBERT also averages over padded positions; we don't.
        W = sub(self.proj.weight, self.proj.out_features, arch.hidden)
        hid = masked_mse(linear(s_hidden, W, sub(self.proj.bias, len(W))), t_hidden, keep[..., None])
        return att + hid, {"att": att.detach(), "hid": hid.detach()}


TINY_TEACHER = Arch(2, 256, 1024, 4, 256)  # the demo teacher: BERT-S3's shape (Table 4) in two layers


def load_teacher(folder, flag="--teacher", mha="heads"):
    """(frozen teacher Bert, path of its vocabulary) from a BERT/ELECTRA folder (§4.1), also superplm.py --init's
    (`flag` names the option); every problem (not BERT-shaped, no vocabulary, one it cannot embed) before training."""
    folder = Path(folder)
    try:
        teacher = from_pretrained(folder, mha)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None
    except KeyError as e:
        raise UserError(f"{flag}: {folder}/config.json has no {e}: expected a BERT/ELECTRA config") from None
    except (SafetensorError, pickle.UnpicklingError, RuntimeError) as e:
        raise UserError(f"{flag}: the weights in {folder} do not load ({str(e).splitlines()[0]}): "
                        "download or save the model again") from None
    # the vocabulary in a Hugging Face folder: tokenizer.json first, as it also records the casing
    vocab = next((folder / name for name in ("tokenizer.json", "vocab.txt") if (folder / name).exists()), None)
    if vocab is None:
        raise UserError(f"{flag}: {folder} has no vocab.txt or tokenizer.json: use a copy of the model that "
                        "has its vocabulary (the corpus is read with the model's token ids)")
    n = load_tokenizer(vocab).get_vocab_size()
    if n > teacher.word.num_embeddings:
        raise UserError(f"{flag}: {vocab} has {n} tokens but the model embeds only "
                        f"{teacher.word.num_embeddings}: use the vocabulary the model was trained with")
    return teacher.requires_grad_(False).eval(), str(vocab)  # frozen: no gradient (the authors' code computed them)


def check_compatible(teacher, student, space=None):
    """UserError unless every sub-model of `student` (Bert, Arch, SuperPLM sampling `space`) has the teacher's heads."""
    H, a = teacher.arch.heads, getattr(student, "arch", student)
    if a.heads != H:
        like = f", e.g. {Arch(a.layers, a.hidden, a.ffn, H, a.qkv)}" if a.qkv % H == 0 else ""
        raise UserError(f"the teacher has {H} attention heads but the student {a} has {a.heads}: attention "
                        f"distillation needs equal head counts, so give the student {H} heads{like}")
    if space is not None and set(space.heads) != {H}:
        raise UserError(f"the search space samples heads {list(space.heads)} but the teacher has {H}: distil with "
                        f"heads fixed at {H} and mha='dims' (Figure 3(c), KD_SPACE)")


def make_tiny_teacher(folder, arch=TINY_TEACHER, vocab_size=4096, texts=None, seed=0):
    """A random BERT teacher with its own WordPiece vocabulary, for demos and tests (it teaches nothing useful)."""
    seed_everything(seed)
    tokenizer = train_tokenizer(stdlib_corpus() if texts is None else texts, vocab_size, folder)
    save_pretrained(Bert(arch, vocab_size=tokenizer.get_vocab_size()), folder)
    return Path(folder)


@dataclass
class TeacherConfig:
    out: str = flag("runs/teacher", "folder for the teacher (config.json, model.safetensors, tokenizer.json, "
                                    "vocab.txt)")
    arch: str = flag(str(TINY_TEACHER), "teacher layers-hidden-ffn-heads-qkv; the paper's teacher is ELECTRA-base, "
                                        "12-768-3072-12-768")
    vocab_size: int = flag(4096, "WordPiece vocabulary trained on the stdlib corpus", min=6)
    seed: int = flag(0, "seed of the random weights", min=0)
    overwrite: bool = flag(False, "replace a teacher already in --out")


@dataclass
class CheckConfig:
    teacher: str = flag("runs/teacher", "a BERT/ELECTRA Hugging Face folder with its vocab.txt or tokenizer.json")


def main(argv=None):
    command, cfg = parse_flags({"make-teacher": (TeacherConfig, "write a tiny random teacher"),
                                "check": (CheckConfig, "load a teacher and print what a student needs")},
                               argv, __doc__.split("\n")[0])
    if command == "make-teacher":
        out = Path(cfg.out)
        if (out / "config.json").exists() and not cfg.overwrite:
            raise UserError(f"{out} already holds a model: pass --overwrite to replace it or choose another --out")
        arch = Arch.parse(cfg.arch)
        make_tiny_teacher(out, arch, cfg.vocab_size, seed=cfg.seed)
        print(f"wrote a random {arch} teacher to {out}; distil into a {arch.heads}-head SuperPLM, e.g. "
              f"python superplm.py --preset tiny --objective kd --teacher {out}")
    else:
        teacher, vocab = load_teacher(cfg.teacher)
        print(f"teacher {teacher.arch} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M parameters), "
              f"vocabulary {vocab}; students need {teacher.arch.heads} heads and read the corpus with that vocabulary")


if __name__ == "__main__":
    run_main(main)
