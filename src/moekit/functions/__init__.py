"""Autograd Functions and torch.library custom ops (with fake implementations).

``grouped_mm`` needs only torch; ``experts`` and ``routing`` wrap the Triton
kernels of ``moekit.kernels`` and import triton.
"""
