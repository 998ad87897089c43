"""A frozen model (``requires_grad_(False)``) run with grad mode on has nothing to
differentiate: it must take the kernels no_grad takes and return no_grad's (and
inference_mode's) outputs bit for bit. Where a gradient is wanted (one parameter, or the
input) it must still arrive.

The bitwise checks hold on every CPU: both sides run the same selection code on the same
tensors, so they take the same kernels whatever this CPU has (AMX, AVX-512, AVX2, none).
Before, the attention projections, the dense FFN, the LM head, the norms, the one-call
routing and the routed experts tested ``torch.is_grad_enabled()`` alone: a frozen fp32
model with grad mode on took torch's ops and differed from no_grad by ~1e-7-6e-7 (bf16:
2e-3-2e-2), a quantized one in ``infer`` (routing), and every patched transformers model.

Shape letters: B batch, T tokens, D hidden.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moekit
from moekit import MoE, MoEConfig
from moekit.models import LMConfig
from moekit.models.transformer import MoETransformer, StaticKVCache
from tests.reference import ref_moe

TOKENS = (1, 5, 40, 200)  # a decode step, small batches, a prefill
QUANT = {"q8": dict(bits=8), "q4a8": dict(bits=4, group_size=32, activations="int8")}


def _frozen(module, kind: str):
    if kind == "bf16":
        module = module.to(torch.bfloat16)
    elif kind in QUANT:
        module = moekit.quantize(module, **QUANT[kind])
    return module.eval().requires_grad_(False)


def _three_ways(fn):
    """fn() under no_grad, under inference_mode, and with grad mode on."""
    with torch.no_grad():
        a = fn()
    with torch.inference_mode():
        b = fn().clone()  # an inference tensor, compared outside inference mode
    c = fn()
    assert torch.is_grad_enabled() and not c.requires_grad
    return a, b, c


def _assert_bitwise(fn, what: str) -> None:
    a, b, c = _three_ways(fn)
    assert torch.equal(a, b), f"{what}: inference_mode differs from no_grad"
    assert torch.equal(a, c), (f"{what}: grad mode on differs from no_grad by "
                               f"{(a.float() - c.float()).abs().max().item():.3g}")


@pytest.mark.parametrize("shared,router", [(0, "softmax"), (1, "sigmoid")])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "q8", "q4a8"])
def test_frozen_model_with_grad_on_equals_no_grad(kind, shared, router):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, max_seq_len=256,
                   ffn_dim=64, num_experts=8, top_k=2, router=router,
                   num_shared_experts=shared, moe_every=2 if shared else 1)
    model = _frozen(MoETransformer(cfg), kind)
    for T in TOKENS:
        ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T))
        _assert_bitwise(lambda ids=ids: model(ids).logits, f"{kind} forward T={T}")

        def infer(ids=ids):  # a prefill of T tokens, then one decode step
            cache = StaticKVCache.for_model(model, 1)
            return torch.cat([model.infer(ids, cache), model.infer(ids[:, :1], cache)])

        _assert_bitwise(infer, f"{kind} infer T={T}")


@pytest.mark.parametrize("kind", ["fp32", "bf16", "q8"])
def test_frozen_layer_with_grad_on_equals_no_grad(kind):
    torch.manual_seed(0)
    moe = _frozen(MoE(MoEConfig(dim=64, ffn_dim=128, num_experts=8, top_k=2,
                                num_shared_experts=1, shared_expert_gate=True)), kind)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    for T in TOKENS:
        x = torch.randn(T, 64, generator=torch.Generator().manual_seed(T)).to(dtype)
        _assert_bitwise(lambda x=x: moe(x).output, f"{kind} forward T={T}")
        _assert_bitwise(lambda x=x: moe.infer(x), f"{kind} infer T={T}")


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "dbrx", "switch_transformers"])
def test_frozen_hf_model_with_grad_on_equals_no_grad(name):
    # stacked experts (their one-call plan or the backends), a shared expert, and the two
    # whole-block forwards (DBRX, Switch) that gather their experts' weights per call
    from moekit.integrations import hf
    from tests import hf_models

    model = hf.apply(hf_models.build(name)).eval().requires_grad_(False)
    for T in (1, 5, 40):
        ids = torch.randint(3, 64, (1, T), generator=torch.Generator().manual_seed(T))
        kw = {"input_ids": ids}
        if name == "switch_transformers":
            kw["decoder_input_ids"] = ids
        _assert_bitwise(lambda kw=kw: model(**kw).logits, f"{name} T={T}")


# -- a gradient someone wants still arrives --------------------------------------------

GRAD_CFG = LMConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, max_seq_len=64,
                    ffn_dim=64, num_experts=4, top_k=2, router="sigmoid",
                    num_shared_experts=1, shared_expert_gate=True, qkv_bias=True,
                    qk_norm="head", tie_embeddings=False, moe_every=2)
# each the only parameter that trains: the input of every layer (embed), each kernel's
# weights (qkv, the q / k norms, the norms fused with the residual add, router, experts,
# shared experts and their gate, the dense FFN, the head)
ALONE = ["embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
         "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight",
         "blocks.0.attn.out.weight", "blocks.0.ffn_norm.weight", "blocks.0.ffn.w_in.weight",
         "blocks.1.attn_norm.weight", "blocks.1.ffn.router.weight",
         "blocks.1.ffn.experts.w_in", "blocks.1.ffn.shared.w_out", "blocks.1.ffn.shared.gate",
         "norm.weight", "head.weight"]


def _grad_of(model, name: str, run) -> torch.Tensor:
    model.requires_grad_(False)
    p = model.get_parameter(name)
    p.requires_grad_(True)
    out = run(model)
    assert out.requires_grad, f"{name}: the output lost its graph"
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # fp64: the same
    (grad,) = torch.autograd.grad((out * w.to(out.dtype)).sum(), p)
    return grad


def _forward(ids):
    return lambda m: m(ids).logits


def _decode_step(ids):
    def run(m):  # the prefill under no_grad, the decode step (kernels) with grad on
        cache = StaticKVCache.for_model(m, 1)
        with torch.no_grad():
            m.infer(ids, cache)
        return m.infer(ids[:, -1:], cache)
    return run


@pytest.mark.parametrize("name", ALONE)
def test_one_trainable_parameter_gets_its_gradient(name):
    # against the fp64 model (torch's ops, no kernel takes fp64): fp32 rounding through
    # two layers measured <= 7.1e-7 of the gradient's largest entry (all 15, both runs);
    # 1e-5 of it fails a gradient that lost a term or came back None
    torch.manual_seed(0)
    model = MoETransformer(GRAD_CFG).eval()
    ref = copy.deepcopy(model).double()
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    for run in (_forward(ids), _decode_step(ids)):
        got, want = _grad_of(model, name, run), _grad_of(ref, name, run)
        scale = want.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got.double(), want, atol=1e-5 * scale, rtol=0)


def test_frozen_layer_still_differentiates_its_input():
    # no parameter trains, x requires grad: the output keeps its graph and x's gradient
    # is the oracle's, at a decode step's rows and a prefill's
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=32, ffn_dim=64, num_experts=4, top_k=2, num_shared_experts=1,
                        shared_expert_gate=True)).eval().requires_grad_(False)
    for T in (1, 5, 200):
        x = torch.randn(T, 32, generator=torch.Generator().manual_seed(T))
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(T, 32, generator=torch.Generator().manual_seed(T + 1))
        (got,) = torch.autograd.grad((moe(x1).output * g).sum(), x1)
        (want,) = torch.autograd.grad((ref_moe(moe, x2)[0] * g).sum(), x2)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits,g,activations", [(8, None, "float"), (4, 32, "float"),
                                                (4, 32, "int8")])
def test_quantized_linear_differentiates_its_input_at_any_rows(bits, g, activations):
    # the decode kernel took up to QUANT_LINEAR_MAX_ROWS (32) rows whatever x wanted: the
    # output came back without a graph, so x's gradient (and that of every norm weight
    # before a quantized projection) was silently lost; 300 rows dequantized and kept it
    from moekit.quant import quantize_tensor
    from moekit.quant.linear import QuantizedLinear

    torch.manual_seed(0)
    lin = QuantizedLinear(quantize_tensor(torch.randn(1, 64, 48), bits, g, activations))
    w_NK = lin.dequantized().double()  # what the gradient multiplies by, exactly
    for T in (1, 5, 300):
        x = torch.randn(T, 64, generator=torch.Generator().manual_seed(T), requires_grad=True)
        y = lin(x)
        assert y.requires_grad, f"T={T}: the output lost its graph"
        dy = torch.randn(T, 48, generator=torch.Generator().manual_seed(T + 1))
        (dx,) = torch.autograd.grad((y * dy).sum(), x)
        # fp32 sums of 48 products of O(1) terms: ~1e-6 off the fp64 product
        torch.testing.assert_close(dx.double(), dy.double() @ w_NK, atol=1e-5, rtol=1e-5)


def test_grad_wanted_reads_module_parameters_only_with_grad_mode_on(monkeypatch):
    from moekit.functions import decode

    lin = torch.nn.Linear(4, 4).requires_grad_(False)
    x = torch.zeros(2, 4)
    assert not decode.grad_wanted(x, modules=(lin,))
    lin.bias.requires_grad_(True)  # one parameter learns: a gradient is wanted
    assert decode.grad_wanted(x, modules=(lin,))
    assert decode.grad_wanted(x.requires_grad_(True))
    walked = []
    monkeypatch.setattr(lin, "parameters", lambda: walked.append(1) or iter(()))
    with torch.no_grad():  # a decode step's calls: no walk over the parameters
        assert not decode.grad_wanted(x, modules=(lin,))
        assert isinstance(decode.no_grad_unless_wanted(x, modules=(lin,)), torch.no_grad)
    assert not walked
    assert not decode.grad_wanted(torch.zeros(1), modules=(lin,)) and walked == [1]
