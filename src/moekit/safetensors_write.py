"""Write a safetensors file without numpy.

``safetensors.torch.save_file`` (0.8) imports numpy to take each tensor's
address, and neither the CPU torch wheel nor safetensors brings numpy, so on a
fresh ``pip install -e .`` the first checkpoint of ``moekit train`` died with
``ModuleNotFoundError: numpy``. The format is small (an 8-byte little-endian
header length, a JSON header naming each tensor's dtype, shape and byte range,
then the raw bytes), so moekit writes it itself; ``safetensors`` still reads it.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterable

import torch
from torch import Tensor

# torch dtype -> safetensors dtype code (the codes of the format's specification)
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _layout(tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> tuple[bytes, int]:
    """The padded JSON header and the size of the data section."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which is not allowed: "
                             f"it must be one of {sorted(map(str, DTYPE_CODES))}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), pos  # the reference writer pads to 8 bytes


def _check(tensors: object, metadata: object) -> None:
    """What the format can hold, and what safetensors can read back."""
    if not isinstance(tensors, dict):
        raise ValueError(f"tensors={type(tensors).__name__} is not allowed: it must be a dict "
                         "of name -> torch.Tensor")
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is not allowed: it must be a str other "
                             "than '__metadata__' (the header's metadata key)")
        if not isinstance(t, Tensor) or t.layout != torch.strided or t.is_meta:
            raise ValueError(f"tensor {name!r} is not allowed: it must be a dense torch.Tensor "
                             "with data (not on the meta device)")
    if metadata is not None and not (
            isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"metadata={metadata!r} is not allowed: it must be a dict of str -> "
                         "str (safetensors cannot read other values back)")


def save_file(tensors: dict[str, Tensor], filename: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Same contract as ``safetensors.torch.save_file`` for CPU or device tensors."""
    _check(tensors, metadata)  # everything before the file is opened: no half-written file
    # one tensor's bytes at a time: no copy of the whole dict
    save_stream(tensors, tensors.items(), filename, metadata)


def raw_bytes(t: Tensor) -> bytearray:
    """A tensor's bytes without numpy (``tensor.numpy()`` needs it; the CPU wheel lacks it)."""
    out = bytearray(t.numel() * t.element_size())
    if out:
        torch.frombuffer(out, dtype=torch.uint8).copy_(_bytes_of(t))
    return out


def _bytes_of(t: Tensor) -> Tensor:
    """A tensor's bytes as a flat uint8 CPU tensor (a view where it is contiguous)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


WRITE_PIECE = 1 << 26  # bytes copied out of a tensor at a time by write_raw


def write_raw(f, t: Tensor) -> None:
    """A tensor's bytes written to the file ``f`` in pieces of WRITE_PIECE (raw_bytes'
    one copy of the whole tensor doubled the memory a large one took while written)."""
    flat = _bytes_of(t)
    n = flat.numel()
    buf = bytearray(min(n, WRITE_PIECE))
    piece = torch.frombuffer(buf, dtype=torch.uint8) if buf else None
    for i in range(0, n, WRITE_PIECE):
        m = min(WRITE_PIECE, n - i)
        piece[:m].copy_(flat[i:i + m])
        f.write(memoryview(buf)[:m])


def save_stream(layout: dict[str, Tensor], tensors: Iterable[tuple[str, Tensor]],
                filename: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``save_file`` for tensors made one at a time (a conversion that holds one layer,
    not the model): ``layout`` gives each name's dtype and shape (meta tensors will do)
    for the header, ``tensors`` then yields (name, tensor) in that order, each checked
    against it before its bytes are written."""
    if sys.byteorder != "little":
        raise RuntimeError("moekit writes safetensors on little-endian machines only")
    header, _ = _layout(layout, metadata)
    want = iter(layout.items())
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, t in tensors:
            expected = next(want, None)
            if expected is None or expected[0] != name or t.dtype != expected[1].dtype \
                    or t.shape != expected[1].shape:
                raise ValueError(f"tensor {name!r} {t.dtype} {tuple(t.shape)} is not allowed "
                                 "here: the header expects " + (
                                     "no more tensors" if expected is None else
                                     f"{expected[0]!r} {expected[1].dtype} "
                                     f"{tuple(expected[1].shape)}"))
            write_raw(f, t)
        rest = [name for name, _ in want]
        if rest:
            raise ValueError(f"tensors {rest[:5]} of the header were never given")
