"""The fused expert path: gather -> x @ w_in -> activation -> @ w_out -> weighted scatter.

One ``torch.autograd.Function`` runs a Dispatch's kept rows (sorted by expert)
in blocks of consecutive experts, each block at most ``BLOCK_ROWS`` rows
(a single expert with more rows is a block of its own):

    forward   x_ND = x_TD[token]                 index_select into a reused buffer
              h_NG = x_ND @ w_in[e] (+ b_in[e])   one mm per expert; saved, nothing else is
              y_ND = act(h_NG) @ w_out[e] (+ b_out[e])
              out_TD[token] += weight * y_ND       index_add_
    backward  recomputes x_ND and act(h_NG) per block, writes every expert's
              weight gradient into its slice of one preallocated [E, ...]
              tensor, and skips every gradient nobody asked for. Around a SwiGLU
              (fp32 or bf16 rows) everything between the two data GEMMs is one C++
              pass (glu.weighted_backward): weight * act(h), dh, d weight.

Where the forward saves nothing (no_grad, inference), an fp32 SwiGLU block without
biases is one C++ call instead (``swiglu_experts_out``): the gather, the activation
and the routing weights run inside the GEMMs' tasks on rows still in the cache, h is
never stored, and the combine adds each token's rows in row order, parallel over
tokens. A 512-token prefill of bench_decode's fine model: bitwise the same logits,
0.969x the time (its expert layers' four row passes cost ~2.7 ms a layer before).

Why this shape (2-core dev box, torch 2.13 CPU, see benchmarks/bench_cpu.py):
- Blocks, not one expert at a time: a first version looped over experts in
  Python (~22 ops per expert); at T=4096/E=128/K=8/F=128 it measured 1.48x
  the dense FFN against 1.37x for blocks (1 thread, shared machine, A/B
  medians). Within a block only the GEMMs are per expert (``mm(out=)`` into
  the block's rows); gather, activation and scatter are one call per block.
  Blocks, not all rows at once: the gathered x, y and gradient rows stay
  bounded (BLOCK_ROWS x D) instead of K times the input.
- The GEMMs of a block run in C++ (``moekit/csrc/cpu_experts.cpp``, built on
  first use, see ``cpu_ext.py``): every expert's GEMM on one thread, the
  threads taking different experts or output tiles. One GEMM at a time, each
  split over both threads, T=256/E=64/K=8 measured 2.04x the dense FFN; with
  the extension 1.62x (idle box, ``benchmarks/bench_cpu.py``, 7 A/B pairs).
  Without the extension the same GEMMs run as a Python loop of ``mm(out=)``.
  bf16 GEMMs run on a hand AVX-512 BF16 kernel where the CPU has one
  (``moekit/csrc/cpu_bf16.cpp``; ``MOEKIT_BF16_KERNEL=0`` keeps aten's mm);
  there, SwiGLU and GeGLU blocks run with the gather, the activation and the
  combine fused into those GEMMs (``bf16_fused.py``).
- Not ``torch._grouped_mm``: on CPU it is a C++ loop of the same GEMMs and
  measured slower than the Python loop (idle box, 2 threads, fp32, random
  routing, all S rows in one call): gate+up 144 vs 103 ms at T=4096/E=8/K=2,
  down 60 vs 35 ms at T=4096/E=128/K=8, equal within 5% at T=256.
- Only ``h`` (S x G) is saved and act(h) is recomputed: the dense SwiGLU
  FFN that the benchmark compares against saves h, silu(gate) and act(h).
- Weight gradients: ``mm(..., out=grad[e])`` into one ``torch.empty``; indexing
  ``w[e]`` under autograd makes every expert allocate and add a full-size zero
  gradient (cost grows with E^2).
- ``index_select`` / ``index_add_`` rather than ``x[idx]`` / ``out[idx] +=``:
  advanced indexing costs 2-4x more on CPU, most of it in backward.
- Reused row buffers: a fresh 1024 x 512 fp32 ``index_select`` result took
  1.5 ms and 409 page faults; into a reused buffer 0.1 ms and none.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations
else F, E experts, S routed rows, N rows of one block, B experts of one block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.config import reject
from moekit.functions import bf16_fused, cpu_ext
from moekit.functions.glu import (
    FAST_KINDS,
    ActFn,
    generic_backward,
    glu_backward,
    glu_forward,
    one_pass,
    weighted_backward,
)
from moekit.routing.hashing import check_id_range

BLOCK_ROWS = 8192


@dataclass(frozen=True)
class _Block:
    """Experts e0..e1-1, rows r0..r1-1; ``ends`` are the experts' row ends within the block."""

    e0: int
    e1: int
    r0: int
    r1: int
    ends: tuple[int, ...]

    def experts(self):
        """(expert, first row, end row) within the block, for experts with rows."""
        start = 0
        for i, end in enumerate(self.ends):
            if end > start:
                yield self.e0 + i, start, end
            start = end


def _blocks(offsets: list[int], block_rows: int) -> list[_Block]:
    blocks, e0, r0 = [], 0, 0
    for e, end in enumerate(offsets):
        last = e == len(offsets) - 1
        if last or offsets[e + 1] - r0 > block_rows:
            if end > r0:
                ends = tuple(o - r0 for o in offsets[e0:e + 1])
                blocks.append(_Block(e0, e + 1, r0, end, ends))
            e0, r0 = e + 1, end
    return blocks


def _ext(a: Tensor):
    """The C++ kernels for these CPU tensors: the AVX-512 BF16 ones for bf16 where
    the CPU has them, else the aten-mm ones; None off the CPU or without a build."""
    if a.device.type != "cpu":
        return None
    return (cpu_ext.bf16() if a.dtype == torch.bfloat16 else None) or cpu_ext.get()


def _gmm(a_NX: Tensor, b_BXY: Tensor | list[Tensor], blk: _Block, out_NY: Tensor) -> Tensor:
    """Rows of expert e times b_BXY[e - e0], into out_NY [N, Y]; b_BXY stacked or a list
    of [X, Y] matrices (the expert cache's, not copied where the kernel takes a list)."""
    ext = _ext(a_NX)
    if ext is not None:
        if not isinstance(b_BXY, list):
            ext.grouped_mm_out(a_NX, b_BXY, blk.ends, out_NY)
        elif hasattr(ext, "grouped_mm_list_out"):
            ext.grouped_mm_list_out(a_NX, b_BXY, blk.ends, out_NY)
        else:  # the bf16 kernels: their own layout, from a stacked copy
            ext.grouped_mm_out(a_NX, stack_experts(b_BXY), blk.ends, out_NY)
        return out_NY
    for e, s, t in blk.experts():
        torch.mm(a_NX[s:t], b_BXY[e - blk.e0], out=out_NY[s:t])
    return out_NY


def stack_experts(ws: list[Tensor]) -> Tensor:
    """Stack per-expert matrices keeping their layout (a transposed view stays one)."""
    if ws[0].stride(0) == 1 and ws[0].stride(1) != 1:
        return torch.stack([w.t() for w in ws]).transpose(1, 2)
    return torch.stack(ws)


def _gmm_weight(a_NX: Tensor, b_NY: Tensor, blk: _Block, out_EXY: Tensor) -> None:
    """out[e] = a[rows of e]^T @ b[rows of e] for the block's experts with rows."""
    ext = _ext(a_NX)
    if ext is not None:
        ext.grouped_mm_weight_out(a_NX, b_NY, blk.ends, out_EXY[blk.e0:blk.e1])
        return
    for e, s, t in blk.experts():
        torch.mm(a_NX[s:t].t(), b_NY[s:t], out=out_EXY[e])


class RowBuffers:
    """The fused path's row buffers kept from one call to the next.

    Each call allocates its gathered rows, gate+up output, activation and expert
    outputs afresh (tens of MB at a 512-token prefill: 4096 rows x D=1024 fp32 is
    16 MiB each), and glibc's default malloc hands such blocks back to the kernel
    and page-faults them in again, zero-filled, on the next layer (see
    ``moekit.tune_malloc``). Inside ``reuse_row_buffers(buffers)`` the forwards that
    save nothing for backward take them from ``buffers`` instead, which grow to the
    largest call and stay. A generation's ``StaticKVCache`` holds one.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, like: Tensor, numel: int) -> Tensor:
        """A flat buffer of at least ``numel`` elements of ``like``'s dtype and device."""
        key = (name, like.dtype, like.device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)  # the smaller one goes before the new one is made
            buf = self._bufs[key] = like.new_empty(numel)
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def clear(self) -> None:
        self._bufs.clear()


_ROW_BUFFERS: ContextVar[RowBuffers | None] = ContextVar("moekit_row_buffers", default=None)


@contextmanager
def reuse_row_buffers(buffers: RowBuffers) -> Iterator[RowBuffers]:
    """Within: the fused path's forwards without autograd use ``buffers``' row buffers."""
    token = _ROW_BUFFERS.set(buffers)
    try:
        yield buffers
    finally:
        _ROW_BUFFERS.reset(token)


def _kept_buffers(*tensors: Tensor | None) -> RowBuffers | None:
    """None where this call saves tensors for backward; else the active RowBuffers, or
    fresh ones for this call alone outside ``reuse_row_buffers``."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    kept = _ROW_BUFFERS.get()
    return RowBuffers() if kept is None else kept


class _Workspace:
    """Row buffers sized for the largest block, reused by every block of one call (and
    by later calls, from ``kept``). Given ``kept``, the forward saves nothing."""

    def __init__(self, like: Tensor, n: int, kept: RowBuffers | None = None) -> None:
        self.like, self.n = like, n
        self.kept = kept is not None  # the buffers outlive this call: nothing is saved
        self._bufs = kept if kept is not None else RowBuffers()

    def get(self, name: str, n: int, width: int) -> Tensor:
        return self._bufs.get(name, self.like, self.n * width)[: n * width].view(n, width)

    def saved(self, name: str, n: int, width: int) -> Tensor:
        """A buffer for a tensor the forward saves for backward: fresh, unless nothing is
        saved (``kept``)."""
        return self.get(name, n, width) if self.kept else self.like.new_empty(n, width)


def _act_forward(h_NG: Tensor, kind: str | None, act: ActFn, out_NF: Tensor) -> Tensor:
    return glu_forward(h_NG, kind, out_NF) if kind in FAST_KINDS else act(h_NG)


def _bias_rows(b_EX: Tensor, blk: _Block, out_NX: Tensor) -> Tensor:
    for e, s, t in blk.experts():
        out_NX[s:t] += b_EX[e]
    return out_NX


@dataclass(frozen=True)
class _Weights:
    w_in_EDG: Tensor
    w_out_EFD: Tensor
    b_in_EG: Tensor | None
    b_out_ED: Tensor | None
    kind: str | None
    act: ActFn


# Whether a forward that saves nothing runs an fp32 SwiGLU block in one C++ call
# (swiglu_experts_out in moekit/csrc/cpu_experts.cpp: the gather, activation, routing
# weights and combine inside the GEMMs' tasks) where it applies; tests and A/B runs flip it.
ONE_CALL_FORWARD = True


def _one_call(ws: _Workspace, p: _Weights, x_TD: Tensor, tok_N: Tensor, out_TD: Tensor):
    """The C++ module for swiglu_experts_out where it applies to this block, else None."""
    if not (ONE_CALL_FORWARD and ws.kept and p.b_in_EG is None and p.b_out_ED is None
            and tok_N.dtype == torch.int64
            and all(w[0].dtype == torch.float32 for w in (p.w_in_EDG, p.w_out_EFD))):
        return None
    ext = one_pass(p.kind, x_TD, out_TD)  # SwiGLU, float32 CPU rows, the module built
    return ext if hasattr(ext, "swiglu_experts_out") else None


def _forward_block(ws: _Workspace, p: _Weights, blk: _Block, x_TD: Tensor, tok_N: Tensor,
                   w_N1: Tensor, out_TD: Tensor) -> Tensor | None:
    """Adds the block's weighted expert outputs to out_TD; returns h_NG to save (None
    from the one-call forward, which saves nothing)."""
    n, D = tok_N.shape[0], x_TD.shape[1]
    G, F = p.w_in_EDG[0].shape[-1], p.w_out_EFD[0].shape[-2]
    ext = _one_call(ws, p, x_TD, tok_N, out_TD)
    if ext is not None:
        w_in, w_out = p.w_in_EDG[blk.e0:blk.e1], p.w_out_EFD[blk.e0:blk.e1]
        call = ext.swiglu_experts_list_out if isinstance(w_in, list) else ext.swiglu_experts_out
        call(x_TD, tok_N.contiguous(), w_N1[:, 0].contiguous(), w_in, w_out, list(blk.ends),
             ws.get("a", n, F), ws.get("y", n, D), out_TD)
        return None
    x_ND = torch.index_select(x_TD, 0, tok_N, out=ws.get("x", n, D))
    h_NG = _gmm(x_ND, p.w_in_EDG[blk.e0:blk.e1], blk, ws.saved("h", n, G))
    if p.b_in_EG is not None:
        _bias_rows(p.b_in_EG, blk, h_NG)
    a_NF = _act_forward(h_NG, p.kind, p.act, ws.get("a", n, F))
    y_ND = _gmm(a_NF, p.w_out_EFD[blk.e0:blk.e1], blk, ws.get("y", n, D))
    if p.b_out_ED is not None:
        _bias_rows(p.b_out_ED, blk, y_ND)
    out_TD.index_add_(0, tok_N, y_ND.mul_(w_N1))
    return h_NG


class FusedExperts(torch.autograd.Function):
    """y_TD = sum over kept rows r of weight_S[r] * expert_{e(r)}(x_TD[token_S[r]])."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_S: Tensor, w_in_EDG: Tensor, w_out_EFD: Tensor,
                b_in_EG: Tensor | None, b_out_ED: Tensor | None, token_S: Tensor,
                offsets: list[int], kind: str | None, act: ActFn,
                block_rows: int = BLOCK_ROWS, kept: RowBuffers | None = None) -> Tensor:
        blocks = _blocks(offsets, block_rows)
        p = _Weights(w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, kind, act)
        ws = _Workspace(x_TD, max((b.r1 - b.r0 for b in blocks), default=0), kept)
        bf16 = bf16_fused.kernels(x_TD, kind)
        if bf16 is not None:
            out_TD, hs = _forward_bf16(bf16, ws, p, blocks, x_TD, token_S, weight_S)
        else:
            out_TD = x_TD.new_zeros(x_TD.shape)
            w_S1 = weight_S.to(x_TD.dtype)[:, None]
            hs = [_forward_block(ws, p, b, x_TD, token_S[b.r0:b.r1], w_S1[b.r0:b.r1], out_TD)
                  for b in blocks]
        ctx.save_for_backward(x_TD, weight_S, w_in_EDG, w_out_EFD, b_out_ED, token_S, *hs)
        ctx.blocks, ctx.p_static = blocks, (kind, act, b_in_EG is not None)
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, g_TD: Tensor):
        x_TD, weight_S, w_in_EDG, w_out_EFD, b_out_ED, token_S, *hs = ctx.saved_tensors
        kind, act, has_b_in = ctx.p_static
        p = _Weights(w_in_EDG, w_out_EFD, None, b_out_ED, kind, act)
        grads = _Grads(ctx.needs_input_grad, x_TD, weight_S, p, has_b_in, ctx.blocks)
        g_TD = g_TD.contiguous()
        ws = _Workspace(x_TD, max((b.r1 - b.r0 for b in ctx.blocks), default=0))
        bf16 = bf16_fused.kernels(x_TD, kind)
        if bf16 is not None:
            _backward_bf16(bf16, grads, ws, ctx.blocks, hs, token_S, g_TD, weight_S)
        else:
            w_S1 = weight_S.to(x_TD.dtype)[:, None]
            for blk, h_NG in zip(ctx.blocks, hs, strict=True):
                grads.block(ws, blk, token_S[blk.r0:blk.r1], g_TD, w_S1[blk.r0:blk.r1], h_NG)
        # (x, weight_S, w_in, w_out, b_in, b_out, token_S, offsets, kind, act, block_rows,
        #  kept)
        return (grads.x_TD, grads.weight_S, grads.w_in, grads.w_out, grads.b_in, grads.b_out,
                None, None, None, None, None, None)


def _forward_bf16(ext, ws: _Workspace, p: _Weights, blocks: list[_Block], x_TD: Tensor,
                  token_S: Tensor, weight_S: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The blocks on the fused bf16 kernels (bf16_fused.py): the combine sums in fp32."""
    out32_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
    w_S, token_S = weight_S.float().contiguous(), token_S.long().contiguous()
    F, G = p.w_out_EFD.shape[1], p.w_in_EDG.shape[2]
    hs = [bf16_fused.forward_block(ext, b, p, x_TD, token_S[b.r0:b.r1], w_S[b.r0:b.r1],
                                   ws.get("a", b.r1 - b.r0, F), ws.saved("h", b.r1 - b.r0, G),
                                   out32_TD) for b in blocks]
    return out32_TD.to(x_TD.dtype), hs


def _backward_bf16(ext, grads: _Grads, ws: _Workspace, blocks: list[_Block], hs: list[Tensor],
                   token_S: Tensor, g_TD: Tensor, weight_S: Tensor) -> None:
    w_S, token_S = weight_S.float().contiguous(), token_S.long().contiguous()
    dx32_TD = None if grads.x_TD is None else torch.zeros(grads.x_TD.shape, dtype=torch.float32)
    for blk, h_NG in zip(blocks, hs, strict=True):
        bf16_fused.backward_block(ext, grads, ws, blk, token_S[blk.r0:blk.r1], g_TD,
                                  w_S[blk.r0:blk.r1], h_NG, dx32_TD)
    if dx32_TD is not None:
        grads.x_TD = dx32_TD.to(g_TD.dtype)


class _Grads:
    """Preallocated gradients (None where not needed), filled block by block.

    ``torch.empty`` and not zeros: every expert's slice is written once with
    ``out=``; the slices of experts without rows are zeroed once here.
    """

    def __init__(self, need: tuple[bool, ...], x_TD: Tensor, weight_S: Tensor, p: _Weights,
                 has_b_in: bool, blocks: list[_Block]) -> None:
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

    def _activation(self, ws: _Workspace, h_NG: Tensor,
                    da_NF: Tensor) -> tuple[Tensor, Tensor | None]:
        n, F = da_NF.shape
        kind, act = self.p.kind, self.p.act
        if not self.need_dh:
            return _act_forward(h_NG, kind, act, ws.get("a", n, F)), None
        if kind in FAST_KINDS:
            return glu_backward(h_NG, da_NF, kind, ws.get("a", n, F), ws.get("t", n, F),
                                ws.get("dh", n, h_NG.shape[1]))
        return generic_backward(h_NG, da_NF, act)

    def block(self, ws: _Workspace, blk: _Block, tok_N: Tensor, g_TD: Tensor, w_N1: Tensor,
              h_NG: Tensor) -> None:
        p, n = self.p, tok_N.shape[0]
        F = p.w_out_EFD.shape[1]
        w_out_BDF = p.w_out_EFD[blk.e0:blk.e1].transpose(1, 2)
        g_ND = torch.index_select(g_TD, 0, tok_N, out=ws.get("g", n, g_TD.shape[1]))
        # gradient of act(h) before the combine weight: d weight_S is its row dot with act(h)
        gu_NF = _gmm(g_ND, w_out_BDF, blk, ws.get("gu", n, F))
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

    def _fused_activation(self, ws: _Workspace, blk: _Block, h_NG: Tensor, gu_NF: Tensor,
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

    def _weight_grad(self, blk: _Block, g_ND: Tensor, gu_NF: Tensor, a_NF: Tensor) -> None:
        # summed in fp32 for bf16 / fp16 rows, in fp64 for fp64 rows (an fp32 sum rounded
        # an fp64 layer's router gradient to ~1e-7)
        dtype = torch.promote_types(gu_NF.dtype, torch.float32)
        self._store_weight_grad(blk, g_ND, gu_NF.mul_(a_NF).sum(1, dtype=dtype))

    def _store_weight_grad(self, blk: _Block, g_ND: Tensor, dw_N: Tensor) -> None:
        """d weight_S of the block's rows: act(h) . gu, plus b_out . dy for biased experts."""
        assert self.weight_S is not None
        if self.p.b_out_ED is not None:
            for e, s, t in blk.experts():
                dw_N[s:t] += (g_ND[s:t] @ self.p.b_out_ED[e]).to(dw_N.dtype)
        self.weight_S[blk.r0:blk.r1] = dw_N

    def _out_grads(self, blk: _Block, g_ND: Tensor, w_N1: Tensor, aw_NF: Tensor) -> None:
        if self.w_out is not None:
            _gmm_weight(aw_NF, g_ND, blk, self.w_out)
        if self.b_out is not None:
            for e, s, t in blk.experts():
                torch.mv(g_ND[s:t].t(), w_N1[s:t, 0], out=self.b_out[e])

    def _in_grads(self, ws: _Workspace, blk: _Block, tok_N: Tensor, dh_NG: Tensor) -> None:
        n, D = tok_N.shape[0], self.x_in.shape[1]
        if self.b_in is not None:
            for e, s, t in blk.experts():
                torch.sum(dh_NG[s:t], 0, out=self.b_in[e])
        if self.w_in is not None:
            x_ND = torch.index_select(self.x_in, 0, tok_N, out=ws.get("x", n, D))
            _gmm_weight(x_ND, dh_NG, blk, self.w_in)
        if self.x_TD is not None:
            w_in_BGD = self.p.w_in_EDG[blk.e0:blk.e1].transpose(1, 2)
            dx_ND = _gmm(dh_NG, w_in_BGD, blk, ws.get("y", n, D))
            self.x_TD.index_add_(0, tok_N, dx_ND)


def _check_tensor(name: str, value: Any, dim: int) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}={type(value).__name__} is not allowed: it must be a "
                         f"{dim}-D torch.Tensor")
    if value.dim() != dim:
        reject(f"{name}.shape", tuple(value.shape), f"it must have {dim} dimensions")


def _check_weights(D: int, w_in: Tensor | list[Tensor], w_out: Tensor | list[Tensor],
                   b_in_EG: Tensor | None, b_out_ED: Tensor | None,
                   kind: str | None) -> int:
    """The number of experts E, after a ValueError for weights or biases that do not fit
    x's width D (a list of per-expert matrices: its length only; the kernels check each)."""
    if isinstance(w_in, Tensor):
        _check_tensor("w_in_EDG", w_in, 3)
        if w_in.shape[1] != D:
            reject("w_in_EDG.shape", tuple(w_in.shape),
                   f"it must be [E, D, G] with D=x_TD.shape[1]={D}")
        E, G = w_in.shape[0], w_in.shape[2]
        _check_tensor("w_out_EFD", w_out, 3)
        if (w_out.shape[0], w_out.shape[2]) != (E, D):
            reject("w_out_EFD.shape", tuple(w_out.shape), f"it must be [E, F, D] with "
                   f"E=w_in_EDG.shape[0]={E} and D=x_TD.shape[1]={D}")
        if kind in FAST_KINDS and G != 2 * w_out.shape[1]:
            raise ValueError(f"w_in_EDG.shape={tuple(w_in.shape)} with w_out_EFD.shape="
                             f"{tuple(w_out.shape)} is not allowed: kind={kind!r} needs "
                             "G = 2F (gate, then up)")
    else:
        E, G = len(w_in), (w_in[0].shape[-1] if len(w_in) else 0)
        if len(w_out) != E:
            reject("len(w_out_EFD)", len(w_out), f"it must be len(w_in_EDG) = {E}")
    for name, b, want in (("b_in_EG", b_in_EG, (E, G)), ("b_out_ED", b_out_ED, (E, D))):
        if b is not None and tuple(b.shape) != want:
            reject(f"{name}.shape", tuple(b.shape), f"it must be [E, {name[-1]}] = {want}")
    return E


def _check_call(x_TD: Any, token_S: Any, weight_S: Any, offsets_E: Any,
                w_in: Tensor | list[Tensor], w_out: Tensor | list[Tensor],
                b_in_EG: Tensor | None, b_out_ED: Tensor | None, kind: str | None) -> list[int]:
    """``offsets_E`` read on the host, after a ValueError naming the argument for what the
    blocks would misread: offsets that decrease, start below 0, end past the rows (a
    negative one crashed the one-call forward) or miss experts (a short list ran fewer
    experts, silently), tensors of the wrong shape or dtype, and token ids outside x
    (read on CPU tensors only, outside torch.compile)."""
    _check_tensor("x_TD", x_TD, 2)
    if not x_TD.is_floating_point():
        reject("x_TD.dtype", x_TD.dtype, "it must be a floating dtype")
    _check_tensor("token_S", token_S, 1)
    if token_S.dtype not in (torch.int64, torch.int32):
        reject("token_S.dtype", token_S.dtype, "it must be torch.int64 or torch.int32")
    _check_tensor("weight_S", weight_S, 1)
    if weight_S.shape != token_S.shape:
        reject("weight_S.shape", tuple(weight_S.shape),
               f"it must be token_S.shape = {tuple(token_S.shape)}")
    E = _check_weights(x_TD.shape[1], w_in, w_out, b_in_EG, b_out_ED, kind)
    _check_tensor("offsets_E", offsets_E, 1)
    if offsets_E.is_floating_point() or offsets_E.is_complex() or offsets_E.dtype == torch.bool:
        reject("offsets_E.dtype", offsets_E.dtype, "it must be an integer dtype (int32, int64)")
    if offsets_E.shape[0] != E:
        reject("offsets_E.shape", tuple(offsets_E.shape),
               f"it must be ({E},), one end per expert of the weights")
    ends = offsets_E.tolist()
    S = token_S.shape[0]
    if any(b < a for a, b in zip([0, *ends[:-1]], ends, strict=True)) or (ends and ends[-1] > S):
        reject("offsets_E", ends, "the ends of each expert's rows must be non-decreasing "
               f"and lie in [0, token_S.shape[0]={S}]")
    if token_S.device.type == "cpu" and not torch.compiler.is_compiling():
        check_id_range("token_S", token_S[:ends[-1] if ends else 0], x_TD.shape[0],
                       "x_TD.shape[0]")
    return ends


def fused_experts(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                  w_in_EDG: Tensor, w_out_EFD: Tensor, b_in_EG: Tensor | None,
                  b_out_ED: Tensor | None, act: ActFn, kind: str | None = None,
                  block_rows: int = BLOCK_ROWS) -> Tensor:
    """Run the fused expert Function; ``kind`` names ``act`` when it has a fast path.

    Rows at and past ``offsets_E[-1]`` (dropped by a capacity policy) are skipped.
    Reads ``offsets_E`` on the host: a CPU path (on CUDA this synchronises).
    """
    ends = _check_call(x_TD, token_S, weight_S, offsets_E, w_in_EDG, w_out_EFD, b_in_EG,
                       b_out_ED, kind)
    kept = _kept_buffers(x_TD, weight_S, w_in_EDG, w_out_EFD, b_in_EG, b_out_ED)
    return FusedExperts.apply(x_TD.contiguous(), weight_S, w_in_EDG, w_out_EFD, b_in_EG,
                              b_out_ED, token_S, ends, kind, act, block_rows, kept)


@torch.no_grad()
def fused_experts_into(out_TD: Tensor, x_TD: Tensor, token_S: Tensor, weight_S: Tensor,
                       offsets_E: Tensor, w_in_EDG: Tensor | list[Tensor],
                       w_out_EFD: Tensor | list[Tensor], b_in_EG: Tensor | None,
                       b_out_ED: Tensor | None, act: ActFn, kind: str | None = None,
                       block_rows: int = BLOCK_ROWS) -> Tensor:
    """FusedExperts' forward without autograd, adding into ``out_TD`` (x's dtype).

    For a caller that holds some experts' weights at a time (moekit.offload): run
    them chunk by chunk in expert order into one ``out_TD``; each index_add_ adds a
    token's rows in row order, so the sums are those of one call over all experts.
    The weights may be lists of per-expert [D, G] and [F, D] matrices (no stacked copy).
    """
    ends = _check_call(x_TD, token_S, weight_S, offsets_E, w_in_EDG, w_out_EFD, b_in_EG,
                       b_out_ED, kind)
    blocks = _blocks(ends, block_rows)
    p = _Weights(w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, kind, act)
    x_TD = x_TD.contiguous()
    w_S1 = weight_S.to(x_TD.dtype)[:, None]
    ws = _Workspace(x_TD, max((b.r1 - b.r0 for b in blocks), default=0), _kept_buffers())
    for b in blocks:
        _forward_block(ws, p, b, x_TD, token_S[b.r0:b.r1], w_S1[b.r0:b.r1], out_TD)
    return out_TD
