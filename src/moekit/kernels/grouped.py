"""Grouped GEMM kernels for MoE experts over rows sorted by expert.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU kinds (gate
first, then up) else F, E experts, S routed rows (sorted by expert; rows at and
past ``offsets_E[-1]`` were dropped and are never touched).

Row-block kernels (``up_project``, ``scatter_rows``, ``down_backward``) launch
an upper bound of ``cdiv(S, BLOCK_M) + E`` row blocks: sum over experts of
ceil(count_e / BLOCK_M) never exceeds it. Each program maps its block id to an
(expert, first row) pair on the device from ``offsets_E`` (``_expert_block``),
and blocks past the last expert exit at once. Nothing reads a count on the host,
so a step with these kernels can be captured in a CUDA graph.

Weight-gradient kernels (``weight_grad``) run one program per (expert, tile)
and loop over that expert's rows on the device.

Launch configurations are autotuned per shape bucket (the autotune key holds
the matrix sizes and a power-of-two bucket of rows per expert); no per-device
files. Under ``TRITON_INTERPRET=1`` a single small configuration is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moekit.kernels.common import (
    ACT_IDS,
    GLU_ACTS,
    INTERPRET,
    act_bwd,
    act_fwd,
    dot_precision,
    mma,
    needs_upcast,
    rows_bucket,
)

# Launch configurations (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BASE serves
# every dtype and row count. The WIDE_* lists add larger tiles and more warps for fp16 /
# bf16 with at least MIN_WIDE_ROWS rows per expert; each was kept only if it compiles
# for sm_90 without register spills (`python tests/triton_aot.py --tiles`, triton 3.6:
# benchmarks/results/triton_tiles_sm90_20261204.txt). That report shows five of the
# seven BASE tiles of _down_bwd_kernel spilling 1.4-1.5 KB per thread: its epilogue
# holds the GEMM tile, both pre-activation tiles and the activation's derivatives, so
# WIDE_DOWN_BWD puts 8 warps on 64x128 / 128x64 tiles (no spill). On an H200 the WIDE
# lists took 10-12% off that kernel and 5-6% off a T=4096 training step
# (benchmarks/bench_triton_bwd.py, 2026-12-04).
BASE_ROW = [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3),
            (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (32, 64, 64, 4, 4)]
BASE_WGRAD = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
              (128, 128, 64, 8, 3)]
WIDE_UP = [(128, 64, 64, 4, 4)]
WIDE_SCATTER = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                (128, 64, 64, 4, 4)]
WIDE_DOWN_BWD = [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 4),
                 (64, 64, 64, 4, 4)]
WIDE_WGRAD = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
              (64, 256, 64, 4, 3)]
MIN_WIDE_ROWS = 64


def _configs(base: list, wide: list) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                          num_stages=s) for m, n, k, w, s in base + wide]


def config_shape(config: triton.Config) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a launch configuration."""
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def _prune(base: list):
    """Autotune pruning: only the BASE tiles for fp32 or few rows per expert."""
    keep = set(base)

    def prune(configs: list, named_args: dict, **kwargs) -> list:
        first = next(v for v in named_args.values() if isinstance(v, Tensor))
        if first.element_size() <= 2 and named_args["M_BUCKET"] >= MIN_WIDE_ROWS:
            return configs
        return [c for c in configs if config_shape(c) in keep] or configs

    return {"early_config_prune": prune}


@triton.jit
def _expert_block(offsets_ptr, E, pid, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map row-block ``pid`` to (expert, first row, end row); expert == E means idle."""
    idx = tl.arange(0, BLOCK_E)
    lane = idx < E
    ends = tl.load(offsets_ptr + idx, mask=lane, other=0)
    starts = tl.load(offsets_ptr + idx - 1, mask=lane & (idx > 0), other=0)
    nblk = tl.where(lane, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    blk_end = tl.cumsum(nblk, 0)
    expert = tl.sum(tl.where(lane & (blk_end <= pid), 1, 0), 0)
    sel = idx == expert
    blk_start = tl.sum(tl.where(sel, blk_end - nblk, 0), 0)
    row0 = tl.sum(tl.where(sel, starts, 0), 0) + (pid - blk_start) * BLOCK_M
    row_end = tl.sum(tl.where(sel, ends, 0), 0)
    return expert, row0, row_end


# -- forward: gather + up projection + activation --------------------------------------------


@triton.autotune(configs=_configs(BASE_ROW, WIDE_UP), key=["D", "F", "M_BUCKET"],
                 prune_configs_by=_prune(BASE_ROW))
@triton.jit
def _up_kernel(x_ptr, tok_ptr, off_ptr, w_ptr, b_ptr, h_ptr, a_ptr,
               E, D, F, M_BUCKET, stride_x, stride_we, stride_wd, stride_wg, stride_be,
               stride_h, stride_a,
               ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr,
               STORE_H: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert, row0, row_end = _expert_block(off_ptr, E, tl.program_id(0), BLOCK_M, BLOCK_E)
    if expert < E:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < F
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < D
            # the gather: token rows read through the sorted index, no permuted copy
            a = tl.load(x_ptr + tok[:, None] * stride_x + kk[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & cmask[None, :]
            w_g = tl.load(w_base + kk[:, None] * stride_wd + cols[None, :] * stride_wg,
                          mask=wmask, other=0.0)
            acc_g = mma(a, w_g, acc_g, UPCAST, PREC)
            if GLU:
                w_u = tl.load(w_base + kk[:, None] * stride_wd + (cols + F)[None, :] * stride_wg,
                              mask=wmask, other=0.0)
                acc_u = mma(a, w_u, acc_u, UPCAST, PREC)
        if HAS_BIAS:
            b_base = b_ptr + expert * stride_be
            acc_g += tl.load(b_base + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if GLU:
                acc_u += tl.load(b_base + F + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        omask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        h_g = acc_g.to(h_ptr.dtype.element_ty)
        h_u = acc_u.to(h_ptr.dtype.element_ty)
        if STORE_H:  # pre-activations, kept for backward (the activation is recomputed)
            tl.store(h_ptr + rows64[:, None] * stride_h + cols[None, :], h_g, mask=omask)
            if GLU:
                tl.store(h_ptr + rows64[:, None] * stride_h + (cols + F)[None, :], h_u,
                         mask=omask)
        # activation on the rounded pre-activation, as the unfused path computes it
        out = act_fwd(h_g.to(tl.float32), h_u.to(tl.float32), ACT, LIMIT, ALPHA)
        tl.store(a_ptr + rows64[:, None] * stride_a + cols[None, :],
                 out.to(a_ptr.dtype.element_ty), mask=omask)


# -- forward down projection + weighted combine; backward input gradient ------------------


@triton.autotune(configs=_configs(BASE_ROW, WIDE_SCATTER), key=["K", "N", "M_BUCKET"],
                 reset_to_zero=["out_ptr"], prune_configs_by=_prune(BASE_ROW))
@triton.jit
def _scatter_kernel(a_ptr, tok_ptr, wt_ptr, off_ptr, w_ptr, b_ptr, out_ptr,
                    E, K, N, M_BUCKET, stride_a, stride_we, stride_wk, stride_wn, stride_be,
                    stride_o,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[tok[r]] += weight[r] * (A[r] @ W[e] + b[e]) for the rows r of expert e."""
    expert, row0, row_end = _expert_block(off_ptr, E, tl.program_id(0), BLOCK_M, BLOCK_E)
    if expert < E:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            a = tl.load(a_ptr + rows64[:, None] * stride_a + kk[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = mma(a, w, acc, UPCAST, PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + expert * stride_be + cols, mask=cmask,
                           other=0.0).to(tl.float32)[None, :]
        if HAS_WEIGHT:
            acc = acc * tl.load(wt_ptr + rows, mask=rmask, other=0.0)[:, None]
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
        # fp32 atomics: the K rows of a token land in different programs; the
        # summation order (not the set of terms) varies from run to run on a GPU
        tl.atomic_add(out_ptr + tok[:, None] * stride_o + cols[None, :], acc,
                      mask=rmask[:, None] & cmask[None, :])


# -- backward through the down projection, the combine weight and the activation ----------


@triton.autotune(configs=_configs(BASE_ROW, WIDE_DOWN_BWD), key=["D", "F", "M_BUCKET"],
                 reset_to_zero=["dwt_ptr"], prune_configs_by=_prune(BASE_ROW))
@triton.jit
def _down_bwd_kernel(dy_ptr, tok_ptr, wt_ptr, off_ptr, w_ptr, b_ptr, h_ptr, dh_ptr, dwt_ptr,
                     aw_ptr, E, D, F, M_BUCKET, stride_dy, stride_we, stride_wf, stride_wd,
                     stride_be, stride_h, stride_dh, stride_aw,
                     ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr,
                     STORE_AW: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dA = dy[tok] @ W_out[e]^T; dh = act'(h) * weight * dA; dweight = <act(h), dA> (+ bias);
    with STORE_AW also aw = weight * act(h), the left operand of dW_out."""
    expert, row0, row_end = _expert_block(off_ptr, E, tl.program_id(0), BLOCK_M, BLOCK_E)
    if expert < E:
        pid_n = tl.program_id(1)
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < F
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < D
            g = tl.load(dy_ptr + tok[:, None] * stride_dy + kk[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_base + cols[None, :] * stride_wf + kk[:, None] * stride_wd,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = mma(g, w, acc, UPCAST, PREC)
        omask = rmask[:, None] & cmask[None, :]
        h_g = tl.load(h_ptr + rows64[:, None] * stride_h + cols[None, :], mask=omask,
                      other=0.0).to(tl.float32)
        h_u = h_g
        if GLU:
            h_u = tl.load(h_ptr + rows64[:, None] * stride_h + (cols + F)[None, :], mask=omask,
                          other=0.0).to(tl.float32)
        # recompute the activation instead of keeping it from the forward pass
        act = act_fwd(h_g, h_u, ACT, LIMIT, ALPHA)
        act = act.to(h_ptr.dtype.element_ty).to(tl.float32)
        dwt = tl.sum(tl.where(omask, act * acc, 0.0), 1)
        if HAS_BIAS:
            if pid_n == 0:  # the bias term of <dy[tok], y_row>, once per row
                for k0 in range(0, D, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    kmask = kk < D
                    g = tl.load(dy_ptr + tok[:, None] * stride_dy + kk[None, :],
                                mask=rmask[:, None] & kmask[None, :], other=0.0)
                    b = tl.load(b_ptr + expert * stride_be + kk, mask=kmask, other=0.0)
                    dwt += tl.sum(g.to(tl.float32) * b.to(tl.float32)[None, :], 1)
        tl.atomic_add(dwt_ptr + rows, dwt, mask=rmask)
        wt = tl.load(wt_ptr + rows, mask=rmask, other=0.0)
        if STORE_AW:
            tl.store(aw_ptr + rows64[:, None] * stride_aw + cols[None, :],
                     (act * wt[:, None]).to(aw_ptr.dtype.element_ty), mask=omask)
        d_g, d_u = act_bwd(h_g, h_u, acc * wt[:, None], ACT, LIMIT, ALPHA)
        tl.store(dh_ptr + rows64[:, None] * stride_dh + cols[None, :],
                 d_g.to(dh_ptr.dtype.element_ty), mask=omask)
        if GLU:
            tl.store(dh_ptr + rows64[:, None] * stride_dh + (cols + F)[None, :],
                     d_u.to(dh_ptr.dtype.element_ty), mask=omask)


# -- weight gradients ---------------------------------------------------------------------


@triton.autotune(configs=_configs(BASE_WGRAD, WIDE_WGRAD), key=["M", "N", "M_BUCKET"],
                 prune_configs_by=_prune(BASE_WGRAD))
@triton.jit
def _wgrad_kernel(a_ptr, tok_ptr, wt_ptr, off_ptr, b_ptr, dw_ptr, db_ptr,
                  M, N, M_BUCKET, stride_a, stride_b, stride_dwe, stride_dwm, stride_db,
                  A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BIAS_WEIGHT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW[e] = A_e^T @ B_e over expert e's rows; db[e] = column sums of B_e.

    A is a[tok[r]] (A_GATHER) or a[r]; B is b[tok[r]] (B_GATHER) or b[r]. With
    BIAS_WEIGHT the bias sums weight[r] * B[r]. Both operands are plain (gathered)
    loads, so the loop's loads are pipelined; nothing is computed on them in registers.
    """
    expert = tl.program_id(0)
    pid_m = tl.program_id(1)
    start = tl.load(off_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(off_ptr + expert)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = ms < M
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        rmask = rs < end
        rs64 = rs.to(tl.int64)
        tok = rs64
        if A_GATHER or B_GATHER:
            tok = tl.load(tok_ptr + rs, mask=rmask, other=0).to(tl.int64)
        a_rows = tok if A_GATHER else rs64
        b_rows = tok if B_GATHER else rs64
        at = tl.load(a_ptr + a_rows[None, :] * stride_a + ms[:, None],
                     mask=mmask[:, None] & rmask[None, :], other=0.0)
        bt = tl.load(b_ptr + b_rows[:, None] * stride_b + ns[None, :],
                     mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = mma(at, bt, acc, UPCAST, PREC)
        if HAS_BIAS:
            if BIAS_WEIGHT:
                wt = tl.load(wt_ptr + rs, mask=rmask, other=0.0)
                bsum += tl.sum(bt.to(tl.float32) * wt[:, None], 0)
            else:
                bsum += tl.sum(bt.to(tl.float32), 0)
    dw_base = dw_ptr + expert.to(tl.int64) * stride_dwe
    tl.store(dw_base + ms[:, None].to(tl.int64) * stride_dwm + ns[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
    if HAS_BIAS:
        if pid_m == 0:
            tl.store(db_ptr + expert * stride_db + ns, bsum.to(db_ptr.dtype.element_ty),
                     mask=nmask)


# -- launchers --------------------------------------------------------------------------------


def _row_grid(S: int, E: int, N: int):
    return lambda meta: (triton.cdiv(S, meta["BLOCK_M"]) + E, triton.cdiv(N, meta["BLOCK_N"]))


def _act_args(act: str, limit: float, alpha: float) -> dict:
    return {"ACT": ACT_IDS[act], "GLU": act in GLU_ACTS, "LIMIT": float(limit),
            "ALPHA": float(alpha)}


def _dot_args(dtype: torch.dtype, E: int | None = None) -> dict:
    out = {"UPCAST": needs_upcast(dtype), "PREC": dot_precision(dtype)}
    if E is not None:
        out["BLOCK_E"] = triton.next_power_of_2(E)
    return out


def up_project(x_TD: Tensor, token_S: Tensor, offsets_E: Tensor, w_in_EDG: Tensor,
               b_in_EG: Tensor | None, act: str, limit: float, alpha: float,
               store_h: bool) -> tuple[Tensor, Tensor | None]:
    """a_SF = act(x[token_S] @ w_in[e] + b_in[e]) per expert; also h_SG when ``store_h``."""
    S, (E, D, G) = token_S.shape[0], w_in_EDG.shape
    F = G // 2 if act in GLU_ACTS else G
    a_SF = x_TD.new_empty(S, F)
    h_SG = x_TD.new_empty(S, G) if store_h else a_SF
    b = b_in_EG if b_in_EG is not None else w_in_EDG
    _up_kernel[_row_grid(S, E, F)](
        x_TD, token_S, offsets_E, w_in_EDG, b, h_SG, a_SF,
        E, D, F, rows_bucket(S, E), x_TD.stride(0), *w_in_EDG.stride(), b.stride(0),
        h_SG.stride(0), a_SF.stride(0),
        HAS_BIAS=b_in_EG is not None, STORE_H=store_h, **_act_args(act, limit, alpha),
        **_dot_args(x_TD.dtype, E))
    return a_SF, (h_SG if store_h else None)


def scatter_rows(a_SK: Tensor, token_S: Tensor, weight_S: Tensor | None, offsets_E: Tensor,
                 w_EKN: Tensor, b_EN: Tensor | None, T: int) -> Tensor:
    """out_TN (fp32) [tok] += weight * (a[r] @ w[e] + b[e]); ``w_EKN`` may be a transposed view."""
    S, K = a_SK.shape
    E, _, N = w_EKN.shape
    out_TN = torch.zeros(T, N, device=a_SK.device, dtype=torch.float32)
    b = b_EN if b_EN is not None else w_EKN
    wt = weight_S if weight_S is not None else offsets_E
    _scatter_kernel[_row_grid(S, E, N)](
        a_SK, token_S, wt, offsets_E, w_EKN, b, out_TN,
        E, K, N, rows_bucket(S, E), a_SK.stride(0), *w_EKN.stride(), b.stride(0),
        out_TN.stride(0),
        HAS_WEIGHT=weight_S is not None, HAS_BIAS=b_EN is not None,
        **_dot_args(a_SK.dtype, E))
    return out_TN


def down_backward(dy_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                  w_out_EFD: Tensor, b_out_ED: Tensor | None, h_SG: Tensor, act: str,
                  limit: float, alpha: float, store_aw: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dh_SG, dweight_S fp32, aw_SF): rows past offsets_E[-1] get dweight 0, dh and aw
    unset. aw_SF = weight_S * act(h_SG) (dW_out's left operand) only with ``store_aw``."""
    S, (E, F, D) = token_S.shape[0], w_out_EFD.shape
    dh_SG = torch.empty_like(h_SG)
    dweight_S = torch.zeros(S, device=dy_TD.device, dtype=torch.float32)
    aw_SF = h_SG.new_empty(S, F) if store_aw else None
    aw = aw_SF if aw_SF is not None else dh_SG
    b = b_out_ED if b_out_ED is not None else w_out_EFD
    _down_bwd_kernel[_row_grid(S, E, F)](
        dy_TD, token_S, weight_S, offsets_E, w_out_EFD, b, h_SG, dh_SG, dweight_S, aw,
        E, D, F, rows_bucket(S, E), dy_TD.stride(0), *w_out_EFD.stride(), b.stride(0),
        h_SG.stride(0), dh_SG.stride(0), aw.stride(0),
        HAS_BIAS=b_out_ED is not None, STORE_AW=store_aw, **_act_args(act, limit, alpha),
        **_dot_args(dy_TD.dtype, E))
    return dh_SG, dweight_S, aw_SF


def weight_grad(a: Tensor, token_S: Tensor, offsets_E: Tensor, b: Tensor, a_gather: bool,
                b_gather: bool, with_bias: bool, bias_weight_S: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
    """(dW_EMN, db_EN): per-expert A^T B over sorted rows (see ``_wgrad_kernel``).

    A = a[token_S] with ``a_gather`` else a[r] (M = a's width); B = b[token_S] with
    ``b_gather`` else b[r] (N = b's width). db sums ``bias_weight_S`` * B when given.
    """
    E, M, N = offsets_E.shape[0], a.shape[1], b.shape[1]
    dw_EMN = a.new_empty(E, M, N)
    db_EN = a.new_empty(E, N) if with_bias else dw_EMN
    wt = bias_weight_S if bias_weight_S is not None else offsets_E
    grid = lambda meta: (E, triton.cdiv(M, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(N, meta["BLOCK_N"]))
    _wgrad_kernel[grid](
        a, token_S, wt, offsets_E, b, dw_EMN, db_EN, M, N, rows_bucket(token_S.shape[0], E),
        a.stride(0), b.stride(0), dw_EMN.stride(0), dw_EMN.stride(1), db_EN.stride(0),
        A_GATHER=a_gather, B_GATHER=b_gather, HAS_BIAS=with_bias,
        BIAS_WEIGHT=bias_weight_S is not None, **_dot_args(a.dtype))
    return dw_EMN, (db_EN if with_bias else None)
