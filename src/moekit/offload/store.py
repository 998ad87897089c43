"""The expert store: where each expert's tensors lie in the checkpoint's shards.

One store entry per key ``(layer, expert)``: a dict name -> Part, each Part the
byte ranges (concatenated along dim 0) that make one tensor. ``load(key)``
reads them with ``pread`` and hands the dict to ``prepare`` (identity by
default; a quantizer can turn it into packed int8/int4 parts), whose result is
what the cache holds and counts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.offload.policy import Key
from moekit.offload.safetensors_io import TensorLoc, read_into

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
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in UNITS:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a number of bytes "
                             "(int) or a string such as '2GiB', '512MiB', '1.5GB'")
        n = int(float(m.group(1)) * UNITS[unit])
    if n <= 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be > 0 bytes")
    return n


@dataclass(frozen=True)
class Part:
    """One tensor of an expert: ``shape``/``dtype``, bytes from ``locs`` in order."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    locs: tuple[TensorLoc, ...]

    @property
    def nbytes(self) -> int:
        return sum(loc.nbytes for loc in self.locs)


def tree_nbytes(value: Any) -> int:
    """Bytes held by a tensor, a dict/list/tuple of them, or an object of tensors."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tree_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tree_nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(tree_nbytes(v) for v in vars(value).values())
    return 0


class ExpertStore:
    """Reads experts from safetensors shards; thread-safe (one fd per file, ``pread``)."""

    def __init__(self, experts: dict[Key, dict[str, Part]],
                 prepare: Callable[[dict[str, Tensor]], Any] | None = None,
                 prepared_nbytes: Callable[[Key], int] | None = None) -> None:
        self.experts = experts
        self.prepare = prepare
        self._prepared_nbytes = prepared_nbytes
        self.files = sorted({loc.file for parts in experts.values()
                             for p in parts.values() for loc in p.locs})
        self._fds = {f: os.open(f, os.O_RDONLY) for f in self.files}

    def raw_nbytes(self, key: Key) -> int:
        return sum(p.nbytes for p in self.experts[key].values())

    def nbytes(self, key: Key) -> int:
        """Bytes the cache holds for ``key``: after ``prepare`` when a sizer was given."""
        if self._prepared_nbytes is not None:
            return self._prepared_nbytes(key)
        return self.raw_nbytes(key)

    def load(self, key: Key) -> Any:
        tensors = {name: read_into(torch.empty(p.shape, dtype=p.dtype), list(p.locs), self._fds)
                   for name, p in self.experts[key].items()}
        return tensors if self.prepare is None else self.prepare(tensors)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

