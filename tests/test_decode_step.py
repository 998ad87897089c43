"""A decode step's one-call routing, attention and residual norm (``route_sort``,
``attend_one``, ``add_rms_norm`` in moekit/csrc/cpu_decode.cpp) against per-token
float64 references written here.

Tolerances: weights and attention outputs are fp32 sums of a few terms of size ~1
against float64: 1e-6 relative on routing weights, 1e-5 absolute on attention
outputs. Expert choice and row order are compared exactly (random logits: no ties).

Shape letters: T tokens, E experts, K experts per token, R rows, H heads, Dh head
dim, M cache slots, P slots filled before this step.
"""

from __future__ import annotations

import math

import pytest
import torch

import moekit
from moekit.functions import cpu_ext, decode
from moekit.inference.engine import Engine, GenerationConfig
from moekit.models.config import LMConfig
from moekit.models.transformer import (
    MoETransformer,
    StaticKVCache,
    dequantize_kv,
    quantize_kv,
    rotary_table,
)

pytestmark = pytest.mark.skipif(not decode.available(), reason="decode kernels not built")


# -- routing ---------------------------------------------------------------------------

def _route_reference(logits_TE, K, mode, renormalize, scale, bias_E):
    """Per token in float64: the chosen experts and weights, then rows by (expert, token)."""
    T, E = logits_TE.shape
    pairs = []  # (expert, token, weight)
    for t in range(T):
        l = logits_TE[t].double()
        if mode == 0:
            key = l
        else:
            key = l.sigmoid() + (0 if bias_E is None else bias_E.double())
        chosen = sorted(range(E), key=lambda e: -key[e].item())[:K]
        if mode == 0:
            probs = l.softmax(-1)
            w = probs[chosen] / probs[chosen].sum() if renormalize else probs[chosen]
        else:
            s = l.sigmoid()[chosen]
            w = s / s.sum() if renormalize else s
        pairs += [(e, t, scale * w[j].item()) for j, e in enumerate(chosen)]
    pairs.sort(key=lambda p: (p[0], p[1]))
    counts = torch.bincount(torch.tensor([p[0] for p in pairs]), minlength=E)
    return (torch.tensor([p[1] for p in pairs]),
            torch.tensor([p[2] for p in pairs], dtype=torch.float64),
            counts, counts.cumsum(0))


@pytest.mark.parametrize("T,E,K", [(1, 64, 8), (5, 8, 2), (3, 6, 6), (33, 16, 1), (700, 64, 8)])
@pytest.mark.parametrize("mode,renormalize,scale,bias", [
    (0, True, 1.0, False),   # Mixtral / OLMoE
    (0, False, 1.0, False),  # Qwen2-MoE, Switch
    (0, True, 2.5, False),   # routed scaling
    (1, True, 1.0, True),    # DeepSeek-V3: sigmoid, selection bias
    (1, False, 1.0, False),  # sigmoid, raw scores
])
def test_route_sort_matches_reference(T, E, K, mode, renormalize, scale, bias):
    g = torch.Generator().manual_seed(T * 100 + E)
    logits = torch.randn(T, E, generator=g) * 3
    bias_E = torch.randn(E, generator=g) * 0.1 if bias else None
    token_S, weight_S, counts_E, offsets_E = decode.route_sort(
        logits, K, mode, renormalize, scale, bias_E)
    ref_token, ref_weight, ref_counts, ref_offsets = _route_reference(
        logits, K, mode, renormalize, scale, bias_E)
    assert token_S.dtype == torch.long and offsets_E.dtype == torch.int32
    assert torch.equal(token_S, ref_token)
    assert torch.equal(counts_E, ref_counts)
    assert torch.equal(offsets_E.long(), ref_offsets)
    torch.testing.assert_close(weight_S.double(), ref_weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("router,kwargs", [
    ("softmax", {}), ("softmax", {"renormalize": False}), ("switch", {}),
    ("softmax_topk", {}), ("sigmoid", {"routed_scaling_factor": 2.0}),
    ("softmax_topk", {"renormalize": False}), ("noisy_topk", {"renormalize": False}),
])
@pytest.mark.parametrize("tokens", [3, 400], ids=lambda t: f"T{2 * t}")  # a step, a prefill
def test_layer_infer_with_route_kernel_matches_training_path(monkeypatch, router, kwargs,
                                                            tokens):
    calls = []
    route_sort = decode.route_sort
    monkeypatch.setattr(decode, "route_sort", lambda *a: calls.append(1) or route_sort(*a))
    top_k = 1 if router == "switch" else 3
    cfg = moekit.MoEConfig(dim=32, ffn_dim=24, num_experts=8, top_k=top_k, router=router,
                           **kwargs)
    torch.manual_seed(0)
    layer = moekit.MoE(cfg).eval()
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.normal_(0, 0.2)
    x = torch.randn(2, tokens, 32)
    assert layer.router.kernel_spec() is not None
    assert 2 * tokens <= decode.ROUTE_KERNEL_MAX_TOKENS
    with torch.no_grad():
        expected = layer(x).output
    with torch.inference_mode():
        got = layer.infer(x)
    assert calls == [1]  # the kernel routed it
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_route_kernel_not_taken_where_it_does_not_apply():
    grouped = moekit.MoEConfig(dim=32, ffn_dim=16, num_experts=8, top_k=2, num_groups=4,
                               topk_groups=2)
    biased = moekit.MoEConfig(dim=32, ffn_dim=16, num_experts=8, top_k=2,
                              bias_update_rate=1e-3)
    for cfg in (grouped, biased):
        assert moekit.MoE(cfg).eval().router.kernel_spec() is None
    assert moekit.MoE(moekit.MoEConfig(dim=32, ffn_dim=16, num_experts=8, top_k=2)
                      ).train().router.kernel_spec() is None


def test_route_sort_rejects_bad_k():
    with pytest.raises(RuntimeError, match="k=9 is not allowed"):
        decode.route_sort(torch.randn(2, 8), 9, 0, True, 1.0, None)


# -- attention for one new token -------------------------------------------------------

def _attend_reference(qkv_RC, pos_R, valid_RM, k_cache, v_cache, P, theta, k_at_P=None,
                      v_at_P=None):
    """Per row and query head in float64: rotate q and k at the row's position, attend
    over the valid slots [0, P] (slot P: the new k, v as the cache stores them, in its
    dtype; ``k_at_P`` / ``v_at_P`` [R, J, Dh]: those instead). The cache holds J key/value
    heads: query head h reads head h // (H / J). Returns (y [R, H Dh], new k [R, J, Dh]
    before that rounding)."""
    R, J, _, Dh = qkv_RC.shape[0], *k_cache.shape[1:]
    H = qkv_RC.shape[1] // Dh - 2 * J
    half = Dh // 2
    inv = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    y = torch.zeros(R, H, Dh, dtype=torch.float64)
    k_new = torch.zeros(R, J, Dh, dtype=torch.float64)
    q_RHD, k_RJD, v_RJD = (t.double().reshape(R, -1, Dh)
                           for t in qkv_RC.split([H * Dh, J * Dh, J * Dh], dim=1))
    for r in range(R):
        ang = pos_R[r] * inv
        c, s = ang.cos(), ang.sin()

        def rot(x, c=c, s=s):
            x1, x2 = x[:half], x[half:]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s])

        for j in range(J):
            k_new[r, j] = rot(k_RJD[r, j])
        for h in range(H):
            j = h // (H // J)
            q, k, v = rot(q_RHD[r, h]), k_new[r, j], v_RJD[r, j]
            k_P = k[None].to(k_cache.dtype) if k_at_P is None else k_at_P[r, j][None]
            keys = torch.cat([k_cache[r, j, :P].double(), k_P.double()])
            v_P = v[None].to(v_cache.dtype) if v_at_P is None else v_at_P[r, j][None]
            vals = torch.cat([v_cache[r, j, :P].double(), v_P.double()])
            score = keys @ q / math.sqrt(Dh)
            score[~valid_RM[r, :P + 1]] = -math.inf
            y[r, h] = score.softmax(0) @ vals
    return y.view(R, H * Dh), k_new


THETA, SLOTS = 10000.0, 64


def _attend_case(R, H, J, Dh, P, padded, seed, store=lambda t: t):
    """A decode step's inputs: caches of R + 1 rows of SLOTS slots (``store``: as the
    cache holds them), qkv [R, (H + 2 J) Dh], the rotary rows (per row where padded: row
    r's prompt starts at slot r, the slots before it padding) and the valid slots.
    Returns (qkv, cos, sin, valid, positions, k_cache, v_cache)."""
    g = torch.Generator().manual_seed(seed)
    k_cache = store(torch.randn(R + 1, J, SLOTS, Dh, generator=g))
    v_cache = store(torch.randn(R + 1, J, SLOTS, Dh, generator=g))
    qkv = torch.randn(R, (H + 2 * J) * Dh, generator=g)
    cos_M, sin_M = rotary_table(SLOTS, Dh, THETA)
    valid = torch.ones(R + 1, SLOTS, dtype=torch.bool)
    if padded:
        pad = torch.arange(R + 1)
        valid = torch.arange(SLOTS)[None] >= pad[:, None]
        pos = (P - pad[:R]).clamp_min(0)
        return qkv, cos_M[pos], sin_M[pos], valid, pos, k_cache, v_cache
    return (qkv, cos_M[P:P + 1], sin_M[P:P + 1], valid, torch.full((R,), P), k_cache,
            v_cache)


def _only_slot_P_moved(k_cache, v_cache, k_before, v_before, R, P):
    k_cache[:R, :, P], v_cache[:R, :, P] = k_before[:R, :, P], v_before[:R, :, P]
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


@pytest.mark.parametrize("R,H,J,Dh,P,padded", [
    (1, 4, 4, 16, 0, False), (3, 2, 2, 32, 7, False), (4, 3, 3, 8, 12, True),
    (2, 16, 16, 64, 40, True),
    # grouped-query: J key/value heads, query head h reads h // (H / J); J = 1 is MQA
    (1, 8, 2, 16, 5, False), (3, 8, 1, 32, 9, True), (2, 6, 3, 8, 0, False),
    (4, 16, 4, 64, 30, True), (1, 6, 1, 16, 3, False)])  # the last: a group split
def test_attend_one_matches_reference(R, H, J, Dh, P, padded):
    qkv, cos, sin, valid, pos, k_cache, v_cache = _attend_case(R, H, J, Dh, P, padded,
                                                               R + P + J)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    theta = THETA
    y = decode.attend_one(qkv, cos, sin, k_cache, v_cache, P, valid if padded else None)
    ref_y, ref_k = _attend_reference(qkv, pos, valid, k_before, v_before, P, theta)
    assert y.shape == (R, H * Dh)
    torch.testing.assert_close(y.double(), ref_y, rtol=0, atol=1e-5)
    torch.testing.assert_close(k_cache[:R, :, P].double(), ref_k, rtol=0, atol=1e-5)
    assert torch.equal(v_cache[:R, :, P], qkv[:, (H + J) * Dh:].view(R, J, Dh))
    _only_slot_P_moved(k_cache, v_cache, k_before, v_before, R, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_one_is_the_same_for_any_split_of_a_group(dtype):
    """A group's query heads run together, or split between threads where the groups are
    fewer than the threads: each head's sums are taken in one order either way, so the
    output and the cache are bitwise the same at any thread count."""
    R, H, J, Dh, P, M = 1, 8, 1, 32, 20, 32
    g = torch.Generator().manual_seed(11)
    caches = torch.randn(2, R, J, M, Dh, generator=g).to(dtype)
    qkv = torch.randn(R, (H + 2 * J) * Dh, generator=g).to(dtype)
    cos_M, sin_M = rotary_table(M, Dh, 1e4)
    got = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            k, v = caches[0].clone(), caches[1].clone()
            got.append((decode.attend_one(qkv, cos_M[P:P + 1], sin_M[P:P + 1], k, v, P, None),
                        k, v))
    finally:
        torch.set_num_threads(threads)
    for y, k, v in got[1:]:
        assert torch.equal(y, got[0][0]) and torch.equal(k, got[0][1]) and torch.equal(v, got[0][2])


def test_attend_one_bf16_matches_reference():
    """bf16 activations and cache: the new k and the output are rounded to bf16 once, q
    and the scores stay fp32. So against float64 on the same bf16 inputs: half a bf16
    ulp (2^-9 relative) plus fp32 sums, checked as rtol 2^-8; y is a convex combination
    of v rows (|y| <= max |v|), so its fp32 part is bounded by 1e-5 absolute as in fp32."""
    R, H, Dh, P, M, theta = 3, 4, 32, 9, 32, 10000.0
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randn(R, H, M, Dh, generator=g).bfloat16()
    v_cache = torch.randn(R, H, M, Dh, generator=g).bfloat16()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(R, 3 * H * Dh, generator=g).bfloat16()
    cos_M, sin_M = rotary_table(M, Dh, theta)
    with torch.no_grad():
        assert decode.attend_one_ok(qkv, k_cache)
    y = decode.attend_one(qkv, cos_M[P:P + 1], sin_M[P:P + 1], k_cache, v_cache, P, None)
    valid = torch.ones(R, M, dtype=torch.bool)
    ref_y, ref_k = _attend_reference(qkv, torch.full((R,), P), valid, k_before, v_before, P,
                                     theta)
    assert y.dtype == torch.bfloat16 and y.shape == (R, H * Dh)
    torch.testing.assert_close(y.double(), ref_y, rtol=2**-8, atol=1e-5)
    torch.testing.assert_close(k_cache[:, :, P].double(), ref_k, rtol=2**-8, atol=1e-5)
    assert torch.equal(v_cache[:, :, P], qkv[:, 2 * H * Dh:].view(R, H, Dh))


@pytest.mark.parametrize("R,H,J,Dh,P,padded", [
    (1, 4, 4, 16, 0, False), (4, 3, 3, 8, 12, True), (2, 16, 16, 64, 40, True),
    (3, 8, 1, 32, 9, True), (4, 16, 4, 64, 30, True), (1, 6, 1, 16, 3, False),
    (2, 4, 2, 20, 6, False)])  # the last: a head size of no vector width (the loops)
def test_attend_one_fp32_over_a_bf16_cache_matches_reference(R, H, J, Dh, P, padded):
    """fp32 activations over a bf16 cache: the new k (rotated in fp32) and v are rounded
    to bf16 as the cache holds them, and slot P reads them so; q, the scores, the sums and
    the output stay fp32. The new key is within half a bf16 ulp of the float64 rotation
    (rtol 2^-8); given the key it stored, y is the float64 attention over the cache's
    values to fp32 sums (1e-5, as for fp32 caches)."""
    qkv, cos, sin, valid, pos, k_cache, v_cache = _attend_case(
        R, H, J, Dh, P, padded, 3 * R + P + J, store=torch.Tensor.bfloat16)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    theta = THETA
    with torch.no_grad():
        assert decode.attend_one_ok(qkv, k_cache)
    y = decode.attend_one(qkv, cos, sin, k_cache, v_cache, P, valid if padded else None)
    _, ref_k = _attend_reference(qkv, pos, valid, k_before, v_before, P, theta)
    k_P = k_cache[:R, :, P]
    ref_y, _ = _attend_reference(qkv, pos, valid, k_before, v_before, P, theta, k_at_P=k_P)
    assert y.dtype == torch.float32 and y.shape == (R, H * Dh)
    torch.testing.assert_close(k_P.double(), ref_k, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(y.double(), ref_y, rtol=0, atol=1e-5)
    assert torch.equal(v_cache[:R, :, P], qkv[:, (H + J) * Dh:].view(R, J, Dh).bfloat16())
    _only_slot_P_moved(k_cache, v_cache, k_before, v_before, R, P)


@pytest.mark.parametrize("R,H,J,Dh,P,padded", [
    (1, 4, 4, 16, 0, False), (4, 3, 3, 8, 12, True), (2, 16, 16, 64, 40, True),
    (3, 8, 1, 32, 9, True), (4, 16, 4, 64, 30, True), (1, 6, 1, 16, 3, False),
    (2, 4, 2, 20, 6, False)])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_attend_one_over_an_int8_cache_matches_reference(R, H, J, Dh, P, padded, act):
    """fp32 or bf16 activations over an int8 cache ([B, J, M, Dh + 4]: each slot's values
    and float scale): the new v is stored as quantize_kv stores it (bitwise: the kernel's
    quantizer is torch's), the new k within half a quantization step of the float64
    rotation; given what it stored, y is the float64 attention over the cache's
    dequantized values to fp32 sums (bf16: y rounded once, half a bf16 ulp more)."""
    qkv, cos, sin, valid, pos, k_cache, v_cache = _attend_case(
        R, H, J, Dh, P, padded, 5 * R + P + J, store=quantize_kv)
    qkv = qkv.to(act)
    k_cache[0, 0, 1] = quantize_kv(torch.zeros(Dh))  # a zero row: scale 0
    k_before, v_before = k_cache.clone(), v_cache.clone()
    theta = THETA
    with torch.no_grad():
        assert decode.attend_one_ok(qkv, k_cache)
    y = decode.attend_one(qkv, cos, sin, k_cache, v_cache, P, valid if padded else None)
    k_P, v_P = k_cache[:R, :, P], v_cache[:R, :, P]
    assert torch.equal(v_P, quantize_kv(qkv[:, (H + J) * Dh:].view(R, J, Dh)))
    _, ref_k = _attend_reference(qkv, pos, valid, dequantize_kv(k_before),
                                 dequantize_kv(v_before), P, theta)
    step = k_P[..., Dh:].contiguous().view(torch.float32)  # the scales: one level each
    assert ((dequantize_kv(k_P).double() - ref_k).abs() <= step / 2 + 1e-5).all()
    ref_y, _ = _attend_reference(qkv, pos, valid, dequantize_kv(k_before),
                                 dequantize_kv(v_before), P, theta, k_at_P=dequantize_kv(k_P),
                                 v_at_P=dequantize_kv(v_P))
    assert y.dtype == act and y.shape == (R, H * Dh)
    torch.testing.assert_close(y.double(), ref_y, rtol=0 if act == torch.float32 else 2**-8,
                               atol=1e-5)
    _only_slot_P_moved(k_cache, v_cache, k_before, v_before, R, P)


def test_quantize_kv_is_per_row_absmax_int8():
    """Against a per-row loop: scale = max |x| / 127, q = round half to even of x /
    scale; a zero row has scale 0 and dequantizes to zeros; dequantize_kv is q * scale."""
    x = torch.tensor([[127.0, 63.5, -0.5, 2.5],  # scale 1: halves to even
                      [0.0, 0.0, 0.0, 0.0], [3.0, -3.0, 1.5, -0.01]])
    packed = quantize_kv(x)
    assert packed.dtype == torch.int8 and packed.shape == (3, 8)
    for row, got in zip(x.tolist(), packed, strict=True):
        amax = max(abs(v) for v in row)
        scale = torch.tensor(amax, dtype=torch.float32) / 127
        want = [int(torch.round(torch.tensor(v, dtype=torch.float32)
                                / (scale if amax else 1.0))) for v in row]
        assert got[:4].tolist() == want
        assert got[4:].view(torch.float32).item() == scale.item()
        assert torch.equal(dequantize_kv(got), got[:4].float() * scale)
    assert packed[0, :4].tolist() == [127, 64, 0, 2]


def test_attend_one_rejects_mixed_dtypes():
    k = torch.zeros(1, 2, 4, 8)
    cos, sin = rotary_table(4, 8, 1e4)
    with pytest.raises(RuntimeError, match="k_BJMD is Float: it must match"):
        cpu_ext.get_decode().attend_one(torch.zeros(1, 48, dtype=torch.bfloat16), cos[:1], sin[:1],
                                        k, k.clone(), 0, None)


@pytest.mark.parametrize("width", [40, 44, 56])
def test_attend_one_rejects_a_qkv_that_does_not_fit_the_cache(width):
    """A cache of J = 2 heads of 8: the width must be (H + 2 J) 8 with J dividing H (40
    leaves H = 1 < J, 44 is not whole heads, 56 gives H = 3)."""
    k = torch.zeros(1, 2, 4, 8)
    cos, sin = rotary_table(4, 8, 1e4)
    with pytest.raises(RuntimeError, match="does not fit a cache of"):
        decode.attend_one(torch.zeros(1, width), cos[:1], sin[:1], k, k.clone(), 0, None)


def test_attend_one_rejects_a_full_cache():
    k = torch.zeros(1, 2, 4, 8)
    cos, sin = rotary_table(4, 8, 1e4)
    with pytest.raises(RuntimeError, match="P=4 is not allowed"):
        decode.attend_one(torch.zeros(1, 48), cos[:1], sin[:1], k, k.clone(), 4, None)


# -- residual add + RMSNorm -------------------------------------------------------------

@pytest.mark.parametrize("R,D", [(1, 1024), (7, 37), (3, 64)])
def test_add_rms_norm_matches_reference(R, D):
    g = torch.Generator().manual_seed(R * D)
    x, y, w = (torch.randn(R, 1, D, generator=g) * 3, torch.randn(R, 1, D, generator=g),
               torch.randn(D, generator=g))
    s, h = decode.add_rms_norm(x, y, w, 1e-5)
    ref_s = x.double() + y.double()
    ref_h = ref_s * torch.rsqrt(ref_s.square().mean(-1, keepdim=True) + 1e-5) * w.double()
    assert s.shape == h.shape == x.shape
    assert torch.equal(s, x + y)  # one fp32 add: exact
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("R,D", [(1, 1024), (5, 37)])
def test_add_rms_norm_bf16_matches_reference(R, D):
    """bf16: the sum rounded once (exactly torch's bf16 add), then normalized in fp32 and
    rounded once: within half a bf16 ulp (2^-9 relative) of float64 on the rounded sum,
    checked as rtol 2^-8."""
    g = torch.Generator().manual_seed(R + D)
    x, y, w = (torch.randn(R, 1, D, generator=g).bfloat16() * 3,
               torch.randn(R, 1, D, generator=g).bfloat16(),
               torch.randn(D, generator=g).bfloat16())
    with torch.no_grad():
        assert decode.add_norm_ok(x, w)
    s, h = decode.add_rms_norm(x, y, w, 1e-5)
    assert s.dtype == h.dtype == torch.bfloat16 and s.shape == h.shape == x.shape
    assert torch.equal(s, x + y)
    s64 = s.double()
    ref_h = s64 * torch.rsqrt(s64.square().mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(h.double(), ref_h, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,D", [(1, 1024), (5, 37)])
def test_rms_norm_matches_reference(R, D, dtype):
    """The norm alone (a decode step's first norm): float64's within fp32 / half a bf16
    ulp, and what add_rms_norm gives with y = 0 (the call it replaced), bit for bit."""
    g = torch.Generator().manual_seed(R * D + 1)
    x, w = (torch.randn(R, 1, D, generator=g) * 3).to(dtype), torch.randn(D, generator=g).to(dtype)
    h = decode.rms_norm(x, w, 1e-5)
    assert h.dtype == dtype and h.shape == x.shape
    x64 = x.double()
    ref = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5) * w.double()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(h.double(), ref, **tol)
    assert torch.equal(h, decode.add_rms_norm(x, torch.zeros_like(x), w, 1e-5)[1])


def test_rms_norm_rejects_a_mismatched_weight():
    with pytest.raises(RuntimeError, match=r"^w_D \[9\] must match x_RD \[2, 8\]"):
        decode.rms_norm(torch.zeros(2, 8), torch.ones(9), 1e-5)


def test_add_rms_norm_rejects_mismatched_shapes():
    with pytest.raises(RuntimeError, match="must match x_RD"):
        decode.add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 9), torch.ones(8), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,H,J,Dh,mode", [(1, 16, 4, 128, "head"), (3, 4, 2, 6, "head"),
                                           (2, 8, 8, 16, "full"), (5, 4, 1, 10, "full")])
def test_qk_norm_matches_reference(R, H, J, Dh, mode, dtype):
    """The decode step's q / k norms, in place on qkv rows [q | k | v]: q's pieces (each
    head, or all heads) and k's normalized as float64 does it, v untouched."""
    g = torch.Generator().manual_seed(R * H + J * Dh)
    C = (H + 2 * J) * Dh
    qkv = (torch.randn(R, C, generator=g) * 3).to(dtype)
    nq, nk = (Dh, Dh) if mode == "head" else (H * Dh, J * Dh)
    wq, wk = (torch.rand(n, generator=g).add(0.5).to(dtype) for n in (nq, nk))
    before = qkv.clone()
    out = decode.qk_norm_(qkv, wq, wk, 1e-6, H * Dh, J * Dh)
    assert out is qkv
    q, k, v = before.double().split([H * Dh, J * Dh, J * Dh], dim=-1)

    def norm(x, w):
        x = x.reshape(R, -1, w.numel())
        return (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w.double()).flatten(1)

    ref = torch.cat([norm(q, wq), norm(k, wk), v], dim=-1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(qkv.double(), ref, **tol)
    assert torch.equal(qkv[:, (H + J) * Dh:], before[:, (H + J) * Dh:])


@pytest.mark.parametrize("q_width,k_width,match", [
    (30, 16, "q_width=30 / k_width=16 do not fit"),  # not whole pieces of q_w
    (32, 48, "q_width=32 / k_width=48 do not fit"),  # past the row
])
def test_qk_norm_rejects_widths_that_do_not_fit(q_width, k_width, match):
    qkv = torch.zeros(2, 64)
    with pytest.raises(RuntimeError, match=match):
        decode.qk_norm_(qkv, torch.ones(8), torch.ones(8), 1e-6, q_width, k_width)
    assert not qkv.any()  # nothing written


# -- a whole model: the one-call step against the torch ops it replaces ------------------

def _lm(router="softmax"):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, dim=64, num_layers=2, num_heads=4, max_seq_len=64,
                   num_experts=8, top_k=2, ffn_dim=32, router=router)
    return MoETransformer(cfg).eval()


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_generation_matches_the_torch_op_step(monkeypatch, router):
    model = _lm(router)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # different lengths: padded rows
    cfg = GenerationConfig(max_new_tokens=12)
    with_kernels, _ = Engine(model).generate(prompts, cfg)
    cache = StaticKVCache.for_model(model, 1, 16)
    with torch.inference_mode():
        fast = model.infer(torch.tensor([[3, 4, 5]]), cache)
        fast = torch.stack([fast, model.infer(torch.tensor([[6]]), cache)])
    monkeypatch.setattr(decode, "ROUTE_KERNEL_MAX_TOKENS", 0)
    monkeypatch.setattr(decode, "attend_one_ok", lambda *a: False)
    without, _ = Engine(model).generate(prompts, cfg)
    cache = StaticKVCache.for_model(model, 1, 16)
    with torch.inference_mode():
        slow = model.infer(torch.tensor([[3, 4, 5]]), cache)
        slow = torch.stack([slow, model.infer(torch.tensor([[6]]), cache)])
    assert [g.tokens for g in with_kernels] == [g.tokens for g in without]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_bf16_model_step_matches_the_torch_op_step(monkeypatch):
    """A bf16 model's decode step with add_rms_norm / attend_one against the torch ops.
    The ops round q, k and each rotary product to bf16 and normalize in their own
    order, the kernels round once, so logits agree to bf16's precision (logits here are
    ~1: 3e-2, the bound test_engine uses for bf16 generation), not bit for bit."""
    model = _lm().to(torch.bfloat16)

    def step():
        cache = StaticKVCache.for_model(model, 2, 16)
        with torch.inference_mode():
            model.infer(torch.tensor([[3, 4, 5], [6, 7, 8]]), cache)
            return model.infer(torch.tensor([[6], [9]]), cache)

    with torch.no_grad():
        assert decode.attend_one_ok(torch.zeros(1, 3, dtype=torch.bfloat16),
                                    StaticKVCache.for_model(model, 1, 4).k[0])
    fast = step()
    monkeypatch.setattr(decode, "attend_one_ok", lambda *a: False)
    monkeypatch.setattr(decode, "add_norm_ok", lambda *a: False)
    slow = step()
    assert fast.dtype == slow.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), slow.float(), rtol=3e-2, atol=3e-2)
