"""Weight-only int8 / int4 quantization for inference (``moekit.quantize``): routed
experts, and by default the dense projections too (``quant/linear.py``).

``QuantizedTensor`` holds packed integers, scales and zero points in place of an
expert weight stack; the decode kernels (``moekit/csrc/cpu_decode.cpp``) read it
directly; prefill dequantizes inside its GEMMs' packing (fp32 SwiGLU experts on
AVX-512F CPUs: ``swiglu_experts_q_out`` in ``moekit/csrc/cpu_experts.cpp``) or a block
of experts at a time. Checkpoints:
``save_quantized`` / ``load_quantized`` (safetensors), or ``moekit quantize``.
"""

from moekit.quant.tensor import QuantizationError, QuantizedTensor, quantize_tensor

__all__ = ["QuantizationError", "QuantizedTensor", "is_quantized", "is_quantized_checkpoint",
           "load_model", "load_quantized", "quantize", "quantize_checkpoint", "quantize_tensor",
           "save_quantized", "set_expert_layout"]

# the experts package imports QuantizedTensor from here, and quantize() walks Experts
# modules (and the checkpoint functions build the language model): load those on use
_LAZY = {"quantize": "model", "is_quantized": "model", "is_quantized_checkpoint": "io",
         "load_model": "io", "load_quantized": "io", "save_quantized": "io",
         "quantize_checkpoint": "io", "set_expert_layout": "model"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"moekit.quant.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moekit.quant' has no attribute {name!r}")
