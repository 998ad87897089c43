"""The expert store: where each expert's tensors lie in the checkpoint's shards.

One store entry per key ``(layer, expert)``: a dict name -> Part, each Part the
byte ranges (concatenated along dim 0) that make one tensor. A ``Codec`` says
what the cache holds for it: the ``layout`` (cached tensors' shapes and dtypes,
packed one after another in one buffer), how to ``encode`` the bytes read into
that layout (identity, or int8/int4 quantization), and how to ``wrap`` the
cached tensors into what the expert compute takes (transposed views, one-expert
``QuantizedTensor``s). ``load(key, out)`` reads into ``out`` (a cache slot) so
the cached bytes are the only copy.
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.errors import NonFiniteScalesError
from moekit.offload.policy import Key
from moekit.offload.safetensors_io import ShardError, TensorLoc, pread_into, read_into

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ExpertMemoryError(ValueError):
    """The expert budget cannot hold the experts one layer step needs."""


def parse_bytes(value: int | str, name: str = "expert_memory") -> int:
    """``2147483648``, ``"2GiB"``, ``"512 MiB"``, ``"1.5GB"`` -> bytes (an int > 0)."""
    if isinstance(value, bool):
        value = str(value)  # refuse True / False below
    if isinstance(value, int):
        n = value
    else:
        # a sign is matched so that '-5' or '-1MiB' is told "> 0", not that it is no size
        m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in UNITS:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a number of bytes "
                             "(int) or a string such as '2GiB', '512MiB', '1.5GB'")
        size = float(m.group(1)) * UNITS[unit]
        if size <= 0:
            raise ValueError(f"{name}={value!r} is not allowed: it must be > 0 bytes")
        if not size.is_integer():  # 1.5 (bytes) was read as 1 byte
            raise ValueError(f"{name}={value!r} is not allowed: it must be a whole number of "
                             "bytes (or a size with a unit, such as '1.5GB')")
        n = int(size)
    if n <= 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be > 0 bytes")
    return n


def mib(n: int) -> str:
    """``n`` bytes in MiB for a message, to the KiB ("0.023 MiB", "1,024 MiB")."""
    return f"{n / 2**20:,.3f}".rstrip("0").rstrip(".") + " MiB"


def size_at_least(n: int) -> str:
    """The smallest whole number of KiB (under 1 MiB) or MiB holding ``n`` bytes, as
    parse_bytes reads it ("24KiB", "513MiB"): a size to suggest that is sure to suffice."""
    if n <= 2**20:
        return f"{-(-n // 2**10)}KiB"
    return f"{-(-n // 2**20)}MiB"


def _signature(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class Part:
    """One tensor of an expert: ``shape``/``dtype``, bytes from ``locs`` in order."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    locs: tuple[TensorLoc, ...]

    @property
    def nbytes(self) -> int:
        return sum(loc.nbytes for loc in self.locs)


ALIGN = 8  # bytes: each cached tensor starts at a multiple (int8 data before fp32 scales)


@dataclass(frozen=True)
class Layout:
    """The cached tensors of one expert: name -> (shape, dtype, byte offset); ``nbytes`` total."""

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype, int]]
    nbytes: int

    @classmethod
    def of(cls, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Layout:
        out, pos = {}, 0
        for name, (shape, dtype) in specs.items():
            pos = -(-pos // ALIGN) * ALIGN
            out[name] = (tuple(shape), dtype, pos)
            pos += math.prod(shape) * dtype.itemsize
        return cls(out, -(-pos // ALIGN) * ALIGN)

    def views(self, buf_B: Tensor) -> dict[str, Tensor]:
        """Tensors over the uint8 buffer ``buf_B`` (at least ``nbytes`` long)."""
        return {n: buf_B[o:o + math.prod(shape) * dt.itemsize].view(dt).view(shape)
                for n, (shape, dt, o) in self.tensors.items()}


class Codec:
    """Identity: the cache holds the parts as read; the compute gets them as they are."""

    # stored parts whose every value must be finite (a quantized expert's scales and zero
    # points), checked as the store first reads each expert
    finite: tuple[str, ...] = ()

    def layout(self, parts: dict[str, Part]) -> Layout:
        return Layout.of({n: (p.shape, p.dtype) for n, p in parts.items()})

    def reads_into_cache(self) -> bool:
        """True when the parts are read straight into the cached tensors (no encode step)."""
        return True

    def encode(self, raw: dict[str, Tensor], out: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def wrap(self, cached: dict[str, Tensor]) -> Any:
        return cached


class ExpertStore:
    """Reads experts from safetensors shards; thread-safe (one fd per file, ``pread``).

    ``close`` never closes a file under a read in progress (the prefetch thread's, which
    ``ExpertCache.close(timeout)`` may give up waiting for): the last such read closes
    them as it ends. A read after ``close`` is refused (it would reopen the files)."""

    def __init__(self, experts: dict[Key, dict[str, Part]], codec: Codec | None = None) -> None:
        self.experts = experts
        self.codec = codec or Codec()
        self._layouts: dict[tuple, Layout] = {}
        self.files = sorted({loc.file for parts in experts.values()
                             for p in parts.values() for loc in p.locs})
        self._lock = threading.Lock()  # guards _reads, _closed and closing _fds
        self._reads = 0  # reads in progress, on any thread
        self._closed = False
        self._fds: dict[str, int] = {}
        try:
            for f in self.files:
                self._fds[f] = os.open(f, os.O_RDONLY)
        except OSError:  # the shards opened before the one that failed are closed again
            self._close_files()
            raise
        # each shard as opened (inode, size, mtime): a shard rewritten in place after the
        # load went on being read, and its new bytes computed with, silently (a file
        # replaced by a rename is not a change: the open fd still reads the old one)
        self._opened = {f: _signature(fd) for f, fd in self._fds.items()}
        self._key_files: dict[Key, tuple] = {}
        self._scratch = threading.local()  # per thread: raw buffers for an encoding codec
        # the experts whose codec.finite parts were found finite (each checked on its first
        # read, not all at load: that would read every expert; a bad one fails every read)
        self._finite: set[Key] = set()
        # per (slot buffer, layout): its tensor views, byte views and wrapped value, made
        # once; re-making them per read held the GIL ~0.1 ms per expert on the prefetch
        # thread, time the compute thread spent waiting for it
        self._slots: dict[tuple[int, int], tuple[dict, dict, Any]] = {}

    def layout(self, key: Key) -> Layout:
        parts = self.experts[key]
        sig = tuple((n, p.shape, p.dtype) for n, p in parts.items())
        got = self._layouts.get(sig)
        if got is None:
            got = self._layouts[sig] = self.codec.layout(parts)
        return got

    def raw_nbytes(self, key: Key) -> int:
        """Bytes read from the shards for ``key``."""
        return sum(p.nbytes for p in self.experts[key].values())

    def nbytes(self, key: Key) -> int:
        """Bytes the cache holds for ``key`` (after the codec, aligned)."""
        return self.layout(key).nbytes

    @property
    def slot_bytes(self) -> int:
        """The largest cached expert: the size of one cache slot."""
        return max(self.nbytes(k) for k in self.experts)

    def load(self, key: Key, out_B: Tensor | None = None) -> Any:
        """Read ``key`` into the uint8 buffer ``out_B`` (a cache slot, or fresh when None);
        what to compute with (a slot's is the same object each time the slot is read).
        RuntimeError after ``close``, before anything is read or made."""
        fds = self._begin_read()
        try:
            return self._load(key, out_B, fds)
        finally:
            self._end_read()

    def _load(self, key: Key, out_B: Tensor | None, fds: dict) -> Any:
        layout = self.layout(key)
        if out_B is None:
            cached, mvs, value = self._views(torch.empty(layout.nbytes, dtype=torch.uint8),
                                             layout)
        else:
            got = self._slots.get((out_B.data_ptr(), id(layout)))
            if got is None:
                got = self._slots[(out_B.data_ptr(), id(layout))] = self._views(out_B, layout)
            cached, mvs, value = got
        parts = self.experts[key]
        self._check_unchanged(key, parts, fds)
        if self.codec.reads_into_cache():
            for name, p in parts.items():
                pread_into(mvs[name], p.locs, fds)
            stored = cached
        else:
            stored = {name: read_into(self._raw_buffer(name, p), list(p.locs), fds)
                      for name, p in parts.items()}
        if self.codec.finite and key not in self._finite:  # (before any encode uses them)
            self._check_finite(key, stored)
        if not self.codec.reads_into_cache():
            self.codec.encode(stored, cached)
        return value

    def _check_unchanged(self, key: Key, parts: dict[str, Part], fds: dict) -> None:
        """ShardError naming the file when a shard ``key`` is read from has changed on
        disk since the store opened it (an fstat per shard and read: ~1 us, against ~0.5 ms
        for a 3 MiB expert from the page cache)."""
        files = self._key_files.get(key)
        if files is None:
            files = self._key_files[key] = tuple(
                {loc.file for p in parts.values() for loc in p.locs})
        for f in files:
            fd = fds.get(f)
            if fd is not None and f in self._opened and _signature(fd) != self._opened[f]:
                raise ShardError(f"shard {f} has changed on disk since the model was "
                                 "loaded (its size or modification time differs): its "
                                 "experts would be read from the new bytes; load the model "
                                 "again")

    def _check_finite(self, key: Key, stored: dict[str, Tensor]) -> None:
        """``NonFiniteScalesError`` naming the file, the tensor and the expert where a part
        the codec names finite holds NaN or inf."""
        for name in self.codec.finite:
            t = stored.get(name)
            if t is None or bool(torch.isfinite(t).all()):
                continue
            finite_N = torch.isfinite(t.reshape(-1))
            at = 0  # the first location (of the part's, read one after another) holding one
            for loc in self.experts[key][name].locs:
                n = loc.nbytes // t.element_size()
                if not bool(finite_N[at:at + n].all()):
                    break
                at += n
            layer, expert = key
            raise NonFiniteScalesError(
                f"checkpoint {loc.file}: {loc.name}, expert {expert} of MoE layer {layer}, "
                f"holds {int((~finite_N).sum())} non-finite value(s) (NaN or inf): "
                "quantization scales and zero points must be finite (checked as the "
                "expert is first read from disk)")
        self._finite.add(key)

    def _begin_read(self) -> dict:
        """The open shard files, held open until ``_end_read``."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the expert store is closed: close() closed its shard "
                                   "files; load the model again to read its experts")
            self._reads += 1
            return self._fds

    def _end_read(self) -> None:
        with self._lock:
            self._reads -= 1
            last = self._closed and self._reads == 0
        if last:  # close() came during this read: the files are closed now
            self._close_files()

    def _views(self, buf_B: Tensor, layout: Layout) -> tuple[dict, dict, Any]:
        # made outside inference mode whatever the thread's mode: a slot's views are
        # reused by every thread, and views made in inference mode refuse the in-place
        # writes of a thread outside it (the prefetch thread's encode had failed with
        # "Inplace update to inference tensor outside InferenceMode")
        with torch.inference_mode(False):
            cached = layout.views(buf_B)
            mvs = {n: memoryview(t.view(-1).view(torch.uint8).numpy())
                   for n, t in cached.items()}
            return cached, mvs, self.codec.wrap(cached)

    def _raw_buffer(self, name: str, p: Part) -> Tensor:
        """A per-thread buffer for the raw bytes of ``name`` (reused from read to read)."""
        bufs = self._scratch.__dict__.setdefault("bufs", {})
        buf = bufs.get(name)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
            with torch.inference_mode(False):  # this thread may read outside it later
                buf = bufs[name] = torch.empty(p.shape, dtype=p.dtype)
        return buf

    def close(self) -> bool:
        """Close the shard files: now (True), or when the reads in progress end (False).
        Closing twice is harmless."""
        with self._lock:
            self._closed = True
            if self._reads:
                return False
        self._close_files()
        return True

    def _close_files(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
