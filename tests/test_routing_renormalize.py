"""``renormalize`` in every router that takes it, against a few lines of plain torch.

True: the K chosen weights sum to 1 (Mixtral, Qwen3-MoE). False: the chosen experts'
softmax probabilities over all E, as OLMoE and Qwen2-MoE (``norm_topk_prob=False``)
use them. softmax_topk and noisy_topk had ignored False; Switch's top-1 gate is the
raw probability whatever the flag (Fedus et al. 2021); hash routing refuses False.
"""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.routing.router import Router


def _plain_torch(x_TD, w_ED, K, renormalize):
    """(experts_TK, weights_TK): top K of the logits; softmax over those K, or the
    full softmax's probabilities of the K."""
    logits_TE = x_TD @ w_ED.T
    top = logits_TE.topk(K, dim=-1)
    if renormalize:
        return top.indices, top.values.softmax(-1)
    return top.indices, logits_TE.softmax(-1).gather(1, top.indices)


@pytest.mark.parametrize("router", ["softmax", "softmax_topk", "noisy_topk"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (37, 7, 3), (12, 5, 5)])
def test_token_choice_weights_match_plain_torch(router, renormalize, T, E, K):
    cfg = moekit.MoEConfig(dim=16, ffn_dim=8, num_experts=E, top_k=K, router=router,
                           renormalize=renormalize)
    torch.manual_seed(0)
    r = Router(cfg).eval()  # noisy_topk draws no noise in eval
    x = torch.randn(T, 16)
    plan = r(x).plan
    experts, weights = _plain_torch(x, r.weight.detach(), K, renormalize)
    torch.testing.assert_close(plan.expert_S.view(T, K).sort(-1).values,
                               experts.sort(-1).values, rtol=0, atol=0)
    got = plan.weight_S.view(T, K).gather(1, plan.expert_S.view(T, K).argsort(-1))
    want = weights.gather(1, experts.argsort(-1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if not renormalize and K < E:  # the raw probabilities: they need not sum to 1
        assert (plan.weight_S.view(T, K).sum(-1) < 1 - 1e-4).all()


@pytest.mark.parametrize("router", ["softmax", "softmax_topk", "noisy_topk"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_layer_infer_route_kernel_honours_renormalize(router, renormalize):
    """The decode step's one-call routing (MoE.infer -> decode.route_sort) gives the
    same output as the layer's forward, which the test above ties to plain torch."""
    cfg = moekit.MoEConfig(dim=16, ffn_dim=8, num_experts=6, top_k=2, router=router,
                           renormalize=renormalize)
    torch.manual_seed(0)
    moe = moekit.MoE(cfg).eval()
    assert moe.router.kernel_spec() == (0, renormalize, None)
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = moe(x).output
    with torch.inference_mode():
        got = moe.infer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_switch_gate_is_the_raw_top1_probability(renormalize):
    cfg = moekit.MoEConfig(dim=16, ffn_dim=8, num_experts=4, top_k=1, router="switch",
                           renormalize=renormalize)
    torch.manual_seed(0)
    r = Router(cfg).eval()
    x = torch.randn(9, 16)
    _, weights = _plain_torch(x, r.weight.detach(), 1, renormalize=False)
    torch.testing.assert_close(r(x).plan.weight_S, weights.view(-1), rtol=1e-5, atol=1e-6)


def test_hash_router_refuses_renormalize_false():
    with pytest.raises(ValueError, match=r"renormalize=False is not allowed: "
                                         r"router='hash'.*1/K"):
        moekit.MoEConfig(dim=16, ffn_dim=8, num_experts=4, top_k=2, router="hash",
                         hash_vocab_size=10, renormalize=False)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (37, 7, 3), (12, 5, 5)])
def test_softmax_topk_without_probs_chooses_and_weighs_the_same(renormalize, T, E, K):
    """``probs=False`` (the Hugging Face routers, which drop probs_TE): the same bits as
    plain torch, and no softmax over all E where renormalising leaves it unused."""
    from moekit.routing.token_choice import softmax_topk

    torch.manual_seed(T)
    x, w = torch.randn(T, 16), torch.randn(E, 16)
    experts, weights, probs = softmax_topk(x @ w.T, K, renormalize=renormalize, ties="topk",
                                           probs=False)
    want_experts, want_weights = _plain_torch(x, w, K, renormalize)
    assert torch.equal(experts, want_experts) and torch.equal(weights, want_weights)
    assert (probs is None) == renormalize
