"""The MoE layer inside a user's own model: under CPU autocast, in eval and training.

Each routing decision is checked against the per-token oracle in tests/reference.py,
which recomputes it in fp32 from the raw parameters.

Shape letters: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from tests.reference import ref_pairs

D, F = 32, 16

LEARNED_ROUTERS = {
    # name: config overrides (every router with a learned gate)
    "softmax": dict(router="softmax", num_experts=8, top_k=2),
    "softmax_topk": dict(router="softmax_topk", num_experts=8, top_k=2),
    "switch": dict(router="switch", num_experts=8, top_k=1, jitter_eps=0.1),
    "noisy_topk": dict(router="noisy_topk", num_experts=8, top_k=2),
    "sigmoid_bias": dict(router="sigmoid", num_experts=16, top_k=4, bias_update_rate=1e-3),
    "groups": dict(router="sigmoid", num_experts=16, top_k=4, num_groups=4, topk_groups=2),
    "expert_choice": dict(router="expert_choice", num_experts=8, top_k=2),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(LEARNED_ROUTERS))
def test_routing_stays_fp32_under_autocast(name, train):
    """Autocast ran the router's [D -> E] projections (the gate, the noisy router's
    noise scale) in bf16: bf16 combine weights (errors ~5e-3) and, at T=4096, other
    experts for 0.4% of the tokens, against the fp32 routing the router documents."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, **LEARNED_ROUTERS[name])).train(train)
    if moe.router.expert_bias is not None:  # a bias that changes the choice
        moe.router.expert_bias.copy_(torch.randn(moe.config.num_experts) * 0.05)
    if moe.router.noise_weight is not None:  # noise that matters in training
        moe.router.noise_weight.data.normal_(0, 0.3)
    x_TD = torch.randn(64, D) * 4  # large logits: bf16 rounding moves weights by ~1e-2
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = moe.route(x_TD)[1].plan
    torch.manual_seed(1)  # replay the training noise draws for the reference
    jitter_u_TD = torch.rand(64, D) if train and name == "switch" else None
    noise_TE = torch.randn(64, 8) if train and name == "noisy_topk" else None
    pairs, _, _, _, _ = ref_pairs(moe, x_TD, None, jitter_u_TD, noise_TE)
    assert plan.weight_S.dtype == torch.float32
    assert plan.token_S.tolist() == [t for t, _, _ in pairs]
    assert plan.expert_S.tolist() == [e for _, e, _ in pairs]
    want = torch.stack([w for _, _, w in pairs]).detach()
    torch.testing.assert_close(plan.weight_S, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["softmax", "sigmoid_bias"])
def test_infer_matches_forward_under_autocast(name):
    """``infer`` (the decode kernel's fp32 routing) and ``forward`` route alike under
    autocast, so generation gives the output of the training-time forward in eval mode."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, **LEARNED_ROUTERS[name])).eval()
    x = torch.randn(2, 3, D) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        want = moe(x).output
        got = moe.infer(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)


def _assert_meta_built_like_cpu_built(cfg: MoEConfig) -> None:
    """Build on the meta device, ``to_empty``, then ``reset_parameters`` per module (the
    usual recipe for large models): the state equals a CPU-built layer's under one seed."""
    torch.manual_seed(0)
    want = MoE(cfg).state_dict()
    with torch.device("meta"):
        moe = MoE(cfg)
    moe.to_empty(device="cpu")
    for t in moe.state_dict().values():  # uninitialised memory, made visible
        t.fill_(float("nan") if t.is_floating_point() else -1)
    torch.manual_seed(0)
    for module in moe.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    got = moe.state_dict()
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_meta_built_layer_initialises_like_a_cpu_built_one():
    """The shared experts had no reset_parameters and kept uninitialised memory (NaN
    outputs), and the selection bias stayed garbage."""
    _assert_meta_built_like_cpu_built(MoEConfig(
        dim=D, ffn_dim=F, num_experts=8, top_k=2, router="sigmoid", bias_update_rate=1e-3,
        num_shared_experts=1, shared_expert_gate=True, expert_bias=True))


@pytest.mark.parametrize("kw", [
    dict(router="noisy_topk"),  # noise_weight: zeros on a CPU-built layer
    dict(router="hash", hash_vocab_size=50, hash_seed=3),  # the table, from its seed
], ids=["noisy_topk", "hash"])
def test_meta_built_router_state_initialises_like_a_cpu_built_one(kw):
    """The routers with more state than a gate: the noise gate and the hash table kept
    uninitialised memory (NaN noise; ids outside [0, E))."""
    _assert_meta_built_like_cpu_built(MoEConfig(dim=D, ffn_dim=F, num_experts=8, top_k=2,
                                                **kw))
