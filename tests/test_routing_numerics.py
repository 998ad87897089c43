"""Numerically safe routing: selection follows the rule computed in fp64 at logit
scales where fp32 scores saturate (sigmoid -> 1.0, softmax -> 0.0), and
renormalised weights sum to 1 even when every score underflows.

Shape letters: T tokens, D hidden, E experts, K experts per token, G groups.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.routing.token_choice import sigmoid_topk, softmax_topk
from tests.reference import assert_valid_selection, ref_selection_key

T, D, E = 256, 32, 16

ROUTERS = [
    # (router overrides,                                    x scale)
    (dict(router="softmax", top_k=4), 1e4),
    (dict(router="softmax", top_k=4, renormalize=False), 1e4),
    (dict(router="softmax", top_k=4), 300.0),  # gaps of ~100-700: 0 in fp32, not in fp64
    (dict(router="softmax", top_k=4, num_groups=4, topk_groups=2), 1e4),
    (dict(router="sigmoid", top_k=4), 100.0),
    (dict(router="sigmoid", top_k=4, num_groups=4, topk_groups=2), 100.0),
    (dict(router="switch", top_k=1), 1e4),
]


def _route(over, scale, dtype, bias):
    torch.manual_seed(0)
    rate = dict(bias_update_rate=1e-3) if bias and over["router"] != "sigmoid" else {}
    moe = MoE(MoEConfig(dim=D, ffn_dim=8, num_experts=E, **over, **rate)).to(dtype)
    bias_E = None
    if moe.router.expert_bias is not None:
        # as update_bias leaves it: whole steps of the rate, so experts share values
        bias_E = torch.randint(-3, 4, (E,)) * 1e-3 if bias else torch.zeros(E)
        moe.router.expert_bias.copy_(bias_E)
    x_TD = (torch.randn(T, D) * scale).to(dtype)
    plan = moe.router(x_TD).plan
    return moe.config, plan, bias_E


@pytest.mark.parametrize("over,scale", ROUTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_selection_follows_the_fp64_rule(over, scale, dtype, bias):
    cfg, plan, bias_E = _route(over, scale, dtype, bias)
    K = cfg.top_k
    experts_TK = plan.expert_S.view(T, K)
    score = "sigmoid" if cfg.router == "sigmoid" else "softmax"
    # the sigmoid router always holds a bias (zeros = none) and ranks score + bias
    key_TE = ref_selection_key(plan.logits_TE, score, bias_E, cfg.num_groups)
    assert_valid_selection(experts_TK, key_TE, cfg.num_groups, cfg.topk_groups,
                           "top2_sum" if score == "sigmoid" else "max")
    # weights come from the fp64 scores of the chosen experts (the router's logits are fp32)
    lg_TK = plan.logits_TE.double().gather(1, experts_TK)
    if score == "sigmoid":
        s_TK = torch.sigmoid(lg_TK)
        want = s_TK / s_TK.sum(-1, keepdim=True) if cfg.renormalize else s_TK
    elif cfg.renormalize and cfg.router != "switch":
        want = lg_TK.softmax(-1)  # p_k / sum_j p_j, with no 0/0 where fp64 p underflows
    else:
        want = plan.logits_TE.double().softmax(-1).gather(1, experts_TK)
    torch.testing.assert_close(plan.weight_S.view(T, K).double(), want, atol=1e-6, rtol=1e-5)


def test_underflowing_sigmoid_scores_still_renormalise():
    """Every sigmoid score is 0 in fp32 at logits near -200; fp64 still orders them."""
    g = torch.Generator().manual_seed(1)
    logits_TE = -200.0 + torch.randn(64, 8, generator=g)
    experts_TK, weights_TK, probs_TE = sigmoid_topk(logits_TE, 3, bias_E=None)
    s_TE = torch.sigmoid(logits_TE.double())
    assert_valid_selection(experts_TK, s_TE)
    s_TK = s_TE.gather(1, experts_TK)
    torch.testing.assert_close(weights_TK.double(), s_TK / s_TK.sum(-1, keepdim=True),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs_TE.double(), s_TE / s_TE.sum(-1, keepdim=True),
                               atol=1e-6, rtol=1e-5)


def test_biased_selection_of_underflowed_softmax_still_renormalises():
    """A bias can pick experts whose fp32 probabilities are all 0: weights still sum to 1."""
    logits_TE = torch.tensor([[0.0, -500.0, -600.0, -700.0]])
    bias_E = torch.tensor([-10.0, 1.0, 2.0, 0.0])
    experts_TK, weights_TK, _ = softmax_topk(logits_TE, 2, bias_E=bias_E)
    assert sorted(experts_TK[0].tolist()) == [1, 2]
    torch.testing.assert_close(weights_TK.double(),
                               logits_TE.double().gather(1, experts_TK).softmax(-1),
                               atol=1e-6, rtol=0)
