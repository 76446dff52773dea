"""An elastic BERT: one nn.Module that is both the SuperPLM and a stand-alone BERT (paper §2, §3.3-3.4).

A sub-model is run by *slicing* the SuperPLM's parameters (§3.4): the first `layers` layers and the top-left
("bottom-left" in the paper's figure) block of every tensor, attention sliced by one of Figure 3's strategies:
    mha="heads"  (b) keep the head width and take the first h heads: qkv = head_dim * h   (pre-training)
    mha="dims"   (c) keep every head and take the first qkv/H dims inside each head         (distillation)
`extract` copies those slices into a stand-alone Bert whose outputs equal the SuperPLM run at that arch.

Below the model: AdamW with §4.1's schedule, and Hugging Face BERT folders (save_pretrained, from_pretrained, kept
with the model as nanoGPT does): ours load in transformers, and stock BERT or ELECTRA folders load here."""

import contextlib
import json
import math
import random
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common import UserError, atomic_write, save_json
from data import masked_positions


@dataclass(frozen=True, order=True)
class Arch:
    """The paper's α = {Lt, dm, dq, dk, dv, df, do} with dq = dk = dv = qkv and do = hidden (§2, §3.3), written as
    in Table 4: layers-hidden-ffn-heads-qkv, e.g. 5-564-1054-8-512."""
    layers: int
    hidden: int
    ffn: int
    heads: int
    qkv: int

    def __post_init__(self):
        for name in ("layers", "hidden", "ffn", "heads", "qkv"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UserError(f"Arch {name} must be a positive integer, got {v!r}")
        if self.qkv % self.heads:
            raise UserError(f"Arch qkv={self.qkv} is not divisible by heads={self.heads}")

    @property
    def head_dim(self):
        return self.qkv // self.heads

    @classmethod
    def parse(cls, text):
        parts = str(text).strip().split("-")
        if len(parts) != 5:
            raise UserError(f"arch {text!r} must have 5 fields layers-hidden-ffn-heads-qkv, e.g. 5-564-1054-8-512")
        for name, p in zip(("layers", "hidden", "ffn", "heads", "qkv"), parts):
            if not p.isdigit():
                raise UserError(f"arch {text!r}: {name} must be a positive integer, got {p!r}")
        return cls(*map(int, parts))

    def __str__(self):
        return f"{self.layers}-{self.hidden}-{self.ffn}-{self.heads}-{self.qkv}"

    @classmethod
    def default_rule(cls, layers, hidden, heads=None):
        """BERT's default rule (§1, §3.3): qkv = hidden, ffn = 4 x hidden, heads of 64 dimensions unless given."""
        return cls(layers, hidden, 4 * hidden, heads or hidden // 64, hidden)


BERT_BASE = Arch(12, 768, 3072, 12, 768)
SUPERPLM = Arch(8, 768, 3072, 12, 768)  # §3.4


def grid(lo, hi, step):
    return tuple(range(lo, hi + 1, step))


@dataclass(frozen=True)
class SearchSpace:
    """The ranges of Appendix B, Table B.1. qkv=None ties qkv = head_dim * heads (the pre-training space)."""
    layers: tuple
    hidden: tuple
    ffn: tuple
    heads: tuple
    qkv: tuple = None
    head_dim: int = 64

    DIMS = ("layers", "hidden", "ffn", "heads", "qkv")

    def choices(self, dim):
        if dim == "qkv" and self.qkv is None:
            return tuple(self.head_dim * h for h in self.heads)
        return getattr(self, dim)

    def size(self):
        n = len(self.layers) * len(self.hidden) * len(self.ffn) * len(self.heads)
        return n if self.qkv is None else n * len(self.qkv)

    def sample(self, rng: random.Random) -> Arch:
        """Uniform in every dimension (§3.4: sampling uses the search space itself)."""
        layers, hidden, ffn, heads = (rng.choice(getattr(self, d)) for d in self.DIMS[:4])
        qkv = self.head_dim * heads if self.qkv is None else rng.choice(self.qkv)
        return Arch(layers, hidden, ffn, heads, qkv)

    def __contains__(self, arch):
        tied = arch.qkv == self.head_dim * arch.heads if self.qkv is None else arch.qkv in self.qkv
        return (arch.layers in self.layers and arch.hidden in self.hidden and arch.ffn in self.ffn
                and arch.heads in self.heads and tied)

    def largest(self) -> Arch:
        """The SuperPLM that holds every architecture of this space."""
        return Arch(*(max(self.choices(d)) for d in self.DIMS))

    def smallest(self) -> Arch:
        return Arch(*(min(self.choices(d)) for d in self.DIMS))


# Table B.1. The paper says "about 46M and 10M"; the ranges give 11.4M (pre-training) and 47.5M (distillation).
PRETRAIN_SPACE = SearchSpace(layers=grid(1, 8, 1), hidden=grid(128, 768, 4), ffn=grid(128, 3072, 4),
                             heads=grid(1, 12, 1))
KD_SPACE = SearchSpace(layers=grid(1, 8, 1), hidden=grid(128, 768, 4), ffn=grid(128, 3072, 4),
                       heads=(12,), qkv=grid(180, 768, 12))


# --------------------------------------------------------------------------------------------- the elastic BERT (§3.4)

def sub(p, *sizes, shape=None):
    """The leading block p.view(shape)[:a, :b, ...]: all of §3.4's sub-matrix extraction. Autograd gives a plain
    slice a full-size gradient, zero outside the block; inside `in_place_grads()` it goes into p.grad's block."""
    index = tuple(slice(0, s) for s in sizes)
    if getattr(_in_place, "on", False) and p.grad is not None and p.requires_grad and torch.is_grad_enabled():
        return _AddToGrad.apply(p, p.shape if shape is None else shape, index)  # its gradient added in place
    if shape is None and tuple(sizes) == tuple(p.shape):
        return p  # the whole tensor (a stand-alone model): no view, so exported graphs hold plain weights
    return p.view(p.shape if shape is None else shape)[index]


_in_place = threading.local()  # .on: inside in_place_grads(), on this thread


@contextlib.contextmanager
def in_place_grads():
    """Inside (superplm.accumulate), a block from `sub` of a parameter with a .grad (superplm.flat_grads) gets its
    gradient added into p.grad's block, not as a full-size zero-padded tensor; `linear` and `embedding` compute it
    there. The same sums, as fast as a lone sub-model (bench/superplm_speed.py); hidden from torch.autograd.grad and
    DDP's hooks. Under autocast the block is cast after `sub`, and its fp32 gradient is added: autograd's own."""
    before, _in_place.on = getattr(_in_place, "on", False), True
    try:
        yield
    finally:
        _in_place.on = before


class _AddToGrad(torch.autograd.Function):
    """p.view(shape)[index], whose backward adds the block's gradient into p.grad in place (see in_place_grads)."""

    @staticmethod
    def forward(ctx, p, shape, index):
        ctx.p, ctx.shape, ctx.index = p, shape, index
        ctx.set_materialize_grads(False)  # linear and embedding add it themselves and pass None: no zeros made
        return p.view(shape)[index]

    @staticmethod
    def backward(ctx, grad):
        if grad is not None:
            grad_block((ctx.p, ctx.shape, ctx.index)).add_(grad)
        return None, None, None


def block_of(t):
    """(p, shape, index) of t, a block from `sub` inside in_place_grads(); None for any other tensor, or under
    autocast (the matmul then runs on a bf16 copy of the block)."""
    node = t.grad_fn
    if isinstance(node, _AddToGrad._backward_cls) and not torch.is_autocast_enabled(t.device.type):
        return node.p, node.shape, node.index
    return None


def grad_block(block):
    p, shape, index = block
    if p.grad is None:  # cleared between forward and backward
        p.grad = torch.zeros_like(p)
    return p.grad.view(shape)[index]


def linear(x, w, b=None):
    """F.linear(x, w, b). Where w and b are `sub`'s blocks inside in_place_grads(), the weight's gradient is
    multiplied straight into p.grad's block (addmm_): no (out, in) gradient is allocated and then added, the
    step that made a sub-model 1.15x slower through the SuperPLM than alone."""
    blocks = [block_of(t) for t in (w, b) if t is not None]
    if None in blocks:
        return F.linear(x, w, b)
    return _LinearInto.apply(x, w, b, blocks)


class _LinearInto(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, blocks):
        ctx.save_for_backward(x, w)
        ctx.blocks = blocks
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_block(ctx.blocks[0]).addmm_(g.T, x.reshape(-1, x.shape[-1]))  # += (out, N) @ (N, in)
        if len(ctx.blocks) == 2:
            grad_block(ctx.blocks[1]).add_(g.sum(0))  # the bias: += (out,)
        gx = (g @ w).view(*grad.shape[:-1], w.shape[1]) if ctx.needs_input_grad[0] else None  # (..., in)
        return gx, None, None, None  # None for w and b: _AddToGrad then does nothing


def embedding(ids, w):
    """F.embedding(ids, w). Where w is `sub`'s block inside in_place_grads(), the rows' gradients are added
    straight into p.grad's block, each token's summed first as autograd sums them (so the same sums), without
    autograd's (vocab, hidden) tensor of zeros, and with no host sync."""
    block = block_of(w)
    return F.embedding(ids, w) if block is None else _EmbeddingInto.apply(ids, w, block)


class _EmbeddingInto(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, w, block):
        ctx.save_for_backward(ids)
        ctx.block = block
        return F.embedding(ids, w)

    @staticmethod
    def backward(ctx, grad):
        ids, = ctx.saved_tensors
        ids, g = ids.flatten(), grad.reshape(-1, grad.shape[-1])  # (N,), (N, C)
        order = ids.argsort(stable=True)  # positions grouped by token, each group in position order
        tokens = ids[order]
        first = torch.ones_like(tokens, dtype=torch.bool)
        first[1:] = tokens[1:] != tokens[:-1]
        group = first.cumsum(0) - 1  # (N,) each sorted position's group
        sums = torch.zeros_like(g).index_add_(0, group, g[order])  # (N, C): a row per token, then zero rows
        grad_block(ctx.block).index_add_(0, torch.zeros_like(ids).scatter_(0, group, tokens), sums)
        return None, None, None


class Layer(nn.Module):
    """One post-LayerNorm Transformer layer: MHA (Eq. 1-2) then a GELU feed-forward (Eq. 3)."""

    def __init__(self, arch, eps, act):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(arch.hidden, arch.qkv) for _ in range(3))
        self.o = nn.Linear(arch.qkv, arch.hidden)  # do = dm (residual)
        self.ln1 = nn.LayerNorm(arch.hidden, eps=eps)
        self.fc1 = nn.Linear(arch.hidden, arch.ffn)
        self.fc2 = nn.Linear(arch.ffn, arch.hidden)
        self.ln2 = nn.LayerNorm(arch.hidden, eps=eps)
        self.act = act

    def qkv_weights(self, lin, H, D, h, d, hidden):
        """Rows of the first h heads and first d dims of each head, from a weight laid out as (H*D, hidden)."""
        if d == D:  # all of each head: the first h*d rows (the whole tensor in a stand-alone model)
            return sub(lin.weight, h * d, hidden), sub(lin.bias, h * d)
        w = sub(lin.weight, h, d, hidden, shape=(H, D, -1)).reshape(h * d, hidden)  # (c): a copy
        return w, sub(lin.bias, h, d, shape=(H, D)).reshape(h * d)

    def forward(self, x, mask, H, D, arch, d, dropout, return_scores=False):
        B, T, C = x.shape  # C = arch.hidden
        h = arch.heads
        q, k, v = (linear(x, *self.qkv_weights(lin, H, D, h, d, C)).view(B, T, h, d).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))  # (B, h, T, d)
        scores = None
        if return_scores:  # the last layer's pre-softmax scores, kept for distillation (TinyBERT)
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, h, T, T)
            att = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
            att = F.dropout(att.softmax(-1), dropout, self.training)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=dropout if self.training else 0.0)  # (B, h, T, d)
        y = y.transpose(1, 2).reshape(B, T, h * d)
        wo = sub(self.o.weight, C, h * d) if d == D else \
            sub(self.o.weight, C, h, d, shape=(-1, H, D)).reshape(C, h * d)  # the columns of the kept rows
        y = linear(y, wo, sub(self.o.bias, C))
        x = F.layer_norm(x + F.dropout(y, dropout, self.training), (C,), sub(self.ln1.weight, C),
                         sub(self.ln1.bias, C), self.ln1.eps)
        f = self.act(linear(x, sub(self.fc1.weight, arch.ffn, C), sub(self.fc1.bias, arch.ffn)))
        f = linear(f, sub(self.fc2.weight, C, arch.ffn), sub(self.fc2.bias, C))
        x = F.layer_norm(x + F.dropout(f, dropout, self.training), (C,), sub(self.ln2.weight, C),
                         sub(self.ln2.bias, C), self.ln2.eps)
        return x, scores


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class Bert(nn.Module):
    """BERT encoder + tied masked-LM head. Bert(arch) is a plain BERT; run with arch=<smaller> it is a SuperPLM."""

    def __init__(self, arch, vocab_size=30522, mha="heads", max_position=512, type_vocab=2, eps=1e-12,
                 act="gelu", dropout=0.1, embedding_size=None):
        super().__init__()
        if mha not in ("heads", "dims"):
            raise UserError(f"mha must be 'heads' or 'dims', got {mha!r}")
        if act not in ACTIVATIONS:
            raise UserError(f"activation {act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        self.arch, self.mha, self.dropout = arch, mha, dropout
        self.cfg = dict(arch=str(arch), vocab_size=vocab_size, mha=mha, max_position=max_position,
                        type_vocab=type_vocab, eps=eps, act=act, dropout=dropout, embedding_size=embedding_size)
        E = embedding_size or arch.hidden
        self.word = nn.Embedding(vocab_size, E)
        self.position = nn.Embedding(max_position, E)
        self.token_type = nn.Embedding(type_vocab, E)
        self.emb_ln = nn.LayerNorm(E, eps=eps)
        self.emb_proj = nn.Linear(E, arch.hidden) if E != arch.hidden else None  # ELECTRA-small style
        self.layers = nn.ModuleList(Layer(arch, eps, ACTIVATIONS[act]) for _ in range(arch.layers))
        self.mlm_dense = nn.Linear(arch.hidden, arch.hidden)  # the MLM head; its decoder is tied to `word`
        self.mlm_ln = nn.LayerNorm(arch.hidden, eps=eps)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.apply(self._init)

    @staticmethod
    def _init(m):
        """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def config(self):
        return dict(self.cfg)

    @classmethod
    def from_config(cls, cfg):
        cfg = dict(cfg)
        return cls(Arch.parse(cfg.pop("arch")), **cfg)

    def check(self, arch):
        """Raise UserError unless `arch` is a sub-model of this one under its MHA strategy (Figure 3)."""
        if arch is None:
            return self.arch
        A = self.arch
        for name in ("layers", "hidden", "ffn"):
            if getattr(arch, name) > getattr(A, name):
                raise UserError(f"arch {arch} does not fit in the SuperPLM {A}: {name} {getattr(arch, name)} "
                                f"> {getattr(A, name)}")
        if self.emb_proj is not None and arch.hidden != A.hidden:
            raise UserError("a model with an embedding projection (ELECTRA-small style) is not elastic in hidden")
        if self.mha == "heads" and (arch.head_dim != A.head_dim or arch.heads > A.heads):
            raise UserError(f"arch {arch} does not fit the 'heads' strategy of {A}: it keeps head width "
                            f"{A.head_dim}, so qkv must be {A.head_dim}*heads with heads <= {A.heads}")
        if self.mha == "dims" and (arch.heads != A.heads or arch.head_dim > A.head_dim):
            raise UserError(f"arch {arch} does not fit the 'dims' strategy of {A}: it keeps all {A.heads} heads, "
                            f"so heads must be {A.heads} and qkv <= {A.qkv}")
        return arch

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, arch=None, return_scores=False):
        """Last hidden states (B, T, arch.hidden); with return_scores also the last layer's pre-softmax attention
        scores (B, heads, T, T), without the padding mask."""
        arch = self.check(arch)
        B, T = input_ids.shape
        C = arch.hidden if self.emb_proj is None else self.word.embedding_dim
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        x = (embedding(input_ids, sub(self.word.weight, self.word.num_embeddings, C))
             + embedding(pos, sub(self.position.weight, self.position.num_embeddings, C))
             + embedding(token_type_ids, sub(self.token_type.weight, self.token_type.num_embeddings, C)))
        x = F.layer_norm(x, (C,), sub(self.emb_ln.weight, C), sub(self.emb_ln.bias, C), self.emb_ln.eps)
        x = F.dropout(x, self.dropout, self.training)  # (B, T, C)
        if self.emb_proj is not None:
            x = self.emb_proj(x)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys
        H, D, d = self.arch.heads, self.arch.head_dim, arch.head_dim
        scores = None
        for i, layer in enumerate(self.layers[:arch.layers]):
            x, scores = layer(x, mask, H, D, arch, d, self.dropout, return_scores and i == arch.layers - 1)
        return (x, scores) if return_scores else x

    def mlm_logits(self, hidden, arch=None):
        """Masked-LM logits (..., vocab) of hidden states (..., arch.hidden); pass only the masked positions."""
        C = self.check(arch).hidden
        x = linear(hidden, sub(self.mlm_dense.weight, C, C), sub(self.mlm_dense.bias, C))
        x = F.layer_norm(self.layers[0].act(x), (C,), sub(self.mlm_ln.weight, C), sub(self.mlm_ln.bias, C),
                         self.mlm_ln.eps)
        W = sub(self.word.weight, self.word.num_embeddings, C)  # (vocab, C): the decoder, tied to the embedding
        return linear(x, W) + self.mlm_bias


@torch.no_grad()
def extract(superplm: Bert, arch: Arch) -> Bert:
    """A stand-alone Bert holding copies of exactly the slices that superplm(arch=arch) uses."""
    arch = superplm.check(arch)
    model = Bert.from_config(dict(superplm.config(), arch=str(arch)))
    H, D, C, d = superplm.arch.heads, superplm.arch.head_dim, arch.hidden, arch.head_dim
    src = dict(superplm.named_parameters())
    for name, p in model.named_parameters():
        s, leaf = src[name], name.split(".")[-2:]
        if len(leaf) == 2 and leaf[0] in ("q", "k", "v"):
            shape, sizes = ((H, D, -1), (arch.heads, d, C)) if leaf[1] == "weight" else ((H, D), (arch.heads, d))
            p.copy_(sub(s, *sizes, shape=shape).reshape(p.shape))
        elif leaf == ["o", "weight"]:
            p.copy_(sub(s, C, arch.heads, d, shape=(-1, H, D)).reshape(p.shape))
        else:  # every other tensor: its leading block
            p.copy_(sub(s, *p.shape))
    return model.train(superplm.training)


class MLM(nn.Module):
    """BERT's masked-LM loss (pre-training, §4.1), with logits only at the masked positions. These come with the
    batch ("masked", from data.batches): a boolean mask on a GPU would make the host wait at every step."""

    def forward(self, model, batch, arch=None):
        hidden = model(batch["input_ids"], batch["attention_mask"], arch=arch)  # (B, T, C)
        where = batch["masked"] if "masked" in batch else masked_positions(batch["labels"])  # (n,) in B*T
        labels = batch["labels"].flatten()[where]  # (n,)
        logits = model.mlm_logits(hidden.flatten(0, 1)[where], arch)  # (n, vocab)
        n = max(where.numel(), 1)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum") / n
        return loss, {"acc": ((logits.argmax(-1) == labels).sum() / n).detach()}


# --------------------------------------------------------------------------------------- AdamW and the schedule (§4.1)

def learning_rate(step, total, peak, warmup):
    """§4.1: linear warm-up over the first `warmup` share of the steps, then linear decay to 0."""
    w = int(warmup * total)
    if step < w:
        return peak * (step + 1) / w  # warm-up
    return peak * max(0.0, (total - step) / max(1, total - w))  # decay


def make_optimizer(params, lr, weight_decay=0.01, eps=1e-6):
    """AdamW with BERT's weight decay and epsilon (the paper does not tune them); no decay on biases and LayerNorm."""
    params = [p for p in params if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    try:  # optimisation: fused kernels (one kernel over all parameters) where torch has them, CUDA and CPU >= 2.4
        return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups, lr=lr, eps=eps)


# ------------------------------------------------------------------------------------------- Hugging Face BERT folders

HF_MODELING = Path(__file__).parent / "hf" / "modeling_autotinybert.py"  # transformers' classes for any qkv
HF_AUTO_MAP = {f"AutoModel{task}": f"modeling_autotinybert.AutoTinyBert{task or 'Model'}"
               for task in ("", "ForMaskedLM", "ForSequenceClassification", "ForQuestionAnswering")}

# Keys of the paper's released models' config.json (no model_type; BERT's fields + qkv_size) that BERT does not use
AUTHORS_KEYS = {"emb_size", "cell", "structure", "pre_trained", "training"}
BERT_KEYS = set("vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size qkv_size hidden_act "
                "hidden_dropout_prob attention_probs_dropout_prob max_position_embeddings type_vocab_size "
                "initializer_range layer_norm_eps".split())


def read_pretrained(folder):
    """(config, state dict) of a BERT/ELECTRA folder, whole or sharded, or an authors' model; never unpickles code."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise UserError(f"model folder {folder} {'has no config.json' if folder.is_dir() else 'does not exist'}: "
                        "expected a Hugging Face BERT/ELECTRA folder (config.json, model.safetensors or .bin)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise UserError(f"{folder}/config.json is not JSON ({e}): save or download the model again") from None
    if "model_type" not in config and {"hidden_size", "num_hidden_layers", "intermediate_size"} <= config.keys():
        unknown = sorted(config.keys() - BERT_KEYS - AUTHORS_KEYS)  # the authors' own keys are ignored by name
        if unknown:
            print(f"note: {folder}/config.json: ignored {', '.join(unknown)} (neither BERT's nor AutoTinyBERT's)",
                  file=sys.stderr)
        config["model_type"] = "bert"
    if config.get("model_type") not in ("bert", "electra"):
        raise UserError(f"{folder} holds a {config.get('model_type')!r} model: expected model_type 'bert' or 'electra'")
    load = lambda f: load_file(f) if f.suffix == ".safetensors" else torch.load(f, "cpu", weights_only=True)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return config, load(folder / name)
        index = folder / f"{name}.index.json"
        if index.exists():  # a sharded checkpoint: the index maps each tensor to its shard
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise UserError(f"{folder} lacks {missing[0]} of {index.name}'s {len(shards)} shards: download it")
            return config, {k: v for s in shards for k, v in load(folder / s).items()}
    raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin (nor their sharded .index.json)")


def _hf_names(layers, emb_proj):
    """(our parameter name, Hugging Face name without the 'bert.'/'electra.' prefix)."""
    pairs = [(f"{a}.weight", f"embeddings.{a}_embeddings.weight") for a in ("word", "position", "token_type")]
    pairs += [(f"emb_ln.{p}", f"embeddings.LayerNorm.{p}") for p in ("weight", "bias")]
    if emb_proj:
        pairs += [(f"emb_proj.{p}", f"embeddings_project.{p}") for p in ("weight", "bias")]
    parts = [("q", "attention.self.query"), ("k", "attention.self.key"), ("v", "attention.self.value"),
             ("o", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
             ("fc1", "intermediate.dense"), ("fc2", "output.dense"), ("ln2", "output.LayerNorm")]
    for i in range(layers):
        pairs += [(f"layers.{i}.{a}.{p}", f"encoder.layer.{i}.{b}.{p}") for a, b in parts for p in ("weight", "bias")]
    pairs += [(f"mlm_{a}.{p}", f"cls.predictions.transform.{b}.{p}")
              for a, b in (("dense", "dense"), ("ln", "LayerNorm")) for p in ("weight", "bias")]
    return pairs + [("mlm_bias", "cls.predictions.bias")]


def save_pretrained(model, folder, head=None, **config_fields):
    """Write config.json + model.safetensors as transformers' BertForMaskedLM does, and HF_MODELING for any qkv
    (trust_remote_code). `head`: a task head's tensors under transformers' names; `config_fields`: for config.json."""
    a, c = model.arch, model.cfg
    config = dict(architectures=["BertForMaskedLM"], auto_map=HF_AUTO_MAP, model_type="bert", pad_token_id=0,
                  vocab_size=c["vocab_size"], hidden_size=a.hidden, num_hidden_layers=a.layers, intermediate_size=a.ffn,
                  num_attention_heads=a.heads, hidden_act=c["act"], layer_norm_eps=c["eps"], initializer_range=0.02,
                  hidden_dropout_prob=c["dropout"], attention_probs_dropout_prob=c["dropout"],
                  max_position_embeddings=c["max_position"], type_vocab_size=c["type_vocab"])
    if a.qkv != a.hidden:
        config["qkv_size"] = a.qkv
    if c["embedding_size"]:
        config["embedding_size"] = c["embedding_size"]
    config.update(config_fields)
    ours = model.state_dict()  # under BertForMaskedLM's names, but for the decoder's weight: the embedding (tied)
    tensors = {(hf if hf.startswith("cls.") else "bert." + hf): ours[name]
               for name, hf in _hf_names(a.layers, model.emb_proj is not None)}
    tensors["cls.predictions.decoder.bias"] = ours["mlm_bias"]
    if head:  # a fine-tuned model: its task head instead of the masked-LM head
        tensors = {k: v for k, v in tensors.items() if not k.startswith("cls.")} | head
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write(Path(folder) / "model.safetensors", lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    atomic_write(Path(folder) / HF_MODELING.name, lambda tmp: Path(tmp).write_text(HF_MODELING.read_text()))
    save_json(config, Path(folder) / "config.json")


def from_pretrained(folder, mha="heads", dropout=None):
    """Load a BERT or ELECTRA(-discriminator) folder written by transformers, or by save_pretrained."""
    config, state = read_pretrained(folder)
    arch = Arch(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
                config["num_attention_heads"], config.get("qkv_size") or config["hidden_size"])
    emb = config.get("embedding_size")
    model = Bert(arch, vocab_size=config["vocab_size"], mha=mha, act=config.get("hidden_act", "gelu"),
                 max_position=config.get("max_position_embeddings", 512), type_vocab=config.get("type_vocab_size", 2),
                 eps=config.get("layer_norm_eps", 1e-12), embedding_size=emb if emb and emb != arch.hidden else None,
                 dropout=config.get("hidden_dropout_prob", 0.1) if dropout is None else dropout)
    ours = {}
    for name, hf in _hf_names(arch.layers, model.emb_proj is not None):
        old = hf.replace("weight", "gamma").replace("bias", "beta")  # LayerNorm's names in TensorFlow-era files
        key = next((p + n for n in (hf, old) for p in ("", "bert.", "electra.") if p + n in state), None)
        if key:
            ours[name] = state[key]
    fit = next((k for k in state if k.endswith(("dense_fit.weight", "fit_dense.weight"))), None)
    if fit:  # a KD model of the authors' code: its projection to the teacher's width
        print(f"note: {folder}: skipped {fit[:-7]} {tuple(state[fit].shape[::-1])}, the projection to the "
              "teacher's width: only distillation used it", file=sys.stderr)
    missing = [n for n in model.state_dict() if n not in ours and not n.startswith("mlm")]
    if missing:
        raise UserError(f"{folder} is not a complete BERT/ELECTRA checkpoint: missing weights for {missing[:3]}")
    model.load_state_dict(ours, strict=False)  # a discriminator has no MLM head: it keeps its fresh init
    return model
