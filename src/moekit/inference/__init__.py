"""Inference: the generation engine (static KV cache, batched generation).

Names resolve on first use, so importing this package pulls in neither the
language model nor the kernels (the expert backends import from here too).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Engine": "moekit.inference.engine",
    "GenerationConfig": "moekit.inference.engine",
    "Generation": "moekit.inference.engine",
    "GenerationStats": "moekit.inference.engine",
    "ContextLengthError": "moekit.inference.engine",
    "EmptyPromptError": "moekit.inference.engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moekit.inference' has no attribute {name!r}")


__all__ = sorted(_LAZY)
