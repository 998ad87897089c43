"""The fused expert path's row buffers: ``RowBuffers`` kept from one call to the next
(``reuse_row_buffers``; a generation's ``StaticKVCache`` holds one), the choice between
kept and fresh buffers for a call (``kept_buffers``), and the per-call ``Workspace``
every block of a call takes its gathered rows, activations and outputs from.

Shape letters: none beyond a buffer's rows (n) and width.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor


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


def kept_buffers(*tensors: Tensor | None) -> RowBuffers | None:
    """None where this call saves tensors for backward; else the active RowBuffers, or
    fresh ones for this call alone outside ``reuse_row_buffers``."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    kept = _ROW_BUFFERS.get()
    return RowBuffers() if kept is None else kept


class Workspace:
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
