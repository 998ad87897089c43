"""Inference: the decode expert path (few routed rows, no autograd) and the generation
engine (static KV cache, batched generation) and the continuous batcher (sequences
that join and leave a running batch: ``moekit serve``).

The engine's names resolve on first use, so importing this package pulls in neither
the language model nor the kernels (the expert backends import from here too).
"""

from __future__ import annotations

import importlib

from moekit.inference.decode import decode_experts, sorted_rows

_LAZY = {
    "Engine": "moekit.inference.engine",
    "GenerationConfig": "moekit.inference.engine",
    "Generation": "moekit.inference.engine",
    "GenerationStats": "moekit.inference.engine",
    "ConcurrentUseError": "moekit.inference.concurrency",
    "ContextLengthError": "moekit.inference.engine",
    "EmptyPromptError": "moekit.inference.engine",
    "Batcher": "moekit.inference.batcher",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moekit.inference' has no attribute {name!r}")


__all__ = ["Batcher", "ConcurrentUseError", "ContextLengthError", "EmptyPromptError", "Engine",
           "Generation", "GenerationConfig", "GenerationStats", "decode_experts", "sorted_rows"]
