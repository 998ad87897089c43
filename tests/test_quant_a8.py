"""int4 and int8 weights with int8 activations (``moekit.quantize(..., activations="int8")``,
W4A8 and W8A8).

Oracle: the definition, in float64. Each input row is rounded per block of 32 inputs
(the last block may be shorter) to xq = round(x / sx), sx = max|x| / 127 (fp32, as
written in the docstring of ``moekit.quantize``: computed here with torch ops, not by
the kernels), and the
kernels must return the product of the dequantized weights with sx * xq. The bound
is fp32 summation: (K + 2) * 2^-24 times the sum of the terms' magnitudes. Also
the API's checks, checkpoints and CLI, prefill (float activations), and a whole
model's logits against the same definition applied layer by layer.

Shape letters: T tokens, E experts, K experts per token, D hidden, F expert hidden,
N output width, g group size.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import moekit
from moekit.experts import backends
from moekit.experts.backends import BACKENDS
from moekit.functions import cpu_ext
from moekit.functions import decode as decode_fn
from moekit.inference import sorted_rows
from moekit.quant import QuantizationError, QuantizedTensor, quantize, quantize_tensor
from moekit.quant import io as qio
from moekit.train.checkpoint import CheckpointError
from tests.test_quant import _lm, _trained_checkpoint

needs_kernel = pytest.mark.skipif(cpu_ext.get_decode() is None, reason="decode kernels not built")


def round_a8(x: torch.Tensor) -> torch.Tensor:
    """x [.., K] (fp32) as the kernels see it: sx * round(x / sx) per block of 32 (the
    last block: the K % 32 inputs left; zeros added to fill it change no max)."""
    K = x.shape[-1]
    b = torch.nn.functional.pad(x.float(), (0, -K % 32)).unflatten(-1, (-1, 32))
    sx = b.abs().amax(-1, keepdim=True) / 127
    q = torch.where(sx > 0, (b / torch.where(sx > 0, sx, 1)).round().clamp(-127, 127), 0)
    return (q.double() * sx.double()).flatten(-2)[..., :K]


def _quantize(w: torch.Tensor, bits: int, g: int | None) -> QuantizedTensor:
    return quantize_tensor(w, bits, g if bits == 4 else None, activations="int8")


def _check(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, K: int) -> None:
    bound = (K + 2) * 2.0**-24 * magnitude + 1e-30
    excess = ((got.double() - want).abs() / bound).max().item()
    assert excess <= 1.0, f"error {excess:.2f} x the fp32 summation bound"


@needs_kernel
# int4: 160 and 96, a tail of chunks past the last block of 128 inputs; int8: K % 64 (a
# last, partial block of the 64-input records: 100, 33, 7; 160 and 96 one of 32)
@pytest.mark.parametrize("bits,K,g", [
    *((4, K, g) for K, g in [(1024, 32), (1024, 64), (1024, 128), (384, 64), (384, 128),
                             (160, 32), (96, 32)]),
    *((8, K, None) for K in (1024, 160, 100, 96, 64, 33, 7))])
@pytest.mark.parametrize("T", [1, 3, 9])  # 9: a pass of 8 rows (4 on AVX2) and a rest
def test_int8_activation_gate_up_matches_definition(bits, K, g, T):
    E, N, topk = 5, 45, 3  # N odd: a tile's last output row alone (W8A8 pairs them)
    gen = torch.Generator().manual_seed(K + (g or 0) + T + bits)
    qt = _quantize(torch.randn(E, K, N, generator=gen), bits, g)
    x = torch.randn(T, K, generator=gen) * torch.rand(T, 1, generator=gen) * 4
    x[0, :min(32, K)] = 0  # a block of zeros: scale 0
    w, idx = torch.rand(T, E, generator=gen).topk(topk, dim=-1)
    d = sorted_rows(idx, w, E)
    ext = cpu_ext.get_decode()
    h = ext.gate_up(x, d.token_S, d.offsets_E, *decode_fn.wargs(qt), None, 0, 0.0, 1.0)
    W = qt.dequantize().double()  # [E, K, N]
    xh = round_a8(x)
    e_S = torch.repeat_interleave(torch.arange(E), d.counts_E)
    rows = xh[d.token_S]
    want = torch.einsum("sk,skn->sn", rows, W[e_S])
    mag = torch.einsum("sk,skn->sn", rows.abs(), W[e_S].abs())
    _check(h, want, mag, K)


@needs_kernel
# o16: int4 held in the 16-output order (tests/test_quant_o16.py)
@pytest.mark.parametrize("bits,g,layout", [(4, 32, "nk"), (4, 64, "nk"), (8, None, "nk"),
                                           (4, 32, "o16")])
@pytest.mark.parametrize("T", [1, 6])
def test_int8_activation_down_combine_matches_definition(bits, g, layout, T):
    E, F, D, topk = 6, 256, 96, 2
    gen = torch.Generator().manual_seed(7 + (g or 0) + T + bits)
    qt = _quantize(torch.randn(E, F, D, generator=gen), bits, g)
    w, idx = torch.rand(T, E, generator=gen).topk(topk, dim=-1)
    d = sorted_rows(idx, w, E)
    a = torch.randn(T * topk, F, generator=gen)
    out = torch.full((T, D), 9.0)
    kernel_w = copy.deepcopy(qt).set_layout(layout)
    cpu_ext.get_decode().down_combine(a, d.token_S, d.weight_S.float(), d.offsets_E,
                                      *decode_fn.wargs(kernel_w), None, out)
    W = qt.dequantize().double()
    e_S = torch.repeat_interleave(torch.arange(E), d.counts_E)
    ah = round_a8(a)
    ws = d.weight_S.double()[:, None]
    want = torch.zeros(T, D, dtype=torch.float64).index_add_(
        0, d.token_S, ws * torch.einsum("sk,skn->sn", ah, W[e_S]))
    mag = torch.zeros(T, D, dtype=torch.float64).index_add_(
        0, d.token_S, ws.abs() * torch.einsum("sk,skn->sn", ah.abs(), W[e_S].abs()))
    _check(out, want, mag, F + topk)


@needs_kernel
@pytest.mark.parametrize("bits,g", [(4, 64), (8, None)])
def test_int8_activations_change_the_result_and_weight_only_does_not(bits, g):
    """The flag reaches the kernels (a weight-only run differs from W4A8 / W8A8 by the
    activations' rounding)."""
    E, K, N = 4, 256, 32
    qt = quantize_tensor(torch.randn(E, K, N), bits, g)
    qa = QuantizedTensor(qt.data, qt.scales, qt.zeros, bits, g, activations="int8")
    x = torch.randn(3, K)
    d = sorted_rows(torch.tensor([[0], [2], [3]]), torch.ones(3, 1), E)
    ext = cpu_ext.get_decode()
    hw = ext.gate_up(x, d.token_S, d.offsets_E, *decode_fn.wargs(qt), None, 0, 0.0, 1.0)
    ha = ext.gate_up(x, d.token_S, d.offsets_E, *decode_fn.wargs(qa), None, 0, 0.0, 1.0)
    W = qt.dequantize().double()[[0, 2, 3]]
    exact = torch.einsum("sk,skn->sn", x.double(), W)
    rounded = torch.einsum("sk,skn->sn", round_a8(x), W)
    assert (hw.double() - exact).abs().max() < 1e-3 < (hw.double() - rounded).abs().max()
    assert (ha.double() - rounded).abs().max() < 1e-3 < (ha.double() - exact).abs().max()


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("path", ["kernel", "one call", "dequantize+fused"])
def test_int8_activation_experts_through_the_backend(path, bits, monkeypatch):
    """The MoE experts' decode backend (gather, SwiGLU, combine) against the definition:
    x rounded before w_in, the activated rows rounded before w_out, on the decode kernels
    and on prefill's one call where it rounds them too (igemm_a8: AVX-512 VNNI); prefill
    on dequantized weights and the fused GEMMs keeps float activations."""
    if path != "kernel":
        monkeypatch.setattr(backends, "QUANT_KERNEL_MAX_ROWS", 0)
        monkeypatch.setattr(backends, "DECODE_MAX_ROWS_PER_EXPERT", 0)
    if path == "one call":
        ext = cpu_ext.get()
        if ext is None or not decode_fn.quant_one_call_format(torch.float32, bits, 32, 128, 64,
                                                             False, "swiglu") \
                or not ext.int8_activations_gemm_ok():
            pytest.skip("prefill's one call with int8 activations needs AVX-512 VNNI")
    else:
        monkeypatch.setattr(decode_fn, "QUANT_ONE_CALL", path == "kernel")
    prefill = path == "dequantize+fused"
    cfg = moekit.MoEConfig(dim=128, ffn_dim=64, num_experts=6, top_k=2)
    ex = moekit.experts.Experts(cfg).requires_grad_(False)
    qi, qo = (_quantize(w, bits, 32) for w in (ex.w_in, ex.w_out))
    T = 4
    x = torch.randn(T, 128)
    w, idx = torch.rand(T, 6).topk(2, dim=-1)
    d = sorted_rows(idx, w, 6)
    with torch.no_grad():
        got = BACKENDS["decode"](x, d, qi, qo, None, None, ex._act)
    Wi, Wo = qi.dequantize().double(), qo.dequantize().double()
    e_S = torch.repeat_interleave(torch.arange(6), d.counts_E)
    rnd = (lambda t: t.double()) if prefill else round_a8
    h = torch.einsum("sk,skn->sn", rnd(x[d.token_S]), Wi[e_S]).float()
    gate, up = h.chunk(2, dim=-1)
    a = torch.nn.functional.silu(gate) * up
    y = torch.einsum("sk,skn->sn", rnd(a), Wo[e_S]) * d.weight_S.double()[:, None]
    want = torch.zeros(T, 128, dtype=torch.float64).index_add_(0, d.token_S, y)
    # h is rounded in fp32 here and in the kernel: a near-tie may round either way
    # once, moving one input by a step (sx ~ |a| / 127): a loose bound on purpose
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("kw,match", [
    (dict(bits=4, activations="int4"), "activations='int4' is not allowed"),
    (dict(bits=8, activations=None), "activations=None is not allowed"),
])
def test_bad_activation_requests_change_nothing(kw, match):
    model = _lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=match):
        quantize(model, **kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not moekit.quant.model.is_quantized(model)


@needs_kernel
@pytest.mark.parametrize("bits,g", [(4, 32), (8, None)])
def test_generation_runs_the_int8_activation_kernels(bits, g):
    """A decode step of a W4A8 / W8A8 model differs from the weight-only model's logits
    (the flag reaches every quantized projection), by little."""
    model = _lm()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    a8 = quantize(copy.deepcopy(model), bits=bits, group_size=g, activations="int8")
    w4 = quantize(copy.deepcopy(model), bits=bits, group_size=g)
    assert all(q.activations == "int8" for q in a8.modules()
               if isinstance(q, QuantizedTensor))
    assert "activations=int8" in repr(a8.blocks[0].ffn.experts.w_in)
    from moekit.models.transformer import StaticKVCache
    with torch.inference_mode():
        outs = []
        for m in (a8, w4):
            cache = StaticKVCache.for_model(m, 2, 16)
            cache.reset()
            m.infer(ids, cache)
            outs.append(m.infer(ids[:, -1:], cache))
    diff = (outs[0] - outs[1]).abs().max().item()
    assert 0 < diff < 0.1 * outs[1].abs().max().item()


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_checkpoint_round_trip_and_cli(tmp_path, capsys, bits):
    from moekit.cli import main

    model, run = _trained_checkpoint(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", str(run), "--bits", str(bits), "--activations", "int8",
                 "--out", str(out)]) == 0
    assert "activations=int8" in capsys.readouterr().out
    assert json.loads((out / qio.META_FILE).read_text())["activations"] == "int8"
    loaded = qio.load_quantized(out)
    expect = quantize(copy.deepcopy(model), bits=bits, activations="int8")
    qts = [m for m in loaded.modules() if isinstance(m, QuantizedTensor)]
    assert qts and all(q.activations == "int8" for q in qts)
    ids = torch.randint(0, 256, (1, 9))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, expect(ids).logits)
    assert main(["generate", "--checkpoint", str(out), "--prompt", "ab",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_checkpoint_with_bad_activations_is_refused(tmp_path):
    model, run = _trained_checkpoint(tmp_path)
    out = qio.quantize_checkpoint(run, tmp_path / "q", 4)
    meta = json.loads((out / qio.META_FILE).read_text())
    assert meta["activations"] == "float"
    del meta["activations"]  # files written before the flag: weight-only
    (out / qio.META_FILE).write_text(json.dumps(meta))
    assert all(q.activations == "float" for q in qio.load_quantized(out).modules()
               if isinstance(q, QuantizedTensor))
    meta["activations"] = "int2"
    (out / qio.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="activations='int2' is not allowed"):
        qio.load_quantized(out)


@needs_kernel
@pytest.mark.parametrize("bits,g", [(4, 32), (8, None)])
def test_hf_patched_model_with_int8_activations(bits, g):
    """A transformers model patched by hf.apply and quantized with int8 activations:
    every quantized weight carries the flag, its logits differ from the weight-only
    model's by the activations' rounding only (close), and its own generate() runs."""
    transformers = pytest.importorskip("transformers")
    from moekit.integrations import hf
    from tests import hf_models

    torch.manual_seed(0)  # an OLMoE whose expert widths int4 groups of 32 tile
    cfg = transformers.OlmoeConfig(**{**hf_models.COMMON, "intermediate_size": 32,
                                      "num_experts": 8, "num_experts_per_tok": 2})
    original = transformers.OlmoeForCausalLM(cfg).eval()
    a8 = quantize(hf.apply(copy.deepcopy(original)), bits=bits, group_size=g,
                  activations="int8")
    w4 = quantize(hf.apply(copy.deepcopy(original)), bits=bits, group_size=g)
    qts = [m for m in a8.modules() if isinstance(m, QuantizedTensor)]
    assert qts and all(q.activations == "int8" for q in qts)
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lw = a8(input_ids=ids).logits, w4(input_ids=ids).logits
    diff = (la - lw).abs().max().item()
    assert 0 < diff < 0.05 * lw.abs().max().item()
    out = a8.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10) and torch.equal(out[:, :6], ids)
