"""The fused expert path's blocks in bf16 on the AVX-512 BF16 kernels, layer fused in.

``moe_experts.FusedExperts`` runs a block of experts as GEMMs with aten passes
between them (gather, activation, weight scale, combine, and their backward).
Where the CPU runs AVX-512 BF16 and the activation is SwiGLU or GeGLU, a block
runs instead as (``moekit/csrc/cpu_bf16.cpp``):

    forward   glu_up_out      h = x[tok] @ w_in (+ b_in), a = act(gate) * up
              scatter_mm      out32[tok] += weight * (a @ w_out (+ b_out))
    backward  glu_backward_out  gu = dy[tok] @ w_out^T; dh, weight * a, d weight
              grouped_mm_weight_out  dw_out = (weight a)^T dy[tok], dw_in = x[tok]^T dh
              scatter_mm      dx32[tok] += dh @ w_in^T

The gathers are the GEMMs' A loads (row pointers), the activation and the
combine are their epilogues, the combine accumulates in fp32 (one bf16
rounding of the output instead of one per routed row), and h is the only
tensor saved (act(h) is recomputed in the backward epilogue, as in fp32).
Any other activation, or ``MOEKIT_BF16_KERNEL=0``, keeps the unfused path.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F, E experts, N rows
of one block, C 64-column tiles of F.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from moekit.functions import cpu_ext

KIND_IDS = {"swiglu": 0, "geglu": 1}
TILE = 64  # columns of F per kernel tile: glu_backward_out's d weight comes in C partials


def kernels(x_TD: Tensor, kind: str | None) -> ModuleType | None:
    """The bf16 kernels where this block can run fused: bf16 CPU tensors, SwiGLU or GeGLU,
    a CPU with AVX-512 BF16 and the kernels built (else None: the unfused path)."""
    if kind not in KIND_IDS or x_TD.device.type != "cpu" or x_TD.dtype != torch.bfloat16:
        return None
    return cpu_ext.bf16()


def _slice(t: Tensor | None, e0: int, e1: int, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t[e0:e1].to(dtype)


def forward_block(ext: ModuleType, blk, p, x_TD: Tensor, tok_N: Tensor, w_N: Tensor,
                  a_NF: Tensor, h_NG: Tensor, out32_TD: Tensor) -> Tensor:
    """Adds the block's weighted expert outputs to out32_TD (fp32); returns h_NG (the
    caller's [n, G] buffer, filled) to save.

    ``blk`` is an expert_blocks.Block, ``p`` its Weights, ``w_N`` float32 weights."""
    e0, e1 = blk.e0, blk.e1
    ext.glu_up_out(x_TD, tok_N, p.w_in_EDG[e0:e1], _slice(p.b_in_EG, e0, e1, x_TD.dtype),
                   list(blk.ends), KIND_IDS[p.kind], h_NG, a_NF)
    ext.scatter_mm(a_NF, p.w_out_EFD[e0:e1], _slice(p.b_out_ED, e0, e1, x_TD.dtype), w_N,
                   tok_N, list(blk.ends), out32_TD)
    return h_NG


def backward_block(ext: ModuleType, grads, ws, blk, tok_N: Tensor, g_TD: Tensor, w_N: Tensor,
                   h_NG: Tensor, dx32_TD: Tensor | None) -> None:
    """Fills the block's share of ``grads`` (an expert_grads.Grads); dx into dx32_TD."""
    p, n, (e0, e1) = grads.p, tok_N.shape[0], (blk.e0, blk.e1)
    F = p.w_out_EFD.shape[1]
    ends = list(blk.ends)
    dh_NG, aw_NF = ws.get("dh", n, 2 * F), ws.get("a", n, F)
    dw_NC = torch.empty(n, -(-F // TILE), dtype=torch.float32)
    ext.glu_backward_out(g_TD, tok_N, p.w_out_EFD[e0:e1].transpose(1, 2), h_NG, w_N, ends,
                         KIND_IDS[p.kind], dh_NG, aw_NF, dw_NC)
    g_ND = None
    if p.b_out_ED is not None and (grads.weight_S is not None or grads.b_out is not None):
        g_ND = torch.index_select(g_TD, 0, tok_N)  # bias terms only: rare, kept simple
    if grads.weight_S is not None:
        dw_N = dw_NC.sum(1)
        if g_ND is not None:
            for e, s, t in blk.experts():
                dw_N[s:t] += (g_ND[s:t] @ p.b_out_ED[e]).float()
        grads.weight_S[blk.r0:blk.r1] = dw_N
    if grads.w_out is not None:
        ext.grouped_mm_weight_out(aw_NF, g_TD, ends, grads.w_out[e0:e1], None, tok_N)
    if grads.b_out is not None:
        for e, s, t in blk.experts():
            grads.b_out[e] = (g_ND[s:t].float().t() @ w_N[s:t]).to(grads.b_out.dtype)
    if grads.b_in is not None:
        for e, s, t in blk.experts():
            torch.sum(dh_NG[s:t], 0, out=grads.b_in[e])
    if grads.w_in is not None:
        ext.grouped_mm_weight_out(grads.x_in, dh_NG, ends, grads.w_in[e0:e1], tok_N, None)
    if dx32_TD is not None:
        ext.scatter_mm(dh_NG, p.w_in_EDG[e0:e1].transpose(1, 2), None, None, tok_N, ends,
                       dx32_TD)
