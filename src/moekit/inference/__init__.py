"""Inference: the decode expert path (few routed rows, no autograd)."""

from moekit.inference.decode import decode_experts, sorted_rows

__all__ = ["decode_experts", "sorted_rows"]
