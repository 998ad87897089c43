"""Bad input: a ValueError naming the argument, its value and what is allowed,
raised before any state changes."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig, MultiGateMoE

BASE = dict(dim=8, ffn_dim=4, num_experts=4, top_k=2)


@pytest.mark.parametrize("over,needle", [
    (dict(top_k=5), "top_k=5"),
    (dict(top_k=0), "top_k=0"),
    (dict(num_experts=513, top_k=1), "num_experts=513"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
    (dict(capacity_factor=float("nan")), "capacity_factor=nan"),
    (dict(router="topk"), "router='topk'"),
    (dict(activation="swish"), "activation='swish'"),
    (dict(drop_policy="random"), "drop_policy='random'"),
    (dict(dim=0), "dim=0"),
    (dict(ffn_dim=2.5), "ffn_dim=2.5"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef=-0.1"),
    (dict(num_groups=3), "num_groups=3"),
    (dict(num_groups=2, topk_groups=3), "topk_groups=3"),
    (dict(router="switch"), "top_k=2"),
    (dict(router="hash"), "hash_vocab_size=None"),
    (dict(jitter_eps=1.5), "jitter_eps=1.5"),
    (dict(routed_scaling_factor=0), "routed_scaling_factor=0"),
    (dict(num_shared_experts=-1), "num_shared_experts=-1"),
    (dict(num_groups=2, router="softmax_topk"), "num_groups=2"),
    # these routers ignore a selection bias: the balancing was silently off
    (dict(router="hash", hash_vocab_size=10, bias_update_rate=0.01), "bias_update_rate=0.01"),
    (dict(router="expert_choice", bias_update_rate=0.01), "bias_update_rate=0.01"),
    (dict(jitter_eps=0.1), "jitter_eps=0.1"),  # only switch jitters: silently ignored
    (dict(router="noisy_topk", jitter_eps=0.1), "jitter_eps=0.1"),
])
def test_config_rejects(over, needle):
    with pytest.raises(ValueError, match="not allowed") as err:
        MoEConfig(**{**BASE, **over})
    assert needle in str(err.value)


def test_config_bounds_accept_the_extremes():
    MoEConfig(dim=8, ffn_dim=4, num_experts=1, top_k=1)
    MoEConfig(dim=8, ffn_dim=4, num_experts=512, top_k=512)
    with pytest.raises(ValueError, match="unknown keys"):
        MoEConfig.from_dict({**BASE, "experts": 3})
    cfg = MoEConfig(**BASE, capacity_factor=1.25)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg


def _snapshot(moe):
    return {k: v.clone() for k, v in moe.state_dict().items()}


def _unchanged(moe, before):
    return all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())


@pytest.mark.parametrize("x,needle", [
    (torch.randn(3, 7), "x.shape=(3, 7)"),
    (torch.randint(0, 5, (3, 8)), "x.dtype=torch.int64"),
    (torch.randn(()), "x.shape=()"),
])
def test_forward_rejects_bad_input(x, needle):
    moe = MoE(MoEConfig(**BASE, bias_update_rate=0.1)).train()
    before = _snapshot(moe)
    with pytest.raises(ValueError, match="not allowed") as err:
        moe(x)
    assert needle in str(err.value)
    assert _unchanged(moe, before)  # the load buffer did not move


def test_non_finite_input_rejected_only_when_checking():
    x = torch.randn(5, 8)
    x[2, 3] = float("nan")
    moe = MoE(MoEConfig(**BASE, check_finite=True, bias_update_rate=0.1)).train()
    before = _snapshot(moe)
    with pytest.raises(ValueError, match="NaN or inf"):
        moe(x)
    assert _unchanged(moe, before)
    MoE(MoEConfig(**BASE))(x)  # without the check it runs (and propagates NaN)


def test_hash_router_needs_valid_token_ids():
    moe = MoE(MoEConfig(**BASE, router="hash", hash_vocab_size=10))
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="token_ids=None"):
        moe(x)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        moe(x, token_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[10, 10\].*hash_vocab_size=10"):
        moe(x, token_ids=torch.full((2, 3), 10))
    assert moe(x, token_ids=torch.full((2, 3), 9)).output.shape == x.shape


def test_module_arguments_rejected():
    with pytest.raises(ValueError, match="backend='fast'"):
        MoE(MoEConfig(**BASE), backend="fast")
    with pytest.raises(ValueError, match="config=dict"):
        MoE(dict(BASE))
    with pytest.raises(ValueError, match="num_tasks=0"):
        MultiGateMoE(MoEConfig(**BASE), num_tasks=0)
