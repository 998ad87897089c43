"""Drop-in moekit acceleration for Hugging Face transformers MoE models.

>>> from moekit.integrations import hf
>>> model = hf.apply(model)     # MoE routers and experts now run moekit
>>> model = hf.revert(model)    # the original transformers modules again
>>> model = hf.load_offloaded("ckpt_dir", expert_memory="2GiB")  # experts streamed from disk

``apply`` swaps the class of each MoE router / experts module in place (same
object, same Parameters), so ``state_dict`` keys, ``save_pretrained`` and
``from_pretrained`` are unchanged, with or without the patch. ``save_pretrained`` is
refused once ``moekit.quantize`` or ``load_offloaded`` holds experts transformers could
not load back (``SaveGuard``).
"""

from __future__ import annotations

from torch import nn

from moekit.experts.experts import BACKEND_NAMES
from moekit.integrations.hf.architectures import OFFLOADABLE
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
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = SaveGuard(model)
    return model


def _held_by_moekit(model: nn.Module) -> tuple[str, str, int | None] | None:
    """(module name, "quantized" or "offloaded", bits) for the first module holding weights
    only moekit can run, or None."""
    from moekit.quant.tensor import QuantizedTensor  # noqa: PLC0415 (keeps import light)

    for name, m in model.named_modules():
        if isinstance(m, QuantizedTensor):
            return name, "quantized", m.bits
        if is_patched(m) and getattr(type(m), "_moekit_offloaded", False):
            return name, "offloaded", None
    return None


# Why transformers could not take a model back (revert) or load its save_pretrained
# checkpoint (save), by what holds the weights: "{name} holds " + this
_HELD = {
    ("revert", "quantized"): "int{bits} weights from moekit.quantize, which transformers' "
                             "modules cannot run; reload the unquantized checkpoint instead",
    ("revert", "offloaded"): "experts streamed from disk by load_offloaded (not in memory); "
                             "load the checkpoint with from_pretrained instead",
    ("save", "quantized"): "int{bits} weights from moekit.quantize, which from_pretrained does "
                           "not read (it would fill those weights at random); save the model "
                           "before quantizing and quantize it again after loading{offloaded}",
    ("save", "offloaded"): "experts streamed from disk by load_offloaded, which would not be "
                           "written (a checkpoint without experts); the directory "
                           "load_offloaded read is the checkpoint: copy it, or load it with "
                           "from_pretrained and save that",
}


def _why_not(action: str, model: nn.Module) -> str | None:
    """Why transformers could not take ``model`` back (``action`` "revert": its own modules
    could not run it) or load what ``save_pretrained`` writes ("save"), or None."""
    held = _held_by_moekit(model)
    if held is None:
        return None
    name, kind, bits = held
    # load_offloaded reads only OFFLOADABLE types: GPT-OSS's message had named it, which
    # then refused the checkpoint ("model_type='gpt_oss' is not supported for offloading")
    offloaded = (f", or load the float checkpoint with load_offloaded(path, expert_memory, "
                 f"quantize={bits})" if _model_type(model) in OFFLOADABLE else "")
    return f"{name} holds " + _HELD[action, kind].format(bits=bits, offloaded=offloaded)


class SaveGuard:
    """``model.save_pretrained`` of a model ``apply`` patched: transformers' own, refused
    (ValueError, nothing written) while quantized or offloaded experts would make the
    checkpoint unloadable. An instance attribute (the model's class is unchanged); a
    module-level class so ``torch.save(model)`` and ``copy.deepcopy`` keep it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        reason = _why_not("save", self.model)
        if reason is not None:
            raise ValueError("model.save_pretrained would write a checkpoint that transformers "
                             f"cannot load back: {reason}")
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def revert(model: nn.Module) -> nn.Module:
    """Undo ``apply``: every patched module gets its transformers class back; returns ``model``.

    Refused (ValueError, nothing changed) for a model with quantized or offloaded experts:
    the transformers classes would hold weights they cannot use.
    """
    _check_module(model)
    reason = _why_not("revert", model)
    if reason is not None:
        raise ValueError(f"model cannot be reverted to transformers' modules: {reason}")
    for m in model.modules():
        if is_patched(m):
            unpatch_module(m)
    if isinstance(model.__dict__.get("save_pretrained"), SaveGuard):
        del model.save_pretrained
    return model


def load_offloaded(path, expert_memory, quantize=None, **kwargs) -> nn.Module:
    """A transformers MoE checkpoint whose experts are read on demand within a byte budget.

    See ``moekit.integrations.hf.offload.load_offloaded`` (imported on first use).
    """
    from moekit.integrations.hf.offload import load_offloaded as load

    return load(path, expert_memory, quantize=quantize, **kwargs)
