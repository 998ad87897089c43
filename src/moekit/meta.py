"""Build modules on the meta device, and give them memory, without importing
``torch._dynamo``.

Under a plain ``with torch.device("meta")`` every module still runs its weight init, on
tensors that hold no values, and torch's meta ``normal_`` (``nn.Embedding``'s init,
moekit's experts, router and model inits) is its Python reference, ``torch._refs.normal_``,
whose wrapper imports ``torch._dynamo`` and with it sympy and triton; ``Module.to_empty``
calls ``empty_like`` of each meta tensor, another Python reference, which imports sympy.
Measured on the 2-vCPU Intel Xeon VM (torch 2.13.0+cpu): +75 MiB of ``RssAnon`` and
~70 MiB of libraries (``RssFile``) the first time a process loads a moekit checkpoint,
resident or offloaded. ``meta_device()`` is that context with ``normal_`` of a meta
tensor returning the tensor as it is (the same meta model, no values either way, no
draw from any generator: the meta reference draws none); ``to_empty`` is
``Module.to_empty`` with ``empty_like`` of a contiguous meta tensor made by ``empty``.
The other inits moekit's models run on meta (``uniform_``, ``zeros_``, ``ones_``,
``fill_``) have C++ meta kernels and import nothing; nor does ``empty``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["meta_device", "to_empty"]

# what would run torch._refs on a meta tensor: nn.init's and the Tensor method
_NORMAL = (nn.init.normal_, Tensor.normal_)


def _target(args: tuple, kwargs: dict) -> object:
    """The tensor an op works on: nn.init.normal_ passes it as ``tensor=``."""
    if args:
        return args[0]
    return kwargs.get("tensor", kwargs.get("self", kwargs.get("input")))


def _is_meta(t: object) -> bool:
    return isinstance(t, Tensor) and t.is_meta


class _NoMetaRefs(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = _target(args, kwargs)
        if func in _NORMAL and _is_meta(t):
            return t
        if (func is torch.empty_like and _is_meta(t) and t.is_contiguous()
                and set(kwargs) <= {"device", "dtype"} and len(args) == 1):
            # what empty_like(preserve_format) gives a contiguous tensor: contiguous
            return torch.empty(t.shape, dtype=kwargs.get("dtype") or t.dtype,
                               device=kwargs.get("device") or t.device)
        return func(*args, **kwargs)


@contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device("meta")`` whose modules' ``normal_`` inits are skipped (see the
    module's docstring): build a model there, then assign or read its tensors."""
    with torch.device("meta"), _NoMetaRefs():
        yield


def to_empty(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to_empty(device=device)``: uninitialised memory for a meta-built module,
    without the import of sympy (see the module's docstring)."""
    with _NoMetaRefs():
        return module.to_empty(device=device)
