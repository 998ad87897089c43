"""The fused expert path: gather -> x @ w_in -> activation -> @ w_out -> weighted scatter.

One ``torch.autograd.Function`` runs every expert of a Dispatch on its slice of
the expert-sorted rows, one expert at a time:

    forward   x_N = x_TD[token]         (index_select of this expert's rows only)
              h_NG = x_N @ w_in[e] (+ b_in[e])        -> saved, nothing else is
              y_ND = act(h_NG) @ w_out[e] (+ b_out[e])
              out_TD[token] += weight * y_ND          (index_add_)
    backward  recomputes x_N and act(h_NG) per expert, writes each expert's
              weight gradient straight into its slice of a preallocated
              [E, ...] tensor, and skips every gradient nobody asked for.

Why this shape (numbers from benchmarks/bench_cpu.py on the 2-core dev box):
- Per-expert chunks keep the gathered rows, h and act(h) of one expert in
  cache, and only ``h`` (S x G) is saved: the dense equal-FLOP FFN saves h,
  silu(gate) and act(h).
- Weight gradients are written with ``mm(..., out=grad[e])`` into one
  ``torch.empty`` [E, D, G]: indexing ``w[e]`` under autograd makes every
  expert allocate and add a full-size zero gradient (cost grows with E^2).
- ``index_select`` / ``index_add_`` instead of advanced indexing: ``x[idx]``
  and its backward cost 2-4x more on CPU.
- The combine weight is applied to the F-wide activation in backward
  (w * a)^T @ g rather than to the D-wide output gradient.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations
else F, E experts, S routed rows (kept rows first, dropped rows after), N rows
of one expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.functions.glu import FAST_KINDS, ActFn, generic_backward, glu_backward, glu_forward


def _segments(offsets: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) for every expert that received rows."""
    segs, start = [], 0
    for e, end in enumerate(offsets):
        if end > start:
            segs.append((e, start, end))
        start = end
    return segs


def _act_forward(h_NG: Tensor, kind: str | None, act: ActFn) -> Tensor:
    return glu_forward(h_NG, kind) if kind in FAST_KINDS else act(h_NG)


def _act_backward(h_NG: Tensor, da_NF: Tensor, kind: str | None,
                  act: ActFn) -> tuple[Tensor, Tensor]:
    if kind in FAST_KINDS:
        return glu_backward(h_NG, da_NF, kind)
    return generic_backward(h_NG, da_NF, act)


class FusedExperts(torch.autograd.Function):
    """y_TD = sum over kept rows r of weight_S[r] * expert_{e(r)}(x_TD[token_S[r]])."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_S: Tensor, w_in_EDG: Tensor, w_out_EFD: Tensor,
                b_in_EG: Tensor | None, b_out_ED: Tensor | None, token_S: Tensor,
                offsets: list[int], kind: str | None, act: ActFn) -> Tensor:
        segs = _segments(offsets)
        S_kept = offsets[-1] if offsets else 0
        out_TD = x_TD.new_zeros(x_TD.shape)
        h_SG = x_TD.new_empty(S_kept, w_in_EDG.shape[2])
        w_S1 = weight_S.to(x_TD.dtype)[:, None]
        for e, r0, r1 in segs:
            tok_N = token_S[r0:r1]
            h_NG = h_SG[r0:r1]
            torch.mm(x_TD.index_select(0, tok_N), w_in_EDG[e], out=h_NG)
            if b_in_EG is not None:
                h_NG += b_in_EG[e]
            y_ND = _act_forward(h_NG, kind, act) @ w_out_EFD[e]
            if b_out_ED is not None:
                y_ND += b_out_ED[e]
            out_TD.index_add_(0, tok_N, y_ND.mul_(w_S1[r0:r1]))
        ctx.save_for_backward(x_TD, weight_S, w_in_EDG, w_out_EFD, b_out_ED, token_S, h_SG)
        ctx.segs, ctx.kind, ctx.act = segs, kind, act
        ctx.has_b_in = b_in_EG is not None
        return out_TD

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        x_TD, weight_S, w_in_EDG, w_out_EFD, b_out_ED, token_S, h_SG = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _Grads(need, x_TD, weight_S, w_in_EDG, w_out_EFD, ctx.has_b_in, b_out_ED,
                       {e for e, _, _ in ctx.segs})
        g_TD = g_TD.contiguous()
        w_S1 = weight_S.to(x_TD.dtype)[:, None]
        for e, r0, r1 in ctx.segs:
            tok_N = token_S[r0:r1]
            g_ND = g_TD.index_select(0, tok_N)
            w_N1 = w_S1[r0:r1]
            h_NG = h_SG[r0:r1]
            gu_NF = g_ND @ w_out_EFD[e].t()  # gradient of act(h) before the combine weight
            if need[2] or need[4] or need[0]:
                a_NF, dh_NG = _act_backward(h_NG, gu_NF * w_N1, ctx.kind, ctx.act)
            else:
                a_NF, dh_NG = _act_forward(h_NG, ctx.kind, ctx.act), None
            grads.expert(e, r0, r1, tok_N, g_ND, w_N1, gu_NF, a_NF, dh_NG)
        # (x, weight_S, w_in, w_out, b_in, b_out, token_S, offsets, kind, act)
        return (grads.x_TD, grads.weight_S, grads.w_in, grads.w_out, grads.b_in, grads.b_out,
                None, None, None, None)


class _Grads:
    """Preallocated gradients (None where not needed), filled expert by expert.

    ``torch.empty`` and not zeros: every expert's slice is written once; the
    slices of experts without rows are zeroed once at construction.
    """

    def __init__(self, need: tuple[bool, ...], x_TD: Tensor, weight_S: Tensor,
                 w_in_EDG: Tensor, w_out_EFD: Tensor, has_b_in: bool,
                 b_out_ED: Tensor | None, used: set[int]) -> None:
        self.x_in, self.w_in_EDG, self.b_out_ED = x_TD, w_in_EDG, b_out_ED
        E, D, G = w_in_EDG.shape
        self.x_TD = x_TD.new_zeros(x_TD.shape) if need[0] else None  # index_add_ target
        self.weight_S = weight_S.new_zeros(weight_S.shape) if need[1] else None  # 0 if dropped
        self.w_in = w_in_EDG.new_empty(E, D, G) if need[2] else None
        self.w_out = w_out_EFD.new_empty(w_out_EFD.shape) if need[3] else None
        self.b_in = w_in_EDG.new_empty(E, G) if has_b_in and need[4] else None
        self.b_out = w_out_EFD.new_empty(E, D) if b_out_ED is not None and need[5] else None
        idle = [e for e in range(E) if e not in used]
        for t in (self.w_in, self.w_out, self.b_in, self.b_out):
            if t is not None and idle:
                t[idle] = 0

    def expert(self, e: int, r0: int, r1: int, tok_N: Tensor, g_ND: Tensor, w_N1: Tensor,
               gu_NF: Tensor, a_NF: Tensor, dh_NG: Tensor | None) -> None:
        if self.weight_S is not None:
            dw_N = (gu_NF * a_NF).sum(1, dtype=torch.float32)
            if self.b_out_ED is not None:
                dw_N += (g_ND @ self.b_out_ED[e]).float()
            self.weight_S[r0:r1] = dw_N
        if self.w_out is not None:
            torch.mm((a_NF * w_N1).t(), g_ND, out=self.w_out[e])
        if self.b_out is not None:
            torch.mv(g_ND.t(), w_N1[:, 0], out=self.b_out[e])
        if dh_NG is None:
            return
        if self.b_in is not None:
            torch.sum(dh_NG, 0, out=self.b_in[e])
        if self.w_in is not None:
            torch.mm(self.x_in.index_select(0, tok_N).t(), dh_NG, out=self.w_in[e])
        if self.x_TD is not None:
            self.x_TD.index_add_(0, tok_N, dh_NG @ self.w_in_EDG[e].t())


def fused_experts(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                  w_in_EDG: Tensor, w_out_EFD: Tensor, b_in_EG: Tensor | None,
                  b_out_ED: Tensor | None, act: ActFn, kind: str | None = None) -> Tensor:
    """Run the fused expert Function; ``kind`` names ``act`` when it has a fast path.

    Rows at and past ``offsets_E[-1]`` (dropped by a capacity policy) are skipped.
    Reads ``offsets_E`` on the host: a CPU path (on CUDA this synchronises).
    """
    return FusedExperts.apply(x_TD.contiguous(), weight_S, w_in_EDG, w_out_EFD, b_in_EG,
                              b_out_ED, token_S, offsets_E.tolist(), kind, act)
