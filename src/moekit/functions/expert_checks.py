"""Argument checks of the fused expert entry points (``fused_experts``,
``fused_experts_into``): a ValueError naming the argument, its value and what is allowed,
before any block runs.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations else F,
E experts, S routed rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.config import reject
from moekit.functions.glu import FAST_KINDS
from moekit.routing.hashing import check_id_range


def _check_tensor(name: str, value: Any, dim: int) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}={type(value).__name__} is not allowed: it must be a "
                         f"{dim}-D torch.Tensor")
    if value.dim() != dim:
        reject(f"{name}.shape", tuple(value.shape), f"it must have {dim} dimensions")


def _check_weights(D: int, w_in: Tensor | list[Tensor], w_out: Tensor | list[Tensor],
                   b_in_EG: Tensor | None, b_out_ED: Tensor | None,
                   kind: str | None) -> int:
    """The number of experts E, after a ValueError for weights or biases that do not fit
    x's width D (a list of per-expert matrices: its length only; the kernels check each)."""
    if isinstance(w_in, Tensor):
        _check_tensor("w_in_EDG", w_in, 3)
        if w_in.shape[1] != D:
            reject("w_in_EDG.shape", tuple(w_in.shape),
                   f"it must be [E, D, G] with D=x_TD.shape[1]={D}")
        E, G = w_in.shape[0], w_in.shape[2]
        _check_tensor("w_out_EFD", w_out, 3)
        if (w_out.shape[0], w_out.shape[2]) != (E, D):
            reject("w_out_EFD.shape", tuple(w_out.shape), f"it must be [E, F, D] with "
                   f"E=w_in_EDG.shape[0]={E} and D=x_TD.shape[1]={D}")
        if kind in FAST_KINDS and G != 2 * w_out.shape[1]:
            raise ValueError(f"w_in_EDG.shape={tuple(w_in.shape)} with w_out_EFD.shape="
                             f"{tuple(w_out.shape)} is not allowed: kind={kind!r} needs "
                             "G = 2F (gate, then up)")
    else:
        E, G = len(w_in), (w_in[0].shape[-1] if len(w_in) else 0)
        if len(w_out) != E:
            reject("len(w_out_EFD)", len(w_out), f"it must be len(w_in_EDG) = {E}")
    for name, b, want in (("b_in_EG", b_in_EG, (E, G)), ("b_out_ED", b_out_ED, (E, D))):
        if b is not None and tuple(b.shape) != want:
            reject(f"{name}.shape", tuple(b.shape), f"it must be [E, {name[-1]}] = {want}")
    return E


def check_call(x_TD: Any, token_S: Any, weight_S: Any, offsets_E: Any,
                w_in: Tensor | list[Tensor], w_out: Tensor | list[Tensor],
                b_in_EG: Tensor | None, b_out_ED: Tensor | None, kind: str | None) -> list[int]:
    """``offsets_E`` read on the host, after a ValueError naming the argument for what the
    blocks would misread: offsets that decrease, start below 0, end past the rows (a
    negative one crashed the one-call forward) or miss experts (a short list ran fewer
    experts, silently), tensors of the wrong shape or dtype, and token ids outside x
    (read on CPU tensors only, outside torch.compile)."""
    _check_tensor("x_TD", x_TD, 2)
    if not x_TD.is_floating_point():
        reject("x_TD.dtype", x_TD.dtype, "it must be a floating dtype")
    _check_tensor("token_S", token_S, 1)
    if token_S.dtype not in (torch.int64, torch.int32):
        reject("token_S.dtype", token_S.dtype, "it must be torch.int64 or torch.int32")
    _check_tensor("weight_S", weight_S, 1)
    if weight_S.shape != token_S.shape:
        reject("weight_S.shape", tuple(weight_S.shape),
               f"it must be token_S.shape = {tuple(token_S.shape)}")
    E = _check_weights(x_TD.shape[1], w_in, w_out, b_in_EG, b_out_ED, kind)
    _check_tensor("offsets_E", offsets_E, 1)
    if offsets_E.is_floating_point() or offsets_E.is_complex() or offsets_E.dtype == torch.bool:
        reject("offsets_E.dtype", offsets_E.dtype, "it must be an integer dtype (int32, int64)")
    if offsets_E.shape[0] != E:
        reject("offsets_E.shape", tuple(offsets_E.shape),
               f"it must be ({E},), one end per expert of the weights")
    ends = offsets_E.tolist()
    S = token_S.shape[0]
    if any(b < a for a, b in zip([0, *ends[:-1]], ends, strict=True)) or (ends and ends[-1] > S):
        reject("offsets_E", ends, "the ends of each expert's rows must be non-decreasing "
               f"and lie in [0, token_S.shape[0]={S}]")
    if token_S.device.type == "cpu" and not torch.compiler.is_compiling():
        check_id_range("token_S", token_S[:ends[-1] if ends else 0], x_TD.shape[0],
                       "x_TD.shape[0]")
    return ends
