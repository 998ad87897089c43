"""Weights in transparent huge pages: a decode step's weight stream at the memory's pace.

A decode step reads every weight it touches once, scattered over the experts the step's
rows picked. With 4 KiB pages the reads miss the TLB every 4 KiB, and in a virtual
machine each miss walks two page tables (the guest's and the host's). On the 2-core
Intel Xeon KVM VM (torch 2.13.0+cpu, 2 threads) a 1 GiB ``sum`` read 22.5-22.9 GB/s from
4 KiB pages and 33.5-34.2 GB/s from the same bytes collapsed into 2 MiB pages
(``benchmarks/harness.py``'s ``read_bandwidths``).

``huge_pages(model)`` asks the kernel to move, in place, the 2 MiB-aligned span of each
CPU tensor's memory (parameters and buffers, 2 MiB and up) into huge pages
(``madvise(MADV_COLLAPSE)``, Linux 6.1+): the tensors keep their addresses and values,
so views, tied weights and anything holding them (a ``DecodePlan``) are unaffected, and
nothing in the process's settings changes. The kernel collapses anonymous memory only: a
storage that maps a file (a checkpoint loaded without a copy: safetensors maps it) is
first copied to anonymous memory and the target's tensors on it are pointed there
(``Tensor.set_``; the same Parameter objects, ties and views among them kept; tensors
outside the target that share it keep the file's pages, so build decode plans after). It
copies the bytes once (2.7 s per GiB on that VM, the kernel allocating and filling fresh
pages); a span already in huge pages costs one system call. What it gave there, the same
model through the engine with and without (``benchmarks/bench_huge_pages.py``): decode
steps 0.89-1.00x the time (median 0.96; fp32, bf16, int8, int4; batch 1 and 8). ``moekit
serve`` calls it after loading (``--no-huge-pages`` skips it), ``moekit generate`` with
``--huge-pages``; elsewhere (an ``Engine`` of your own, a transformers model patched by
``moekit.integrations.hf.apply``) call it yourself.

Where the kernel cannot (not Linux, transparent huge pages ``never``, a kernel before
6.1, no free 2 MiB blocks), the tensors stay as they were and the report says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.config import check_bool

HUGE_PAGE = 2 << 20  # x86-64's and arm64's (4 KiB granule) transparent huge page
_MADV_COLLAPSE = 25  # <asm-generic/mman-common.h>, Linux 6.1


@dataclass(frozen=True)
class HugePages:
    """What ``huge_pages`` did."""

    tensors: int  # distinct storages of 2 MiB and up looked at
    asked: int  # bytes in their 2 MiB-aligned spans
    collapsed: int  # of those, bytes the kernel reports in huge pages now
    seconds: float
    reason: str | None = None  # why some or all of ``asked`` stays in 4 KiB pages
    copied: int = 0  # bytes first copied out of files' mappings (moved tensors)

    def __str__(self) -> str:
        mib = 1 << 20
        copied = f", {self.copied / mib:,.0f} MiB copied out of files' mappings first" \
            if self.copied else ""
        text = (f"huge pages: {self.collapsed / mib:,.0f} of {self.asked / mib:,.0f} MiB "
                f"({self.tensors} tensors{copied}, {self.seconds:.2f} s)")
        return text if self.reason is None else f"{text}; {self.reason}"


def _madvise():
    """libc's madvise with its argument types, or None (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _span(storage) -> tuple[int, int]:
    """The 2 MiB-aligned (start, end) inside a storage's memory (end <= start: none)."""
    start, size = storage.data_ptr(), storage.nbytes()
    return -(-start // HUGE_PAGE) * HUGE_PAGE, (start + size) // HUGE_PAGE * HUGE_PAGE


def _groups(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    """The tensors grouped by their CPU storage, for storages with a 2 MiB-aligned span."""
    groups: dict[int, list[Tensor]] = {}
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.is_sparse:
            continue
        lo, hi = _span(t.untyped_storage())
        if hi > lo:
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    return [groups[k] for k in sorted(groups)]


def _spans(tensors: Iterable[Tensor]) -> list[tuple[int, int]]:
    """The distinct 2 MiB-aligned (start, end) spans inside the tensors' CPU storages."""
    return [_span(g[0].untyped_storage()) for g in _groups(tensors)]


def _tensors(target: nn.Module | Tensor | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(target, nn.Module):
        return [*target.parameters(), *target.buffers()]
    if isinstance(target, Tensor):
        return [target]
    try:
        tensors = list(target)
    except TypeError:
        tensors = None
    if tensors is None or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(f"target={type(target).__name__} is not allowed: it must be an "
                        "nn.Module, a Tensor or an iterable of Tensors")
    return tensors


def _file_backed(address: int) -> bool:
    """Whether ``address`` lies in a mapping of a file (its inode in /proc/self/maps is
    not 0): a checkpoint loaded without a copy (safetensors maps the file)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                if lo <= address < hi:
                    return len(fields) >= 5 and fields[4] != "0"
    except OSError:
        pass
    return False


def _move(group: list[Tensor]) -> None:
    """Point the group's tensors (one storage) at a copy of it in anonymous memory."""
    old = group[0].untyped_storage()
    new = torch.empty(old.nbytes(), dtype=torch.uint8)
    new.copy_(torch.empty(0, dtype=torch.uint8).set_(old))
    storage = new.untyped_storage()
    with torch.no_grad():
        for t in group:
            t.set_(storage, t.storage_offset(), t.size(), t.stride())


def huge_pages(target: nn.Module | Tensor | Iterable[Tensor], *,
               strict: bool = False) -> HugePages:
    """Move ``target``'s CPU tensors (a module's parameters and buffers) into transparent
    huge pages in place (see the module docstring); returns what was done. ``strict``:
    raise ``OSError`` where the kernel refuses instead of reporting it."""
    check_bool("strict", strict)
    groups = _groups(_tensors(target))
    t0 = time.perf_counter()
    copied = 0

    def spans() -> int:  # (after any copy out of a file: its own alignment)
        return sum(hi - lo for lo, hi in (_span(g[0].untyped_storage()) for g in groups))

    def report(collapsed: int, reason: str | None) -> HugePages:
        if reason is not None and strict:
            raise OSError(f"huge_pages: {reason}")
        return HugePages(len(groups), spans(), collapsed, time.perf_counter() - t0, reason,
                         copied)

    if not groups:
        return report(0, None)
    madvise = _madvise()
    if madvise is None:
        return report(0, "not Linux with glibc: madvise is not available")

    def collapse(lo: int, hi: int) -> int:  # 0, or the errno
        return 0 if madvise(lo, hi - lo, _MADV_COLLAPSE) == 0 else ctypes.get_errno()

    collapsed, failures = 0, {}
    for group in groups:
        span = _span(group[0].untyped_storage())
        err = collapse(*span)
        if err == errno.EINVAL and _file_backed(span[0]):  # a file's pages: copy them out
            _move(group)
            copied += group[0].untyped_storage().nbytes()
            span = _span(group[0].untyped_storage())
            err = collapse(*span)
        if err == 0:
            collapsed += span[1] - span[0]
            continue
        failures[err] = failures.get(err, 0) + 1
        if err == errno.EINVAL:  # the kernel has no MADV_COLLAPSE or THP is "never":
            break  # every other span would fail the same way
    if not failures:
        return report(collapsed, None)
    why = {errno.EINVAL: "the kernel does not collapse (Linux before 6.1, or transparent "
                         "huge pages set to never)",
           errno.EAGAIN: "the kernel found no free 2 MiB blocks for some",
           errno.ENOMEM: "the kernel found no free 2 MiB blocks for some"}
    reasons = sorted({why.get(e, os.strerror(e)) for e in failures})
    return report(collapsed, "; ".join(reasons))
