"""The decode expert kernels (moekit/csrc/cpu_decode.cpp) against the per-token oracle.

The oracle is tests/reference.py: one (token, expert) pair at a time, in fp32,
from the raw parameters. Rows are routed with a top-k of random logits; the
kernels see them sorted by expert.

Tolerances: fp32 differs from the oracle only in summation order (D <= 96
terms of size ~1): 1e-5 absolute, 1e-4 relative. bf16: the kernels read the
same bf16 weights and inputs the oracle casts to fp32, accumulate in fp32, and
round only the output to bf16, so the error is at most half a bf16 ulp of the
output (2^-9 relative) plus fp32 noise: 4e-3 relative, 1e-4 absolute.

Shape letters: T tokens, D hidden, F expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import moekit
from moekit.experts.backends import BACKENDS, DECODE_MAX_ROWS, decode_max_rows
from moekit.functions import cpu_ext
from moekit.functions import decode as decode_fn
from moekit.inference import decode_experts, sorted_rows
from moekit.quant.tensor import quantize_tensor, unpack_int4
from tests.reference import f32, ref_expert

pytestmark = pytest.mark.skipif(not decode_fn.available(), reason="decode kernels not built")

ACTIVATIONS = ["swiglu", "geglu", "swiglu_oai", "relu2", "gelu"]
DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-4, 4e-3)]
CASES = [
    # (T, E, K, D, F)     what it exercises
    (1, 4, 1, 64, 48),    # one row
    (3, 8, 8, 40, 24),    # K == E: every expert touched; D not a multiple of 32
    (5, 7, 3, 96, 80),    # odd T, prime E
    (8, 16, 8, 64, 32),   # 64 rows
    (12, 4, 2, 37, 21),   # ~6 rows per expert (row groups of 4 + rest); odd D, F: tails
]


def _experts(E, D, F, act, dtype, seed=0) -> moekit.experts.Experts:
    torch.manual_seed(seed)
    cfg = moekit.MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=1, activation=act,
                           expert_bias=True, swiglu_limit=1.5)
    ex = moekit.experts.Experts(cfg).requires_grad_(False)
    ex.b_in.normal_(0, 0.5)
    ex.b_out.normal_(0, 0.5)
    return ex.to(dtype)


def _route(T, E, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    w, idx = logits.softmax(-1).topk(K, dim=-1)
    return idx, w


def _oracle(ex, x_TD, experts_TK, weights_TK):
    p = f32(ex, "w_in", "w_out", "b_in", "b_out")
    y = torch.zeros(x_TD.shape, dtype=torch.float32)
    for t in range(x_TD.shape[0]):
        for k in range(experts_TK.shape[1]):
            e = int(experts_TK[t, k])
            y[t] += weights_TK[t, k] * ref_expert(x_TD[t].float(), p, e, ex.cfg)
    return y


def _transposed(w):
    """The same values with unit stride along the input (transformers' layout)."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("T,E,K,D,F", CASES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", ["moekit", "transposed"])
def test_matches_reference(T, E, K, D, F, act, dtype, atol, rtol, layout):
    ex = _experts(E, D, F, act, dtype)
    x = torch.randn(T, D).to(dtype)
    experts_TK, weights_TK = _route(T, E, K)
    w_in, w_out = ex.w_in, ex.w_out
    if layout == "transposed":
        w_in, w_out = _transposed(w_in), _transposed(w_out)
    y = decode_experts(x, experts_TK, weights_TK, w_in, w_out, ex.b_in, ex.b_out, act,
                       swiglu_limit=1.5, swiglu_alpha=ex.cfg.swiglu_alpha)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), _oracle(ex, x, experts_TK, weights_TK),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_single_touched_expert_and_untouched_tokens(dtype, atol, rtol):
    """Every row to expert 2 (the others idle); a token with weight 0 contributes 0."""
    ex = _experts(6, 64, 32, "swiglu", dtype)
    x = torch.randn(7, 64).to(dtype)
    experts_TK = torch.full((7, 1), 2)
    weights_TK = torch.rand(7, 1)
    weights_TK[3] = 0.0
    y = decode_experts(x, experts_TK, weights_TK, ex.w_in, ex.w_out, ex.b_in, ex.b_out)
    want = _oracle(ex, x, experts_TK, weights_TK)
    torch.testing.assert_close(y.float(), want, atol=atol, rtol=rtol)
    assert torch.all(y[3] == 0)


def test_callable_activation_runs_unfused():
    """An activation the kernel does not know runs in Python between the two kernels."""
    ex = _experts(5, 32, 16, "swiglu", torch.float32)
    x = torch.randn(4, 32)
    experts_TK, weights_TK = _route(4, 5, 2)

    def tanh_glu(h):
        g, u = h.chunk(2, dim=-1)
        return torch.tanh(g) * u

    y = decode_experts(x, experts_TK, weights_TK, ex.w_in, ex.w_out, ex.b_in, ex.b_out,
                       tanh_glu)
    p = f32(ex, "w_in", "w_out", "b_in", "b_out")
    want = torch.zeros(4, 32)
    for t in range(4):
        for k in range(2):
            e = int(experts_TK[t, k])
            h = x[t] @ p.w_in[e] + p.b_in[e]
            want[t] += weights_TK[t, k] * (tanh_glu(h) @ p.w_out[e] + p.b_out[e])
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("F", [50, 256])  # 50: tiles of 16 and a tail of 2
@pytest.mark.parametrize("act", ["swiglu", "swiglu_oai"])
def test_swiglu_matches_definition_over_the_exp_range(F, act):
    """SwiGLU's epilogue (AVX-512 / AVX2: a vector exp) against float64 silu(g) * u (GPT-OSS:
    g clamped above, u both sides, g * sigmoid(alpha g) * (u + 1)) for gates from -120 to
    100 (exp's underflow and overflow), +-inf and NaN: x = 0 and zero weights, so g and u
    are the biases exactly."""
    E, K, limit, alpha = 1, 16, 7.0, 1.702
    gen = torch.Generator().manual_seed(F)
    g = torch.cat([torch.linspace(-120, 100, F - 5),
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])])
    g = g[torch.randperm(F, generator=gen)]
    u = torch.randn(F, generator=gen) * 6  # past the clamp at +-7 too
    b_in = torch.cat([g, u])[None]  # [E, 2F]
    w_in = torch.zeros(E, K, 2 * F)
    d = sorted_rows(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), E)
    ext = cpu_ext.get_decode()
    h = ext.gate_up(torch.zeros(1, K), d.token_S, d.offsets_E, w_in, None, None, 0, 0, b_in,
                    decode_fn.ACT_CODES[act], limit, alpha)
    g64, u64 = g.double(), u.double()
    if act == "swiglu":
        arg = g64
        want = g64 * torch.sigmoid(g64) * u64
    else:
        g64 = g64.clamp(max=limit)
        arg = alpha * g64
        want = g64 * torch.sigmoid(arg) * (u64.clamp(-limit, limit) + 1)
    want[g == float("-inf")] = float("nan")  # -inf * sigmoid(-inf) = -inf * 0
    assert torch.equal(h[0].isnan(), want.isnan())
    ok = ~want.isnan()
    # relative: a few fp32 roundings, plus exp's conditioning (fp32's rounding of its
    # argument, alpha g, moves exp by |arg| 2^-24); absolute: where exp(-arg) overflows
    # fp32 (arg below ~-88.7) the fp32 formula gives 0
    rtol = 1e-6 + arg[ok].abs().nan_to_num(posinf=0.0) * 2.0**-23
    err = (h[0][ok].double() - want[ok]).abs()
    finite = want[ok].isfinite()
    assert torch.all(h[0][ok][~finite] == want[ok][~finite].float())
    assert torch.all(err[finite] <= 1e-30 + rtol[finite] * want[ok][finite].abs()), \
        (err / want[ok].abs()).max()


def test_dropped_rows_contribute_nothing():
    """Rows past offsets_E[-1] (a capacity policy dropped them) are skipped."""
    ex = _experts(4, 32, 16, "swiglu", torch.float32)
    x = torch.randn(3, 32)
    d = sorted_rows(torch.tensor([[0], [1], [1]]), torch.ones(3, 1), 4)
    kept = torch.tensor([1, 1, 0, 0], dtype=torch.int32)  # token 2's row dropped
    d2 = moekit.Dispatch(token_S=d.token_S, weight_S=d.weight_S, counts_E=kept.long(),
                         offsets_E=torch.cumsum(kept, 0).to(torch.int32), assigned_E=d.counts_E)
    with torch.no_grad():
        y = BACKENDS["decode"](x, d2, ex.w_in, ex.w_out, ex.b_in, ex.b_out, ex._act)
        want = BACKENDS["loop"](x, d2, ex.w_in, ex.w_out, ex.b_in, ex.b_out, ex._act)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
    assert torch.all(y[2] == 0)


def test_auto_picks_decode_only_without_autograd_and_few_rows():
    moe = moekit.MoE(moekit.MoEConfig(dim=32, ffn_dim=16, num_experts=4, top_k=2))
    x = torch.randn(3, 32)
    assert moe.experts.auto_backend(x, rows=6) == "fused"  # grad mode on
    with torch.no_grad():
        assert moe.experts.auto_backend(x, rows=6) == "decode"
        assert moe.experts.auto_backend(x, rows=DECODE_MAX_ROWS + 1) == "fused"
    with torch.inference_mode():
        limit = decode_max_rows(4)  # 24 rows per expert
        assert limit == 96 and decode_max_rows(64) == DECODE_MAX_ROWS
        assert moe.experts.auto_backend(x, rows=limit) == "decode"
        assert moe.experts.auto_backend(x, rows=limit + 1) == "fused"


def test_layer_in_inference_mode_matches_training_path():
    moe = moekit.MoE(moekit.MoEConfig(dim=48, ffn_dim=32, num_experts=8, top_k=2))
    x = torch.randn(2, 3, 48)
    want = moe(x)[0]
    with torch.inference_mode():
        got = moe(x)[0]
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-4)


def test_decode_backend_refuses_autograd():
    moe = moekit.MoE(moekit.MoEConfig(dim=16, ffn_dim=8, num_experts=4, top_k=1),
                     backend="decode")
    with pytest.raises(RuntimeError, match="no backward"):
        moe(torch.randn(2, 16))


def test_hf_patched_model_decode_equals_fused():
    """A patched transformers model (its [E, 2F, D] weights as transposed views) gives
    the same logits and greedy tokens with the decode backend as with fused."""
    from moekit.integrations import hf
    from tests import hf_models

    for name in ("qwen3_moe", "olmoe"):
        model = hf.apply(hf_models.build(name), backend="fused").eval()
        ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = model(input_ids=ids).logits
            hf.apply(model, backend="decode")
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        kw = dict(max_new_tokens=5, do_sample=False, min_new_tokens=5)
        tokens_decode = model.generate(ids[:1], **kw)
        hf.apply(model, backend="fused")
        assert torch.equal(tokens_decode, model.generate(ids[:1], **kw))


# -- dense weights through the decode kernel (functions/decode.dense_rows) -----------

@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_dense_rows_match_per_row_dot_products(rows, dtype, atol, rtol):
    """dense_rows(x, W) == W @ x[r] row by row in float64 for an nn.Linear weight [N, K]
    (N=71, K=37: every row and column tail of the register blocks: passes of 4 rows, 6
    or 4 columns at a time (11 x 6 + 4 + 1, or 17 x 4 + 3), then single columns)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(71, 37, generator=g).to(dtype)
    x = torch.randn(rows, 37, generator=g).to(dtype)
    with torch.no_grad():
        y = decode_fn.dense_rows(x, w[None].transpose(1, 2))
    want = torch.stack([w.double() @ x[r].double() for r in range(rows)])
    assert y.shape == (rows, 71) and y.dtype == dtype
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 12, 13])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_dense_rows_kn_layout_match_per_row_products(rows, dtype, atol, rtol):
    """dense_rows(x, W) with W [1, K, N] of unit stride along N (moekit's own w_in / w_out
    layout, the KN kernels) == x[r] @ W row by row in float64: passes of up to 6 rows
    with AVX-512 (4 with AVX2), an expert's rows split evenly (7: 4 + 3, 13: 5 + 4 + 4);
    N=71: the 64- and 16-column blocks and single columns; K=37: a partial last block
    of 8 weight rows."""
    g = torch.Generator().manual_seed(100 + rows)
    w = torch.randn(1, 37, 71, generator=g).to(dtype)
    x = torch.randn(rows, 37, generator=g).to(dtype)
    with torch.no_grad():
        y = decode_fn.dense_rows(x, w)
    want = torch.stack([x[r].double() @ w[0].double() for r in range(rows)])
    assert y.shape == (rows, 71) and y.dtype == dtype
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_takes_the_kernel_only_for_few_rows_without_autograd(monkeypatch, dtype):
    """models.transformer.Linear: the kernel up to float_kernel_max_rows rows without
    autograd; more rows, or autograd on, run F.linear (and keep the graph)."""
    from moekit.models.transformer import Linear

    calls = []
    real = decode_fn.dense_rows
    monkeypatch.setattr(decode_fn, "dense_rows", lambda *a: calls.append(1) or real(*a))
    lin = Linear(37, 70, bias=False).to(dtype)
    n = decode_fn.float_kernel_max_rows(dtype)
    few, many = torch.randn(1, n, 37).to(dtype), torch.randn(n + 1, 37).to(dtype)
    with torch.no_grad():
        want = torch.nn.functional.linear(few.double(), lin.weight.double())
        _, atol, rtol = next(d for d in DTYPES if d[0] == dtype)
        torch.testing.assert_close(lin(few).double(), want, atol=atol, rtol=rtol)
        assert len(calls) == 1
        lin(many)
        assert len(calls) == 1
    y = lin(few)  # autograd on: F.linear, and the graph is kept
    assert len(calls) == 1 and y.requires_grad


# -- bf16 projections on AMX tiles (amx_nk_rows in csrc/cpu_decode.cpp) -----------------

amx = pytest.mark.skipif(not (decode_fn.available() and decode_fn.amx()),
                         reason="no AMX-BF16 on this CPU (or MOEKIT_AMX=0)")


def _projection(x, w_1KN, b=None, act=0, rows=None, ends=None):
    """The decode kernel's fp32 output of a dense projection (dense_rows rounds it to x's
    dtype), and whether it ran on AMX."""
    ext = cpu_ext.get_decode()
    R = x.shape[0]
    rows = torch.arange(R) if rows is None else rows
    ends = torch.tensor([R]) if ends is None else ends
    before = ext.amx_runs()
    y = ext.gate_up(x.float(), rows, ends, w_1KN, None, None, 0, 0, b, act, 0.0, 1.0)
    return y.double(), ext.amx_runs() > before


def _fma(*args, **kw):
    ext = cpu_ext.get_decode()
    ext.set_amx(False)
    try:
        return _projection(*args, **kw)
    finally:
        ext.set_amx(True)


@amx
@pytest.mark.parametrize("K,N,R", [(1024, 3072, 16), (32, 16, 1), (96, 48, 7), (64, 80, 16),
                                   (128, 112, 3), (256, 176, 9)])
def test_amx_bf16_projection_is_within_fp32_rounding_of_float64(K, N, R):
    """A bf16 nn.Linear weight ([N, K], unit stride along K) against bf16 rows: AMX's
    sums within fp32's rounding bound of float64 (the bf16 products are exact; K * 2^-24 *
    sum |x| |w|), as the FMA kernel's. N: 64-output blocks and 16 / 32 / 48-output tails;
    R: 1 to 16 rows (one B tile's columns)."""
    g = torch.Generator().manual_seed(K + N + R)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(R, K, generator=g).bfloat16()
    y, on_amx = _projection(x, w[None].transpose(1, 2))
    fma, fma_on_amx = _fma(x, w[None].transpose(1, 2))
    assert on_amx and not fma_on_amx
    want = x.double() @ w.double().t()
    bound = K * 2.0**-24 * (x.double().abs() @ w.double().abs().t())
    assert ((y - want).abs() <= bound).all()
    assert ((fma - want).abs() <= bound).all()


@amx
def test_amx_bf16_projection_with_a_bias():
    """A bias (Qwen2's q / k / v) is added after AMX's sums, as the FMA kernel adds it."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(96, 128, generator=g).bfloat16()
    x = torch.randn(5, 128, generator=g).bfloat16()
    b = torch.randn(1, 96, generator=g)
    y, on_amx = _projection(x, w[None].transpose(1, 2), b=b)
    plain, _ = _projection(x, w[None].transpose(1, 2))
    assert on_amx
    assert torch.equal(y, (plain.float() + b).double())
    fma, _ = _fma(x, w[None].transpose(1, 2), b=b)
    want = x.double() @ w.double().t() + b.double()
    bound = 128 * 2.0**-24 * (x.double().abs() @ w.double().abs().t() + b.double().abs())
    assert ((y - want).abs() <= bound).all() and ((fma - want).abs() <= bound).all()


@amx
@pytest.mark.parametrize("case", ["fp32 rows", "K 48", "N 72", "17 rows", "swiglu",
                                  "KN layout", "rows reordered"])
def test_amx_leaves_what_it_cannot_run_to_the_fma_kernel(case):
    """Rows that are not all bf16 values (an fp32 model with bf16 weights), K not a multiple
    of 32, N not of 16, more than 16 rows, an activation, a weight with unit stride along
    N, rows not in order: the FMA kernel, bitwise as with AMX off."""
    K = 48 if case == "K 48" else 64
    N = 72 if case == "N 72" else 64
    R = 17 if case == "17 rows" else 4
    g = torch.Generator().manual_seed(3)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(R, K, generator=g)
    if case != "fp32 rows":
        x = x.bfloat16()
    w_1KN = w.t().contiguous()[None] if case == "KN layout" else w[None].transpose(1, 2)
    kw = {}
    if case == "swiglu":
        kw["act"] = 1
    if case == "rows reordered":
        kw["rows"] = torch.arange(R).flip(0)
    y, on_amx = _projection(x, w_1KN, **kw)
    fma, _ = _fma(x, w_1KN, **kw)
    assert not on_amx
    assert torch.equal(y, fma)


@amx
def test_amx_off_by_environment_and_a_bad_setting_named():
    """MOEKIT_AMX=0 keeps bf16 and int8 projections on the FMA kernels (and bf16's row limit
    at 8); any setting but 0 / 1 / unset is refused by name."""
    import os
    import subprocess
    import sys

    code = ("import torch; from moekit.functions import decode, cpu_ext; "
            "print(decode.amx(), decode.float_kernel_max_rows(torch.bfloat16), "
            "cpu_ext.get_decode().amx_int8())")
    env = {**os.environ, "MOEKIT_AMX": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "8", "False"]
    env["MOEKIT_AMX"] = "yes"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "MOEKIT_AMX='yes' is not allowed" in out.stderr


# -- int8 / int4 weight-only projections on AMX-INT8 (amx_i8_rows, amx_i4_rows) ----------

amx_int8 = pytest.mark.skipif(
    not (decode_fn.available() and cpu_ext.get_decode().amx_int8()),
    reason="no AMX-INT8 on this CPU (or MOEKIT_AMX=0)")


def _q_linear(bits, N, K, g, group=64):
    """A weight-only quantized nn.Linear weight as the kernels take it (a QuantizedTensor
    of E=1: int8 [N, K] with a scale per output row, or int4 [N, K / 2] with a scale and a
    zero per output row and group) and its dequantized parts in float64, computed here:
    (s * q, z) with w = s * q + z (z = 0 for int8)."""
    qt = quantize_tensor(torch.randn(1, K, N, generator=g) * 0.05, bits,
                         **({"group_size": group} if bits == 4 else {}))
    if bits == 8:
        assert qt.data.shape == (1, N, K) and qt.scales.shape == (1, N)
        sq = qt.data[0].double() * qt.scales[0].double()[:, None]
        return qt, sq, torch.zeros_like(sq)
    q = unpack_int4(qt.data[0]).double().unflatten(-1, (-1, group))  # [N, K / g, g]
    assert qt.scales.shape == qt.zeros.shape == (1, N, K // group)
    sq = (q * qt.scales[0].double()[..., None]).flatten(-2)
    z = qt.zeros[0].double()[..., None].expand_as(q).flatten(-2)
    return qt, sq, z


def _q_projection(x, qt, b=None):
    """gate_up's fp32 output of a dense quantized projection and whether it ran on AMX."""
    ext = cpu_ext.get_decode()
    R = x.shape[0]
    before = ext.amx_runs()
    y = ext.gate_up(x, torch.arange(R), torch.tensor([R]), qt.data, qt.scales, qt.zeros,
                    decode_fn.kernel_bits(qt), qt.group_size or 0, b, 0, 0.0, 1.0)
    return y.double(), ext.amx_runs() > before


def _off(fn, *switches):
    """fn() with the decode kernels' on / off switches (``set_amx``, ``set_int8_terms``)
    off, and on again after it."""
    ext = cpu_ext.get_decode()
    for switch in switches:
        getattr(ext, switch)(False)
    try:
        return fn()
    finally:
        for switch in switches:
            getattr(ext, switch)(True)


def _q_fma(x, qt, b=None):
    """_q_projection on the FMA kernel (neither AMX nor int8 terms)."""
    return _off(lambda: _q_projection(x, qt, b), "set_amx", "set_int8_terms")


@amx_int8
@pytest.mark.parametrize("bits,K,N,R,group", [
    (8, 1024, 3072, 16, 0), (8, 64, 16, 8, 0), (8, 128, 48, 12, 0), (8, 192, 80, 9, 0),
    (8, 256, 32, 16, 0), (8, 128, 48, 17, 0), (8, 1024, 64, 32, 0), (8, 128, 48, 2, 0),
    (8, 192, 80, 3, 0), (8, 256, 112, 4, 0), (8, 128, 96, 5, 0), (8, 64, 64, 6, 0),
    (8, 320, 48, 21, 0), (4, 1024, 3072, 16, 64),
    (4, 64, 16, 12, 64), (4, 256, 48, 13, 128), (4, 384, 80, 16, 64), (4, 256, 32, 25, 64),
    (4, 1024, 64, 32, 128), (4, 256, 64, 2, 64), (4, 192, 96, 3, 64), (4, 1024, 3072, 8, 64),
    (4, 128, 32, 11, 128), (4, 64, 32, 5, 64)])
def test_amx_int8_projection_is_within_fp32_rounding_of_float64(bits, K, N, R, group):
    """fp32 rows against an int8 or int4 weight: AMX-INT8's result within its own bound of
    float64 over the dequantized weight. int8: rows in groups of four per B tile, passes of
    four 16-output blocks (one group: 2-4 rows; N = 48, 80, 112 end on passes of 3, 1, 3
    blocks), else two, against two groups at a time (5-8 rows: one round; 9-32 rows: two
    or more, an odd last one for 9-12 and 17-20), a last group of 1-3 rows; int4 from 12
    rows: one chunk of rows (up to 16: one B tile per term) and two (17-32, the second
    padded with zero rows);
    int4 of 2-11 rows (a4_rows, as int4 experts): 1, 2 and 4 rows' C tiles, passes of four
    rows (5, 8, 11), K = 192 ending on one 64-input chunk, K = 64 (one group). The rows'
    four int8 terms hold each x to 2^-28 of its row's largest magnitude (2^-27 max |x| sum
    |s q|); the int32 sums are exact and their recombination, the groups' scaling and sums
    round a few times per group in fp32 ((G + 8) * 2^-24 * sum |x| |s q|, and for the zero
    points (g + G + 2) * 2^-24 * sum |x| |z|): far tighter than the FMA kernel's K * 2^-24 *
    sum |x| |w|, which it meets too. Rows of mixed magnitudes: all zeros, an outlier 1e4
    times the rest, 1e-30 times the rest."""
    g = torch.Generator().manual_seed(K + N + R + bits)
    qt, sq, z = _q_linear(bits, N, K, g, group)
    x = torch.randn(R, K, generator=g)
    x[1] = 0.0
    x[2 % R, 5] = 1e4  # (2 rows: the outlier in the first)
    x[3 % R] *= 1e-30
    y, on_amx = _q_projection(x, qt)
    fma, fma_on_amx = _q_fma(x, qt)
    assert on_amx and not fma_on_amx
    xd = x.double().abs()
    want = x.double() @ (sq + z).t()
    G = K // group if bits == 4 else 1
    tight = ((G + 8) * 2.0**-24 * (xd @ sq.abs().t())
             + ((group + G + 2) * 2.0**-24 * (xd @ z.abs().t()) if bits == 4 else 0.0)
             + 2.0**-27 * xd.amax(1, keepdim=True) * sq.abs().sum(1))
    assert ((y - want).abs() <= tight).all()
    # (both compute s * sum(x q) + z * sum(x): the FMA kernel's error is relative to |s q| +
    # |z|, not to |s q + z|, which cancels where z = the group's minimum is negative)
    assert ((fma - want).abs() <= K * 2.0**-24 * (xd @ (sq.abs() + z.abs()).t())).all()
    assert (y[1] == 0).all() if bits == 8 else True


@amx_int8
@pytest.mark.parametrize("bits", [8, 4])
def test_amx_int8_projection_with_a_bias(bits):
    """A bias (Qwen2's q / k / v) is added after AMX's sums, as for bf16."""
    g = torch.Generator().manual_seed(9)
    qt, _, _ = _q_linear(bits, 96, 128, g)
    x = torch.randn(13, 128, generator=g)
    b = torch.randn(1, 96, generator=g)
    y, on_amx = _q_projection(x, qt, b)
    plain, _ = _q_projection(x, qt)
    assert on_amx and torch.equal(y, (plain.float() + b).double())


@amx_int8
@pytest.mark.parametrize("bits,case", [
    (8, "fewer rows"), (8, "33 rows"), (8, "K 96"), (8, "N 40"), (8, "nan"), (8, "inf"),
    (8, "tiny"), (8, "int8 activations"), (4, "fewer rows"), (4, "33 rows"), (4, "group 32"),
    (4, "N 40"), (4, "nan"), (4, "tiny"), (4, "int8 activations")])
def test_amx_int8_leaves_what_it_cannot_run_to_the_fma_kernel(bits, case):
    """Fewer rows than amx_int8_min_rows or more than 32, K not a multiple of 64 (int8),
    groups of 32 (int4), N not a multiple of 16, a row holding NaN or inf (its terms would
    be garbage: the FMA kernel propagates them), a row whose largest magnitude is below
    2^-100 (its scale 2^-e would overflow fp32 below ~2^-121), int8 activations (their own
    kernels): the FMA kernel, bitwise as with AMX off."""
    ext = cpu_ext.get_decode()
    R = {"fewer rows": ext.amx_int8_min_rows(bits) - 1, "33 rows": 33, "nan": 24,
         "inf": 24, "tiny": 24}.get(case, 13)
    K, N = (96 if case == "K 96" else 128), (40 if case == "N 40" else 64)
    g = torch.Generator().manual_seed(4)
    group = {8: {}, 4: {"group_size": 32 if case == "group 32" else 64}}[bits]
    qt = quantize_tensor(torch.randn(1, K, N, generator=g), bits, **group,
                         activations="int8" if case == "int8 activations" else "float")
    x = torch.randn(R, K, generator=g)
    if case in ("nan", "inf"):
        x[-3, 7] = float(case)  # in the second chunk of rows (24 rows: two of 12)
    if case == "tiny":
        x[-3] *= 1e-39  # subnormal: 2^-e would be ~2^134, past fp32's range
    before = ext.amx_runs()
    args = (torch.arange(R), torch.tensor([R]), qt.data, qt.scales, qt.zeros,
            decode_fn.kernel_bits(qt), qt.group_size or 0, None, 0, 0.0, 1.0)
    ext.set_int8_terms(False)  # (int8: the FMA kernel proper, not the terms kernel)
    try:
        y = ext.gate_up(x, *args)
        assert ext.amx_runs() == before
        ext.set_amx(False)
        fma = ext.gate_up(x, *args)
    finally:
        ext.set_amx(True)
        ext.set_int8_terms(True)
    torch.testing.assert_close(y, fma, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN = NaN


# -- int8 weight-only experts on the rows' four int8 terms (i8t_tile, AVX-512 VNNI) -----

int8_terms = pytest.mark.skipif(
    not (decode_fn.available() and cpu_ext.get_decode().int8_terms()),
    reason="no AVX-512 VNNI on this CPU (or MOEKIT_INT8_TERMS=0)")


def _routed(T, E, k, g):
    """token_S, expert_S (sorted by expert) and offsets_E of a top-k of random logits."""
    idx = torch.randn(T, E, generator=g).topk(k, dim=-1).indices.flatten()
    order = idx.argsort(stable=True)
    return order // k, idx[order], torch.bincount(idx, minlength=E).cumsum(0)


def _mixed_rows(T, E, k, K):
    """A generator seeded from the shapes, the routing of T tokens (_routed) and their rows
    x [T, K] of mixed magnitudes: one all zeros, one with an outlier 1e4 times the rest,
    one 1e-30 times the rest."""
    g = torch.Generator().manual_seed(T * 100 + K + E)
    token, expert, offsets = _routed(T, E, k, g)
    x = torch.randn(T, K, generator=g)
    x[min(1, T - 1)] = 0.0
    x[min(2, T - 1), 5] = 1e4
    x[min(3, T - 1)] *= 1e-30
    return g, token, expert, offsets, x


def _spoiled(x, case):
    """x with row 2 holding a NaN or inf ("nan", "inf") or scaled to subnormals ("tiny":
    its 2^-e would overflow fp32), for the cases a kernel leaves to the FMA kernel."""
    if case in ("nan", "inf"):
        x[2, 7] = float(case)
    if case == "tiny":
        x[2] *= 1e-39
    return x


@contextlib.contextmanager
def _terms_rows(rows):
    """int8 terms for the experts of up to `rows` rows (set_int8_terms_max_rows), this
    CPU's default again after."""
    ext = cpu_ext.get_decode()
    ext.set_int8_terms_max_rows(rows)
    try:
        yield
    finally:
        ext.set_int8_terms_max_rows(-1)


def _stays_on_fma(x, args, runs, switch):
    """gate_up(x, *args) runs nothing that `runs` counts and equals, bitwise (NaN = NaN),
    the call again with `switch` off (_off: the kernel that runs without it)."""
    ext = cpu_ext.get_decode()
    before = runs()
    y = ext.gate_up(x, *args)
    assert runs() == before
    fma = _off(lambda: ext.gate_up(x, *args), switch)
    torch.testing.assert_close(y, fma, rtol=0, atol=0, equal_nan=True)


@int8_terms
@pytest.mark.parametrize("kernel", ["terms", pytest.param("amx", marks=amx_int8)])
@pytest.mark.parametrize("T,E,k,K,N", [
    (1, 4, 1, 64, 64), (3, 4, 2, 128, 128), (9, 2, 2, 1024, 192), (16, 8, 4, 256, 64),
    (7, 2, 1, 192, 64), (24, 3, 3, 128, 128)])
def test_int8_experts_on_terms_are_within_fp32_rounding_of_float64(kernel, T, E, k, K, N):
    """gate_up and down_combine of int8 weight-only experts (1 to 24 rows an expert) on the
    rows' four int8 terms, by vpdpbusd (passes of up to 4 rows; AMX off) or on AMX-INT8 (4
    rows to a B tile, 1 or 2 B tiles a pass; experts of one row on vpdpbusd in the same
    call): each x held to 2^-28 of its row's largest magnitude (2^-27 max |x| sum |s q|
    here), the lanes exact int32, then three FMAs, a sum of 16 lanes (vpdpbusd) and two
    products in fp32: within 12 * 2^-24 sum |x| |s q| of float64 over the dequantized
    weights (computed here), far inside the FMA kernel's K * 2^-24 sum |x| |w|, which it
    meets too. Rows of mixed magnitudes (zeros, an outlier 1e4 times the rest, 1e-30 times
    the rest); the run counters show which kernels ran (down_combine's inputs are N wide: a
    multiple of 64 here; two experts at least: the rows of one expert in order are a dense
    projection)."""
    # (terms: every call on them, whatever this CPU's row limit)
    with _terms_rows(T * k) if kernel == "terms" else contextlib.nullcontext():
        _int8_experts_on_terms(kernel, T, E, k, K, N)


def _int8_experts_on_terms(kernel, T, E, k, K, N):
    ext = cpu_ext.get_decode()
    g, token, expert, offsets, x = _mixed_rows(T, E, k, K)
    w_in = quantize_tensor(torch.randn(E, K, N, generator=g) * 0.05, 8)
    sq_in = w_in.data.double() * w_in.scales.double()[..., None]  # [E, N, K]
    args = (token, offsets, *decode_fn.wargs(w_in), None, 0, 0.0, 1.0)
    counts = torch.bincount(expert, minlength=E)
    amx = kernel == "amx" and bool((counts > 1).any())  # (from 2 rows an expert)
    terms = kernel == "terms" or bool((counts == 1).any())
    run = (lambda f: f()) if kernel == "amx" else (lambda f: _off(f, "set_amx"))
    before, amx_before = ext.int8_terms_runs(), ext.amx_runs()
    h = run(lambda: ext.gate_up(x, *args)).double()
    assert (ext.int8_terms_runs(), ext.amx_runs()) == (before + terms, amx_before + amx)
    fma = _off(lambda: ext.gate_up(x, *args), "set_int8_terms", "set_amx").double()
    xs = x.double()[token]  # [S, K]
    want = torch.einsum("sk,snk->sn", xs, sq_in[expert])
    mag = torch.einsum("sk,snk->sn", xs.abs(), sq_in[expert].abs())
    tight = (12 * 2.0**-24 * mag
             + 2.0**-27 * xs.abs().amax(1, keepdim=True) * sq_in[expert].abs().sum(2))
    assert ((h - want).abs() <= tight).all()
    assert ((fma - want).abs() <= K * 2.0**-24 * mag).all()
    # down_combine: N inputs per row back to K outputs, weighted into their tokens
    a = torch.randn(token.numel(), N, generator=g)
    wts = torch.rand(token.numel(), generator=g)
    w_out = quantize_tensor(torch.randn(E, N, K, generator=g) * 0.05, 8)
    sq_out = w_out.data.double() * w_out.scales.double()[..., None]  # [E, K, N]
    out = torch.empty(T, K)
    run(lambda: ext.down_combine(a, token, wts, offsets, *decode_fn.wargs(w_out), None, out))
    assert (ext.int8_terms_runs(), ext.amx_runs()) == (before + 2 * terms, amx_before + 2 * amx)
    rows = torch.einsum("sn,skn->sk", a.double(), sq_out[expert]) * wts.double()[:, None]
    rows_mag = (torch.einsum("sn,skn->sk", a.double().abs(), sq_out[expert].abs())
                * wts.double()[:, None])
    want_out = torch.zeros(T, K, dtype=torch.float64).index_add_(0, token, rows)
    # each row's bound, plus the fp32 sums of k rows per token and their weights
    bound = torch.zeros(T, K, dtype=torch.float64).index_add_(
        0, token, (12 + 2 * k) * 2.0**-24 * rows_mag
        + 2.0**-27 * a.double().abs().amax(1, keepdim=True) * sq_out[expert].abs().sum(2)
        * wts.double()[:, None])
    assert ((out.double() - want_out).abs() <= bound).all()


@int8_terms
@pytest.mark.parametrize("case", ["K 96", "nan", "inf", "tiny", "int8 activations"])
def test_int8_terms_leave_what_they_cannot_run_to_the_fma_kernel(case):
    """K not a multiple of 64, a row holding NaN or inf or one whose largest magnitude is
    below 2^-100 (subnormal here: its 2^-e would overflow; then the whole call stays on the
    FMA kernel), int8 activations (their own kernel): bitwise as with the terms off, no
    terms run."""
    ext = cpu_ext.get_decode()
    g = torch.Generator().manual_seed(11)
    K = 96 if case == "K 96" else 128
    token, expert, offsets = _routed(5, 4, 2, g)
    qt = quantize_tensor(torch.randn(4, K, 32, generator=g), 8,
                         activations="int8" if case == "int8 activations" else "float")
    x = _spoiled(torch.randn(5, K, generator=g), case)
    args = (token, offsets, *decode_fn.wargs(qt), None, 0, 0.0, 1.0)
    with _terms_rows(10):  # (not the row limit: the call's experts have up to 2 rows)
        _stays_on_fma(x, args, ext.int8_terms_runs, "set_int8_terms")


def _cpu_vendor():
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD, ...), "" where it has none."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")),
                    "")


@int8_terms
def test_int8_terms_take_the_experts_up_to_their_row_limit():
    """In one call the experts of at most int8_terms_max_rows rows run on terms and the
    others on the FMA kernel: each expert's outputs bitwise those of the call with every
    expert on terms, or with the terms off. The default by vendor (/proc/cpuinfo): one row
    on Intel (there the FMA kernel is faster from two rows), no limit on AMD; a bad limit
    is refused by name, nothing changed."""
    ext = cpu_ext.get_decode()
    g = torch.Generator().manual_seed(5)
    qt = quantize_tensor(torch.randn(3, 128, 64, generator=g), 8)
    x = torch.randn(6, 128, generator=g)
    offsets = torch.tensor([1, 3, 6])  # experts 0, 1, 2 with 1, 2, 3 rows
    args = (torch.arange(6), offsets, *decode_fn.wargs(qt), None, 0, 0.0, 1.0)
    with _terms_rows(3):
        terms = ext.gate_up(x, *args)
    fma = _off(lambda: ext.gate_up(x, *args), "set_int8_terms")
    assert not torch.equal(terms, fma)  # (the two kernels sum in other orders)
    starts = [0, 1, 3]
    for limit in (1, 2, 3):
        with _terms_rows(limit):
            before = ext.int8_terms_runs()
            y = ext.gate_up(x, *args)
            assert ext.int8_terms_runs() == before + 1
        for e, (r0, r1) in enumerate(zip(starts, offsets.tolist(), strict=True)):
            want = terms if r1 - r0 <= limit else fma
            assert torch.equal(y[r0:r1], want[r0:r1]), (limit, e)
    # no expert within the limit: nothing on terms
    qt2 = quantize_tensor(torch.randn(2, 128, 64, generator=g), 8)
    args2 = (torch.arange(5), torch.tensor([2, 5]), *decode_fn.wargs(qt2), None, 0, 0.0, 1.0)
    with _terms_rows(1):
        _stays_on_fma(x[:5], args2, ext.int8_terms_runs, "set_int8_terms")
    vendor = _cpu_vendor()
    if vendor in ("GenuineIntel", "AuthenticAMD"):
        assert ext.int8_terms_max_rows() == (1 if vendor == "GenuineIntel" else 2**63 - 1)
    default = ext.int8_terms_max_rows()
    for bad in (0, -2):
        with pytest.raises(RuntimeError, match=f"rows={bad} is not allowed"):
            ext.set_int8_terms_max_rows(bad)
    assert ext.int8_terms_max_rows() == default


@int8_terms
def test_int8_terms_off_by_environment_and_a_bad_setting_named():
    """MOEKIT_INT8_TERMS=0 keeps int8 experts on the FMA kernel; any setting but 0 / 1 /
    unset is refused by name."""
    import os
    import subprocess
    import sys

    code = "from moekit.functions import cpu_ext; print(cpu_ext.get_decode().int8_terms())"
    env = {**os.environ, "MOEKIT_INT8_TERMS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]
    env["MOEKIT_INT8_TERMS"] = "yes"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "MOEKIT_INT8_TERMS='yes' is not allowed" in out.stderr


# -- int4 weight-only experts on AMX-INT8, four rows' terms to a B tile (a4_rows) ---------

def _q4_experts(E, K, N, group, g):
    """int4 experts [E, K, N] (a QuantizedTensor) and, in float64, s * q and z of each
    expert's [N, K] weights (w = s * q + z), computed here from the packed nibbles."""
    qt = quantize_tensor(torch.randn(E, K, N, generator=g) * 0.05, 4, group_size=group)
    q = unpack_int4(qt.data).double().unflatten(-1, (-1, group))  # [E, N, K / g, g]
    sq = (q * qt.scales.double()[..., None]).flatten(-2)
    z = qt.zeros.double()[..., None].expand_as(q).flatten(-2)
    return qt, sq, z


def _a4_bound(x, sq, z, G, group, extra=0):
    """|error| allowed per routed row (x [S, K]; sq, z [S, N, K]): each group's int32 sums
    exact, scaled and summed over G groups in fp32 with the recombination and zero points'
    few roundings ((G + 8 + extra) * 2^-24 sum |x| |s q|; the group sums (g + G + 2) * 2^-24
    sum |x| |z|), the terms' truncation 2^-27 max |x| sum |s q|."""
    xa = x.abs()
    return ((G + 8 + extra) * 2.0**-24 * torch.einsum("sk,snk->sn", xa, sq.abs())
            + (group + G + 2 + extra) * 2.0**-24 * torch.einsum("sk,snk->sn", xa, z.abs())
            + 2.0**-27 * xa.amax(1, keepdim=True) * sq.abs().sum(2))


@amx_int8
@pytest.mark.parametrize("T,E,k,K,N,group", [
    (3, 4, 2, 256, 64, 64), (9, 2, 1, 1024, 128, 128), (24, 3, 2, 192, 64, 64),
    (30, 2, 1, 128, 128, 128), (16, 8, 4, 512, 256, 64), (5, 4, 3, 64, 64, 64)])
def test_int4_experts_on_amx_are_within_fp32_rounding_of_float64(T, E, k, K, N, group):
    """gate_up and down_combine of int4 weight-only experts (1 to ~30 rows an expert: C
    tiles of 1, 2 and 4 rows, passes of four rows, K = 192 ending on one 64-input chunk,
    one group or many, g 64 and 128) on AMX-INT8: within _a4_bound of float64 over the
    dequantized weights (computed here), far inside the FMA kernel's K * 2^-24 sum |x| (|s
    q| + |z|), which it meets too. Rows of mixed magnitudes (zeros, an outlier 1e4 times
    the rest, 1e-30 times the rest); amx_runs shows both calls ran on AMX."""
    ext = cpu_ext.get_decode()
    g, token, expert, offsets, x = _mixed_rows(T, E, k, K)
    w_in, sq_in, z_in = _q4_experts(E, K, N, group, g)
    args = (token, offsets, *decode_fn.wargs(w_in), None, 0, 0.0, 1.0)
    before = ext.amx_runs()
    h = ext.gate_up(x, *args).double()
    assert ext.amx_runs() == before + 1
    fma = _off(lambda: ext.gate_up(x, *args), "set_amx")
    xs = x.double()[token]  # [S, K]
    want = torch.einsum("sk,snk->sn", xs, sq_in[expert] + z_in[expert])
    assert ((h - want).abs() <= _a4_bound(xs, sq_in[expert], z_in[expert], K // group,
                                          group)).all()
    wide = torch.einsum("sk,snk->sn", xs.abs(), sq_in[expert].abs() + z_in[expert].abs())
    assert ((fma.double() - want).abs() <= K * 2.0**-24 * wide).all()
    # down_combine: N inputs per row back to K outputs, weighted into their tokens
    a = torch.randn(token.numel(), N, generator=g)
    wts = torch.rand(token.numel(), generator=g)
    w_out, sq_out, z_out = _q4_experts(E, N, K, group, g)
    out = torch.empty(T, K)
    ext.down_combine(a, token, wts, offsets, *decode_fn.wargs(w_out), None, out)
    assert ext.amx_runs() == before + 2
    ad, wd = a.double(), wts.double()[:, None]
    rows = torch.einsum("sn,skn->sk", ad, sq_out[expert] + z_out[expert]) * wd
    want_out = torch.zeros(T, K, dtype=torch.float64).index_add_(0, token, rows)
    # each row's bound, plus the fp32 sums of k rows per token and their weights
    bound = torch.zeros(T, K, dtype=torch.float64).index_add_(
        0, token, _a4_bound(ad, sq_out[expert], z_out[expert], N // group, group, 2 * k) * wd)
    assert ((out.double() - want_out).abs() <= bound).all()


_LEFT = ["one row", "33 rows", "N 48", "nan", "tiny", "int8 activations"]


@amx_int8
@pytest.mark.parametrize("bits,case", [(4, c) for c in _LEFT + ["group 32"]]
                         + [(8, c) for c in _LEFT + ["K 96"]])
def test_quantized_experts_leave_what_amx_cannot_run_to_other_kernels(bits, case):
    """int4 / int8 experts of one row each (the FMA kernel, int8's terms kernel, stream as
    fast there), an expert of more than 32 rows, outputs not a multiple of 32, int4 groups
    of 32, int8 inputs not a multiple of 64, a row holding NaN or one below 2^-100 in
    magnitude (then the whole call stays off AMX), int8 activations (their own kernel):
    bitwise as with AMX off, no AMX run."""
    ext = cpu_ext.get_decode()
    g = torch.Generator().manual_seed(12)
    T, E, k = {"one row": (2, 8, 1), "33 rows": (40, 1, 1)}.get(case, (6, 4, 2))
    token, expert, offsets = _routed(T, E, k, g)
    if case == "one row":
        token, expert = torch.tensor([0, 1]), torch.tensor([2, 5])
        offsets = torch.bincount(expert, minlength=E).cumsum(0)
    N, K = 48 if case == "N 48" else 64, 96 if case == "K 96" else 128
    qt = quantize_tensor(torch.randn(E, K, N, generator=g), bits,
                         **({"group_size": 32 if case == "group 32" else 64} if bits == 4 else {}),
                         activations="int8" if case == "int8 activations" else "float")
    x = _spoiled(torch.randn(T, K, generator=g), case)
    if case in ("nan", "tiny"):  # (row 2 goes to an expert of more rows)
        assert (torch.bincount(expert, minlength=E)[expert[token == 2]] > 1).any()
    args = (token, offsets, *decode_fn.wargs(qt), None, 0, 0.0, 1.0)
    _stays_on_fma(x, args, ext.amx_runs, "set_amx")
