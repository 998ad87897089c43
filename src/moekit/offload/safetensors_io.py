"""Read tensors, or byte ranges of them, from safetensors files with ``os.pread``.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, [begin, end) byte offsets into the data that follows),
then the data. Reading with ``pread`` into a fresh buffer, instead of through a
memory map, keeps the file's pages out of this process's resident set: a mapped
shard counts every page it touched in RSS until it is unmapped, which would
defeat a byte budget.

Every location is checked against the file's size when the header is read, so
a truncated or missing shard raises ``ShardError`` naming the tensor and the
file before anything is loaded.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.errors import CheckpointError
from moekit.quant.tensor import QuantizedTensor

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class ShardError(CheckpointError):
    """A safetensors shard that is missing, truncated, changed since the load, or lacks a
    tensor the model needs. A CheckpointError (a ValueError), so `moekit generate` names one
    found mid-run in one line, and a prefetch read's is raised as it is, not wrapped."""


@dataclass(frozen=True)
class TensorLoc:
    """Where one tensor's bytes lie: ``file`` at ``offset`` (absolute), ``nbytes`` long."""

    file: Path
    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def row(self, index: int) -> TensorLoc:
        """The slice ``tensor[index]`` of a stacked tensor (one expert of [E, ...])."""
        n = self.shape[0]
        if not 0 <= index < n:
            raise ShardError(f"{self.name}[{index}] is out of range: {self.name} in "
                             f"{self.file} has {n} rows")
        per = self.nbytes // n
        return TensorLoc(self.file, f"{self.name}[{index}]", self.offset + index * per, per,
                         self.dtype, self.shape[1:])


def read_header(path: str | Path) -> dict[str, TensorLoc]:
    """Every tensor's location in ``path``, checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ShardError(f"{path} is truncated: {size} bytes, no safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise ShardError(f"{path} is truncated: its header says {n} bytes, the file "
                                 f"has {size - 8} after the length")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise ShardError(f"shard {path} is missing") from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ShardError(f"{path} has a corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ShardError(f"{path} has a corrupt safetensors header: a JSON "
                         f"{type(header).__name__}, where it must be an object")
    header.pop("__metadata__", None)
    return {name: _locate(path, name, info, 8 + n, size) for name, info in header.items()}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _naturals(value: Any, n: int | None = None) -> bool:
    """Whether ``value`` is a JSON list of ints >= 0 (of ``n`` of them)."""
    return isinstance(value, list) and (n is None or len(value) == n) and all(
        type(v) is int and v >= 0 for v in value)


def _locate(path: Path, name: str, info: Any, base: int, size: int) -> TensorLoc:
    # a header that is JSON but not the format's (a list entry, a missing key, a negative
    # begin) raised AttributeError / KeyError / TypeError, or, for a negative begin,
    # read bytes of the header itself as the tensor
    if not isinstance(info, dict):
        raise ShardError(f"{name} in {path} has a corrupt header entry: a JSON "
                         f"{type(info).__name__}, where it must be an object")
    kind = info.get("dtype")
    dtype = DTYPES.get(kind) if isinstance(kind, str) else None
    if dtype is None:
        raise ShardError(f"{name} in {path} has dtype {_short(kind)}, which is not "
                         f"allowed: it must be one of {', '.join(DTYPES)}")
    offsets, shape = info.get("data_offsets"), info.get("shape")
    if not _naturals(offsets, 2) or offsets[0] > offsets[1]:
        raise ShardError(f"{name} in {path} has data_offsets={_short(offsets)}, which is not "
                         "allowed: it must be [begin, end], ints with 0 <= begin <= end")
    if not _naturals(shape):
        raise ShardError(f"{name} in {path} has shape={_short(shape)}, which is not allowed: it "
                         "must be a list of ints >= 0")
    begin, end = offsets
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    if end - begin != numel * dtype.itemsize:
        raise ShardError(f"{name} in {path}: {end - begin} bytes for shape {shape} "
                         f"{info['dtype']} (needs {numel * dtype.itemsize})")
    if base + end > size:
        raise ShardError(f"{name} in {path} is truncated: it ends at byte {base + end}, the "
                         f"file has {size} bytes")
    return TensorLoc(path, name, base + begin, end - begin, dtype, shape)


def read_into(out: Tensor, locs: list[TensorLoc], fds: dict[Path, int]) -> Tensor:
    """Fill the contiguous tensor ``out`` with the bytes of ``locs``, one after another.

    Concatenating along dim 0 is a byte concatenation, so gate and up (two [F, D]
    tensors) land in one [2F, D] buffer without a copy.
    """
    pread_into(memoryview(out.view(-1).view(torch.uint8).numpy()), locs, fds)
    return out


def pread_into(buf: memoryview, locs: list[TensorLoc], fds: dict[Path, int]) -> None:
    """Fill the byte buffer ``buf`` with the bytes of ``locs``, one after another."""
    pos = 0
    for loc in locs:
        fd = fds.get(loc.file)
        if fd is None:
            fd = fds[loc.file] = os.open(loc.file, os.O_RDONLY)
        view = buf[pos:pos + loc.nbytes]
        got = os.preadv(fd, [view], loc.offset)
        while got < loc.nbytes:  # a short read: go on where it stopped
            more = os.preadv(fd, [view[got:]], loc.offset + got)
            if more == 0:
                raise ShardError(f"{loc.name} in {loc.file} is truncated: read {got} of "
                                 f"{loc.nbytes} bytes")
            got += more
        pos += loc.nbytes


def read_tensor(loc: TensorLoc, fds: dict[Path, int]) -> Tensor:
    """One tensor (or row of a stacked tensor) as a fresh CPU tensor."""
    return read_into(torch.empty(loc.shape, dtype=loc.dtype), [loc], fds)


@torch.no_grad()
def read_into_module(module: torch.nn.Module, locs: dict[str, TensorLoc],
                     fds: dict[Path, int]) -> None:
    """Fill each state_dict entry of ``module`` named in ``locs`` in place, one at a time
    (never a second copy of the whole model in memory). The files hold NK order: a
    ``QuantizedTensor`` held in another (``layout="o16"``) is refused before any read
    (its state_dict entries are NK copies; filling them would change nothing)."""
    for n, m in module.named_modules():
        if isinstance(m, QuantizedTensor) and m.layout != "nk":
            raise ValueError(f"{n or 'the module'} holds layout {m.layout!r}, which "
                             "read_into_module cannot fill: it reads NK order into the "
                             "module's tensors in place; set_layout('nk') first, then "
                             "set_expert_layout after the read")
    state = module.state_dict(keep_vars=True)
    for name, loc in locs.items():
        dest = state[name]
        if dest.dtype == loc.dtype and dest.is_contiguous():
            read_into(dest.data, [loc], fds)
        else:
            dest.data.copy_(read_tensor(loc, fds))


def drop_page_cache(paths) -> None:
    """Ask the kernel to forget the files' cached pages (``posix_fadvise(DONTNEED)``).

    Advice, not a command: pages mapped by another process stay resident.
    """
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
