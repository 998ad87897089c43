"""Degenerate and bad input (issue 15): zero tokens give an empty output and a zero
aux loss; a wrong dtype/device, a truthy string for a bool, a non-finite or absurd
number, or a bad command-line flag is a named ValueError (exit status 2 on the
command line) before any state changes.

Shape letters: T tokens, D hidden, E experts, K experts per token, B batch, L sequence.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from moekit import MoE, MoEConfig, MultiGateMoE
from moekit.cli import main as moekit_main
from moekit.models.config import LMConfig
from moekit.plan.cluster import GPUS, Layout, TrainSetup
from moekit.plan.spec import ModelSpec
from moekit.routing.losses import seq_aux_loss, switch_aux_loss, z_loss
from moekit.train.data import load_corpus
from moekit.train.trainer import TrainConfig

BASE = dict(dim=8, ffn_dim=4, num_experts=4, top_k=2)

# -- zero tokens -------------------------------------------------------------------

ZERO_TOKEN_CONFIGS = [
    dict(),
    dict(aux_loss_coef=0.1, z_loss_coef=0.1),
    dict(seq_aux_loss_coef=0.1),  # raised ZeroDivisionError
    dict(capacity_factor=1.0),
    dict(capacity_factor=1.0, drop_policy="probability"),
    dict(router="expert_choice", aux_loss_coef=0.1),  # raised an index error
    dict(router="sigmoid", bias_update_rate=0.1, num_groups=2, topk_groups=1),
    dict(router="switch", top_k=1, aux_loss_coef=0.1),
    dict(router="softmax_topk"),
    dict(router="noisy_topk"),
    dict(router="hash", hash_vocab_size=10),
    dict(num_shared_experts=1, shared_expert_gate=True),
]


def _zero_grads_ok(loss, x, params):
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    assert grads[0] is not None and grads[0].shape == x.shape
    for g in grads:
        assert g is None or not g.any()


@pytest.mark.parametrize("over", ZERO_TOKEN_CONFIGS)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
@pytest.mark.parametrize("backend", ["auto", "loop", "fused", "grouped_mm"])
def test_zero_tokens(over, shape, backend):
    """Every backend: with router='hash' (no router weight in the graph) backend='loop'
    returned an output cut from autograd, so y.sum().backward() raised 'element 0 of
    tensors does not require grad'."""
    moe = MoE(MoEConfig(**{**BASE, **over}), backend=backend).train()
    x = torch.randn(shape, requires_grad=True)
    ids = torch.zeros(shape[:-1], dtype=torch.long) if over.get("router") == "hash" else None
    y, aux, stats = moe(x, ids)
    assert y.shape == x.shape
    assert aux.item() == 0.0 and stats.router_entropy.item() == 0.0  # not NaN
    # nothing was dropped: 1.0 (dropless routers) and NaN (expert choice) before
    assert stats.to_dict()["dropped_fraction"] == 0.0
    assert stats.to_dict()["tokens_per_expert"] == [0] * BASE["num_experts"]
    _zero_grads_ok(y.sum() + aux, x, list(moe.parameters()))
    with torch.inference_mode():  # and the generation path
        assert moe.eval().infer(x.detach(), ids).shape == x.shape


def test_zero_tokens_multigate():
    mg = MultiGateMoE(MoEConfig(**BASE, aux_loss_coef=0.1, z_loss_coef=0.1), num_tasks=2)
    x = torch.randn(0, 8, requires_grad=True)
    outs, aux, stats = mg(x)
    assert [o.shape for o in outs] == [x.shape, x.shape] and aux.item() == 0.0
    assert [s.to_dict()["dropped_fraction"] for s in stats] == [0.0, 0.0]
    _zero_grads_ok(sum(o.sum() for o in outs) + aux, x, list(mg.parameters()))


def test_losses_of_zero_tokens_are_zero():
    assert switch_aux_loss(torch.rand(0, 4), torch.zeros(0, 2, dtype=torch.long)).item() == 0
    assert seq_aux_loss(torch.rand(2, 0, 4), torch.zeros(2, 0, 2, dtype=torch.long)).item() == 0
    assert z_loss(torch.randn(0, 4)).item() == 0


# -- dtype and device: refused before the router counts the tokens ------------------------

def _state(moe):
    return {k: v.clone() for k, v in moe.state_dict().items()}


@pytest.mark.parametrize("x_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_other_than_the_weights_is_refused_first(x_dtype):
    moe = MoE(MoEConfig(**BASE, bias_update_rate=0.1)).train()
    before = _state(moe)
    with pytest.raises(ValueError, match=rf"x.dtype={x_dtype}.*layer's dtype \(torch.float32\)"):
        moe(torch.randn(3, 8, dtype=x_dtype))
    assert all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())
    assert moe.router.load.sum() == 0  # the load counter did not move


def test_autocast_input_and_matching_dtype_still_run():
    moe = MoE(MoEConfig(**BASE))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe(torch.randn(3, 8, dtype=torch.bfloat16)).output.shape == (3, 8)
    moe_bf16 = MoE(MoEConfig(**BASE)).to(torch.bfloat16)
    assert moe_bf16(torch.randn(3, 8, dtype=torch.bfloat16)).output.dtype == torch.bfloat16


def test_meta_input_is_refused():
    moe = MoE(MoEConfig(**BASE, bias_update_rate=0.1)).train()
    with pytest.raises(ValueError, match="x.device=meta is not allowed"):
        moe(torch.empty(3, 8, device="meta"))
    assert moe.router.load.sum() == 0


# -- strict configs -------------------------------------------------------------------

@pytest.mark.parametrize("over,needle", [
    (dict(renormalize="False"), "renormalize='False'"),
    (dict(expert_bias=1), "expert_bias=1"),
    (dict(check_finite="yes"), "check_finite='yes'"),
    (dict(shared_expert_gate=None), "shared_expert_gate=None"),
    (dict(routed_scaling_factor=True), "routed_scaling_factor=True"),
    (dict(routed_scaling_factor=1e308), "routed_scaling_factor=1e+308"),
    (dict(aux_loss_coef=1e308), "aux_loss_coef=1e+308"),
    (dict(z_loss_coef=math.inf), "z_loss_coef=inf"),
    (dict(seq_aux_loss_coef=True), "seq_aux_loss_coef=True"),
    (dict(bias_update_rate=math.nan), "bias_update_rate=nan"),
    (dict(swiglu_limit=1e308), "swiglu_limit=1e+308"),
    (dict(swiglu_alpha=math.inf), "swiglu_alpha=inf"),
    (dict(capacity_factor=1e308), "capacity_factor=1e+308"),
    (dict(capacity_factor=True), "capacity_factor=True"),
    (dict(router="hash", hash_vocab_size=10, hash_seed="1"), "hash_seed='1'"),
    (dict(router="hash", hash_vocab_size=10, hash_seed=1.5), "hash_seed=1.5"),
    (dict(router="hash", hash_vocab_size=10, hash_seed=-1), "hash_seed=-1"),
    (dict(router="hash", hash_vocab_size=1e12), "hash_vocab_size=1000000000000.0"),
    (dict(router="hash", hash_vocab_size=10**12), "hash_vocab_size=1000000000000"),
    (dict(router="hash", hash_vocab_size=10.0), "hash_vocab_size=10.0"),
])
def test_moe_config_is_strict(over, needle):
    with pytest.raises(ValueError, match="not allowed") as err:
        MoEConfig(**{**BASE, **over})
    assert needle in str(err.value)


@pytest.mark.parametrize("cls,over,needle", [
    (LMConfig, dict(tie_embeddings="no"), "tie_embeddings='no'"),
    (LMConfig, dict(dense="no"), "dense='no'"),
    (LMConfig, dict(aux_loss_coef=1e308), "aux_loss_coef=1e+308"),
    (LMConfig, dict(dense=True, capacity_factor=math.inf), "capacity_factor=inf"),
    (LMConfig, dict(rope_theta=math.inf), "rope_theta=inf"),
    (TrainConfig, dict(bf16="no"), "bf16='no'"),
    (TrainConfig, dict(compile="no"), "compile='no'"),
    (TrainConfig, dict(beta1=True), "beta1=True"),
    (TrainConfig, dict(beta2=math.nan), "beta2=nan"),
    (TrainConfig, dict(device="foo"), "device='foo'"),
    (TrainConfig, dict(device="meta"), "device='meta'"),
    (TrainConfig, dict(device=0), "device=0"),
    (TrainConfig, dict(lr=True), "lr=True"),
    (TrainConfig, dict(seed=1.0), "seed=1.0"),
    (TrainSetup, dict(compute_efficiency=True), "compute_efficiency=True"),
    (TrainSetup, dict(joules_per_flop=math.inf), "joules_per_flop=inf"),
    (TrainSetup, dict(causal="no"), "causal='no'"),
    (ModelSpec, dict(num_layers=2, dim=8, tied_embeddings="no"), "tied_embeddings='no'"),
    (Layout, dict(zero=True), "zero=True"),
])
def test_other_configs_are_strict(cls, over, needle):
    with pytest.raises(ValueError, match="not allowed") as err:
        cls(**over)
    assert needle in str(err.value)


def test_gpu_spec_rejects_infinite_memory():
    from dataclasses import replace
    with pytest.raises(ValueError, match="memory_bytes=inf"):
        replace(GPUS["h100"], memory_bytes=math.inf)


def test_multigate_rejects_a_dict():
    with pytest.raises(ValueError, match="config=dict"):
        MultiGateMoE(dict(BASE), num_tasks=2)


@pytest.mark.parametrize("rate", [math.nan, math.inf, -1.0])
def test_update_bias_rejects_non_finite_rate(rate):
    moe = MoE(MoEConfig(**BASE, bias_update_rate=0.1)).train()
    moe(torch.randn(16, 8))
    with pytest.raises(ValueError, match=f"rate={rate}"):
        moe.update_bias(rate)
    assert not moe.router.expert_bias.any()


def test_non_finite_load_never_poisons_the_bias():
    moe = MoE(MoEConfig(**BASE, bias_update_rate=0.1)).train()
    moe.router.load.copy_(torch.tensor([3.0, math.inf, 1.0, 0.0]))
    moe.update_bias()
    assert torch.equal(moe.router.expert_bias, torch.zeros(4))
    assert not moe.router.load.any()
    moe.router.load.copy_(torch.tensor([3.0, 1.0, 1.0, 3.0]))  # a finite load still steps
    moe.update_bias()
    assert torch.allclose(moe.router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, -0.1]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_hash_token_ids_of_any_integer_dtype(dtype):
    moe = MoE(MoEConfig(**BASE, router="hash", hash_vocab_size=100))
    x = torch.randn(2, 5, 8)
    ids = torch.randint(0, 100, (2, 5))
    want = moe(x, ids).output
    torch.testing.assert_close(moe(x, ids.to(dtype)).output, want, atol=0, rtol=0)


def test_hash_token_ids_of_bool_are_refused():
    moe = MoE(MoEConfig(**BASE, router="hash", hash_vocab_size=100))
    with pytest.raises(ValueError, match="token_ids.dtype=torch.bool"):
        moe(torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool))


# -- the command line -----------------------------------------------------------------

@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 200)
    return path


def _train_fails(argv, tmp_path, capsys, *needles):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    rc = moekit_main(["train", "--preset", "tiny", "--steps", "1", "--seq-len", "32",
                      "--out", str(out), "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()  # nothing created
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("argv,needles", [
    (["--threads", "-1"], ["--threads", "-1", "positive int"]),
    (["--threads", "0"], ["--threads", "0", "positive int"]),
    (["--device", "foo"], ["--device", "'foo'", "cpu, cuda"]),
    (["--device", "meta"], ["--device", "'meta'", "meta holds no data"]),
    (["--lr", "nan"], ["--lr", "nan", "finite"]),
])
def test_train_flag_errors(argv, needles, text_file, tmp_path, capsys):
    _train_fails([*argv, "--data", str(text_file)], tmp_path, capsys, *needles)


@pytest.mark.parametrize("content,needles", [
    pytest.param(b"", ["--data", "0 bytes", "seq_len + 2 = 34"], id="empty"),
    pytest.param(b"abc", ["--data", "3 bytes", "seq_len + 2 = 34"], id="3-bytes"),
    pytest.param(bytes(range(256)) * 40, ["--data", "not text"], id="binary"),
])
def test_train_data_errors(content, needles, tmp_path, capsys):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    _train_fails(["--data", str(path)], tmp_path, capsys, *needles)


def test_dangling_symlink_in_data_dir_is_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text\n" * 100)
    (tmp_path / "b.txt").write_text("beta text\n" * 100)
    os.symlink(tmp_path / "gone.txt", tmp_path / "c.txt")
    with pytest.warns(UserWarning, match="c.txt.*dangling symlink"):
        corpus = load_corpus(str(tmp_path))
    assert corpus.train_files + corpus.val_files == 2


@pytest.mark.parametrize("flag,value", [("--memory-gb", "inf"), ("--peak-tflops", "0"),
                                        ("--power-w", "nan"), ("--efficiency", "inf")])
def test_plan_float_flags_finite_positive(flag, value, capsys):
    assert moekit_main(["plan", "mixtral-8x7b", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and value in err, err
