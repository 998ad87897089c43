"""Balancing that lives outside forward, and the multi-gate module."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig, MultiGateMoE, attach_bias_update
from tests.reference import ref_moe


def test_bias_update_follows_the_deepseek_rule():
    moe = MoE(MoEConfig(dim=8, ffn_dim=4, num_experts=4, top_k=1, router="sigmoid",
                        bias_update_rate=0.01)).train()
    x = torch.randn(64, 8)
    moe(x)
    moe(x)
    load = moe.router.load.clone()
    assert load.sum().item() == 128  # two batches of 64 tokens, top-1
    moe.update_bias()
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.router.expert_bias, expected)
    assert moe.router.load.sum().item() == 0  # consumed
    moe.eval()
    moe(x)
    assert moe.router.load.sum().item() == 0  # eval does not accumulate


def test_bias_changes_selection_not_weights():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, ffn_dim=4, num_experts=4, top_k=1, router="sigmoid",
                        renormalize=False))
    x = torch.randn(32, 8)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([10.0, 0, 0, 0]))  # everyone picks 0
    plan = moe.router(x).plan
    assert plan.expert_S.tolist() == [0] * 32
    scores = torch.sigmoid(x @ moe.router.weight.detach().t())[:, 0]
    torch.testing.assert_close(plan.weight_S.detach(), scores)  # bias not in the weight


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=16, ffn_dim=8, num_experts=8, top_k=2, router="sigmoid",
                        bias_update_rate=0.02)).train()
    with torch.no_grad():
        moe.router.weight[0] += 1.0  # expert 0 favoured
    x = torch.randn(512, 16).abs()
    first = moe(x).stats.load_max_over_mean.item()
    for _ in range(100):
        moe.update_bias()
        moe(x)
    last = moe(x).stats.load_max_over_mean.item()
    assert first > 2.0 and last < 1.3, (first, last)


def test_optimizer_hook_runs_the_update():
    moe = MoE(MoEConfig(dim=8, ffn_dim=4, num_experts=4, top_k=1, router="softmax",
                        bias_update_rate=0.5)).train()
    opt = torch.optim.SGD(moe.parameters(), lr=0.0)
    handle = attach_bias_update(opt, moe)
    y, aux, _ = moe(torch.randn(40, 8))
    y.sum().backward()
    assert moe.router.load.sum() == 40
    opt.step()
    assert moe.router.load.sum() == 0 and moe.router.expert_bias.abs().sum() > 0
    handle.remove()


def test_sequence_loss_sees_sequences():
    """Two sequences each routed wholly to one expert: balanced overall, not per sequence."""
    from moekit.routing.losses import seq_aux_loss, switch_aux_loss
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 4)
    experts = torch.tensor([[0]] * 4 + [[1]] * 4)
    assert switch_aux_loss(probs, experts).item() == pytest.approx(1.0)
    per_seq = seq_aux_loss(probs.view(2, 4, 2), experts.view(2, 4, 1))
    assert per_seq.item() == pytest.approx(2 * 0.9)  # E * f * P = 2 * 1 * 0.9 per sequence


@pytest.mark.parametrize("top_k", [1, 4])
def test_multigate_each_task_equals_an_moe_with_that_gate(top_k):
    torch.manual_seed(0)
    cfg = MoEConfig(dim=8, ffn_dim=4, num_experts=4, top_k=top_k, aux_loss_coef=0.01)
    mmoe = MultiGateMoE(cfg, num_tasks=3)
    x = torch.randn(2, 5, 8, requires_grad=True)
    outs, aux, stats = mmoe(x)
    assert len(outs) == 3 and len(stats) == 3
    total_aux = 0.0
    for gate, out in zip(mmoe.gates, outs, strict=True):
        single = MoE(cfg)
        single.router.load_state_dict(gate.state_dict())
        single.experts.load_state_dict(mmoe.experts.state_dict())
        y_ref, aux_ref, _ = ref_moe(single, x)
        torch.testing.assert_close(out, y_ref, atol=1e-5, rtol=1e-4)
        total_aux += aux_ref
    torch.testing.assert_close(aux, total_aux, atol=1e-6, rtol=1e-5)
    (sum(o.sum() for o in outs) + aux).backward()
    assert all(g.weight.grad is not None for g in mmoe.gates)


def test_cli_demo_runs(capsys):
    from moekit.cli import main
    assert main(["demo", "--tokens", "64", "--dim", "32", "--ffn-dim", "16"]) == 0
    out = capsys.readouterr().out
    assert "tokens_per_expert" in out and "router_entropy" in out


def test_balancing_buffers_stay_fp32_under_dtype_casts():
    moe = MoE(MoEConfig(dim=8, ffn_dim=8, num_experts=4, top_k=1, router="sigmoid",
                        bias_update_rate=1e-3)).to(torch.bfloat16).train()
    assert moe.router.weight.dtype == torch.bfloat16
    assert moe.router.expert_bias.dtype == moe.router.load.dtype == torch.float32
    for _ in range(3):
        moe(torch.randn(300, 8, dtype=torch.bfloat16))
    assert moe.router.load.sum().item() == 900  # bf16 could not count past 256 exactly
    moe.update_bias()
    assert moe.router.expert_bias.abs().max().item() == pytest.approx(1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_balancing_buffers_keep_their_values_under_dtype_casts(dtype):
    """They stayed fp32 but went through the cast first: a load of 257 came back 256, a
    bias of 1e-3 + 1e-7 as bf16's nearest."""
    moe = MoE(MoEConfig(dim=8, ffn_dim=8, num_experts=4, top_k=1, router="sigmoid",
                        bias_update_rate=1e-3))
    bias = torch.tensor([1e-3 + 1e-7, -2.5e-3, 1.0001, 0.0])
    load = torch.tensor([257.0, 1001.0, 65537.0, 3.0])  # none of them a bf16 or fp16 value
    moe.router.expert_bias.copy_(bias)
    moe.router.load.copy_(load)
    moe.to(dtype)
    assert moe.router.weight.dtype == dtype
    assert moe.router.expert_bias.dtype == moe.router.load.dtype == torch.float32
    assert torch.equal(moe.router.expert_bias, bias)
    assert torch.equal(moe.router.load, load)


def test_optimizer_hook_updates_every_multigate_gate():
    """attach_bias_update / update_all_biases reach MultiGateMoE's gates (they were
    skipped: loads grew forever and the biases never moved)."""
    torch.manual_seed(0)
    mmoe = MultiGateMoE(MoEConfig(dim=8, ffn_dim=4, num_experts=4, top_k=1, router="sigmoid",
                                  bias_update_rate=0.01), num_tasks=2).train()
    with torch.no_grad():
        mmoe.gates[1].weight[2] += 2.0  # task 1 favours expert 2, task 0 does not
    model = torch.nn.Sequential(mmoe)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    attach_bias_update(opt, model)
    outs, _, stats = mmoe(torch.randn(40, 8).abs())
    loads = [g.load.clone() for g in mmoe.gates]
    assert [s.tokens_per_expert.tolist() for s in stats] == [ld.long().tolist() for ld in loads]
    sum(o.sum() for o in outs).backward()
    opt.step()
    for gate, load in zip(mmoe.gates, loads, strict=True):
        assert load.sum() == 40 and gate.load.sum() == 0  # consumed
        torch.testing.assert_close(gate.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert not torch.equal(mmoe.gates[0].expert_bias, mmoe.gates[1].expert_bias)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recompute_does_not_count_the_load_twice(use_reentrant):
    """torch.utils.checkpoint reruns the block's forward in backward; the load must hold
    the tokens of the forward alone (it held each token twice, so bias steps came from
    doubled counts whenever activation checkpointing was on)."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, ffn_dim=4, num_experts=4, top_k=2, router="sigmoid",
                        bias_update_rate=0.01)).train()
    proj = torch.nn.Linear(8, 8)
    x = torch.randn(48, 8, requires_grad=True)

    def block(t):
        h = proj(t)
        return h + moe(h).output

    # the independent count: top-2 of the gate's scores (sigmoid is monotone, bias zero)
    with torch.no_grad():
        chosen = (proj(x) @ moe.router.weight.t()).topk(2, dim=-1).indices
    expected = torch.bincount(chosen.reshape(-1), minlength=4).float()
    y = checkpoint(block, x, use_reentrant=use_reentrant)
    y.square().sum().backward()
    assert x.grad is not None and moe.router.weight.grad is not None  # the recompute ran
    assert moe.router.load.tolist() == expected.tolist()


def test_train_step_bias_counts_every_micro_batch_once():
    """The trainer's step: the bias moves once, from the tokens of all its micro-batches
    (gradient accumulation), and the load is empty again for the next step."""
    from moekit.layer import MoE as MoELayer
    from moekit.models import MoETransformer, preset
    from moekit.train import TrainConfig
    from moekit.train.trainer import make_optimizer, train_step
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny", router="sigmoid", bias_update_rate=0.01)).train()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    counts = {id(m): torch.zeros(4) for m in layers}

    def count(m, args, _out):  # the independent count: top-2 of sigmoid(x W^T) + bias
        with torch.no_grad():
            x_TD = args[0].reshape(-1, args[0].shape[-1]).float()
            scores = torch.sigmoid(x_TD @ m.router.weight.t()) + m.router.expert_bias
            counts[id(m)] += torch.bincount(scores.topk(2, -1).indices.reshape(-1), minlength=4)
    for m in layers:
        m.register_forward_hook(count)
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, grad_accum=3, lr=0.0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (2, 16), generator=g),) * 2 for _ in range(3)]
    train_step(model, make_optimizer(model, cfg), batches, cfg, lr=0.0)
    for m in layers:
        load = counts[id(m)]
        assert load.sum() == 3 * 2 * 16 * 2  # three micro-batches of 32 tokens, top-2
        assert m.router.expert_bias.tolist() == (0.01 * torch.sign(load.mean() - load)).tolist()
        assert not m.router.load.any()


def test_load_counted_without_torchs_private_graph_task_lookup(monkeypatch):
    """A torch without ``torch._C._current_graph_task_id`` (private): a training forward
    still counts its tokens (it had raised AttributeError on every forward)."""
    monkeypatch.delattr(torch._C, "_current_graph_task_id", raising=False)
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, ffn_dim=4, num_experts=4, top_k=2, router="sigmoid",
                        bias_update_rate=0.01)).train()
    x = torch.randn(10, 8)
    with torch.no_grad():
        chosen = (x @ moe.router.weight.t()).topk(2, dim=-1).indices
    moe(x)
    expected = torch.bincount(chosen.reshape(-1), minlength=4).float()
    assert moe.router.load.tolist() == expected.tolist()


def test_a_router_pickled_before_it_had_a_ddp_note_still_counts_its_load():
    """torch.save(model) of an older moekit: its Router's __dict__ lacks _ddp; unpickled,
    a training forward counts the tokens (an AttributeError otherwise)."""
    import pickle

    cfg = MoEConfig(dim=16, ffn_dim=8, num_experts=4, top_k=2, router="sigmoid",
                    bias_update_rate=0.01)
    moe = MoE(cfg).train()
    del moe.router.__dict__["_ddp"]  # as an older Router was pickled
    loaded = pickle.loads(pickle.dumps(moe))
    loaded(torch.randn(5, 16))
    assert loaded.router.load.sum().item() == 5 * 2
