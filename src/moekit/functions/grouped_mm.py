"""``moekit::grouped_mm``: torch._grouped_mm as a custom op that compiles in fp32.

PyTorch 2.13's meta kernel for ``aten._grouped_mm`` accepts only bf16, so
``torch.compile`` cannot trace the fp32 CPU path through it; these ops hide
the calls behind fake implementations and spell out the backward with them.

Shape letters: S rows sorted by group, D input width, N output width, E groups.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import reject


def _check(x_SD: Tensor, w_EDN: Tensor, offsets_E: Tensor) -> None:
    """Shapes and dtypes only (free). A 2-D weight made torch._grouped_mm group along D
    instead and return [E, S, N], silently, where the fake kernel promised [S, N]."""
    if x_SD.dim() != 2:
        reject("x_SD.shape", tuple(x_SD.shape), "it must be 2-D [S, D]")
    if w_EDN.dim() != 3 or w_EDN.shape[1] != x_SD.shape[1]:
        reject("w_EDN.shape", tuple(w_EDN.shape),
               f"it must be 3-D [E, D, N] with D=x_SD.shape[1]={x_SD.shape[1]}")
    if offsets_E.dtype != torch.int32:
        reject("offsets_E.dtype", offsets_E.dtype, "it must be torch.int32")
    if tuple(offsets_E.shape) != (w_EDN.shape[0],):
        reject("offsets_E.shape", tuple(offsets_E.shape),
               f"it must be (E,) = ({w_EDN.shape[0]},), one end per expert")


@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def grouped_mm(x_SD: Tensor, w_EDN: Tensor, offsets_E: Tensor) -> Tensor:
    """Row block e of x (ending at offsets_E[e]) times w_EDN[e]; offsets int32."""
    _check(x_SD, w_EDN, offsets_E)
    return torch._grouped_mm(x_SD, w_EDN, offs=offsets_E)


@grouped_mm.register_fake
def _(x_SD: Tensor, w_EDN: Tensor, offsets_E: Tensor) -> Tensor:
    _check(x_SD, w_EDN, offsets_E)
    return x_SD.new_empty(x_SD.shape[0], w_EDN.shape[-1])


@torch.library.custom_op("moekit::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x_SD: Tensor, grad_SN: Tensor, offsets_E: Tensor) -> Tensor:
    """Per group e: x[rows of e]^T @ grad[rows of e], [E, D, N]; zero for empty groups."""
    return torch._grouped_mm(x_SD.t(), grad_SN, offs=offsets_E)


@grouped_mm_weight_grad.register_fake
def _(x_SD: Tensor, grad_SN: Tensor, offsets_E: Tensor) -> Tensor:
    return x_SD.new_empty(offsets_E.shape[0], x_SD.shape[1], grad_SN.shape[1])


def _setup(ctx, inputs, output) -> None:
    x_SD, w_EDN, offsets_E = inputs
    ctx.save_for_backward(x_SD, w_EDN, offsets_E)


def _backward(ctx, grad_SN: Tensor):
    x_SD, w_EDN, offsets_E = ctx.saved_tensors
    grad_SN = grad_SN.contiguous()  # the kernel rejects broadcast (stride-0) gradients
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = grouped_mm(grad_SN, w_EDN.transpose(-2, -1), offsets_E)
    if ctx.needs_input_grad[1]:
        grad_w = grouped_mm_weight_grad(x_SD, grad_SN, offsets_E)
    return grad_x, grad_w, None  # x, w, offsets


grouped_mm.register_autograd(_backward, setup_context=_setup)
