"""Decode-time expert compute: ``decode_experts`` from a router's top-k choice.

The same kernels serve the "decode" expert backend, which ``backend="auto"``
picks on CPU when autograd is off and a layer has few routed rows (see
``moekit.experts.backends.DECODE_MAX_ROWS``); this function is the direct entry
for engines and offloading code that hold the top-k choice themselves.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations
else F, E experts, K experts per token, S = T*K routed rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.dispatch.plan import Dispatch
from moekit.experts.activations import activate
from moekit.experts.backends import decode_experts as _decode_backend
from moekit.quant.tensor import QuantizedTensor

ACTIVATIONS = ("swiglu", "geglu", "swiglu_oai", "relu2", "gelu")


def sorted_rows(experts_TK: Tensor, weights_TK: Tensor, num_experts: int) -> Dispatch:
    """The (token, expert) pairs sorted by expert (stable: token order within an expert)."""
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
    d = sorted_rows(experts_TK, weights_TK, w_in.shape[0])
    with torch.no_grad():
        return _decode_backend(x_TD, d, w_in, w_out, b_in, b_out, act)
