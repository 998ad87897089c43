"""Small modules the MoE language model is built of: ``Linear`` (an ``nn.Linear`` whose
few-row inference runs on the decode kernel), ``RMSNorm``, the dense SwiGLU ``DenseFFN``,
and the generation step's fused residual-add + norm helpers (``first_norm``, ``add_norm``).

Shape letters: T rows, K input features (``Linear``), A dense FFN hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.functions import decode


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state_dict) whose few-row inference (decode,
    no autograd, CPU) runs on the decode kernel: one [1024 -> 3072] projection at 1
    row takes 0.65x (fp32) / 0.46x (bf16) the time of torch's GEMM (see
    ``functions/decode.py``), the bias added after it. Everything else is ``F.linear``."""

    def forward(self, x: Tensor) -> Tensor:
        x_TK = x.reshape(-1, x.shape[-1])
        if decode.dense_kernel_ok(x, self.weight, x_TK.shape[0]):
            y = decode.dense_rows(x_TK, self.weight[None].transpose(1, 2))
            if self.bias is not None:  # as QuantizedLinear adds it (DecodePlan: the same)
                y = y + self.bias.to(y.dtype)
            return y.view(*x.shape[:-1], y.shape[-1])
        return super().forward(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and not decode.grad_wanted(x, self.weight):
            # one op instead of seven: generation runs 2 per layer + 1 per step (and a
            # frozen model with grad mode on: no_grad's output, not the seven ops')
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in fp32: under bf16 autocast the mean of squares loses ~3 digits
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class DenseFFN(nn.Module):
    """SwiGLU with hidden size A; ``w_in`` is [gate | up] like the MoE experts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_in = Linear(dim, 2 * hidden, bias=False)
        self.w_out = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


def first_norm(x: Tensor, norm: RMSNorm) -> Tensor:
    """norm(x) for a generation step: for a decode step's rows the rms_norm kernel
    (torch's fused rms_norm of one row took ~15 us hot and ~60 inside a step, after the
    weights' stream; the kernel ~2 hot), else the module."""
    if decode.add_norm_ok(x, norm.weight):
        return decode.rms_norm(x, norm.weight, norm.eps)
    return norm(x)


def add_norm(x: Tensor, y: Tensor, norm: RMSNorm) -> tuple[Tensor, Tensor]:
    """(x + y, norm(x + y)): one C++ call for a decode step's few rows."""
    if decode.add_norm_ok(x, norm.weight, y):
        return decode.add_rms_norm(x, y, norm.weight, norm.eps)
    x = x + y
    return x, norm(x)
