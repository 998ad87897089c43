"""Decode-time expert compute: ``decode_experts`` from a router's top-k choice.

The same kernels serve the "decode" expert backend, which ``backend="auto"``
picks on CPU when autograd is off and a layer has few routed rows (see
``moekit.experts.backends.DECODE_MAX_ROWS``); this function is the direct entry
for engines and offloading code that hold the top-k choice themselves.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations
else F, E experts, K experts per token, S = T*K routed rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.config import GLU_ACTIVATIONS, check_positive_int, reject
from moekit.dispatch.plan import Dispatch
from moekit.experts.activations import activate
from moekit.experts.backends import decode_experts as _decode_backend
from moekit.quant.tensor import QuantizedTensor
from moekit.routing.hashing import check_id_range, check_integer_tensor

ACTIVATIONS = ("swiglu", "geglu", "swiglu_oai", "relu2", "gelu")


def sorted_rows(experts_TK: Tensor, weights_TK: Tensor, num_experts: int) -> Dispatch:
    """The (token, expert) pairs sorted by expert (stable: token order within an expert)."""
    check_positive_int("num_experts", num_experts)
    _check_routing(experts_TK, weights_TK, None, num_experts, "num_experts")
    return _sorted_rows(experts_TK, weights_TK, num_experts)


def _sorted_rows(experts_TK: Tensor, weights_TK: Tensor, num_experts: int) -> Dispatch:
    T, K = experts_TK.shape
    expert_S = experts_TK.reshape(-1)
    order_S = torch.argsort(expert_S, stable=True)
    counts_E = torch.bincount(expert_S, minlength=num_experts)
    token_S = torch.arange(T, device=experts_TK.device).repeat_interleave(K)
    return Dispatch(token_S=token_S[order_S], weight_S=weights_TK.reshape(-1)[order_S].float(),
                    counts_E=counts_E, offsets_E=torch.cumsum(counts_E, 0).to(torch.int32),
                    assigned_E=counts_E)


class _Act:
    """A named activation the kernels fuse (``moekit.config.MoEConfig.activation``)."""

    def __init__(self, kind: str, limit: float, alpha: float) -> None:
        if kind not in ACTIVATIONS:
            raise ValueError(f"activation={kind!r} is not allowed: it must be one of "
                             f"{', '.join(ACTIVATIONS)} or a callable")
        self.kind, self.swiglu_limit, self.swiglu_alpha = kind, limit, alpha
        self.activation = kind  # so that activate(h, self) reads it like an MoEConfig

    def __call__(self, h_SG: Tensor) -> Tensor:
        return activate(h_SG, self)


def decode_experts(x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor,
                   w_in: Tensor | QuantizedTensor, w_out: Tensor | QuantizedTensor,
                   b_in: Tensor | None = None, b_out: Tensor | None = None,
                   activation="swiglu", swiglu_limit: float = 7.0,
                   swiglu_alpha: float = 1.702) -> Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * expert_{experts_TK[t, k]}(x_TD[t]), no autograd.

    ``w_in`` [E, D, G] / ``w_out`` [E, F, D]: fp32 or bf16 tensors (any layout with a
    unit stride along D or G, e.g. transformers' transposed views) or
    ``QuantizedTensor`` (``moekit.quantize``). ``activation``: one of ACTIVATIONS
    (fused into the kernel) or any callable on the [S, G] gate+up output.
    """
    act = activation if callable(activation) else _Act(activation, swiglu_limit, swiglu_alpha)
    _check_args(x_TD, experts_TK, weights_TK, w_in, w_out, b_in, b_out, activation)
    d = _sorted_rows(experts_TK, weights_TK, w_in.shape[0])
    with torch.no_grad():
        return _decode_backend(x_TD, d, w_in, w_out, b_in, b_out, act)


def _shape(t: Any) -> tuple | str:
    return tuple(t.shape) if isinstance(t, (Tensor, QuantizedTensor)) else type(t).__name__


def _check_args(x_TD: Any, experts_TK: Any, weights_TK: Any, w_in: Any, w_out: Any,
                b_in: Any, b_out: Any, activation: Any) -> None:
    """Shapes and dtypes of decode_experts' arguments, and the expert ids on CPU tensors
    (reading them on CUDA would sync the host): before any work. Without them a routing
    table of T - 1 rows left the last token's output 0, combine weights of another shape
    were paired with the wrong experts, and integer activations came back truncated."""
    if not isinstance(x_TD, Tensor) or x_TD.dim() != 2 or not x_TD.is_floating_point():
        reject("x_TD", f"{_shape(x_TD)} {getattr(x_TD, 'dtype', '')}".strip(),
               "it must be a floating-point [T, D] tensor")
    T, D = x_TD.shape
    _check_routing(experts_TK, weights_TK, T)
    for name, w in (("w_in", w_in), ("w_out", w_out)):
        if not isinstance(w, (Tensor, QuantizedTensor)) or len(w.shape) != 3:
            reject(name, _shape(w), "it must be a 3-D tensor or QuantizedTensor "
                   f"({'[E, D, G]' if name == 'w_in' else '[E, F, D]'})")
    E, _, G = w_in.shape
    if w_in.shape[1] != D:
        reject("w_in.shape", tuple(w_in.shape), f"it must be [E, D, G] with D = "
               f"x_TD.shape[1] = {D}")
    # G = 2F (gate and up halves) for a named GLU; a callable maps G to w_out's F itself
    glu = isinstance(activation, str) and activation in GLU_ACTIVATIONS
    F = G // 2 if glu else G
    want = (E, F, D) if not callable(activation) else (E, w_out.shape[1], D)
    if tuple(w_out.shape) != want or (glu and G % 2):
        reject("w_out.shape", tuple(w_out.shape),
               f"it must be [E, F, D] = {list(want)} for w_in {list(w_in.shape)}"
               + (f" and activation={activation!r} (G = 2F)" if glu else ""))
    for name, b, shape in (("b_in", b_in, (E, G)), ("b_out", b_out, (E, D))):
        if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != shape):
            reject(f"{name}.shape", _shape(b), f"it must be None or {list(shape)}")
    if experts_TK.device.type == "cpu":
        check_id_range("experts_TK", experts_TK, E, "num_experts (w_in.shape[0])")


def _check_routing(experts_TK: Any, weights_TK: Any, T: int | None, E: int | None = None,
                   what: str = "") -> None:
    """experts_TK an integer [T, K] tensor (T = x_TD's rows where given), weights_TK a
    float tensor of its shape; with E, the ids in [0, E) (read on CPU tensors only)."""
    check_integer_tensor("experts_TK", experts_TK)
    if experts_TK.dim() != 2 or (T is not None and experts_TK.shape[0] != T):
        reject("experts_TK.shape", tuple(experts_TK.shape), "it must be [T, K]"
               + (f" with T = x_TD.shape[0] = {T}" if T is not None else ""))
    if not isinstance(weights_TK, Tensor) or not weights_TK.is_floating_point() \
            or weights_TK.shape != experts_TK.shape:
        reject("weights_TK", f"{_shape(weights_TK)} {getattr(weights_TK, 'dtype', '')}".strip(),
               f"it must be a floating-point tensor of experts_TK's shape "
               f"{tuple(experts_TK.shape)}")
    if E is not None and experts_TK.device.type == "cpu":
        check_id_range("experts_TK", experts_TK, E, what)
