"""The patched softmax top-k routers (Mixtral, OLMoE, Qwen) take the [T, D] rows their MoE
block hands them as they are, and a [B, L, D] input too, with the same outputs: the
logits bitwise those of transformers' own router (the same F.linear), the same experts,
weights within fp32 rounding of its (it takes the top K of the probabilities and divides
by their sum; moekit the softmax of the chosen logits)."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.integrations import hf
from tests import hf_models  # skips this module when transformers is missing


def _routers(name: str, **attrs):
    model = hf_models.build(name)
    original = next(m for m in model.modules() if type(m).__name__.endswith("TopKRouter"))
    for key, value in attrs.items():
        setattr(original, key, value)
    with torch.no_grad():
        original.weight.normal_()
    patched = copy.deepcopy(original)
    hf.patch_module(patched, hf.ARCHITECTURES[model.config.model_type][
        type(original).__name__], "auto")
    return original, patched


@pytest.mark.parametrize("name,attrs", [("mixtral", {}), ("olmoe", {"norm_topk_prob": True}),
                                        ("olmoe", {"norm_topk_prob": False}),
                                        ("qwen3_moe", {})])
@pytest.mark.parametrize("shape", [(5, 32), (1, 32), (2, 3, 32)])
def test_router_outputs_for_rows_and_sequences(name, attrs, shape):
    original, patched = _routers(name, **attrs)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
    with torch.no_grad():
        want_logits, want_weights, want_experts = original(x)
        logits, weights, experts = patched(x)
    assert torch.equal(logits, want_logits)
    assert torch.equal(experts, want_experts)
    assert weights.dtype == want_weights.dtype
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-6)


def test_router_reads_norm_topk_prob_set_after_patching():
    original, patched = _routers("olmoe", norm_topk_prob=False)
    patched.norm_topk_prob = original.norm_topk_prob = True
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(patched(x)[1], original(x)[1], atol=1e-6, rtol=1e-6)
        assert torch.allclose(patched(x)[1].sum(-1), torch.ones(4))
