"""moekit.experts.reference.reference_experts, the row-by-row expert oracle the CPU
benchmark times and backends.py says every backend must agree with, had no test (0% line
coverage): its output and gradients against tests/reference.py's per-token MoE, which
routes, applies capacity and computes the experts with code of its own.

Shape letters: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.experts.reference import reference_experts
from tests.reference import ref_moe

CASES = [
    # (T, E, K, extra config)                                     what it exercises
    (1, 4, 1, {}),                                                # a single token
    (37, 7, 3, {"activation": "geglu", "expert_bias": True}),     # odd T, prime E, biases
    (24, 5, 5, {"activation": "relu2"}),                          # K == E, not a GLU
    (40, 6, 2, {"capacity_factor": 0.5}),                         # rows dropped by position
    (40, 6, 2, {"capacity_factor": 0.5, "drop_policy": "probability",
                "activation": "swiglu_oai", "expert_bias": True}),
    (30, 8, 2, {"activation": "gelu", "router": "sigmoid", "routed_scaling_factor": 2.5}),
]


def _layer(E: int, K: int, extra: dict, dtype: torch.dtype) -> MoE:
    torch.manual_seed(E * 10 + K)
    moe = MoE(MoEConfig(dim=16, ffn_dim=12, num_experts=E, top_k=K, **extra), backend="loop")
    with torch.no_grad():
        for p in moe.parameters():  # biases start at 0: give them values that show
            p.normal_(0, 0.3)
    return moe.to(dtype)


@pytest.mark.parametrize("T,E,K,extra", CASES)
@pytest.mark.parametrize("dtype,atol,rtol", [
    (torch.float32, 1e-5, 1e-4),
    (torch.float64, 1e-12, 1e-10),
])
def test_reference_experts_matches_the_per_token_oracle(T, E, K, extra, dtype, atol, rtol):
    moe = _layer(E, K, extra, dtype)
    x_TD = torch.randn(T, 16, dtype=dtype, generator=torch.Generator().manual_seed(T))
    x_TD.requires_grad_(True)
    _, _, dispatch, _ = moe.route(x_TD)
    got = reference_experts(moe.experts, x_TD, dispatch)
    want, _, (pairs, keep) = ref_moe(moe, x_TD)
    if "capacity_factor" in extra:
        assert not all(keep)  # the case drops rows, so the oracle's cut is what is checked
    torch.testing.assert_close(got, want.to(dtype), atol=atol, rtol=rtol)

    g = torch.randn_like(got)
    inputs = [x_TD, *(p for p in moe.experts.parameters())]
    got_grads = torch.autograd.grad(got, inputs, g, allow_unused=True)
    want_grads = torch.autograd.grad(want, inputs, g.to(want.dtype), allow_unused=True)
    for name, a, b in zip(["x", "w_in", "w_out", "b_in", "b_out"], got_grads, want_grads,
                          strict=False):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b.to(dtype), atol=atol, rtol=rtol, msg=name)


def test_an_expert_with_no_rows_and_all_tokens_to_one_expert():
    """Expert 0's router row pushes every token to it (top-1): the other experts get no
    row, and the output is expert 0's FFN times each token's weight."""
    moe = _layer(4, 1, {}, torch.float32)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    x_TD = torch.rand(9, 16, generator=torch.Generator().manual_seed(0)) + 0.1  # sum > 0
    _, _, dispatch, _ = moe.route(x_TD)
    assert dispatch.counts_E.tolist() == [9, 0, 0, 0]
    got = reference_experts(moe.experts, x_TD, dispatch)
    want, _, _ = ref_moe(moe, x_TD)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
