"""moekit.integrations.hf on Llama 4 (``llama4_text``; ``llama4``'s text model is in
tests/test_hf_models_more.py): the patched block runs only the routed (token, expert)
pairs and computes what transformers' block computes running every expert on every
token.

The oracle is the unpatched model (a deep copy with the same weights), whose
``Llama4TextMoe`` scales each token by its router score (0 for the experts not chosen)
and runs all E experts on it. Tiny random models from tests/hf_models_more.py: hidden
64, 8 experts, layer 0 dense (``interleave_moe_layer_step=2``), layer 1 MoE, fp32.

Shape letters: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moekit import quantize
from moekit.integrations import hf
from moekit.integrations.hf.blocks import Llama4Block
from moekit.integrations.hf.experts import Llama4Experts
from moekit.quant.linear import QuantizedLinear
from moekit.quant.tensor import QuantizedTensor
from tests import hf_models_more  # skips this module when transformers is missing
from tests.test_hf_models_more import _dequantized_reference

transformers = hf_models_more.transformers
# fp32: the two paths differ in GEMM blocking (bmm over all E vs grouped rows) only
ATOL, RTOL = 1e-5, 1e-5
GENERATE = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
TOP_K = [1, 2]  # Llama 4 as released routes top 1; top 2 sums two scaled experts
E = 8


def _ids(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(1))


def _pair(top_k: int):
    original = hf_models_more.build("llama4_text", num_experts_per_tok=top_k)
    return original, hf.apply(copy.deepcopy(original))


def _moe_blocks(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("Llama4TextMoe")]


def test_only_moe_blocks_are_patched_and_dense_layers_left_alone():
    _, patched = _pair(1)
    layers = patched.model.layers
    assert not hf.is_patched(layers[0].feed_forward)  # interleave_moe_layer_step=2: dense
    assert type(layers[0].feed_forward).__name__ == "Llama4TextMLP"
    block = layers[1].feed_forward
    assert isinstance(block, Llama4Block) and isinstance(block.experts, Llama4Experts)
    assert not hf.is_patched(block.router) and not hf.is_patched(block.shared_expert)


@pytest.mark.parametrize("top_k", [*TOP_K, E])  # K == E: every expert on every token
def test_logits_match(top_k):
    original, patched = _pair(top_k)
    with torch.no_grad():
        want = original(input_ids=_ids(), output_router_logits=True)
        got = patched(input_ids=_ids(), output_router_logits=True)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=RTOL)
    assert len(got.router_logits) == len(want.router_logits) == 1  # one MoE layer recorded
    torch.testing.assert_close(got.router_logits[0], want.router_logits[0], atol=0, rtol=0)


@pytest.mark.parametrize("top_k", [*TOP_K, E])
def test_loss_and_every_gradient_match(top_k):
    """Every parameter's gradient, the router's included: it gets one only through the
    scores that scale the experts' input."""
    original, patched = _pair(top_k)
    for model in (original, patched):
        model.train()
    hf_models_more.assert_same_loss_and_grads(
        original, patched, _ids(), nonzero=("model.layers.1.feed_forward.router.weight",),
        atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("top_k", TOP_K)
def test_generate_same_tokens(top_k):
    original, patched = _pair(top_k)
    ids = _ids(1, 6)
    assert torch.equal(patched.generate(ids, **GENERATE), original.generate(ids, **GENERATE))


@pytest.mark.parametrize("top_k", TOP_K)
def test_experts_compute_only_the_routed_rows(top_k):
    """transformers' block hands its experts E*T rows (every token to every expert);
    the patched one hands moekit's experts T*K rows, each routed to one of its token's
    top K experts with weight 1 (its score already in the row)."""
    original, patched = _pair(top_k)
    seen, rows = [], []
    for model in (original, patched):
        experts = _moe_blocks(model)[0].experts
        handle = experts.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
        if model is patched:  # what the patched block hands its experts
            spy = experts.register_forward_hook(lambda m, a, out: seen.append(
                (a[0].shape[0], a[1].clone(), a[2].clone())))
        with torch.no_grad():
            model(input_ids=_ids())
        handle.remove()
    spy.remove()
    T = _ids().numel()
    assert rows == [E * T, T * top_k]
    [(n, experts_S1, weights_S1)] = seen
    assert n == T * top_k and experts_S1.shape == (T * top_k, 1)
    assert torch.equal(weights_S1, torch.ones_like(weights_S1))
    with torch.no_grad():  # the router's choice: its top K logits
        logits_TE = original(input_ids=_ids(), output_router_logits=True).router_logits[0]
    chosen_TK = logits_TE.topk(top_k, dim=1).indices.sort(dim=1).values
    assert torch.equal(experts_S1.view(T, top_k), chosen_TK)


BLOCK_CASES = [
    # (T, favourite expert)   what it exercises
    pytest.param(1, None, id="T1"),         # a single token
    pytest.param(7, None, id="T7"),         # odd T: some experts get no token
    pytest.param(16, 3, id="all-to-3"),     # every token's top expert is expert 3
]


@pytest.mark.parametrize("top_k", [*TOP_K, E])
@pytest.mark.parametrize("T,favourite", BLOCK_CASES)
def test_block_output_and_gradients_match(top_k, T, favourite):
    """One MoE block against transformers', input and every parameter's gradient."""
    original, patched = _pair(top_k)
    blocks = [_moe_blocks(m)[0] for m in (original, patched)]
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(T))
    if favourite is not None:  # its logit ~3 on every token, the others' ~0.1
        x[:, 0] = 3.0
        for b in blocks:
            with torch.no_grad():
                b.router.weight.mul_(0.01)
                b.router.weight[:, 0] = 0.0
                b.router.weight[favourite, 0] = 1.0
        assert (blocks[0].router(x)[1].argmax(1) == favourite).all()
    results = []
    for block in blocks:
        x_TD = x.clone().requires_grad_(True)
        y_TD, logits_TE = block(x_TD)
        torch.autograd.backward(y_TD, torch.ones_like(y_TD))
        results.append((y_TD, logits_TE, x_TD.grad, {n: p.grad for n, p in
                                                     block.named_parameters()}))
    (y0, l0, dx0, g0), (y1, l1, dx1, g1) = results
    torch.testing.assert_close(y1, y0, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(l1, l0, atol=0, rtol=0)
    torch.testing.assert_close(dx1, dx0, atol=ATOL, rtol=1e-4)
    assert g0.keys() == g1.keys() and "router.weight" in g0
    for n, g in g0.items():
        torch.testing.assert_close(g1[n], g, atol=ATOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_revert_restores_the_transformers_modules():
    original, patched = _pair(2)
    hf.revert(patched)
    assert not any(hf.is_patched(m) for m in patched.modules())
    assert {type(m) for m in patched.modules()} == {type(m) for m in original.modules()}
    assert "save_pretrained" not in vars(patched)
    with torch.no_grad():
        assert torch.equal(patched(input_ids=_ids()).logits, original(input_ids=_ids()).logits)


def test_save_patched_then_load_plain(tmp_path):
    original, patched = _pair(1)
    patched.save_pretrained(tmp_path)
    loaded = transformers.Llama4ForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(hf.is_patched(m) for m in loaded.modules())
    want = original.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, original(input_ids=_ids()).logits)


@pytest.mark.parametrize("top_k", TOP_K)
def test_int8_quantized_matches_the_dequantized_model(top_k):
    """scope "all": the experts' stacks become QuantizedTensors, the shared expert's and
    the dense layer's projections QuantizedLinears, the router stays float."""
    original, patched = _pair(top_k)
    quantized = quantize(copy.deepcopy(patched), bits=8)
    block = _moe_blocks(quantized)[0]
    assert isinstance(block.experts.gate_up_proj, QuantizedTensor)
    assert isinstance(block.experts.down_proj, QuantizedTensor)
    assert isinstance(block.shared_expert.up_proj, QuantizedLinear)
    assert isinstance(quantized.model.layers[0].feed_forward.down_proj, QuantizedLinear)
    assert type(block.router).__name__ == "Llama4Router"
    reference = _dequantized_reference(original, quantized)
    with torch.no_grad():
        got = quantized(input_ids=_ids()).logits
        want = reference(input_ids=_ids()).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    ids = _ids(1, 6)
    assert torch.equal(quantized.generate(ids, **GENERATE), reference.generate(ids, **GENERATE))


@pytest.mark.parametrize("top_k", TOP_K)
def test_bf16_forward_matches(top_k):
    original, patched = (m.to(torch.bfloat16) for m in _pair(top_k))
    with torch.no_grad():
        want = original(input_ids=_ids()).logits
        got = patched(input_ids=_ids()).logits
    assert got.dtype == torch.bfloat16 and got.isfinite().all()
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
