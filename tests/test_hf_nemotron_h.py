"""moekit.integrations.hf on NemotronH: experts without a gate (``up_proj`` only,
``down(relu2(x @ up))``) run as moekit's non-GLU experts, the DeepSeek-V3-style router
(sigmoid, correction bias, groups) on moekit's ``sigmoid_topk``.

The oracle is the unpatched model (a deep copy with the same weights, transformers'
eager experts loop). Logits, greedy tokens and int8 are in tests/test_hf_models_more.py;
here: training gradients, bf16, the decode kernels' fused relu2, revert, save / load.
Tiny random model from tests/hf_models_more.py: hidden 64, 8 experts top 2 in 2 groups,
layers Mamba, MoE, attention, MoE, fp32.

Shape letters: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moekit import quantize
from moekit.experts.backends import QUANT_KERNEL_MAX_ROWS
from moekit.functions import decode as decode_fn
from moekit.integrations import hf
from moekit.integrations.hf.experts import (
    PlainAct,
    UngatedExperts,
    supports_stacked,
    supports_ungated,
)
from moekit.integrations.hf.experts_plan import PLAN_ATTR
from moekit.integrations.hf.routers import SigmoidGroupRouter
from tests import hf_models_more  # skips this module when transformers is missing
from tests.test_hf_models_more import _dequantized_reference

transformers = hf_models_more.transformers
ATOL, RTOL = 1e-5, 1e-5


def _ids(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(1))


def _pair():
    original = hf_models_more.build("nemotron_h")
    return original, hf.apply(copy.deepcopy(original))


def _experts(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("NemotronHExperts")]


def test_experts_and_router_patched_with_relu2():
    _, patched = _pair()
    experts = _experts(patched)
    assert len(experts) == 2 and all(isinstance(m, UngatedExperts) for m in experts)
    act = experts[0]._moekit_act()
    assert isinstance(act, PlainAct) and act.kind == "relu2"
    routers = [m for m in patched.modules() if type(m).__name__.endswith("NemotronHTopkRouter")]
    assert len(routers) == 2 and all(isinstance(m, SigmoidGroupRouter) for m in routers)


def test_each_experts_mixin_takes_only_its_layout():
    """``apply`` leaves to transformers an experts module whose layout the mixin does not
    read: a gated one is not an ungated one's, nor the reverse."""
    original, _ = _pair()
    ungated = _experts(original)[0]
    assert supports_ungated(ungated) and not supports_stacked(ungated)
    gated = next(m for m in hf_models_more.build("dots1").modules()
                 if type(m).__name__ == "Dots1Experts")
    assert supports_stacked(gated) and not supports_ungated(gated)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_loss_and_every_gradient_match(train):
    original, patched = _pair()
    for model in (original, patched):
        model.train(train)
    hf_models_more.assert_same_loss_and_grads(
        original, patched, _ids(),
        nonzero=("model.layers.1.mixer.gate.weight", "model.layers.1.mixer.experts.up_proj"),
        atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not decode_fn.available(), reason="decode kernels not built")
def test_decode_rows_run_relu2_in_the_kernels(monkeypatch):
    """A decode-sized call (no autograd, few rows) runs relu2 inside the C++ kernels
    (one call, sort included, its arguments prepared once: experts_plan.py), and gives
    transformers' eager loop's output."""
    original, patched = _pair()
    calls = []
    prepare = decode_fn.topk_rows_call

    def spy(*args):
        calls.append(args[-1])
        return prepare(*args)

    monkeypatch.setattr(decode_fn, "topk_rows_call", spy)
    want_experts, got_experts = _experts(original)[0], _experts(patched)[0]
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(3, 64, generator=g)
    experts_TK = torch.tensor([[0, 5], [5, 7], [2, 3]])
    weights_TK = torch.rand(3, 2, generator=g)
    with torch.no_grad():
        want = want_experts(x_TD, experts_TK, weights_TK)
        got = got_experts(x_TD, experts_TK, weights_TK)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert [spec[0] for spec in calls] == ["relu2"]
    with torch.no_grad():  # the plan makes the C++ call: it returns its output
        assert torch.equal(got_experts.__dict__[PLAN_ATTR](x_TD, experts_TK, weights_TK), got)


@pytest.mark.skipif(not decode_fn.available(), reason="decode kernels not built")
@pytest.mark.parametrize("T", [3, QUANT_KERNEL_MAX_ROWS // 2 + 1],
                         ids=["kernels", "dequantized"])
def test_int8_experts_match_the_dequantized_ones(T, monkeypatch):
    """int8 relu2 experts (F-wide ``up_proj``) on the decode kernels (few rows) and,
    past ``QUANT_KERNEL_MAX_ROWS`` routed rows, dequantized a block of experts at a time
    onto the fused path: transformers' eager loop on the dequantized weights."""
    original, patched = _pair()
    quantized = quantize(patched, bits=8, scope="experts")
    reference = _dequantized_reference(original, quantized)
    calls = []
    dequantized = decode_fn.dequantized_experts
    monkeypatch.setattr(decode_fn, "dequantized_experts",
                        lambda *a, **k: calls.append(T) or dequantized(*a, **k))
    g = torch.Generator().manual_seed(T)
    x_TD = torch.randn(T, 64, generator=g)
    experts_TK = torch.rand(T, 8, generator=g).topk(2, dim=1).indices
    weights_TK = torch.rand(T, 2, generator=g)
    with torch.no_grad():
        got = _experts(quantized)[0](x_TD, experts_TK, weights_TK)
        want = _experts(reference)[0](x_TD, experts_TK, weights_TK)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert calls == ([] if T == 3 else [T])


def test_bf16_matches():
    original, patched = (m.to(torch.bfloat16) for m in _pair())
    with torch.no_grad():
        a = original(input_ids=_ids(), output_router_logits=True)
        b = patched(input_ids=_ids(), output_router_logits=True)
    assert [x.dtype for x in b.router_logits] == [x.dtype for x in a.router_logits]
    assert b.logits.dtype == a.logits.dtype  # NemotronH returns fp32 logits
    torch.testing.assert_close(b.logits.float(), a.logits.float(), atol=2e-2, rtol=2e-2)


def test_revert_restores_the_transformers_modules():
    original, patched = _pair()
    hf.revert(patched)
    assert not any(hf.is_patched(m) for m in patched.modules())
    assert {type(m) for m in patched.modules()} == {type(m) for m in original.modules()}
    with torch.no_grad():
        assert torch.equal(patched(input_ids=_ids()).logits, original(input_ids=_ids()).logits)


def test_save_patched_then_load_plain(tmp_path):
    original, patched = _pair()
    patched.save_pretrained(tmp_path)
    loaded = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    loaded.set_experts_implementation("eager")
    assert not any(hf.is_patched(m) for m in loaded.modules())
    want, got = original.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, original(input_ids=_ids()).logits)


def test_latent_projection_experts_match():
    """With ``moe_latent_size`` NemotronH's block projects the hidden state down before the
    routed experts and back up after (the router still reads the full width): the patched
    experts run on the latent width, loss and every gradient as transformers'."""
    original = hf_models_more.build("nemotron_h", moe_latent_size=32)
    patched = hf.apply(copy.deepcopy(original))
    experts = _experts(patched)[0]  # up [E, F, latent], down [E, latent, F]
    assert experts.up_proj.shape == (8, 16, 32) and experts.down_proj.shape == (8, 32, 16)
    for model in (original, patched):
        model.train()
    hf_models_more.assert_same_loss_and_grads(
        original, patched, _ids(),
        nonzero=("model.layers.1.mixer.fc1_latent_proj.weight",
                 "model.layers.1.mixer.experts.up_proj"),
        atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        patched.eval(), original.eval()
        torch.testing.assert_close(patched(input_ids=_ids()).logits,
                                   original(input_ids=_ids()).logits, atol=ATOL, rtol=RTOL)
