"""Fused token-choice routing: scores, top-k, renormalisation, per-chunk expert counts,
and a stable counting-sort placement of the (token, slot) pairs by expert.

Shape letters: T tokens, E experts, K experts per token, C chunks of BLOCK_T
tokens (one program each), S = T*K routed pairs.

``route_forward`` writes experts_TK, weights_TK, scores_TE and hist_CE (pairs
per expert in each chunk, deterministic: no atomics). The caller turns hist_CE
into counts and offsets with two device cumsums, and ``place`` writes each
pair's row in the expert-sorted order; nothing is read on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moekit.kernels.common import INTERPRET

SCORE_IDS = {"softmax": 0, "sigmoid": 1}


@triton.jit
def _logits(logits_ptr, rows, cols, T, E, stride_l):
    """fp32 logits [BLOCK_T, BLOCK_E]; lanes past E hold -inf, rows past T stay finite."""
    mask = (rows < T)[:, None] & (cols < E)[None, :]
    lg = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l + cols[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    return tl.where((cols < E)[None, :], lg, float("-inf"))


@triton.jit
def _scores(logits_ptr, rows, cols, T, E, stride_l, SCORE: tl.constexpr):
    """fp32 scores [BLOCK_T, BLOCK_E]; lanes past E hold 0."""
    mask = (rows < T)[:, None] & (cols < E)[None, :]
    lg = _logits(logits_ptr, rows, cols, T, E, stride_l)
    if SCORE == 0:
        lg = lg - tl.max(lg, 1)[:, None]
        p = tl.exp(lg)
        p = p / tl.sum(p, 1)[:, None]
    else:
        p = tl.sigmoid(lg)
    return tl.where(mask, p, 0.0)


@triton.jit
def _scores_fp64(lg, SCORE: tl.constexpr):
    """fp64 softmax or sigmoid of fp32 logits (-inf lanes give 0), for selection keys."""
    lg64 = lg.to(tl.float64)
    if SCORE == 0:
        e = tl.exp(lg64 - tl.max(lg64, 1)[:, None])
        return e / tl.sum(e, 1)[:, None]
    return 1.0 / (1.0 + tl.exp(-lg64))


@triton.jit
def _renormalised(lgk, ks, K: tl.constexpr, SCORE: tl.constexpr):
    """s_k / sum_j s_j over the chosen K as a softmax of log-scores (sums to 1 even when
    every score underflows): log-score = logit (softmax) or log-sigmoid."""
    if SCORE == 0:
        u = lgk
    else:
        u = tl.minimum(lgk, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(lgk)))
    u = tl.where((ks < K)[None, :], u, float("-inf"))
    e = tl.exp(u - tl.max(u, 1)[:, None])
    return e / tl.sum(e, 1)[:, None]


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, experts_ptr, weights_ptr, scores_ptr, hist_ptr,
                  T, E, stride_l, K: tl.constexpr, SCORE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, SCALE: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    ks = tl.arange(0, BLOCK_K)
    tmask = rows < T
    p = _scores(logits_ptr, rows, cols, T, E, stride_l, SCORE)
    rows64 = rows.to(tl.int64)
    tl.store(scores_ptr + rows64[:, None] * E + cols[None, :], p,
             mask=tmask[:, None] & (cols < E)[None, :])
    lg = _logits(logits_ptr, rows, cols, T, E, stride_l)
    # the rule of routing/token_choice.py: never rank saturated fp32 scores. Without a
    # bias the logit is the key (softmax and sigmoid are monotone); with one, the
    # score is formed in fp64 before the bias is added.
    if HAS_BIAS:  # the selection bias shifts the choice only, never the weights
        sel = _scores_fp64(lg, SCORE) + tl.load(bias_ptr + cols, mask=cols < E,
                                                other=0.0).to(tl.float64)[None, :]
        sel = tl.where((cols < E)[None, :], sel, float("-inf"))
    else:
        sel = lg
    chosen = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    ws = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    lgk = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    hist = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for k in tl.static_range(K):
        best = tl.max(sel, 1)
        # lowest index among equal maxima, as a deterministic tie-break
        idx = tl.min(tl.where(sel == best[:, None], cols[None, :], BLOCK_E), 1)
        hit = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(hit, p, 0.0), 1)
        chosen = tl.where(ks[None, :] == k, idx[:, None], chosen)
        ws = tl.where(ks[None, :] == k, w[:, None], ws)
        lgk = tl.where(ks[None, :] == k, tl.sum(tl.where(hit, lg, 0.0), 1)[:, None], lgk)
        hist += tl.sum((hit & tmask[:, None]).to(tl.int32), 0)
        sel = tl.where(hit, float("-inf"), sel)
    if RENORM:
        ws = _renormalised(lgk, ks, K, SCORE)
    ws = ws * SCALE
    omask = tmask[:, None] & (ks < K)[None, :]
    tl.store(experts_ptr + rows64[:, None] * K + ks[None, :], chosen, mask=omask)
    tl.store(weights_ptr + rows64[:, None] * K + ks[None, :], ws, mask=omask)
    tl.store(hist_ptr + pid * E + cols, hist, mask=cols < E)


@triton.jit
def _place_kernel(experts_ptr, start_ptr, order_ptr, T, E, K: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """order_S[row] = pair for this chunk's pairs; row = start_CE[chunk, e] + rank in chunk."""
    pid = tl.program_id(0)
    j = tl.arange(0, BLOCK_P)  # pair index within the chunk, token-major
    pair = pid * BLOCK_T * K + j
    valid = (j < BLOCK_T * K) & (pair < T * K)
    e = tl.load(experts_ptr + pair, mask=valid, other=-1)
    # stable rank: earlier pairs of the chunk that chose the same expert
    same = (e[:, None] == e[None, :]) & (j[None, :] < j[:, None]) & valid[None, :]
    rank = tl.sum(same.to(tl.int32), 1)
    start = tl.load(start_ptr + pid * E + e, mask=valid, other=0)
    tl.store(order_ptr + start + rank, pair.to(tl.int64), mask=valid)


@triton.jit
def _route_bwd_kernel(logits_ptr, experts_ptr, dweights_ptr, dscores_ptr, dlogits_ptr,
                      T, E, stride_l, K: tl.constexpr, SCORE: tl.constexpr,
                      RENORM: tl.constexpr, SCALE: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Recompute the scores, then d logits from d weights_TK and d scores_TE."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    ks = tl.arange(0, BLOCK_K)
    tmask = rows < T
    rows64 = rows.to(tl.int64)
    emask = tmask[:, None] & (cols < E)[None, :]
    kmask = tmask[:, None] & (ks < K)[None, :]
    p = _scores(logits_ptr, rows, cols, T, E, stride_l, SCORE)
    q = tl.load(dscores_ptr + rows64[:, None] * E + cols[None, :], mask=emask, other=0.0)
    dw = tl.load(dweights_ptr + rows64[:, None] * K + ks[None, :], mask=kmask, other=0.0)
    ex = tl.load(experts_ptr + rows64[:, None] * K + ks[None, :], mask=kmask, other=-1)
    lg = _logits(logits_ptr, rows, cols, T, E, stride_l)
    lgk = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(K):
        e_k = tl.sum(tl.where(ks[None, :] == k, ex, 0), 1)
        l_k = tl.sum(tl.where(cols[None, :] == e_k[:, None], lg, 0.0), 1)
        lgk = tl.where(ks[None, :] == k, l_k[:, None], lgk)
    if RENORM:  # w = SCALE * softmax_K(u): du_k = SCALE * w_k (dw_k - sum_j w_j dw_j)
        w = _renormalised(lgk, ks, K, SCORE)
        dlog = SCALE * w * (dw - tl.sum(w * dw, 1)[:, None])  # into the logits directly
        dthrough = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    else:  # w_k = SCALE * s_k: through the scores
        dlog = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        dthrough = SCALE * dw
    extra = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in tl.static_range(K):
        e_k = tl.sum(tl.where(ks[None, :] == k, ex, 0), 1)
        hit = cols[None, :] == e_k[:, None]
        q += tl.where(hit, tl.sum(tl.where(ks[None, :] == k, dthrough, 0.0), 1)[:, None], 0.0)
        extra += tl.where(hit, tl.sum(tl.where(ks[None, :] == k, dlog, 0.0), 1)[:, None], 0.0)
    if SCORE == 0:
        dl = p * (q - tl.sum(p * q, 1)[:, None]) + extra
    else:  # d log-sigmoid(l) / dl = 1 - sigmoid(l)
        dl = q * p * (1.0 - p) + extra * (1.0 - p)
    tl.store(dlogits_ptr + rows64[:, None] * stride_l + cols[None, :], dl, mask=emask)


def block_t(E: int, K: int) -> int:
    """Tokens per program: keeps the [BLOCK_T, BLOCK_E] tile and the placement's
    [BLOCK_T*K]^2 rank comparison modest (at most 256 pairs per chunk)."""
    cap = 16 if INTERPRET else 4096 // triton.next_power_of_2(E)
    by_pairs = 256 // triton.next_power_of_2(K)
    return max(1, min(cap, by_pairs, 64))


def route_forward(logits_TE: Tensor, bias_E: Tensor | None, top_k: int, score: str,
                  renormalize: bool, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(experts_TK int32, weights_TK fp32, scores_TE fp32, hist_CE int32)."""
    T, E = logits_TE.shape
    BT = block_t(E, top_k)
    C = triton.cdiv(T, BT)
    dev = logits_TE.device
    experts_TK = torch.empty(T, top_k, device=dev, dtype=torch.int32)
    weights_TK = torch.empty(T, top_k, device=dev, dtype=torch.float32)
    scores_TE = torch.empty(T, E, device=dev, dtype=torch.float32)
    hist_CE = torch.empty(C, E, device=dev, dtype=torch.int32)
    b = bias_E.float().contiguous() if bias_E is not None else scores_TE
    _route_kernel[(C,)](logits_TE, b, experts_TK, weights_TK, scores_TE, hist_CE, T, E,
                        logits_TE.stride(0), K=top_k, SCORE=SCORE_IDS[score],
                        HAS_BIAS=bias_E is not None, RENORM=renormalize, SCALE=float(scale),
                        BLOCK_T=BT, BLOCK_E=triton.next_power_of_2(E),
                        BLOCK_K=triton.next_power_of_2(top_k))
    return experts_TK, weights_TK, scores_TE, hist_CE


def place(experts_TK: Tensor, start_CE: Tensor) -> Tensor:
    """order_S (int64): the pair (t*K + k) placed at each expert-sorted row; stable."""
    T, K = experts_TK.shape
    C, E = start_CE.shape
    BT = block_t(E, K)
    order_S = torch.empty(T * K, device=experts_TK.device, dtype=torch.int64)
    _place_kernel[(C,)](experts_TK, start_CE, order_S, T, E, K=K, BLOCK_T=BT,
                        BLOCK_P=triton.next_power_of_2(BT * K))
    return order_S


def route_backward(logits_TE: Tensor, experts_TK: Tensor, dweights_TK: Tensor,
                   dscores_TE: Tensor, score: str, renormalize: bool, scale: float) -> Tensor:
    T, E = logits_TE.shape
    K = experts_TK.shape[1]
    BT = block_t(E, K)
    dlogits_TE = torch.empty(T, E, device=logits_TE.device, dtype=torch.float32)
    _route_bwd_kernel[(triton.cdiv(T, BT),)](
        logits_TE, experts_TK, dweights_TK, dscores_TE, dlogits_TE, T, E, logits_TE.stride(0),
        K=K, SCORE=SCORE_IDS[score], RENORM=renormalize, SCALE=float(scale), BLOCK_T=BT,
        BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(K))
    return dlogits_TE
