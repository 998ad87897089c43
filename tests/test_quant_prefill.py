"""Quantized prefill in one C++ call: int8 / int4 weights dequantized inside the GEMMs'
packing (``swiglu_experts_q_out``, moekit/csrc/cpu_experts.cpp), against an fp64
computation on ``dequantize``'s weights and, bitwise, against the float one-call
forward on those weights.

Shape letters: T tokens, D hidden, F expert hidden, E experts.
"""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.experts.backends import BACKENDS
from moekit.functions import cpu_ext, decode
from moekit.inference import sorted_rows
from moekit.quant.tensor import _dequantize_torch, quantize_tensor
from tests.test_fast_path import _assert_close, _dispatch, _per_row_fp64

FORMATS = [(8, None), (4, 32), (4, 64), (4, 128)]
# rows per expert: none, one, the register blocks' edges, 64, 96 and past moekit's float
# GEMM's rows (97, 300)
COUNTS, T = [0, 1, 5, 7, 64, 96, 97, 300], 200


def _q_ext(gemm: bool = False):
    """The C++ module; ``gemm``: also skip where moekit's GEMM is off (MOEKIT_SGEMM=0), so
    that the model paths do not take the one call."""
    ext = cpu_ext.get()
    if ext is None or not hasattr(ext, "swiglu_experts_q_out"):
        pytest.skip("the C++ kernels did not build")
    if not ext.quantized_swiglu_experts_ok():
        pytest.skip("swiglu_experts_q_out needs an AVX-512F CPU")
    if gemm and ext.sgemm_max_rows() == 0:
        pytest.skip("moekit's GEMM is off (MOEKIT_SGEMM=0)")
    return ext


def _problem(bits, g, D, Fd, counts=COUNTS, seed=3):
    E = len(counts)
    d = _dispatch(E, counts, dropped=3, T=T, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    qi = quantize_tensor(torch.randn(E, D, 2 * Fd, generator=gen) / D**0.5, bits, g)
    qo = quantize_tensor(torch.randn(E, Fd, D, generator=gen) / Fd**0.5, bits, g)
    return d, x, qi, qo


def _float(q) -> torch.Tensor:
    """dequantize's weights as a contiguous [E, K, N] stack (torch ops, not the kernels)."""
    return _dequantize_torch(q, 0, q.data.shape[0]).transpose(1, 2).contiguous()


def _call(ext, d, x, qi, qo, out):
    S, (Fd, D) = int(d.offsets_E[-1]), qo.shape[1:]
    ext.swiglu_experts_q_out(x, d.token_S[:S].contiguous(), d.weight_S[:S].contiguous(),
                             qi.data, qi.scales, qi.zeros, qo.data, qo.scales, qo.zeros,
                             qi.bits, qi.group_size or 0, d.offsets_E.tolist(),
                             torch.empty(S, Fd), torch.empty(S, D), out, False)
    return out


@pytest.mark.parametrize("bits,g", FORMATS)
# D = 160: a last 16-column group and panel past D's end in the down projection;
# F = 96: every gate|up task narrower than 64 columns (its halves packed apart)
@pytest.mark.parametrize("D,Fd", [(256, 128), (160, 96)])
def test_matches_fp64_on_dequantized_weights(bits, g, D, Fd, two_threads):
    ext = _q_ext()
    if bits == 4 and (D % g or Fd % g):
        pytest.skip("the group does not divide the width")
    d, x, qi, qo = _problem(bits, g, D, Fd)
    start = torch.randn(T, D)
    got = _call(ext, d, x, qi, qo, start.clone())
    want = start.double() + _per_row_fp64(d, x, _float(qi), _float(qo))
    _assert_close([got], [want], ["out"], 1e-5, 1e-5)


@pytest.mark.parametrize("bits,g", [(8, None), (4, 64)])
def test_bitwise_the_float_one_call_on_dequantized_weights(bits, g, two_threads):
    """Experts of at most 96 rows with weights past 512 x 1024: the float call runs moekit's
    GEMM there too, each output one FMA chain over k in order; so equal packed weights
    (transpose, nibble order, scales, zero points) give bitwise equal outputs."""
    ext = _q_ext()
    if ext.sgemm_max_rows() < 96:
        pytest.skip("moekit's float GEMM is off (MOEKIT_SGEMM=0)")
    counts = [0, 1, 5, 7, 64, 96, 0, 3, 50]
    d, x, qi, qo = _problem(bits, g, 1024, 512, counts)
    S = int(d.offsets_E[-1])
    got = _call(ext, d, x, qi, qo, torch.zeros(T, 1024))
    want = torch.zeros(T, 1024)
    ext.swiglu_experts_out(x, d.token_S[:S].contiguous(), d.weight_S[:S].contiguous(),
                           _float(qi), _float(qo), d.offsets_E.tolist(), torch.empty(S, 512),
                           torch.empty(S, 1024), want)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits,g", [(8, None), (4, 32)])
def test_prefill_takes_it_and_matches_the_dequantize_path(bits, g, monkeypatch, two_threads):
    """A quantized SwiGLU MoE layer past the decode kernels' rows: the one call runs (the
    dequantize-per-block path is not entered) and agrees with that path."""
    _q_ext(gemm=True)
    cfg = moekit.MoEConfig(dim=128, ffn_dim=96, num_experts=6, top_k=2)
    ex = moekit.experts.Experts(cfg).requires_grad_(False)
    qi, qo = quantize_tensor(ex.w_in, bits, g), quantize_tensor(ex.w_out, bits, g)
    monkeypatch.setattr("moekit.experts.backends.QUANT_KERNEL_MAX_ROWS", 0)
    x = torch.randn(50, 128)
    w, idx = torch.rand(50, 6).topk(2, dim=-1)
    d = sorted_rows(idx, w, 6)
    calls = []
    real = decode.quantized_experts_into
    monkeypatch.setattr(decode, "quantized_experts_into", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = BACKENDS["decode"](x, d, qi, qo, None, None, ex._act)
        assert calls == [1]
        monkeypatch.setattr(decode, "QUANT_ONE_CALL", False)
        want = BACKENDS["decode"](x, d, qi, qo, None, None, ex._act)
        assert calls == [1]  # the dequantize-per-block path instead
        ref = BACKENDS["loop"](x, d, _float(qi), _float(qo), None, None, ex._act)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_before_anything_is_written():
    ext = _q_ext()
    d, x, qi, qo = _problem(4, 64, 256, 128)
    out = torch.zeros(T, 256)

    def call(**change):
        args = dict(qi_data=qi.data, qi_zeros=qi.zeros, qo_scales=qo.scales, group=64)
        args.update(change)
        S = int(d.offsets_E[-1])
        ext.swiglu_experts_q_out(x, d.token_S[:S].contiguous(), d.weight_S[:S].contiguous(),
                                 args["qi_data"], qi.scales, args["qi_zeros"], qo.data,
                                 args["qo_scales"], qo.zeros, 4, args["group"],
                                 d.offsets_E.tolist(), torch.empty(S, 128),
                                 torch.empty(S, 256), out, False)

    with pytest.raises(RuntimeError, match=r"w_in: int4 needs zeros"):
        call(qi_zeros=None)
    with pytest.raises(RuntimeError, match=r"w_in data must be contiguous uint8 \[8, 256, 128\]"):
        call(qi_data=qi.data[:, :, :64])
    with pytest.raises(RuntimeError, match=r"w_out scales must be contiguous float32"):
        call(qo_scales=qo.scales[:, :, :1])
    with pytest.raises(RuntimeError, match=r"group=48 must be a multiple of 32"):
        call(group=48)
    assert not out.any()
    # an input width that is not a multiple of 32 (int8 allows any K)
    d8, x8, qi8, qo8 = _problem(8, None, 256, 40, counts=[3, 4])
    with pytest.raises(RuntimeError, match=r"w_out: the input width K=40 must be a multiple "
                                           r"of 32"):
        _call(ext, d8, x8, qi8, qo8, out)
    assert not out.any()


def test_the_decode_kernels_keep_few_rows_per_expert_only_where_the_one_call_runs():
    """Past 24 rows per expert the one call is faster than the decode kernels (measured in
    experts/backends.py), so "decode" hands those rows to it; with biases (no one call)
    the kernels keep up to QUANT_KERNEL_MAX_ROWS, with bf16 activations 64 per expert
    (dequantized straight to bf16) up to that."""
    from moekit.experts import backends

    _q_ext(gemm=True)
    _, _, qi, qo = _problem(8, None, 256, 128, counts=[1] * 6)
    limit = backends.quant_kernel_max_rows(torch.float32, qi, qo, False, "swiglu")
    assert limit == backends.DECODE_MAX_ROWS_PER_EXPERT * 6
    for args in ((torch.float32, qi, qo, True, "swiglu"),     # biases
                 (torch.float32, qi, qo, False, "geglu")):    # another activation
        assert backends.quant_kernel_max_rows(*args) == backends.QUANT_KERNEL_MAX_ROWS
    bf16 = (torch.bfloat16, qi, qo, False, "swiglu")
    assert backends.quant_kernel_max_rows(*bf16) == backends.BF16_QUANT_ROWS_PER_EXPERT * 6
    _, _, q64, q64o = _problem(8, None, 256, 128, counts=[1] * 64)
    assert backends.quant_kernel_max_rows(torch.bfloat16, q64, q64o, False, "swiglu") == \
        backends.QUANT_KERNEL_MAX_ROWS
    # int8-activation weights: the one call rounds their inputs too where the CPU has
    # AVX-512 VNNI, and overtakes the kernels sooner
    for bits, g in [(8, None), (4, 32)]:
        a8 = [quantize_tensor(_float(q), bits, g, activations="int8")
              for q in _problem(bits, g, 256, 128, counts=[1] * 6)[2:]]
        per = backends.A8_ROWS_PER_EXPERT[bits] if decode.int8_gemm_here() else \
            backends.DECODE_MAX_ROWS_PER_EXPERT
        assert backends.quant_kernel_max_rows(torch.float32, *a8, False, "swiglu") == per * 6
        assert backends.quant_kernel_max_rows(torch.float32, *a8, True, "swiglu") == \
            backends.QUANT_KERNEL_MAX_ROWS


# -- a quantized linear's rows past the decode kernel: q_linear_out --------------------


def _q_linear(bits, g, K, N, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return quantize_tensor(torch.randn(1, K, N, generator=gen) / K**0.5, bits, g)


@pytest.mark.parametrize("bits,g", FORMATS)
# N = 200: a last panel of 8 columns; 33 rows: one past the decode kernel's
@pytest.mark.parametrize("M,K,N", [(33, 256, 200), (130, 128, 1024), (256, 512, 64)])
def test_q_linear_matches_fp64_on_dequantized_weights(bits, g, M, K, N, two_threads):
    ext = _q_ext()
    if bits == 4 and K % g:
        pytest.skip("the group does not divide K")
    q = _q_linear(bits, g, K, N)
    x = torch.randn(M, K)
    out = torch.full((M, N), float("nan"))
    ext.q_linear_out(x, q.data, q.scales, q.zeros, bits, g or 0, out, False)
    _assert_close([out], [x.double() @ _float(q)[0].double()], ["out"], 1e-5, 1e-5)


@pytest.mark.parametrize("bits,g", [(8, None), (4, 64)])
def test_q_linear_bitwise_the_float_gemm_on_dequantized_weights(bits, g, two_threads):
    """Up to 96 rows the float grouped GEMM runs moekit's GEMM on a [512, 1024] weight too:
    the same FMA chain per output, so bitwise equal outputs."""
    ext = _q_ext()
    if ext.sgemm_max_rows() < 96:
        pytest.skip("moekit's float GEMM is off (MOEKIT_SGEMM=0)")
    q = _q_linear(bits, g, 512, 1024)
    x = torch.randn(96, 512)
    got, want = torch.empty(96, 1024), torch.empty(96, 1024)
    ext.q_linear_out(x, q.data, q.scales, q.zeros, bits, g or 0, got, False)
    ext.grouped_mm_out(x, _float(q), [96], want)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits,g", [(8, None), (4, 32)])
def test_quantized_linear_takes_it_between_the_kernel_and_the_float_copy(bits, g,
                                                                         monkeypatch):
    """QuantizedLinear (and decode.project) on 33..QUANT_GEMM_MAX_ROWS fp32 rows: one
    q_linear_out call, no float copy of the weight; past it, or with a gradient wanted
    through x, or in bf16, the dequantize path."""
    from moekit.quant.linear import QuantizedLinear

    _q_ext(gemm=True)
    q = _q_linear(bits, g, 128, 96)
    bias = torch.randn(96)
    layer = QuantizedLinear(q, bias)
    copies = []
    import moekit.quant.linear as qlinear
    import moekit.quant.tensor as qtensor

    real = qtensor.dequantize_NK
    for module in (qlinear, qtensor):  # QuantizedLinear's and QuantizedTensor.dequantize's
        monkeypatch.setattr(module, "dequantize_NK",
                            lambda *a, **k: copies.append(1) or real(*a, **k))
    ref = _float(q)[0].double()
    for rows in (33, decode.QUANT_GEMM_MAX_ROWS):
        x = torch.randn(rows, 128)
        with torch.no_grad():
            got = layer(x)
            via_project = decode.project(x, q)
        assert not copies
        _assert_close([got, via_project], [x.double() @ ref + bias.double(), x.double() @ ref],
                      ["QuantizedLinear", "project"], 1e-5, 1e-5)
    x = torch.randn(decode.QUANT_GEMM_MAX_ROWS + 1, 128)
    with torch.no_grad():
        layer(x)
        assert copies
        copies.clear()
        decode.project(x, q)
    assert copies
    copies.clear()
    x = torch.randn(40, 128, requires_grad=True)
    y = layer(x)  # autograd wants dy/dx: the float path
    assert copies and y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(x.grad, _float(q)[0].sum(1).expand(40, 128), atol=1e-5,
                               rtol=1e-5)
    copies.clear()
    with torch.no_grad():
        assert layer(torch.randn(40, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert copies


def test_q_linear_refuses_bad_input_before_writing():
    ext = _q_ext()
    q = _q_linear(4, 64, 256, 128)
    out = torch.zeros(40, 128)
    with pytest.raises(RuntimeError, match=r"weight: int4 needs zeros"):
        ext.q_linear_out(torch.randn(40, 256), q.data, q.scales, None, 4, 64, out, False)
    with pytest.raises(RuntimeError, match=r"out_MN must be \[40, 128\], got \[40, 64\]"):
        ext.q_linear_out(torch.randn(40, 256), q.data, q.scales, q.zeros, 4, 64,
                         torch.zeros(40, 64), False)
    with pytest.raises(RuntimeError, match=r"weight data must be contiguous uint8 \[1, 128, 128\]"):
        ext.q_linear_out(torch.randn(40, 256), q.data[:, :, :64], q.scales, q.zeros, 4, 64, out,
                         False)
    with pytest.raises(RuntimeError, match=r"x_MK must be float32"):
        ext.q_linear_out(torch.randn(40, 256).double(), q.data, q.scales, q.zeros, 4, 64, out,
                         False)
    if ext.int8_activations_gemm_ok():  # int4 groups must divide the int8 GEMM's blocks
        parts = torch.zeros(1, 128, 96, dtype=torch.uint8), torch.ones(1, 128, 2)
        with pytest.raises(RuntimeError, match=r"group=96 is not allowed with int8 activations"):
            ext.q_linear_out(torch.randn(40, 192), *parts, torch.zeros(1, 128, 2), 4, 96, out,
                             True)
    assert not out.any()


# -- int8 activations (activations="int8" weights): igemm_a8 -----------------------------


def _a8_ext():
    ext = _q_ext()
    if not ext.int8_activations_gemm_ok():
        pytest.skip("the int8-activation GEMM needs AVX-512 VNNI")
    return ext


def _a8_rows(M: int, K: int, seed: int = 7) -> torch.Tensor:
    """Random rows, with row 0's first chunk full of exact ties (max 127, so sx = 1: x / sx
    = k + 0.5 rounds to even; half away from zero would be off by one) and row 1's first
    chunk all zeros (sx = 0)."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
    x[0, :32] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -2.5, 4.5] * 4)
    if M > 1:
        x[1, :32] = 0.0
    return x


@pytest.mark.parametrize("bits,g", FORMATS)
# K = 96 .. 1024: one packed block of a panel; 2176: a block of 2048 inputs (A8_KC) and a
# short last one. Rows 1, 7, 13 and 300: the 6-row register blocks and their rests. N =
# 70 / 200 / 33: a last panel of 6 / 8 / 1 columns
@pytest.mark.parametrize("M,K,N", [(1, 96, 70), (7, 384, 200), (13, 1024, 33), (300, 2176, 64)])
def test_q_linear_int8_activations_match_the_definition(bits, g, M, K, N, two_threads):
    """out = x' @ W, x' the rows rounded per 32 inputs as the decode kernels round them
    (tests/test_quant_a8.round_a8), W dequantize's weights: within fp32 summation's bound."""
    from tests.test_quant_a8 import _check, round_a8

    ext = _a8_ext()
    if bits == 4 and K % g:
        pytest.skip("the group does not divide K")
    q = quantize_tensor(torch.randn(1, K, N, generator=torch.Generator().manual_seed(5))
                        / K**0.5, bits, g, activations="int8")
    x = _a8_rows(M, K)
    out = torch.full((M, N), float("nan"))
    ext.q_linear_out(x, q.data, q.scales, q.zeros, bits, g or 0, out, True)
    W = _float(q)[0].double()
    _check(out, round_a8(x) @ W, round_a8(x).abs() @ W.abs(), K)


@pytest.mark.parametrize("bits,g", FORMATS)
@pytest.mark.parametrize("D,Fd", [(256, 128), (160, 96)])
def test_swiglu_experts_int8_activations_match_the_definition(bits, g, D, Fd, two_threads):
    """The one call with a8: a = swiglu(x' @ W_in) per routed row, then out += w * a' @
    W_out (a' the kernel's own a, rounded: a near-tie in a's fp32 rounding may round
    either way, so the two projections are checked apart), each within fp32's bound."""
    from tests.test_quant_a8 import _check, round_a8

    ext = _a8_ext()
    if bits == 4 and (D % g or Fd % g):
        pytest.skip("the group does not divide the width")
    d, _, qi, qo = _problem(bits, g, D, Fd)
    qi, qo = (quantize_tensor(_float(q), bits, g, activations="int8") for q in (qi, qo))
    x = _a8_rows(T, D)
    S = int(d.offsets_E[-1])
    a, y, out = torch.empty(S, Fd), torch.empty(S, D), torch.zeros(T, D)
    ext.swiglu_experts_q_out(x, d.token_S[:S].contiguous(), d.weight_S[:S].contiguous(),
                             qi.data, qi.scales, qi.zeros, qo.data, qo.scales, qo.zeros, bits,
                             g or 0, d.offsets_E.tolist(), a, y, out, True)
    e_S = torch.repeat_interleave(torch.arange(len(COUNTS)), d.counts_E)[:S]
    xr, Wi, Wo = round_a8(x[d.token_S[:S]]), _float(qi).double(), _float(qo).double()
    h = torch.einsum("sk,skn->sn", xr, Wi[e_S])
    gate, up = h.chunk(2, dim=-1)
    want_a = torch.nn.functional.silu(gate) * up
    # h's fp32 error carried through swiglu (|silu'| <= 1.1), and swiglu's own rounding
    # (silu in fp32 and a product): 4 ulp of |a|
    mag_h = torch.einsum("sk,skn->sn", xr.abs(), Wi[e_S].abs())
    mag_a = 1.1 * up.abs() * mag_h[:, :Fd] + torch.nn.functional.silu(gate).abs() * \
        mag_h[:, Fd:] + 4 * want_a.abs() / (D + 2)
    _check(a, want_a, mag_a, D)
    ar, w_S = round_a8(a), d.weight_S[:S].double()[:, None]
    want_y = torch.einsum("sk,skn->sn", ar, Wo[e_S]) * w_S
    _check(y, want_y, torch.einsum("sk,skn->sn", ar.abs(), Wo[e_S].abs()) * w_S, Fd + 1)
    # the combine: out[t] = the sum of its rows of y (a few fp32 additions)
    want = torch.zeros(T, D, dtype=torch.float64).index_add_(0, d.token_S[:S], y.double())
    bound = 4 * 2.0**-24 * torch.zeros_like(want).index_add_(0, d.token_S[:S], y.double().abs())
    assert ((out.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("bits,g", [(8, None), (4, 64)])
def test_int8_activation_model_prefills_the_function_it_decodes(bits, g, monkeypatch,
                                                                two_threads):
    """An LM quantized with activations="int8": a 4 x 50-token forward on prefill's GEMMs
    (experts of ~100 rows, projections of 200 rows) gives the logits of the same forward
    forced onto the decode kernels (which round every projection's inputs), to fp32
    summation differences; with float inputs in prefill (the one call off) it did not."""
    from tests.test_quant import _lm

    _a8_ext()
    model = moekit.quantize(_lm(num_experts=4, top_k=2), bits=bits, group_size=g,
                            activations="int8", scope="all")
    ids = torch.randint(0, 256, (4, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids)
        monkeypatch.setattr(decode, "QUANT_ONE_CALL", False)
        floats = model(ids)
        from moekit.experts import backends
        monkeypatch.setattr(backends, "QUANT_KERNEL_MAX_ROWS", 1 << 30)
        monkeypatch.setattr(backends, "DECODE_MAX_ROWS_PER_EXPERT", 1 << 30)
        monkeypatch.setattr(decode, "QUANT_LINEAR_MAX_ROWS", 1 << 30)
        want = model(ids)
    got, floats, want = (getattr(t, "logits", t) for t in (got, floats, want))
    # where an input lands within fp32 noise of a rounding tie (x / sx = k + 1/2) the two
    # orders of summation may round it apart, one step (sx) in one input; such a flip
    # moves the logits of its position (here ~1% of the logits, by up to ~1e-3); every
    # other logit agrees to fp32 noise. Float inputs moved all of them.
    far, far_floats = ((t - want).abs() > 1e-5 for t in (got, floats))
    assert far.float().mean() < 0.05 and far_floats.float().mean() > 0.5
    assert (got - want).abs().mean() * 50 < (floats - want).abs().mean()
