"""The 16-output order of int4 weights with int8 activations (``layout="o16"``).

``QuantizedTensor``'s NK layout ([E, N, K/2] bytes, each output's inputs in a row) is
what files and ``state_dict`` hold. In memory, int4 weights with int8 activations may
take the order the decode kernel's AVX-512 VNNI instructions sum in instead: within
each 16 outputs' span of bytes, per 32-input chunk c, four 64-byte vectors j whose
byte 4 o + t is NK byte 16 c + 4 j + t of output o (the nibbles of inputs 32 c + 4 j + t
and 32 c + 16 + 4 j + t); their scales and zero points [K/g][16] per 16 outputs. The
same bytes, permuted within each 16 outputs' span: a decode step converts, scales and
accumulates each row once per 32 inputs of 16 outputs instead of per output
(``benchmarks/bench_int4_order.py``; docs/cpu-inference.md, "W4A8 experts in the
16-output order, built").

Shape letters: E experts, N output width, K input width, g group size.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

# set inside raw_state_dicts(): QuantizedTensor's state_dict keeps o16 buffers as they are
RAW_STATE: contextvars.ContextVar[bool] = contextvars.ContextVar("moekit_raw_state",
                                                                 default=False)


@contextlib.contextmanager
def raw_state_dicts() -> Iterator[None]:
    """Within it (this thread or task), ``state_dict`` gives o16 tensors' buffers as they
    are, in o16 order, not NK copies: for a writer that converts one tensor at a time
    (``save_quantized``), not twice the experts' memory at once."""
    token = RAW_STATE.set(True)
    try:
        yield
    finally:
        RAW_STATE.reset(token)


def o16_allowed(bits: int, activations: str, N: int, device: torch.device | str = "cpu"
                ) -> bool:
    """Whether a weight of this format and output width N on ``device`` may take
    ``layout="o16"`` (a CPU kernel's order)."""
    return (bits == 4 and activations == "int8" and N % 16 == 0
            and torch.device(device).type == "cpu")


def to_o16(t: Tensor, out: Tensor | None = None) -> Tensor:
    """An NK part [E, N, X] (uint8 data, X = K/2; or float scales / zeros, X = K/g) in the
    16-output order (N a multiple of 16): a new contiguous tensor, or written into ``out``
    (a contiguous [E, N, X] tensor, converted to its dtype as ``copy_`` converts; no
    temporary) and returned."""
    E, N, X = t.shape
    if t.dtype == torch.uint8:  # [., 16 o, K/32 c, 4 j, 4 t] -> [., c, j, o, t]
        src = t.view(E, N // 16, 16, X // 16, 4, 4).permute(0, 1, 3, 4, 2, 5)
    else:
        src = t.view(E, N // 16, 16, X).transpose(2, 3)
    if out is None:
        return src.reshape(E, N, X)
    if not (out.shape == t.shape and out.is_contiguous()):
        raise ValueError(f"out of shape {tuple(out.shape)} (contiguous: {out.is_contiguous()}) "
                         f"is not allowed: it must be a contiguous tensor of t's shape "
                         f"{tuple(t.shape)}")
    out.view(src.shape).copy_(src)
    return out


def from_o16(t: Tensor) -> Tensor:
    """The inverse of ``to_o16``: an o16 part back in NK order (a new contiguous tensor)."""
    E, N, X = t.shape
    if t.dtype == torch.uint8:
        return t.view(E, N // 16, X // 16, 4, 16, 4).permute(0, 1, 4, 2, 3, 5).reshape(E, N, X)
    return t.view(E, N // 16, X, 16).transpose(2, 3).reshape(E, N, X)
