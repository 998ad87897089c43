"""Autograd Functions and torch.library custom ops (with fake implementations).

``grouped_mm`` and ``moe_experts`` (the fused CPU expert path, whose GEMMs run
in the C++ extension that ``cpu_ext`` builds on first use) need only torch;
``experts`` and ``routing`` wrap the Triton kernels of ``moekit.kernels`` and
import triton.
"""
