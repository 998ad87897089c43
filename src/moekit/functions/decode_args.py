"""How the decode kernels (``moekit/csrc/cpu_decode.cpp``, built by ``cpu_ext``) are
called: whether they run here (``available``, ``isa``; ``grad_wanted``: not where autograd
wants a gradient, ``no_grad_unless_wanted``), the activation codes their epilogues know
(``ACT_CODES``), and their arguments: a weight as they read it (``wargs``:
a float stack in either unit-stride layout, or a ``QuantizedTensor``'s data, scales,
zeros and format code; ``list_args`` for one-expert lists), contiguous float32 or
``dtype`` copies made only where needed (``f32``, ``plain_f32``), and the rows of one
"expert" that every row goes to (``all_rows``). ``decode.py`` and ``decode_step.py``
call the kernels with these; the public names stay importable from
``moekit.functions.decode``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from moekit.functions import cpu_ext
from moekit.quant.tensor import QuantizedTensor

ActFn = Callable[[Tensor], Tensor]
ACT_CODES = {"swiglu": 1, "geglu": 2, "swiglu_oai": 3, "relu2": 4, "gelu": 5}


def grad_wanted(*tensors: Tensor | QuantizedTensor | None,
                modules: tuple[torch.nn.Module, ...] = ()) -> bool:
    """Whether autograd wants a gradient through any of ``tensors`` or the parameters of
    ``modules``: grad mode on and one of them requires grad. The kernels have no
    backward, so they run where this is False, a frozen model with grad mode on included
    (it takes the kernels no_grad takes: its outputs are no_grad's, bit for bit). The
    modules' parameters are walked only with grad mode on (a decode step's per-layer
    calls run without it)."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, Tensor) and t.requires_grad for t in tensors) or any(
        p.requires_grad for m in modules for p in m.parameters())


def no_grad_unless_wanted(*tensors: Tensor | QuantizedTensor | None,
                          modules: tuple[torch.nn.Module, ...] = ()
                          ) -> AbstractContextManager:
    """``torch.no_grad()`` where no gradient is wanted through ``tensors`` or the
    parameters of ``modules`` (all a call computes from), else nothing: a frozen module
    called with grad mode on then picks the backend and kernels no_grad picks, and
    returns no_grad's output bit for bit."""
    return nullcontext() if grad_wanted(*tensors, modules=modules) else torch.no_grad()


def available() -> bool:
    """Whether the decode kernels are built (or buildable) here."""
    return cpu_ext.get_decode() is not None


def isa() -> str:
    """The decode kernels' path on this CPU: "avx512", "avx2" or "generic" ("" unbuilt)."""
    ext = cpu_ext.get_decode()
    return "" if ext is None else _isa(ext)


@functools.cache
def _isa(ext) -> str:
    return ext.isa()


def kernel_bits(qt: QuantizedTensor) -> int:
    """The kernels' weight format code: 8, 4, 88 or 48 (int8 / int4 weights, int8
    activations), 49 (48 in the 16-output order, ``layout="o16"``)."""
    if qt.layout == "o16":
        return 49
    return {8: 88, 4: 48}[qt.bits] if qt.activations == "int8" else qt.bits


def wargs(w: Tensor | QuantizedTensor) -> tuple:
    if isinstance(w, QuantizedTensor):
        return w.data, w.scales, w.zeros, kernel_bits(w), w.group_size or 0
    if w.stride(2) != 1 and w.stride(1) != 1:  # neither layout the kernel reads
        w = w.contiguous()
    return w, None, None, 0, 0


def f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float().contiguous()


def kernels_for(spec: tuple[str, float, float] | None):
    """(the decode extension, activation code, swiglu limit, swiglu alpha) for ``spec``."""
    ext = cpu_ext.get_decode()
    if ext is None:
        raise RuntimeError("the decode kernels are not built (MOEKIT_CPU_EXT=0 or the build "
                           "failed); use backend='fused'")
    kind, limit, alpha = spec if spec is not None else (None, 0.0, 1.0)
    return ext, ACT_CODES.get(kind, 0), limit, alpha


def plain(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t as a contiguous ``dtype`` tensor (no autograd), converted only where needed."""
    return t if t.dtype == dtype and t.is_contiguous() else t.detach().to(dtype).contiguous()


def plain_f32(t: Tensor) -> Tensor:
    """t as a contiguous float32 tensor the kernels read (the C++ side takes no autograd)."""
    return plain(t, torch.float32)


def list_args(ws: list[Tensor | QuantizedTensor]) -> tuple:
    """Per-expert weights -> (data list, scales list | None, zeros list | None, bits, group)."""
    first = ws[0]
    if isinstance(first, QuantizedTensor):
        return ([w.data[0] for w in ws], [w.scales[0] for w in ws],
                None if first.zeros is None else [w.zeros[0] for w in ws],
                kernel_bits(first), first.group_size or 0)
    return list(ws), None, None, 0, 0


_ALL_ROWS: dict[int, tuple[Tensor, Tensor]] = {}


def all_rows(T: int) -> tuple[Tensor, Tensor]:
    """(arange(T), [T] as int32): every row routed to the one expert; made once per T
    (a decode step's rows), since the kernel only reads them."""
    if T not in _ALL_ROWS:
        _ALL_ROWS[T] = torch.arange(T), torch.full((1,), T, dtype=torch.int32)
    return _ALL_ROWS[T]
