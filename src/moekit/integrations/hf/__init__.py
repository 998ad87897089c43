"""Drop-in moekit acceleration for Hugging Face transformers MoE models.

>>> from moekit.integrations import hf
>>> model = hf.apply(model)     # MoE routers and experts now run moekit
>>> model = hf.revert(model)    # the original transformers modules again
>>> model = hf.load_offloaded("ckpt_dir", expert_memory="2GiB")  # experts streamed from disk

``apply`` swaps the class of each MoE router / experts module in place (same
object, same Parameters), so ``state_dict`` keys, ``save_pretrained`` and
``from_pretrained`` are unchanged, with or without the patch.
"""

from __future__ import annotations

from torch import nn

from moekit.experts.experts import BACKEND_NAMES
from moekit.integrations.hf.patch import (
    ARCHITECTURES,
    BACKEND_ATTR,
    SUPPORTED,
    is_patched,
    patch_module,
    unpatch_module,
)

__all__ = ["SUPPORTED", "apply", "is_patched", "load_offloaded", "revert"]


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} is not allowed: it must be a "
                         "transformers PreTrainedModel (a torch.nn.Module)")


def apply(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Run every MoE block of a transformers ``model`` with moekit, in place; returns it.

    ``backend`` is a moekit expert backend ("auto" picks the fastest available).
    Raises ValueError for a model whose architecture is not in ``SUPPORTED``.
    """
    _check_module(model)
    model_type = _model_type(model)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} is not supported: moekit.integrations.hf "
                         f"supports {', '.join(SUPPORTED)}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend={backend!r} is not allowed: it must be one of "
                         f"{', '.join(BACKEND_NAMES)}")
    mixins = ARCHITECTURES[model_type]
    for m in model.modules():  # applying again switches the backend
        if is_patched(m) and hasattr(type(m), BACKEND_ATTR):
            setattr(m, BACKEND_ATTR, backend)
    targets = [m for m in model.modules()
               if not is_patched(m) and type(m).__name__ in mixins]
    patched = sum(patch_module(m, mixins[type(m).__name__], backend) for m in targets)
    if not patched and not any(is_patched(m) for m in model.modules()):
        raise ValueError(f"model (model_type={model_type!r}) has no MoE block that moekit "
                         f"can run: expected modules of class {', '.join(mixins)}")
    return model


def _unrevertable(model: nn.Module) -> str | None:
    """Why transformers' own modules could not run ``model`` after ``revert``, or None."""
    from moekit.quant.tensor import QuantizedTensor  # noqa: PLC0415 (keeps import light)

    for name, m in model.named_modules():
        if isinstance(m, QuantizedTensor):
            return (f"{name} holds int{m.bits} weights from moekit.quantize, which transformers' "
                    "modules cannot run; reload the unquantized checkpoint instead")
        if is_patched(m) and getattr(type(m), "_moekit_offloaded", False):
            return (f"{name} holds experts streamed from disk by load_offloaded (not in "
                    "memory); load the checkpoint with from_pretrained instead")
    return None


def revert(model: nn.Module) -> nn.Module:
    """Undo ``apply``: every patched module gets its transformers class back; returns ``model``.

    Refused (ValueError, nothing changed) for a model with quantized or offloaded experts:
    the transformers classes would hold weights they cannot use.
    """
    _check_module(model)
    reason = _unrevertable(model)
    if reason is not None:
        raise ValueError(f"model cannot be reverted to transformers' modules: {reason}")
    for m in model.modules():
        if is_patched(m):
            unpatch_module(m)
    return model


def load_offloaded(path, expert_memory, quantize=None, **kwargs) -> nn.Module:
    """A transformers MoE checkpoint whose experts are read on demand within a byte budget.

    See ``moekit.integrations.hf.offload.load_offloaded`` (imported on first use).
    """
    from moekit.integrations.hf.offload import load_offloaded as load

    return load(path, expert_memory, quantize=quantize, **kwargs)
