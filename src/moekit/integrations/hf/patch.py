"""Swap the class of transformers' MoE modules in place, and back.

A patched module is the same object with the same Parameters and buffers; only
its class changes to a subclass whose ``forward`` runs moekit. So the
state_dict keys, hooks already installed (transformers records router logits
with forward hooks), ``isinstance`` checks and optimizer state all survive,
and ``revert`` is a class swap back.
"""

from __future__ import annotations

from torch import nn

from moekit.integrations.hf.architectures import ARCHITECTURES, SUPPORTED

__all__ = ["ARCHITECTURES", "BACKEND_ATTR", "SUPPORTED", "is_patched", "new_patched",
           "patch_module", "patched_class", "unpatch_module"]

_PATCHED_CLASSES: dict[tuple[type, type], type] = {}
BACKEND_ATTR = "_moekit_backend"


def patched_class(original: type, mixin: type) -> type:
    """``class Moekit<Original>(mixin, original)``, created once per pair."""
    key = (original, mixin)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"Moekit{original.__name__}", (mixin, original),
                                     {"_moekit_original": original, "_moekit_mixin": mixin,
                                      "__module__": mixin.__module__,
                                      "__reduce_ex__": _reduce_patched})
    return _PATCHED_CLASSES[key]


def _reduce_patched(module: nn.Module, protocol: int) -> tuple:
    """Pickle a patched module as its (original, mixin) pair: the class is built at run
    time, so pickle could not find it by name (``torch.save(model)`` failed with
    "attribute lookup failed"). The state is what the default reduction saves."""
    _, _, *rest = object.__reduce_ex__(module, protocol)
    cls = type(module)
    return (new_patched, (cls._moekit_original, cls._moekit_mixin), *rest)


def new_patched(original: type, mixin: type) -> nn.Module:
    """An empty instance of ``patched_class(original, mixin)`` (unpickling fills it)."""
    cls = patched_class(original, mixin)
    return cls.__new__(cls)


def is_patched(module: nn.Module) -> bool:
    return "_moekit_original" in type(module).__dict__


def patch_module(module: nn.Module, mixin: type, backend: str) -> bool:
    """Swap ``module``'s class; False when its layout is one moekit does not handle."""
    supports = getattr(mixin, "_moekit_supports", None)
    if supports is not None and not supports(module):
        return False
    module.__class__ = patched_class(type(module), mixin)
    if hasattr(mixin, BACKEND_ATTR):
        setattr(module, BACKEND_ATTR, backend)
    return True


def unpatch_module(module: nn.Module) -> None:
    module.__class__ = type(module).__dict__["_moekit_original"]
    for name in [n for n in module.__dict__ if n.startswith("_moekit_")]:
        del module.__dict__[name]  # the backend, a decode plan (experts_plan.py)
