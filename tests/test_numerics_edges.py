"""Numerical edge cases of the MoE layer as a demanding user meets them: ties in the
router's scores (a zero router, zero tokens), every backend and router against the
per-token reference (tests/reference.py, whose tie rule is the lower index first).

Shape letters: T tokens, D hidden, E experts, K experts per token, R rows, N candidates.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.routing import topk
from moekit.routing.topk import top_indices
from tests.reference import ref_moe

D, F, E = 32, 16, 8


def _oracle_top(row: list[float], k: int) -> list[int]:
    """The k largest, largest first, equal values in index order, NaN the largest."""
    return sorted(range(len(row)), key=lambda i: (not math.isnan(row[i]),
                                                  -row[i] if not math.isnan(row[i]) else 0,
                                                  i))[:k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("everywhere", [False, True], ids=["cpu", "compiled"])
@pytest.mark.parametrize("N,k", [(8, 1), (8, 2), (8, 7), (8, 8), (5, 3), (64, 8)])
def test_top_indices_ties_go_to_the_lower_index(N, k, everywhere, dtype, monkeypatch):
    """Keys of a few values (most rows tie at the k-th), +-inf, one NaN in some rows;
    ``everywhere``: the path of CUDA and torch.compile, which recomputes every tied row
    without asking the host whether any row ties."""
    if everywhere:
        monkeypatch.setattr(topk.torch.compiler, "is_compiling", lambda: True)
    gen = torch.Generator().manual_seed(N * 100 + k)
    key_RN = torch.randint(-2, 3, (200, N), generator=gen).to(dtype)
    key_RN[3] = 0.0  # a zero router, a zero token
    key_RN[5, 1] = float("inf")
    key_RN[6, :2] = float("-inf")
    if k >= 2:  # one NaN: topk counts it as the largest, so the tie rule still decides
        key_RN[7::9, N // 2] = float("nan")
    got = top_indices(key_RN, k)
    want = [_oracle_top(row, k) for row in key_RN.tolist()]
    assert got.tolist() == want


# -- ties reach the layer: forward, infer and the reference choose the same experts --------

TIE_ROUTERS = {
    "softmax": dict(router="softmax"),
    "softmax_unnormalised": dict(router="softmax", renormalize=False),
    "softmax_topk": dict(router="softmax_topk"),
    "sigmoid": dict(router="sigmoid"),
    "sigmoid_bias": dict(router="sigmoid", bias_update_rate=0.01),  # bias 0: ties remain
    "switch": dict(router="switch", top_k=1),
    "noisy_topk": dict(router="noisy_topk"),
    "softmax_groups": dict(router="softmax", num_groups=4, topk_groups=2),
    "sigmoid_groups": dict(router="sigmoid", num_groups=4, topk_groups=2),
    "expert_choice": dict(router="expert_choice"),
}


def _tied_layer(over: dict, backend: str, case: str) -> tuple[MoE, torch.Tensor]:
    """Expert biases make every expert's output differ even for a zero token, so the
    choice among tied experts shows in the output."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=over.pop("top_k", 2),
                        expert_bias=True, **over), backend=backend).eval()
    with torch.no_grad():
        moe.experts.b_in.normal_()
        moe.experts.b_out.normal_()
        if case == "zero router":
            moe.router.weight.zero_()
    x = torch.randn(11, D)
    x[[2, 7]] = 0.0  # zero (padding) tokens: every logit 0
    return moe, x


@pytest.mark.parametrize("case", ["zero router", "zero tokens"])
@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm"])
@pytest.mark.parametrize("name", list(TIE_ROUTERS))
def test_tied_scores_route_as_the_reference_in_forward_and_infer(name, backend, case):
    """torch.topk broke ties by its algorithm (experts [6, 5] of 8 for a zero row) where
    the reference and infer's decode kernel take the lower index: a zero-initialised
    router sent every token elsewhere in forward than in infer (max difference 5.7 on
    outputs of 3.8), and zero tokens differed with expert biases."""
    moe, x = _tied_layer(dict(TIE_ROUTERS[name]), backend, case)
    want, _, _ = ref_moe(moe, x)
    xg = x.clone().requires_grad_()  # the training backends' forward
    got = moe(xg).output.detach()
    with torch.inference_mode():
        inferred = moe.infer(x)
    bound = 1e-5 + 1e-4 * want.abs().max().item()  # test_layer's fp32 tolerance
    assert (got - want).abs().max().item() <= bound
    assert (inferred - want).abs().max().item() <= bound


# -- a NaN token's score ranks last where tokens compete for capacity ---------------------

NAN_RANKED = {
    "expert_choice": dict(router="expert_choice"),
    "expert_choice_tight": dict(router="expert_choice", capacity_factor=0.5),  # C = 1
    "probability": dict(router="softmax", capacity_factor=1.0, drop_policy="probability"),
}


@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm"])
@pytest.mark.parametrize("name", list(NAN_RANKED))
def test_a_nan_token_takes_no_capacity_from_finite_ones(name, backend):
    """Expert choice and the probability drop policy rank tokens by score, and a NaN
    score ranked first (topk and a descending sort put NaN on top): one token with a
    NaN took a slot of every expert, and at capacity 1 every slot, zeroing the output
    of the 12 other tokens. A NaN score now ranks last, as in the reference."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=2, **NAN_RANKED[name]),
              backend=backend).eval()
    x = torch.randn(13, D)
    x[6, 3] = float("nan")
    good = torch.arange(13) != 6
    y = moe(x.clone().requires_grad_()).output.detach()
    want, _, (pairs, keep) = ref_moe(moe, x)
    if name.startswith("expert_choice"):  # (the case at stake: it lost every contest)
        assert not any(k for (t, _, _), k in zip(pairs, keep, strict=True) if t == 6)
    bound = 1e-5 + 1e-4 * want[good].abs().max().item()
    assert torch.isfinite(y[good]).all()
    assert (y[good] - want[good]).abs().max().item() <= bound
