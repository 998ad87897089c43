"""``moekit.quantize``: weight-only quantization of a model's routed experts, in place.

Finds every moekit ``Experts`` module (``w_in`` / ``w_out``) and every transformers
experts module patched by ``moekit.integrations.hf.apply`` (``gate_up_proj`` /
``down_proj``), checks them all, then replaces each weight by a
``QuantizedTensor`` of the same logical shape. Biases, routers, attention,
embeddings and shared experts stay in floating point. Quantized experts run on
the "decode" backend (its kernels for few rows, block-wise dequantization +
the fused path for many) and have no backward.

Shape letters: E experts, D hidden, F expert hidden, G = 2F for GLU activations.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from moekit.experts.experts import Experts
from moekit.quant.tensor import (
    QuantizationError,
    QuantizedTensor,
    check_bits,
    check_divides,
    quantize_tensor,
)


@dataclass(frozen=True)
class _Target:
    """One weight to quantize: module.<attr>, its logical [E, K, N] view, its name."""

    module: nn.Module
    attr: str
    w_EKN: Tensor
    name: str


def _hf_view(module: nn.Module, attr: str) -> Tensor:
    w = getattr(module, attr)
    return w if getattr(module, "is_transposed", False) else w.transpose(1, 2)


def _targets(model: nn.Module) -> list[_Target]:
    from moekit.integrations.hf.experts import StackedExperts  # no transformers import

    out = []
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            pairs = [("w_in", m.w_in), ("w_out", m.w_out)]
        elif isinstance(m, StackedExperts):
            pairs = [(a, getattr(m, a) if isinstance(getattr(m, a), QuantizedTensor)
                      else _hf_view(m, a)) for a in ("gate_up_proj", "down_proj")]
        else:
            continue
        out += [_Target(m, a, w, f"{name}.{a}" if name else a) for a, w in pairs]
    return out


def _check(targets: list[_Target], group_size: int | None) -> None:
    if not targets:
        raise QuantizationError("the model has no moekit Experts module nor a transformers "
                                "experts module patched by moekit.integrations.hf.apply: "
                                "nothing to quantize")
    for t in targets:
        if isinstance(t.w_EKN, QuantizedTensor):
            raise QuantizationError(f"{t.name} is already quantized ({t.w_EKN.extra_repr()}): "
                                    "quantizing twice is not allowed; load the float model")
        check_divides(group_size, t.w_EKN.shape[1], f"the input dimension of {t.name}")


def quantize(model: nn.Module, bits: int = 8, group_size: int | None = None) -> nn.Module:
    """Quantize the routed experts of ``model`` in place and return it.

    ``bits=8``: int8, one scale per output channel (``group_size`` must be None).
    ``bits=4``: int4 with a scale and zero point per ``group_size`` (32, 64 or 128;
    default 64) inputs. Everything is checked before anything changes: bits=3, a
    group size that does not divide an input dimension, a model already quantized
    or without experts raise ``QuantizationError`` and leave the model untouched.
    """
    group_size = check_bits(bits, group_size)
    targets = _targets(model)
    _check(targets, group_size)
    quantized = [quantize_tensor(t.w_EKN, bits, group_size) for t in targets]
    for t, q in zip(targets, quantized, strict=True):
        delattr(t.module, t.attr)
        setattr(t.module, t.attr, q.to(t.w_EKN.device))
    return model


def quantize_like(model: nn.Module, bits: int, group_size: int | None) -> nn.Module:
    """Empty QuantizedTensors of the right shapes in place of the experts (for loading)."""
    group_size = check_bits(bits, group_size)
    targets = _targets(model)
    _check(targets, group_size)
    for t in targets:
        E, K, N = t.w_EKN.shape
        delattr(t.module, t.attr)
        setattr(t.module, t.attr, QuantizedTensor.empty(E, K, N, bits, group_size,
                                                        t.w_EKN.device))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedTensor) for m in model.modules())
