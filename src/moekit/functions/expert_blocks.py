"""Pieces of the fused expert path (``moe_experts.FusedExperts``) shared by its forward
and backward: the split of a Dispatch's sorted rows into blocks of consecutive experts
(``Block``), the blocks' grouped GEMMs on the C++ kernels or a loop of ``mm(out=)``
(``gmm``, ``gmm_weight``), the activation and bias rows, and the weights of one call
(``Weights``); also ``stack_experts``, which stacks per-expert matrices into one [E, ...]
tensor in their layout (the offloaded experts' lists).

Shape letters: N rows of one block, B experts of one block, X / Y a GEMM's inner and
output width, E experts, D hidden, F expert hidden, G = 2F for GLU activations else F.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.functions import cpu_ext
from moekit.functions.glu import FAST_KINDS, ActFn, glu_forward


@dataclass(frozen=True)
class Block:
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


def split_blocks(offsets: list[int], block_rows: int) -> list[Block]:
    blocks, e0, r0 = [], 0, 0
    for e, end in enumerate(offsets):
        last = e == len(offsets) - 1
        if last or offsets[e + 1] - r0 > block_rows:
            if end > r0:
                ends = tuple(o - r0 for o in offsets[e0:e + 1])
                blocks.append(Block(e0, e + 1, r0, end, ends))
            e0, r0 = e + 1, end
    return blocks


def _ext(a: Tensor):
    """The C++ kernels for these CPU tensors: the AVX-512 BF16 ones for bf16 where
    the CPU has them, else the aten-mm ones; None off the CPU or without a build."""
    if a.device.type != "cpu":
        return None
    return (cpu_ext.bf16() if a.dtype == torch.bfloat16 else None) or cpu_ext.get()


def gmm(a_NX: Tensor, b_BXY: Tensor | list[Tensor], blk: Block, out_NY: Tensor) -> Tensor:
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


def gmm_weight(a_NX: Tensor, b_NY: Tensor, blk: Block, out_EXY: Tensor) -> None:
    """out[e] = a[rows of e]^T @ b[rows of e] for the block's experts with rows."""
    ext = _ext(a_NX)
    if ext is not None:
        ext.grouped_mm_weight_out(a_NX, b_NY, blk.ends, out_EXY[blk.e0:blk.e1])
        return
    for e, s, t in blk.experts():
        torch.mm(a_NX[s:t].t(), b_NY[s:t], out=out_EXY[e])


def act_forward(h_NG: Tensor, kind: str | None, act: ActFn, out_NF: Tensor) -> Tensor:
    return glu_forward(h_NG, kind, out_NF) if kind in FAST_KINDS else act(h_NG)


def bias_rows(b_EX: Tensor, blk: Block, out_NX: Tensor) -> Tensor:
    for e, s, t in blk.experts():
        out_NX[s:t] += b_EX[e]
    return out_NX


@dataclass(frozen=True)
class Weights:
    w_in_EDG: Tensor
    w_out_EFD: Tensor
    b_in_EG: Tensor | None
    b_out_ED: Tensor | None
    kind: str | None
    act: ActFn
