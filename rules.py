"""Architectures by a rule instead of by a search: AutoTinyBERT-Fast (§4.4) and BERT's default rule (BERT-S).

§4.4 finds that the searched architectures follow 1.6 dm <= df <= 1.9 dm and 0.7 dm <= dqkv <= 1.0 dm:
AutoTinyBERT-Fast scores only the rule's architecture nearest the latency budget of each layer count (8 candidates
instead of 100; search.py --method fast). BERT-S (Table 1's baseline) takes BERT's own shape (ffn = 4 hidden,
qkv = hidden) at a latency instead.
"""

from common import UserError
from evaluators import Evaluations, ranked
from model import Arch

FFN_RULE, QKV_RULE = (1.6, 1.9), (0.7, 1.0)  # §4.4: 1.6 dm <= df <= 1.9 dm and 0.7 dm <= dqkv <= 1.0 dm


def follows_rule(arch):
    return (FFN_RULE[0] * arch.hidden <= arch.ffn <= FFN_RULE[1] * arch.hidden
            and QKV_RULE[0] * arch.hidden <= arch.qkv <= QKV_RULE[1] * arch.hidden)


def fast_candidates(space, budget):
    """For each layer count, the architecture of the rule nearest the budget from below (§4.4: "we only need to test
    one architecture at each layer number"). Latency grows with every dimension, so for each (layers, hidden,
    heads, qkv) the largest ffn within budget is found by bisection, scanning hidden from the top down and stopping
    once a hidden's largest rule shape fits (no smaller hidden can come nearer)."""
    attention = sorted(((q, h) for h in space.heads for q in (space.qkv or (space.head_dim * h,)) if q % h == 0))
    out = []
    for layers in space.layers:
        best = None
        for hidden in sorted(space.hidden, reverse=True):
            ffns = [f for f in space.ffn if FFN_RULE[0] * hidden <= f <= FFN_RULE[1] * hidden]
            qhs = [(q, h) for q, h in attention if QKV_RULE[0] * hidden <= q <= QKV_RULE[1] * hidden]
            shape = lambda f, qh: Arch(layers, hidden, f, qh[1], qh[0])  # noqa: E731
            if not ffns or not qhs or not budget.meets(shape(ffns[0], qhs[0])):
                continue  # even this hidden's smallest rule shape is too slow
            for qh in qhs:
                lo, hi = 0, len(ffns)  # bisection: ffns[:lo] meet the budget, ffns[hi:] do not
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (mid + 1, hi) if budget.meets(shape(ffns[mid], qh)) else (lo, mid)
                if lo and (best is None or budget(shape(ffns[lo - 1], qh)) > budget(best)):
                    best = shape(ffns[lo - 1], qh)
            if budget.meets(shape(ffns[-1], qhs[-1])):
                break
        if best is not None:
            out.append(best)
    return out


def fast_search(space, score, budget, seed=0, cache=None, on_generation=None):
    """AutoTinyBERT-Fast (§4.4): score only the rule's candidate of each layer count and rank them."""
    archs = fast_candidates(space, budget)
    if not archs:
        raise UserError(f"no architecture following the rule of §4.4 meets {budget.budget_ms:.3g} ms; choose a "
                        "lower speedup target or --method evolve")
    evals = Evaluations(score, budget, cache)
    evals(archs, generation=1)
    if on_generation:
        on_generation(ranked(evals.done))
    return ranked(evals.done)



# ----------------------------------------------------------------------------- BERT's default rule: Table 1's BERT-S


def default_rule(layers, hidden):
    """BERT's conventional shape (§3.3): qkv = hidden, ffn = 4 x hidden, heads of 64 dimensions."""
    return Arch(layers, hidden, 4 * hidden, hidden // 64, hidden)


def bert_s(ms, latency, layers=4):
    """BERT-S at a latency (Table 1's baseline): the default-rule shape of `layers` layers, hidden 64 to 768, whose
    latency predicted by `latency` (a latency.LatencyPredictor) is closest to `ms` from below; the smallest when
    none is below."""
    shapes = [default_rule(layers, 64 * k) for k in range(1, 13)]
    pred = latency.predict(shapes)
    below = [k for k in range(len(shapes)) if pred[k] <= ms]
    return shapes[max(below, key=lambda k: pred[k]) if below else 0]
