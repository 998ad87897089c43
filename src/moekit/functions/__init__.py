"""Autograd functions and torch.library custom ops over moekit.kernels (needs triton)."""
