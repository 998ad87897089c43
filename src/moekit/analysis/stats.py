"""Routing statistics from the counts a RoutingCollector gathered (pure functions).

Shape letters: E experts, V vocabulary, C byte classes, M rows of sums computed together.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.collect import CLASS_NAMES, LayerRouting
from moekit.config import check_positive_int


def imbalance(load_E: Tensor) -> dict[str, float]:
    """How far the expert loads are from uniform (1.0 / 0.0 = perfectly balanced)."""
    load = load_E.double()
    mean = load.mean().clamp_min(1e-12)
    share = load / load.sum().clamp_min(1e-12)
    E = load.numel()
    entropy = float(-(share * share.clamp_min(1e-30).log()).sum())
    return {"max_over_mean": float(load.max() / mean),
            "min_over_mean": float(load.min() / mean),
            "coefficient_of_variation": float(load.std(unbiased=False) / mean),
            "load_entropy_normalised": entropy / math.log(E) if E > 1 else 1.0,
            "starved_experts": int((load < 0.1 * mean).sum())}


def coactivation_lift(co_EE: Tensor, tokens: int) -> Tensor:
    """P(i and j) / (P(i) P(j)) per token: 1 = chosen independently, 0 = never together."""
    co = co_EE.double()
    diag = co.diagonal()
    expected = diag[:, None] * diag[None, :] / max(tokens, 1)
    return torch.where(expected > 0, co / expected.clamp_min(1e-30), torch.zeros_like(co))


def _symmetric_sums(w_E: Tensor, without_ME: Tensor, K: int) -> Tensor:
    """[M, K+1]: the elementary symmetric sums e_0..e_K of the weights w_E, leaving out
    in row m the experts where ``without_ME[m]`` is True (a sum over K-expert sets of the
    product of their weights; recomputed per row, never by subtraction, which cancels)."""
    e_MK = torch.zeros(without_ME.shape[0], K + 1, dtype=torch.float64)
    e_MK[:, 0] = 1.0
    for x in range(w_E.numel()):
        w_M = torch.where(without_ME[:, x], 0.0, w_E[x])
        e_MK[:, 1:] = e_MK[:, 1:] + w_M[:, None] * e_MK[:, :-1]
    return e_MK


def _max_entropy_weights(share_E: Tensor, K: int, iters: int = 2000) -> Tensor:
    """Weights w of the K-expert sets drawn with P(set) ~ prod of its w whose inclusion
    probabilities P(e in set) equal ``share_E`` (K times a load share): the multiplicative
    fit of Chen, Dempster and Liu (1994) for conditional Poisson sampling."""
    E = share_E.numel()
    none_1E, self_EE = torch.zeros(1, E, dtype=torch.bool), torch.eye(E, dtype=torch.bool)
    w_E = share_E.clone()
    for _ in range(iters):
        incl_E = w_E * _symmetric_sums(w_E, self_EE, K)[:, K - 1] \
            / _symmetric_sums(w_E, none_1E, K)[0, K]
        ratio_E = torch.where(incl_E > 0, share_E / incl_E.clamp_min(1e-300), 0.0)
        w_E = w_E * ratio_E
        w_E = w_E / w_E.max()
        if float((ratio_E[share_E > 0] - 1).abs().max()) < 1e-10:
            break
    return w_E


def coactivation_expected(co_EE: Tensor, tokens: int, top_k: int,
                          expert_choice: bool = False) -> Tensor:
    """Tokens expected to go to both i and j by chance, given each expert's load n_i
    (the diagonal of ``co_EE``); the diagonal of the result is that load.

    Chance for token choice (every token takes exactly K distinct experts, so experts
    cannot be chosen independently: uniform random top-2 of 8 gives P(i and j) /
    (P(i) P(j)) = 0.57, not 1) is the maximum-entropy routing with these loads: each
    token's K-expert set drawn with probability proportional to the product of per-expert
    weights fitted so that expert e is in a set with probability n_e / T. With equal loads
    that is a uniformly random K-set, T K (K-1) / (E (E-1)) per pair; 0 for K = 1, which
    has no pairs. For expert choice (each expert takes its own tokens, a token any
    number of experts) chance is independence, n_i n_j / T.
    """
    n_E = co_EE.double().diagonal().clone()
    E, T, K = n_E.numel(), max(tokens, 1), top_k
    if expert_choice:
        expected = n_E[:, None] * n_E[None, :] / T
    elif K < 2 or tokens == 0:
        expected = torch.zeros(E, E, dtype=torch.float64)
    else:
        w_E = _max_entropy_weights((n_E / T).clamp(0.0, 1.0), K)
        eye = torch.eye(E, dtype=torch.bool)
        both_without = (eye[:, None, :] | eye[None, :, :]).reshape(E * E, E)
        e_pair = _symmetric_sums(w_E, both_without, K)[:, K - 2].view(E, E)
        e_all = _symmetric_sums(w_E, torch.zeros(1, E, dtype=torch.bool), K)[0, K]
        expected = T * w_E[:, None] * w_E[None, :] * e_pair / e_all
    expected.diagonal().copy_(n_E)
    return expected


def coactivation_pairs(co_EE: Tensor, expected_EE: Tensor, tokens: int) -> list[dict[str, Any]]:
    """Every pair i < j, most tokens first: ``tokens`` routed to both, their ``share`` of
    all tokens, the ``expected`` count by chance (``coactivation_expected``),
    ``over_chance`` = tokens / expected (None where nothing is expected) and ``excess`` =
    tokens - expected, the tokens the pair's association accounts for."""
    E = co_EE.shape[0]
    out = []
    for i in range(E):
        for j in range(i + 1, E):
            c, x = int(co_EE[i, j]), float(expected_EE[i, j])
            out.append({"experts": [i, j], "tokens": c, "share": c / max(tokens, 1),
                        "expected": x, "over_chance": c / x if x > 0 else None,
                        "excess": c - x})
    out.sort(key=lambda p: (-p["tokens"], p["experts"]))
    return out


def mutual_information_bits(joint: Tensor) -> float:
    """I(X; expert) in bits from a count table whose last dimension is the expert."""
    p = joint.double().reshape(-1, joint.shape[-1])
    total = p.sum()
    if total == 0:
        return 0.0
    p = p / total
    px, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / (px * pe)[nz]).log2()).sum())


def entropy_bits(counts: Tensor) -> float:
    p = counts.double() / counts.sum().clamp_min(1e-30)
    return float(-(p[p > 0] * p[p > 0].log2()).sum())


def token_label(v: int, vocab_size: float) -> str:
    if vocab_size <= 256:
        return repr(chr(v)) if v < 128 else f"0x{v:02x}"
    return str(v)


def top_lift(counts_XE: Tensor, base_X: Tensor, e: int,
             labels: Sequence[str] | Callable[[int], str], top: int, min_count: int
             ) -> list[dict[str, Any]]:
    """Items expert e receives beyond chance, most ``excess`` first (ties: the more
    frequent item first): excess = count - expected, expected = the item's occurrences x
    the expert's share (its pairs / all occurrences), the count it would get if it took
    every item alike. ``lift`` = count / expected, the same ratio as the item's share of
    the expert's pairs / its share of the text; ranked by it, an item seen 7 times had led
    one seen 91 times. ``routed``: the fraction of the item's occurrences that went to e
    (for top-K routing up to 1 per slot). Items seen under ``min_count`` times are left out.
    ``labels``: the items' names, or a function of the item's index giving its name.
    """
    label = labels if callable(labels) else labels.__getitem__
    c = counts_XE[:, e].double()
    share = c / c.sum().clamp_min(1e-30)
    base = base_X.double() / base_X.sum().clamp_min(1e-30)
    expected = base_X.double() * (c.sum() / base_X.sum().clamp_min(1e-30))
    lift = torch.where(base > 0, share / base.clamp_min(1e-30), torch.zeros_like(share))
    excess = c - expected
    ok = ((c >= min_count) & (excess > 0)).nonzero().flatten().tolist()
    ok.sort(key=lambda i: (round(float(excess[i]), 9), float(c[i])), reverse=True)
    return [{"item": label(i), "count": int(c[i]), "expected": float(expected[i]),
             "excess": float(excess[i]), "share": float(share[i]),
             "base_share": float(base[i]), "lift": float(lift[i]),
             "routed": float(c[i] / base_X[i])} for i in ok[:top]]


def specialisation(layer: LayerRouting, base_V: Tensor, base_CC: Tensor | None, top: int,
                   min_count: int, label: Callable[[int], str] | None = None
                   ) -> dict[str, Any]:
    V, E = layer.token_VE.shape
    if label is None:
        label = functools.partial(token_label, vocab_size=V)
    out: dict[str, Any] = {
        "token_mutual_information_bits": mutual_information_bits(layer.token_VE),
        "expert_entropy_bits": entropy_bits(layer.load_E)}
    pattern_XE = None
    if base_CC is not None:
        C = len(CLASS_NAMES)
        pattern_XE = layer.pattern_CCE.view(C * C, E)
        out["pattern_mutual_information_bits"] = mutual_information_bits(pattern_XE)
        pattern_labels = [f"{a}>{b}" for a in CLASS_NAMES for b in CLASS_NAMES]
    experts = []
    for e in range(E):
        item = {"expert": e, "tokens": top_lift(layer.token_VE, base_V, e, label, top,
                                                min_count)}
        if pattern_XE is not None and base_CC is not None:
            item["patterns"] = top_lift(pattern_XE, base_CC.reshape(-1), e, pattern_labels,
                                        top, min_count)
        experts.append(item)
    out["experts"] = experts
    return out


def load_summary(layer: LayerRouting) -> dict[str, Any]:
    """One MoE layer's load and router entropy: the head of ``summarise``, all that
    ``analyze --compare`` reads of the second checkpoint (which had paid for its
    co-activation fit and per-expert lists too, and dropped them)."""
    E = layer.num_experts
    # a hash router has no scores: its "distribution" is 1/K on the table's K experts,
    # whose entropy is ln K by construction (it had read as 33% of the maximum at K=2, E=8)
    entropy = None if layer.router == "hash" else layer.entropy_sum / max(layer.tokens, 1)
    return {
        "name": layer.name, "num_experts": E, "top_k": layer.top_k,
        "vocab_size": layer.vocab_size, "tokens": layer.tokens,
        "pairs": layer.pairs, "load": layer.load_E.tolist(),
        "load_share": (layer.load_E.double() / max(layer.pairs, 1)).tolist(),
        "imbalance": imbalance(layer.load_E),
        "dropped_fraction": layer.dropped / layer.drop_denominator
        if layer.drop_denominator else 0.0,
        "router_entropy_nats": entropy,
        "router_entropy_normalised": None if entropy is None
        else entropy / math.log(E) if E > 1 else 0.0}


def summarise(layer: LayerRouting, base_V: Tensor, base_CC: Tensor | None, top: int = 5,
              min_count: int = 5, label: Callable[[int], str] | None = None
              ) -> dict[str, Any]:
    """Everything the report shows about one MoE layer, as plain Python values.
    ``label``: a token id's text (a tokenizer's); by default a byte's, or the id. Where
    given, ``token_text`` holds the text of every id that occurred (tokens.csv's)."""
    check_positive_int("top", top)  # 0 listed nothing, -1 all items but the last
    check_positive_int("min_count", min_count)
    lift_EE = coactivation_lift(layer.co_EE, layer.tokens)
    expected_EE = coactivation_expected(layer.co_EE, layer.tokens, layer.top_k,
                                        layer.router == "expert_choice")
    out = {
        **load_summary(layer),
        "coactivation": layer.co_EE.tolist(), "coactivation_lift": lift_EE.tolist(),
        "coactivation_expected": expected_EE.tolist(),
        "coactivation_pairs": coactivation_pairs(layer.co_EE, expected_EE, layer.tokens),
        "specialisation": specialisation(layer, base_V, base_CC, top, min_count, label),
        "token_counts": token_counts(layer.token_VE, base_V),
    }
    if label is not None:
        out["token_text"] = {str(v): label(v) for v in base_V.nonzero().flatten().tolist()}
    return out


def token_counts(token_VE: Tensor, base_V: Tensor) -> list[list[int]]:
    """Every (token id, expert) that occurred, as [token id, expert, pairs, occurrences of
    the token in the text], by token then expert: which tokens went where, in full."""
    nz = token_VE.nonzero().tolist()
    return [[v, e, int(token_VE[v, e]), int(base_V[v])] for v, e in nz]
