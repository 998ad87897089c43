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

The blocks and GEMMs live in ``expert_blocks.py``, the row buffers in
``row_buffers.py``, the backward's gradients in ``expert_grads.py`` and the argument
checks in ``expert_checks.py``; their public names stay importable from here.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations
else F, E experts, S routed rows, N rows of one block, B experts of one block.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.functions import bf16_fused
from moekit.functions.expert_blocks import (
    Block,
    Weights,
    act_forward,
    bias_rows,
    gmm,
    split_blocks,
    stack_experts,
)
from moekit.functions.expert_checks import check_call
from moekit.functions.expert_grads import Grads
from moekit.functions.glu import ActFn, one_pass
from moekit.functions.row_buffers import (
    RowBuffers,
    Workspace,
    kept_buffers,
    reuse_row_buffers,
)

# the pieces moved to expert_blocks.py and row_buffers.py, importable from here as before
__all__ = [
    "BLOCK_ROWS", "ONE_CALL_FORWARD", "FusedExperts", "RowBuffers", "fused_experts",
    "fused_experts_into", "reuse_row_buffers", "stack_experts",
]

BLOCK_ROWS = 8192

# Whether a forward that saves nothing runs an fp32 SwiGLU block in one C++ call
# (swiglu_experts_out in moekit/csrc/cpu_experts.cpp: the gather, activation, routing
# weights and combine inside the GEMMs' tasks) where it applies; tests and A/B runs flip it.
ONE_CALL_FORWARD = True


def _one_call(ws: Workspace, p: Weights, x_TD: Tensor, tok_N: Tensor, out_TD: Tensor):
    """The C++ module for swiglu_experts_out where it applies to this block, else None."""
    if not (ONE_CALL_FORWARD and ws.kept and p.b_in_EG is None and p.b_out_ED is None
            and tok_N.dtype == torch.int64
            and all(w[0].dtype == torch.float32 for w in (p.w_in_EDG, p.w_out_EFD))):
        return None
    ext = one_pass(p.kind, x_TD, out_TD)  # SwiGLU, float32 CPU rows, the module built
    return ext if hasattr(ext, "swiglu_experts_out") else None


def _forward_block(ws: Workspace, p: Weights, blk: Block, x_TD: Tensor, tok_N: Tensor,
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
    h_NG = gmm(x_ND, p.w_in_EDG[blk.e0:blk.e1], blk, ws.saved("h", n, G))
    if p.b_in_EG is not None:
        bias_rows(p.b_in_EG, blk, h_NG)
    a_NF = act_forward(h_NG, p.kind, p.act, ws.get("a", n, F))
    y_ND = gmm(a_NF, p.w_out_EFD[blk.e0:blk.e1], blk, ws.get("y", n, D))
    if p.b_out_ED is not None:
        bias_rows(p.b_out_ED, blk, y_ND)
    out_TD.index_add_(0, tok_N, y_ND.mul_(w_N1))
    return h_NG


class FusedExperts(torch.autograd.Function):
    """y_TD = sum over kept rows r of weight_S[r] * expert_{e(r)}(x_TD[token_S[r]])."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_S: Tensor, w_in_EDG: Tensor, w_out_EFD: Tensor,
                b_in_EG: Tensor | None, b_out_ED: Tensor | None, token_S: Tensor,
                offsets: list[int], kind: str | None, act: ActFn,
                block_rows: int = BLOCK_ROWS, kept: RowBuffers | None = None) -> Tensor:
        blocks = split_blocks(offsets, block_rows)
        p = Weights(w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, kind, act)
        ws = Workspace(x_TD, max((b.r1 - b.r0 for b in blocks), default=0), kept)
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
        p = Weights(w_in_EDG, w_out_EFD, None, b_out_ED, kind, act)
        grads = Grads(ctx.needs_input_grad, x_TD, weight_S, p, has_b_in, ctx.blocks)
        g_TD = g_TD.contiguous()
        ws = Workspace(x_TD, max((b.r1 - b.r0 for b in ctx.blocks), default=0))
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


def _forward_bf16(ext, ws: Workspace, p: Weights, blocks: list[Block], x_TD: Tensor,
                  token_S: Tensor, weight_S: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The blocks on the fused bf16 kernels (bf16_fused.py): the combine sums in fp32."""
    out32_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
    w_S, token_S = weight_S.float().contiguous(), token_S.long().contiguous()
    F, G = p.w_out_EFD.shape[1], p.w_in_EDG.shape[2]
    hs = [bf16_fused.forward_block(ext, b, p, x_TD, token_S[b.r0:b.r1], w_S[b.r0:b.r1],
                                   ws.get("a", b.r1 - b.r0, F), ws.saved("h", b.r1 - b.r0, G),
                                   out32_TD) for b in blocks]
    return out32_TD.to(x_TD.dtype), hs


def _backward_bf16(ext, grads: Grads, ws: Workspace, blocks: list[Block], hs: list[Tensor],
                   token_S: Tensor, g_TD: Tensor, weight_S: Tensor) -> None:
    w_S, token_S = weight_S.float().contiguous(), token_S.long().contiguous()
    dx32_TD = None if grads.x_TD is None else torch.zeros(grads.x_TD.shape, dtype=torch.float32)
    for blk, h_NG in zip(blocks, hs, strict=True):
        bf16_fused.backward_block(ext, grads, ws, blk, token_S[blk.r0:blk.r1], g_TD,
                                  w_S[blk.r0:blk.r1], h_NG, dx32_TD)
    if dx32_TD is not None:
        grads.x_TD = dx32_TD.to(g_TD.dtype)


def fused_experts(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                  w_in_EDG: Tensor, w_out_EFD: Tensor, b_in_EG: Tensor | None,
                  b_out_ED: Tensor | None, act: ActFn, kind: str | None = None,
                  block_rows: int = BLOCK_ROWS) -> Tensor:
    """Run the fused expert Function; ``kind`` names ``act`` when it has a fast path.

    Rows at and past ``offsets_E[-1]`` (dropped by a capacity policy) are skipped.
    Reads ``offsets_E`` on the host: a CPU path (on CUDA this synchronises).
    """
    ends = check_call(x_TD, token_S, weight_S, offsets_E, w_in_EDG, w_out_EFD, b_in_EG,
                       b_out_ED, kind)
    kept = kept_buffers(x_TD, weight_S, w_in_EDG, w_out_EFD, b_in_EG, b_out_ED)
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
    ends = check_call(x_TD, token_S, weight_S, offsets_E, w_in_EDG, w_out_EFD, b_in_EG,
                       b_out_ED, kind)
    blocks = split_blocks(ends, block_rows)
    p = Weights(w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, kind, act)
    x_TD = x_TD.contiguous()
    w_S1 = weight_S.to(x_TD.dtype)[:, None]
    ws = Workspace(x_TD, max((b.r1 - b.r0 for b in blocks), default=0), kept_buffers())
    for b in blocks:
        _forward_block(ws, p, b, x_TD, token_S[b.r0:b.r1], w_S1[b.r0:b.r1], out_TD)
    return out_TD
