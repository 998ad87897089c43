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


class _Workspace:
    """Row buffers sized for the largest expert, reused by every expert of one call.

    Fresh per-expert tensors page-fault on every call with glibc malloc: an
    ``index_select`` of 1024 x 512 fp32 rows took 1.5 ms into a new tensor
    and 0.1 ms into a reused one (409 minor faults vs 0).
    """

    def __init__(self, like: Tensor, n: int, D: int, F: int, G: int) -> None:
        self.n, self.D, self.F, self.G = n, D, F, G
        self.like = like
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, n: int, width: int) -> Tensor:
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = self.like.new_empty(self.n * width)
        return buf[: n * width].view(n, width)


def _act_forward(h_NG: Tensor, kind: str | None, act: ActFn, out_NF: Tensor) -> Tensor:
    return glu_forward(h_NG, kind, out_NF) if kind in FAST_KINDS else act(h_NG)


def _forward_expert(ws: _Workspace, x_TD: Tensor, out_TD: Tensor, tok_N: Tensor, w_N1: Tensor,
                    h_NG: Tensor, w_in_DG: Tensor, w_out_FD: Tensor, b_in_G: Tensor | None,
                    b_out_D: Tensor | None, kind: str | None, act: ActFn) -> None:
    n = tok_N.shape[0]
    x_ND = torch.index_select(x_TD, 0, tok_N, out=ws.get("x", n, ws.D))
    torch.mm(x_ND, w_in_DG, out=h_NG)
    if b_in_G is not None:
        h_NG += b_in_G
    a_NF = _act_forward(h_NG, kind, act, ws.get("a", n, ws.F))
    y_ND = torch.mm(a_NF, w_out_FD, out=ws.get("y", n, ws.D))
    if b_out_D is not None:
        y_ND += b_out_D
    out_TD.index_add_(0, tok_N, y_ND.mul_(w_N1))


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
        ws = _workspace(x_TD, segs, w_out_EFD)
        for e, r0, r1 in segs:
            _forward_expert(ws, x_TD, out_TD, token_S[r0:r1], w_S1[r0:r1], h_SG[r0:r1],
                            w_in_EDG[e], w_out_EFD[e],
                            None if b_in_EG is None else b_in_EG[e],
                            None if b_out_ED is None else b_out_ED[e], kind, act)
        ctx.save_for_backward(x_TD, weight_S, w_in_EDG, w_out_EFD, b_out_ED, token_S, h_SG)
        ctx.segs, ctx.kind, ctx.act = segs, kind, act
        ctx.has_b_in = b_in_EG is not None
        return out_TD

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        x_TD, weight_S, w_in_EDG, w_out_EFD, b_out_ED, token_S, h_SG = ctx.saved_tensors
        grads = _Grads(ctx.needs_input_grad, x_TD, weight_S, w_in_EDG, w_out_EFD,
                       ctx.has_b_in, b_out_ED, {e for e, _, _ in ctx.segs})
        g_TD = g_TD.contiguous()
        w_S1 = weight_S.to(x_TD.dtype)[:, None]
        ws = _workspace(x_TD, ctx.segs, w_out_EFD)
        for e, r0, r1 in ctx.segs:
            grads.expert(ws, e, r0, r1, token_S[r0:r1], g_TD, w_S1[r0:r1], h_SG[r0:r1],
                         ctx.kind, ctx.act)
        # (x, weight_S, w_in, w_out, b_in, b_out, token_S, offsets, kind, act)
        return (grads.x_TD, grads.weight_S, grads.w_in, grads.w_out, grads.b_in, grads.b_out,
                None, None, None, None)


def _workspace(x_TD: Tensor, segs: list[tuple[int, int, int]], w_out_EFD: Tensor) -> _Workspace:
    n = max((r1 - r0 for _, r0, r1 in segs), default=0)
    F = w_out_EFD.shape[1]
    return _Workspace(x_TD, n, x_TD.shape[1], F, 2 * F)


class _Grads:
    """Preallocated gradients (None where not needed), filled expert by expert.

    ``torch.empty`` and not zeros: every expert's slice is written once with
    ``out=``; the slices of experts without rows are zeroed once here.
    """

    def __init__(self, need: tuple[bool, ...], x_TD: Tensor, weight_S: Tensor,
                 w_in_EDG: Tensor, w_out_EFD: Tensor, has_b_in: bool,
                 b_out_ED: Tensor | None, used: set[int]) -> None:
        self.x_in, self.w_in_EDG, self.w_out_EFD, self.b_out_ED = (
            x_TD, w_in_EDG, w_out_EFD, b_out_ED)
        self.need_dh = need[0] or need[2] or need[4]
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

    def _activation(self, ws: _Workspace, h_NG: Tensor, da_NF: Tensor, kind: str | None,
                    act: ActFn) -> tuple[Tensor, Tensor | None]:
        n = h_NG.shape[0]
        if kind in FAST_KINDS and self.need_dh:
            return glu_backward(h_NG, da_NF, kind, ws.get("a", n, ws.F), ws.get("t", n, ws.F),
                                ws.get("dh", n, ws.G))
        if self.need_dh:
            return generic_backward(h_NG, da_NF, act)
        return _act_forward(h_NG, kind, act, ws.get("a", n, ws.F)), None

    def expert(self, ws: _Workspace, e: int, r0: int, r1: int, tok_N: Tensor, g_TD: Tensor,
               w_N1: Tensor, h_NG: Tensor, kind: str | None, act: ActFn) -> None:
        n = tok_N.shape[0]
        g_ND = torch.index_select(g_TD, 0, tok_N, out=ws.get("g", n, ws.D))
        F = self.w_out_EFD.shape[1]
        # gradient of act(h) before the combine weight: d weight_S is its row dot with act(h)
        gu_NF = torch.mm(g_ND, self.w_out_EFD[e].t(), out=ws.get("gu", n, F))
        da_NF = torch.mul(gu_NF, w_N1, out=ws.get("da", n, F))
        a_NF, dh_NG = self._activation(ws, h_NG, da_NF, kind, act)
        if self.weight_S is not None:
            self._weight_grad(e, r0, r1, g_ND, gu_NF, a_NF)
        # scale in place only a buffer we own: a generic act may return a view of h
        aw_NF = a_NF.mul_(w_N1) if kind in FAST_KINDS else a_NF * w_N1
        self._out_grads(e, g_ND, w_N1, aw_NF)
        if dh_NG is not None:
            self._in_grads(ws, e, tok_N, dh_NG)

    def _weight_grad(self, e: int, r0: int, r1: int, g_ND: Tensor, gu_NF: Tensor,
                     a_NF: Tensor) -> None:
        assert self.weight_S is not None
        dw_N = gu_NF.mul_(a_NF).sum(1, dtype=torch.float32)
        if self.b_out_ED is not None:
            dw_N += (g_ND @ self.b_out_ED[e]).float()
        self.weight_S[r0:r1] = dw_N

    def _out_grads(self, e: int, g_ND: Tensor, w_N1: Tensor, aw_NF: Tensor) -> None:
        if self.w_out is not None:
            torch.mm(aw_NF.t(), g_ND, out=self.w_out[e])
        if self.b_out is not None:
            torch.mv(g_ND.t(), w_N1[:, 0], out=self.b_out[e])

    def _in_grads(self, ws: _Workspace, e: int, tok_N: Tensor, dh_NG: Tensor) -> None:
        n = tok_N.shape[0]
        if self.b_in is not None:
            torch.sum(dh_NG, 0, out=self.b_in[e])
        if self.w_in is not None:
            x_ND = torch.index_select(self.x_in, 0, tok_N, out=ws.get("x", n, ws.D))
            torch.mm(x_ND.t(), dh_NG, out=self.w_in[e])
        if self.x_TD is not None:
            dx_ND = torch.mm(dh_NG, self.w_in_EDG[e].t(), out=ws.get("y", n, ws.D))
            self.x_TD.index_add_(0, tok_N, dx_ND)


def fused_experts(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                  w_in_EDG: Tensor, w_out_EFD: Tensor, b_in_EG: Tensor | None,
                  b_out_ED: Tensor | None, act: ActFn, kind: str | None = None) -> Tensor:
    """Run the fused expert Function; ``kind`` names ``act`` when it has a fast path.

    Rows at and past ``offsets_E[-1]`` (dropped by a capacity policy) are skipped.
    Reads ``offsets_E`` on the host: a CPU path (on CUDA this synchronises).
    """
    return FusedExperts.apply(x_TD.contiguous(), weight_S, w_in_EDG, w_out_EFD, b_in_EG,
                              b_out_ED, token_S, offsets_E.tolist(), kind, act)
