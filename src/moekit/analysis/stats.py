"""Routing statistics from the counts a RoutingCollector gathered (pure functions).

Shape letters: E experts, V vocabulary, C byte classes.
"""

from __future__ import annotations

import math
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


def token_label(v: int, vocab_size: int) -> str:
    if vocab_size <= 256:
        return repr(chr(v)) if v < 128 else f"0x{v:02x}"
    return str(v)


def top_lift(counts_XE: Tensor, base_X: Tensor, e: int, labels: list[str], top: int,
             min_count: int) -> list[dict[str, Any]]:
    """Items expert e receives most often relative to their base frequency (ties: the
    more frequent item first). ``routed``: the fraction of the item's occurrences that
    went to e (for top-K routing up to 1 per slot)."""
    c = counts_XE[:, e].double()
    share = c / c.sum().clamp_min(1e-30)
    base = base_X.double() / base_X.sum().clamp_min(1e-30)
    lift = torch.where(base > 0, share / base.clamp_min(1e-30), torch.zeros_like(share))
    ok = ((c >= min_count) & (lift > 0)).nonzero().flatten().tolist()
    ok.sort(key=lambda i: (round(float(lift[i]), 9), float(c[i])), reverse=True)
    return [{"item": labels[i], "count": int(c[i]), "share": float(share[i]),
             "base_share": float(base[i]), "lift": float(lift[i]),
             "routed": float(c[i] / base_X[i])} for i in ok[:top]]


def specialisation(layer: LayerRouting, base_V: Tensor, base_CC: Tensor | None, top: int,
                   min_count: int) -> dict[str, Any]:
    V, E = layer.token_VE.shape
    labels = [token_label(v, V) for v in range(V)]
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
        item = {"expert": e, "tokens": top_lift(layer.token_VE, base_V, e, labels, top,
                                                min_count)}
        if pattern_XE is not None and base_CC is not None:
            item["patterns"] = top_lift(pattern_XE, base_CC.reshape(-1), e, pattern_labels,
                                        top, min_count)
        experts.append(item)
    out["experts"] = experts
    return out


def summarise(layer: LayerRouting, base_V: Tensor, base_CC: Tensor | None, top: int = 5,
              min_count: int = 5) -> dict[str, Any]:
    """Everything the report shows about one MoE layer, as plain Python values."""
    check_positive_int("top", top)  # 0 listed nothing, -1 all items but the last
    check_positive_int("min_count", min_count)
    E = layer.num_experts
    lift_EE = coactivation_lift(layer.co_EE, layer.tokens)
    entropy = layer.entropy_sum / max(layer.tokens, 1)
    return {
        "name": layer.name, "num_experts": E, "top_k": layer.top_k, "tokens": layer.tokens,
        "pairs": layer.pairs, "load": layer.load_E.tolist(),
        "load_share": (layer.load_E.double() / max(layer.pairs, 1)).tolist(),
        "imbalance": imbalance(layer.load_E),
        "dropped_fraction": layer.dropped / layer.drop_denominator
        if layer.drop_denominator else 0.0,
        "router_entropy_nats": entropy,
        "router_entropy_normalised": entropy / math.log(E) if E > 1 else 0.0,
        "coactivation": layer.co_EE.tolist(), "coactivation_lift": lift_EE.tolist(),
        "specialisation": specialisation(layer, base_V, base_CC, top, min_count),
    }
