"""Differentiable collectives: all-to-all with uneven splits, all-gather, reduce-scatter.

Each is a ``torch.autograd.Function`` whose backward is the transposed
collective (all-to-all with the splits swapped; all-gather <-> reduce-scatter).
Split sizes are Python lists because ``all_to_all_single`` takes them so on
every backend; ``None`` means equal splits. Shape letters: R rows, D hidden.

Every rank must run the same collectives in backward, or the ranks deadlock.
Whether an output requires grad can differ between ranks (a rank whose experts
receive no row computes nothing from the expert weights), so each Function
also takes an ``anchor``: a scalar that requires grad whenever grad mode is on,
which puts the collective into the graph on every rank alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

from moekit.distributed.mesh import Comm

Splits = list[int] | None
# torch 2.13 renamed the *_into_tensor / *_tensor collectives to *_single.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _rows(splits: Splits, x: Tensor) -> int:
    return x.shape[0] if splits is None else sum(splits)


def all_to_all_start(x_RD: Tensor, out_splits: Splits, in_splits: Splits, comm: Comm,
                     async_op: bool = False) -> tuple[Tensor, Any]:
    """Launch ``all_to_all_single``; returns (output buffer, work or None)."""
    x_RD = x_RD.contiguous()
    out = x_RD.new_empty((_rows(out_splits, x_RD), *x_RD.shape[1:]))
    work = comm.run("all_to_all_single", dist.all_to_all_single, out, x_RD, out_splits,
                    in_splits, group=comm.group, async_op=async_op)
    return out, work


def _anchor(x: Tensor) -> Tensor:
    return x.new_zeros((), requires_grad=torch.is_grad_enabled())


def wait(work: Any, comm: Comm) -> None:
    if work is not None:
        comm.run("waiting for all_to_all_single", work.wait)


class _AllToAll(Function):
    @staticmethod
    def forward(ctx, x_RD: Tensor, out_splits: Splits, in_splits: Splits, comm: Comm,
                anchor: Tensor) -> Tensor:
        ctx.splits, ctx.comm = (out_splits, in_splits), comm
        return all_to_all_start(x_RD, out_splits, in_splits, comm)[0]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out_splits, in_splits = ctx.splits
        grad_x = all_to_all_start(grad_out, in_splits, out_splits, ctx.comm)[0]
        return grad_x, None, None, None, None  # x_RD, out_splits, in_splits, comm, anchor


def all_to_all(x_RD: Tensor, out_splits: Splits, in_splits: Splits, comm: Comm) -> Tensor:
    """Send ``x_RD[rows of split j]`` to rank j; receive ``out_splits[i]`` rows from rank i."""
    return _AllToAll.apply(x_RD, out_splits, in_splits, comm, _anchor(x_RD))


class Pending:
    """An all-to-all in flight: the collective's work handle and its output buffer."""

    def __init__(self) -> None:
        self.work: Any = None
        self.buffer: Tensor | None = None


class _AllToAllStart(Function):
    """Forward launches the all-to-all; backward waits for the gradient's all-to-all."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, out_splits: Splits, in_splits: Splits, comm: Comm,
                pending: Pending, anchor: Tensor) -> Tensor:
        ctx.comm, ctx.pending = comm, pending
        out, pending.work = all_to_all_start(x_RD, out_splits, in_splits, comm, async_op=True)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        wait(ctx.pending.work, ctx.comm)
        grad_x, ctx.pending.buffer = ctx.pending.buffer, None
        return grad_x, None, None, None, None, None  # x_RD, splits x2, comm, pending, anchor


class _AllToAllWait(Function):
    """Forward waits; backward launches the gradient's all-to-all and returns at once."""

    @staticmethod
    def forward(ctx, y_RD: Tensor, out_splits: Splits, in_splits: Splits, comm: Comm,
                pending: Pending) -> Tensor:
        wait(pending.work, comm)
        pending.work = None
        ctx.splits, ctx.comm, ctx.pending = (out_splits, in_splits), comm, pending
        return y_RD.view_as(y_RD)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        out_splits, in_splits = ctx.splits
        ctx.pending.buffer, ctx.pending.work = all_to_all_start(
            grad_y, in_splits, out_splits, ctx.comm, async_op=True)
        # The buffer is filled once Start.backward waits; autograd runs other
        # nodes (other chunks' expert backward) in between: that is the overlap.
        # Start.backward ignores the gradient passed here and returns the buffer.
        return torch.zeros_like(grad_y), None, None, None, None  # y_RD, splits x2, comm, pending


def all_to_all_async(x_RD: Tensor, out_splits: Splits, in_splits: Splits,
                     comm: Comm) -> tuple[Tensor, Pending]:
    """Start a differentiable all-to-all; pass the result to ``all_to_all_wait`` before use."""
    pending = Pending()
    out = _AllToAllStart.apply(x_RD, out_splits, in_splits, comm, pending, _anchor(x_RD))
    return out, pending


def all_to_all_wait(y_RD: Tensor, out_splits: Splits, in_splits: Splits, comm: Comm,
                    pending: Pending) -> Tensor:
    return _AllToAllWait.apply(y_RD, out_splits, in_splits, comm, pending)


class _AllGather(Function):
    """Gathers several tensors; one node, so backward's reduce-scatters run in a fixed order."""

    @staticmethod
    def forward(ctx, comm: Comm, anchor: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.comm = comm
        return tuple(all_gather_tensor(x, comm) for x in xs)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # unused outputs arrive as zeros (materialize_grads)
        return None, None, *(reduce_scatter_tensor(g, ctx.comm) for g in grads)  # comm, anchor, xs


class _ReduceScatter(Function):
    @staticmethod
    def forward(ctx, x_PTD: Tensor, comm: Comm, anchor: Tensor) -> Tensor:
        ctx.comm = comm
        return reduce_scatter_tensor(x_PTD, comm)

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        return all_gather_tensor(grad_TD, ctx.comm), None, None  # x_PTD, comm, anchor


def all_gather_tensor(x_TD: Tensor, comm: Comm) -> Tensor:
    """Concatenate every rank's ``x_TD`` along dim 0 (same shape on every rank), no grad."""
    x_TD = x_TD.contiguous()
    out = x_TD.new_empty((comm.size * x_TD.shape[0], *x_TD.shape[1:]))
    comm.run("all_gather", _ALL_GATHER, out, x_TD, group=comm.group)
    return out


def reduce_scatter_tensor(x_PTD: Tensor, comm: Comm) -> Tensor:
    """Sum over ranks, then keep this rank's 1/P slice of dim 0, no grad."""
    x_PTD = x_PTD.contiguous()
    out = x_PTD.new_empty((x_PTD.shape[0] // comm.size, *x_PTD.shape[1:]))
    comm.run("reduce_scatter", _REDUCE_SCATTER, out, x_PTD, group=comm.group)
    return out


def all_gather(xs: list[Tensor], comm: Comm) -> tuple[Tensor, ...]:
    """Differentiable all-gather of each tensor along dim 0; backward reduce-scatters."""
    return _AllGather.apply(comm, _anchor(xs[0]), *xs)


def reduce_scatter(x_PTD: Tensor, comm: Comm) -> Tensor:
    """Differentiable reduce-scatter (sum) along dim 0; backward all-gathers."""
    return _ReduceScatter.apply(x_PTD, comm, _anchor(x_PTD))
