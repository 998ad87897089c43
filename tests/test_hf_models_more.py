"""moekit.integrations.hf on the families beyond tests/test_hf.py: the patched model
computes what transformers' own (eager experts loop, its routers) computes, and runs
int8-quantized.

The oracle is the unpatched model, a deep copy with the same weights; the quantized
model's is the unpatched model holding the dequantized weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moekit import quantize
from moekit.integrations import hf
from moekit.integrations.hf.architectures import ARCHITECTURES
from moekit.integrations.hf.experts import StackedExperts
from moekit.quant.linear import QuantizedEmbedding, QuantizedLinear
from moekit.quant.tensor import QuantizedTensor, _dequantize_torch
from tests import hf_models_more  # skips this module when transformers is missing

# fp32 throughout: the two paths differ only in GEMM blocking and summation order.
ATOL, RTOL = 1e-5, 1e-5
GENERATE = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


def _ids(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=hf_models_more.NAMES)
def pair(request):
    """(name, original, patched): same weights, the second patched."""
    name = request.param
    original = hf_models_more.build(name)
    return name, original, hf.apply(copy.deepcopy(original))


def test_registered_and_every_experts_module_patched(pair):
    name, _, patched = pair
    assert name in hf.SUPPORTED
    for cls, mixin in ARCHITECTURES[name].items():  # there, and all of them patched
        found = [m for m in patched.modules() if type(m).__name__ in (cls, f"Moekit{cls}")]
        assert found and all(isinstance(m, mixin) for m in found), cls


def test_logits_match(pair):
    _, original, patched = pair
    with torch.no_grad():
        want = original(input_ids=_ids()).logits
        got = patched(input_ids=_ids()).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_router_outputs_match(pair):
    """A moekit router returns what transformers' does: the router logits the model
    records for its balance loss (where it returns them)."""
    name, original, patched = pair
    if all(mixin is StackedExperts for mixin in ARCHITECTURES[name].values()):
        pytest.skip("experts only: the model's own router runs")
    with torch.no_grad():
        a = original(input_ids=_ids(), output_router_logits=True)
        b = patched(input_ids=_ids(), output_router_logits=True)
    ra, rb = getattr(a, "router_logits", None), getattr(b, "router_logits", None)
    if not ra:
        pytest.skip("the model returns no router logits")
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        torch.testing.assert_close(y, x, atol=ATOL, rtol=RTOL)


def test_generate_same_tokens(pair):
    name, original, patched = pair
    if name not in hf_models_more.GENERATES:
        pytest.skip("a token classifier: nothing to generate")
    ids = _ids(1, 6)
    assert torch.equal(patched.generate(ids, **GENERATE), original.generate(ids, **GENERATE))


# one family per new router mixin (and Jamba's no-renormalisation SoftmaxTopKRouter)
NEW_ROUTERS = ["deepseek_v2", "granitemoe", "jamba", "minimax_m2", "hy_v3", "aria_text",
               "step3p7"]


@pytest.mark.parametrize("name", NEW_ROUTERS)
def test_train_loss_and_grads_match(name):
    original = hf_models_more.build(name).train()
    patched = hf.apply(copy.deepcopy(original))
    grads = []
    for model in (original, patched):
        model(input_ids=_ids(), labels=_ids()).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=ATOL, rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_deepseek_v2_greedy_routing_matches():
    """The test model routes "group_limited_greedy"; "greedy" ignores the groups."""
    original = hf_models_more.build("deepseek_v2", topk_method="greedy")
    patched = hf.apply(copy.deepcopy(original))
    with torch.no_grad():
        a = original(input_ids=_ids(), output_router_logits=True)
        b = patched(input_ids=_ids(), output_router_logits=True)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=RTOL)
    router = next(m for m in patched.modules() if type(m).__name__.endswith("TopkRouter"))
    x = torch.randn(16, 64)
    logits, weights, experts = router(x)
    want_logits, want_weights, want_experts = type(router)._moekit_original.forward(router, x)
    torch.testing.assert_close(logits, want_logits, atol=0, rtol=0)
    order, want_order = experts.argsort(-1), want_experts.argsort(-1)  # topk(sorted=False)
    assert torch.equal(experts.gather(1, order), want_experts.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order), want_weights.gather(1, want_order),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", NEW_ROUTERS)
def test_bf16_matches(name):
    """bf16 weights: the router logits' dtypes as transformers', outputs within bf16
    rounding."""
    original = hf_models_more.build(name).to(torch.bfloat16)
    patched = hf.apply(copy.deepcopy(original))
    with torch.no_grad():
        a = original(input_ids=_ids(), output_router_logits=True)
        b = patched(input_ids=_ids(), output_router_logits=True)
    assert [x.dtype for x in b.router_logits] == [x.dtype for x in a.router_logits]
    torch.testing.assert_close(b.logits.float(), a.logits.float(), atol=2e-2, rtol=2e-2)


def _dequantized_reference(original: nn.Module, quantized: nn.Module) -> nn.Module:
    """``original`` holding the values ``quantized`` computes with (torch dequantization)."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, StackedExperts):
                target = ref.get_submodule(name)
                for attr in m._moekit_weights:
                    w_ENK = _dequantize_torch(getattr(m, attr), 0, None)  # [E, out, in]
                    getattr(target, attr).copy_(w_ENK.transpose(1, 2) if m.is_transposed
                                                else w_ENK)
            elif isinstance(m, QuantizedLinear | QuantizedEmbedding):
                ref.get_submodule(name).weight.copy_(_dequantize_torch(m.weight, 0, 1)[0])
    return ref


# nn.Linear layers whose parent reads their .weight directly, left float by scope "all"
# (Jamba's Mamba mixer computes dt_proj.weight @ time_step; GraniteMoeHybrid's CUDA
# kernel path takes out_proj.weight): what quantize reads from the parent's source
FLOAT_LINEARS = {"jamba": {"dt_proj"}, "granitemoehybrid": {"out_proj"},
                 "nemotron_h": {"out_proj"}}


def test_quantized_int8_runs_and_matches_dequantized(pair):
    """The default scope "all" on every family (Jamba ran with scope="experts": its
    quantized dt_proj failed in the mixer's dt_proj.weight @ time_step)."""
    name, original, patched = pair
    quantized = quantize(copy.deepcopy(patched), bits=8)
    experts = [m for m in quantized.modules() if isinstance(m, StackedExperts)]
    assert experts and all(isinstance(getattr(m, a), QuantizedTensor)
                           for m in experts for a in m._moekit_weights)
    assert any(isinstance(m, QuantizedLinear) for m in quantized.modules())
    mixers = [m for m in quantized.modules() if "Mamba" in type(m).__name__]
    assert bool(mixers) == (name in FLOAT_LINEARS)
    for m in mixers:  # the layers it reads .weight of stay float, the others do not
        linears = {a: type(c) for a, c in m.named_children()
                   if isinstance(c, nn.Linear | QuantizedLinear)}
        assert linears == {a: nn.Linear if a in FLOAT_LINEARS[name] else QuantizedLinear
                           for a in linears}, type(m).__name__
    reference = _dequantized_reference(original, quantized)
    with torch.no_grad():
        got = quantized(input_ids=_ids()).logits
        want = reference(input_ids=_ids()).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if name in hf_models_more.GENERATES:
        ids = _ids(1, 6)
        out = quantized.generate(ids, **GENERATE)
        assert out.shape == (1, 12) and torch.equal(out[:, :6], ids)


@pytest.mark.parametrize("name", ["hunyuan_v1_moe", "gemma4_text", "longcat_flash"])
def test_quantize_keeps_nested_router_linears_float(name):
    """Routers stay float: before, a router module holding an nn.Linear (HunYuan's
    ``gate.wg``, Gemma 4's ``router.proj``, Longcat's ``router.classifier``) had it
    quantized with the attention projections."""
    model = quantize(hf.apply(hf_models_more.build(name)), bits=8)
    routers = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("gate", "router")]
    assert routers
    for router in routers:
        assert not any(isinstance(m, QuantizedLinear) for m in router.modules())
