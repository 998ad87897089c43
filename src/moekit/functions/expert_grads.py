"""The fused expert path's backward, block by block (``Grads``): preallocated gradients
of x, the combine weights, the expert weights and biases (None where nobody asked), with
act(h) recomputed from the saved h and, around a SwiGLU, everything between the two data
GEMMs in one C++ pass (``glu.weighted_backward``).

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations else F,
E experts, S routed rows, N rows of one block, B experts of one block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.functions.expert_blocks import Block, Weights, act_forward, gmm, gmm_weight
from moekit.functions.glu import FAST_KINDS, generic_backward, glu_backward, weighted_backward
from moekit.functions.row_buffers import Workspace


class Grads:
    """Preallocated gradients (None where not needed), filled block by block.

    ``torch.empty`` and not zeros: every expert's slice is written once with
    ``out=``; the slices of experts without rows are zeroed once here.
    """

    def __init__(self, need: tuple[bool, ...], x_TD: Tensor, weight_S: Tensor, p: Weights,
                 has_b_in: bool, blocks: list[Block]) -> None:
        self.x_in, self.p = x_TD, p
        self.need_dh = need[0] or need[2] or need[4]
        E, D, G = p.w_in_EDG.shape
        self.x_TD = x_TD.new_zeros(x_TD.shape) if need[0] else None  # index_add_ target
        self.weight_S = weight_S.new_zeros(weight_S.shape) if need[1] else None  # 0 if dropped
        # empty_like keeps the weight's strides: where the weight is a transposed view
        # (transformers' [E, G, D] layout), the gradient comes back in the parameter's
        # own layout and autograd stores it without a transposing copy
        self.w_in = torch.empty_like(p.w_in_EDG) if need[2] else None
        self.w_out = torch.empty_like(p.w_out_EFD) if need[3] else None
        self.b_in = p.w_in_EDG.new_empty(E, G) if has_b_in and need[4] else None
        self.b_out = p.w_out_EFD.new_empty(E, D) if p.b_out_ED is not None and need[5] else None
        used = {e for b in blocks for e, _, _ in b.experts()}
        idle = [e for e in range(E) if e not in used]
        for t in (self.w_in, self.w_out, self.b_in, self.b_out):
            if t is not None and idle:
                t[idle] = 0

    def _activation(self, ws: Workspace, h_NG: Tensor,
                    da_NF: Tensor) -> tuple[Tensor, Tensor | None]:
        n, F = da_NF.shape
        kind, act = self.p.kind, self.p.act
        if not self.need_dh:
            return act_forward(h_NG, kind, act, ws.get("a", n, F)), None
        if kind in FAST_KINDS:
            return glu_backward(h_NG, da_NF, kind, ws.get("a", n, F), ws.get("t", n, F),
                                ws.get("dh", n, h_NG.shape[1]))
        return generic_backward(h_NG, da_NF, act)

    def block(self, ws: Workspace, blk: Block, tok_N: Tensor, g_TD: Tensor, w_N1: Tensor,
              h_NG: Tensor) -> None:
        p, n = self.p, tok_N.shape[0]
        F = p.w_out_EFD.shape[1]
        w_out_BDF = p.w_out_EFD[blk.e0:blk.e1].transpose(1, 2)
        g_ND = torch.index_select(g_TD, 0, tok_N, out=ws.get("g", n, g_TD.shape[1]))
        # gradient of act(h) before the combine weight: d weight_S is its row dot with act(h)
        gu_NF = gmm(g_ND, w_out_BDF, blk, ws.get("gu", n, F))
        fused = self._fused_activation(ws, blk, h_NG, gu_NF, g_ND, w_N1)
        if fused is not None:
            aw_NF, dh_NG = fused
        else:
            da_NF = torch.mul(gu_NF, w_N1, out=ws.get("da", n, F))
            a_NF, dh_NG = self._activation(ws, h_NG, da_NF)
            if self.weight_S is not None:
                self._weight_grad(blk, g_ND, gu_NF, a_NF)
            # scale in place only a buffer we own: a generic act may return a view of h
            aw_NF = a_NF.mul_(w_N1) if p.kind in FAST_KINDS else a_NF * w_N1
        self._out_grads(blk, g_ND, w_N1, aw_NF)
        if dh_NG is not None:
            self._in_grads(ws, blk, tok_N, dh_NG)

    def _fused_activation(self, ws: Workspace, blk: Block, h_NG: Tensor, gu_NF: Tensor,
                          g_ND: Tensor, w_N1: Tensor) -> tuple[Tensor, Tensor] | None:
        """(w act(h), dh) and the combine weights' gradient in one C++ pass over the rows
        (SwiGLU, float32 or bfloat16; glu.weighted_backward), else None: nine aten passes
        (gu w, the activation's five, gu act, its row sums, act w) cost 5.0 ms where this
        takes 1.3 (8192 x 256 bf16 rows, 2 threads, this Xeon; fp32 6.2 / 1.1 ms)."""
        if self.p.kind != "swiglu" or not self.need_dh:
            return None
        n, F = gu_NF.shape
        aw_NF, dh_NG = ws.get("a", n, F), ws.get("dh", n, 2 * F)
        dw_N = torch.empty(n, dtype=torch.float32)
        if not weighted_backward(h_NG, gu_NF, w_N1[:, 0].float().contiguous(), aw_NF, dh_NG,
                                 dw_N):
            return None
        if self.weight_S is not None:
            self._store_weight_grad(blk, g_ND, dw_N)
        return aw_NF, dh_NG

    def _weight_grad(self, blk: Block, g_ND: Tensor, gu_NF: Tensor, a_NF: Tensor) -> None:
        # summed in fp32 for bf16 / fp16 rows, in fp64 for fp64 rows (an fp32 sum rounded
        # an fp64 layer's router gradient to ~1e-7)
        dtype = torch.promote_types(gu_NF.dtype, torch.float32)
        self._store_weight_grad(blk, g_ND, gu_NF.mul_(a_NF).sum(1, dtype=dtype))

    def _store_weight_grad(self, blk: Block, g_ND: Tensor, dw_N: Tensor) -> None:
        """d weight_S of the block's rows: act(h) . gu, plus b_out . dy for biased experts."""
        assert self.weight_S is not None
        if self.p.b_out_ED is not None:
            for e, s, t in blk.experts():
                dw_N[s:t] += (g_ND[s:t] @ self.p.b_out_ED[e]).to(dw_N.dtype)
        self.weight_S[blk.r0:blk.r1] = dw_N

    def _out_grads(self, blk: Block, g_ND: Tensor, w_N1: Tensor, aw_NF: Tensor) -> None:
        if self.w_out is not None:
            gmm_weight(aw_NF, g_ND, blk, self.w_out)
        if self.b_out is not None:
            for e, s, t in blk.experts():
                torch.mv(g_ND[s:t].t(), w_N1[s:t, 0], out=self.b_out[e])

    def _in_grads(self, ws: Workspace, blk: Block, tok_N: Tensor, dh_NG: Tensor) -> None:
        n, D = tok_N.shape[0], self.x_in.shape[1]
        if self.b_in is not None:
            for e, s, t in blk.experts():
                torch.sum(dh_NG[s:t], 0, out=self.b_in[e])
        if self.w_in is not None:
            x_ND = torch.index_select(self.x_in, 0, tok_N, out=ws.get("x", n, D))
            gmm_weight(x_ND, dh_NG, blk, self.w_in)
        if self.x_TD is not None:
            w_in_BGD = self.p.w_in_EDG[blk.e0:blk.e1].transpose(1, 2)
            dx_ND = gmm(dh_NG, w_in_BGD, blk, ws.get("y", n, D))
            self.x_TD.index_add_(0, tok_N, dx_ND)
