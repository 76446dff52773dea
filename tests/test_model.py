"""§3.4's invariants: an Arch is a point of Table B.1's search spaces (their exact sizes), a sub-model is the
SuperPLM's top-left blocks (Figure 3), extracting it gives the numbers the SuperPLM computes at that arch, and the
in-place slice gradients are autograd's sum."""
import contextlib
import random

import pytest
import torch

from common import UserError
from model import (BERT_BASE, KD_SPACE, PRETRAIN_SPACE, SUPERPLM, Arch, Bert, SearchSpace, extract, grid,
                   embedding, in_place_grads, linear, sub)

VOCAB = 97


def batch(B=2, T=12, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T // 2:] = 0  # one padded sequence in the batch
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 3:] = 1
    return ids, mask, types


@pytest.fixture(scope="module", params=["heads", "dims"])
def superplm(request):
    torch.manual_seed(0)
    return Bert(SUPERPLM, vocab_size=VOCAB, mha=request.param, max_position=64).eval()


def space_of(model):
    return PRETRAIN_SPACE if model.mha == "heads" else KD_SPACE


# ----------------------------------------------------------------------------- Arch and SearchSpace

def test_arch_roundtrip_and_rules():
    for text in ("5-564-1054-8-512", "4-396-624-6-384", "12-768-3072-12-768"):
        assert str(Arch.parse(text)) == text
    assert Arch.parse("5-564-1054-8-512").head_dim == 64
    assert Arch.default_rule(4, 512, 8) == Arch(4, 512, 2048, 8, 512)
    assert Arch.default_rule(4, 512) == Arch(4, 512, 2048, 8, 512)  # §4.4's BERT rule: ffn 4 x hidden, heads of 64


def test_space_sizes_are_table_b1s():
    """Table B.1: layers 1-8, hidden 128-768 and ffn 128-3072 in steps of 4, and 1-12 heads of 64 (pre-training)
    or qkv 180-768 in steps of 12 (distillation): 8 x 161 x 737 x 12 and 8 x 161 x 737 x 50 architectures."""
    assert PRETRAIN_SPACE.size() == 11_391_072
    assert KD_SPACE.size() == 47_462_800
    assert (len(PRETRAIN_SPACE.layers), len(PRETRAIN_SPACE.hidden), len(PRETRAIN_SPACE.ffn)) == (8, 161, 737)
    assert len(PRETRAIN_SPACE.heads) == 12 and len(KD_SPACE.qkv) == 50
    tiny = SearchSpace(layers=(1, 2), hidden=(8, 16, 24), ffn=(8,), heads=(1, 2), head_dim=4)
    assert tiny.size() == len(list(_enumerate(tiny))) == 12


def _enumerate(space):
    for L in space.layers:
        for C in space.hidden:
            for f in space.ffn:
                for h in space.heads:
                    for q in ([space.head_dim * h] if space.qkv is None else space.qkv):
                        yield Arch(L, C, f, h, q)


def test_samples_lie_in_the_space_and_cover_every_value():
    rng = random.Random(0)
    for space in (PRETRAIN_SPACE, KD_SPACE):
        archs = [space.sample(rng) for _ in range(3000)]
        assert all(a in space for a in archs)
        for dim in ("layers", "heads"):
            assert {getattr(a, dim) for a in archs} == set(space.choices(dim))
    assert Arch(5, 564, 1056, 8, 512) in PRETRAIN_SPACE and Arch(5, 564, 1056, 8, 512) not in KD_SPACE
    assert Arch(5, 564, 1054, 8, 512) not in PRETRAIN_SPACE  # Table 4's S1 has an ffn off Table B.1's grid
    assert Arch(5, 564, 1024, 12, 528) in KD_SPACE and Arch(5, 564, 1024, 12, 192) in KD_SPACE
    assert Arch(5, 564, 1024, 12, 168) not in KD_SPACE  # qkv below Table B.1's 180
    assert Arch(5, 564, 1024, 8, 448) not in PRETRAIN_SPACE  # qkv must be 64 * heads
    assert PRETRAIN_SPACE.largest() == SUPERPLM and KD_SPACE.largest() == SUPERPLM
    assert grid(180, 768, 12)[-1] == 768


# ----------------------------------------------------------------------------- extraction equals slicing (§3.4)

def test_extraction_equals_slicing_for_random_archs(superplm):
    rng = random.Random(1)
    ids, mask, types = batch()
    archs = [space_of(superplm).sample(rng) for _ in range(25)]
    for arch in archs:
        with torch.no_grad():
            want = superplm(ids, mask, types, arch=arch)
            sub = extract(superplm, arch)
            got = sub(ids, mask, types)
            assert got.shape == (2, 12, arch.hidden)
            assert torch.equal(got, want), arch  # the same sub-matrices in the same operations: the same numbers
            logits = sub.mlm_logits(got[mask.bool()])
            assert torch.equal(logits, superplm.mlm_logits(want[mask.bool()], arch)), arch


def test_extraction_edges(superplm):
    space = space_of(superplm)
    ids, mask, types = batch(T=20)
    smallest = space.smallest()
    one_layer = Arch(1, 768, 3072, 12, 768)
    with torch.no_grad():
        for arch in (smallest, one_layer, SUPERPLM):
            got = extract(superplm, arch)(ids, mask, types)
            assert torch.equal(got, superplm(ids, mask, types, arch=arch)), arch
        full = superplm(ids, mask, types)
        assert torch.equal(full, superplm(ids, mask, types, arch=SUPERPLM))
        assert torch.equal(extract(superplm, SUPERPLM)(ids, mask, types), full)


def test_extracted_blocks_are_the_expected_sub_matrices(superplm):
    arch = Arch(3, 200, 500, 5, 320) if superplm.mha == "heads" else Arch(3, 200, 500, 12, 216)
    sub = extract(superplm, arch)
    d, C = arch.head_dim, arch.hidden
    for i in range(arch.layers):
        big, small = superplm.layers[i], sub.layers[i]
        for name in ("q", "k", "v"):
            W, b = getattr(big, name).weight, getattr(big, name).bias
            if superplm.mha == "heads":  # Figure 3(b): a contiguous top-left block
                want_w, want_b = W[:arch.qkv, :C], b[:arch.qkv]
            else:  # Figure 3(c): the first d rows of each of the 12 per-head blocks of 64
                want_w = torch.cat([W[64 * j:64 * j + d, :C] for j in range(12)])
                want_b = torch.cat([b[64 * j:64 * j + d] for j in range(12)])
            assert torch.equal(getattr(small, name).weight, want_w)
            assert torch.equal(getattr(small, name).bias, want_b)
        Wo = big.o.weight
        want_o = Wo[:C, :arch.qkv] if superplm.mha == "heads" else \
            torch.cat([Wo[:C, 64 * j:64 * j + d] for j in range(12)], dim=1)
        assert torch.equal(small.o.weight, want_o)
        assert torch.equal(small.fc1.weight, big.fc1.weight[:arch.ffn, :C])
        assert torch.equal(small.fc2.weight, big.fc2.weight[:C, :arch.ffn])
        assert torch.equal(small.ln2.bias, big.ln2.bias[:C])
    assert torch.equal(sub.word.weight, superplm.word.weight[:, :C])
    assert torch.equal(sub.mlm_dense.weight, superplm.mlm_dense.weight[:C, :C])
    assert len(sub.layers) == arch.layers


def test_in_place_slice_gradients_are_switched_on_explicitly_and_sum_as_autograd():
    """model.sub is plain slicing unless in_place_grads() is entered: a preallocated .grad alone changes nothing.
    Inside, a block's gradient is added into p.grad's block, exactly autograd's sum (two uses of one weight, as
    the tied embedding and decoder, included), a whole tensor's too; a frozen weight stays plain autograd."""
    torch.manual_seed(0)
    p, frozen = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8)
    a, b = torch.randn(3, 4), torch.randn(2, 8)

    def loss():
        return (sub(p, 3, 4) * a).sum() + (sub(p, 2, 8) * b).sum() ** 2 + (sub(frozen, 3, 4) * a).sum()

    grads = {}
    for in_place in (False, True):
        p.grad = torch.zeros_like(p)  # as superplm.flat_grads leaves them
        with in_place_grads() if in_place else contextlib.nullcontext():
            kinds = {type(sub(p, 3, 4).grad_fn).__name__, type(sub(frozen, 3, 4)).__name__}
            whole = sub(p, 6, 8)
            assert (type(whole.grad_fn).__name__ == "_AddToGradBackward") if in_place else whole is p
            assert sub(frozen, 6, 8) is frozen
            loss().backward()
        assert kinds == ({"_AddToGradBackward", "Tensor"} if in_place else {"SliceBackward0", "Tensor"})
        grads[in_place] = p.grad.clone()
    assert torch.equal(grads[True], grads[False]) and grads[True][3:].abs().sum() == 0 and grads[True].abs().sum() > 0
    with pytest.raises(RuntimeError), in_place_grads():
        raise RuntimeError  # the switch goes back off on the way out, an error included
    assert type(sub(p, 3, 4).grad_fn).__name__ == "SliceBackward0"


def test_linear_and_embedding_compute_a_blocks_gradient_in_place_with_autograds_sums():
    """model.linear multiplies a block's gradient into p.grad (addmm_) and model.embedding adds only the rows used,
    summed per token first: bit for bit autograd's, whether or not the input needs a gradient; under autocast both
    leave it to autograd (the matmul runs on a bf16 copy of the block)."""
    torch.manual_seed(0)
    w, b, emb = (torch.randn(*shape, requires_grad=True) for shape in ((6, 8), (6,), (10, 8)))
    x, ids = torch.randn(2, 5, 4), torch.tensor([[3, 1, 3, 0, 3], [1, 9, 9, 3, 0]])  # repeated tokens
    a, c = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    grads, kinds = {}, {}
    for in_place in (False, True):
        for p in (w, b, emb):
            p.grad = torch.zeros_like(p)
        with in_place_grads() if in_place else contextlib.nullcontext():
            y, e = linear(x, sub(w, 3, 4), sub(b, 3)), embedding(ids, sub(emb, 10, 4))
            kinds[in_place] = (type(y.grad_fn).__name__, type(e.grad_fn).__name__)
            ((y * a).sum() + (e * c).sum() ** 2).backward()
            with torch.autocast("cpu", torch.bfloat16):
                assert type(linear(x, sub(w, 3, 4), sub(b, 3)).grad_fn).__name__ != "_LinearIntoBackward"
        grads[in_place] = [p.grad.clone() for p in (w, b, emb)]
    assert kinds == {False: ("ViewBackward0", "EmbeddingBackward0"),
                     True: ("_LinearIntoBackward", "_EmbeddingIntoBackward")}
    assert all(torch.equal(g, h) for g, h in zip(grads[True], grads[False]))
    assert grads[True][0][3:].abs().sum() == 0 and grads[True][0][:3, :4].abs().sum() > 0


def test_archs_that_do_not_fit_are_rejected(superplm):
    ids = torch.zeros(1, 4, dtype=torch.long)
    bad = [Arch(9, 768, 3072, 12, 768), Arch(2, 800, 1024, 12, 768), Arch(2, 512, 4000, 12, 768)]
    bad += [Arch(2, 512, 1024, 8, 256)] if superplm.mha == "heads" else [Arch(2, 512, 1024, 8, 512)]
    bad += [Arch(2, 512, 1024, 12, 1536)]
    for arch in bad:
        with pytest.raises(UserError, match="does not fit"):
            superplm(ids, arch=arch)
        with pytest.raises(UserError, match="does not fit"):
            extract(superplm, arch)


def test_scores_path_matches_the_fused_attention_path(superplm):
    ids, mask, types = batch()
    arch = space_of(superplm).sample(random.Random(3))
    with torch.no_grad():
        h, scores = superplm(ids, mask, types, arch=arch, return_scores=True)
        assert scores.shape == (2, arch.heads, 12, 12)
        assert (h - superplm(ids, mask, types, arch=arch)).abs().max() <= 1e-5


def test_padding_does_not_change_the_real_tokens():
    torch.manual_seed(0)
    model = Bert(Arch(2, 64, 128, 4, 64), vocab_size=VOCAB, max_position=64).eval()
    ids, _, _ = batch(B=1, T=10)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], 1).long()
    with torch.no_grad():
        assert (model(padded, mask)[:, :10] - model(ids)).abs().max() <= 1e-5


def test_config_round_trip_and_bert_base_size():
    model = Bert(Arch(2, 64, 96, 4, 64), vocab_size=VOCAB, mha="dims", max_position=64)
    again = Bert.from_config(model.config())
    assert again.config() == model.config() and again.mha == "dims"
    with torch.device("meta"):
        base = Bert(BERT_BASE)
    encoder = sum(p.numel() for n, p in base.named_parameters() if not n.startswith("mlm"))
    assert encoder == 109_482_240 - 768 * 768 - 768  # bert-base-uncased's BertModel, less its pooler
