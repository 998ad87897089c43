"""Triton kernels and their launchers (no nn.Module, no autograd here).

Importing this package needs ``triton``. The kernels are decorated when the
module is imported, so ``TRITON_INTERPRET=1`` must be set before that import
for them to run on CPU tensors (the tests do this).

    grouped   gather-fused grouped GEMMs with the activation in the epilogue,
              the down projection with the weighted combine fused, and the
              backward kernels
    routing   fused scores + top-k + renormalisation + per-expert counts
"""
