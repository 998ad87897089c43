"""Fused token-choice routing as custom ops, and a Dispatch built without a sort.

``fused_topk`` matches ``moekit.routing.token_choice.softmax_topk`` /
``sigmoid_topk`` (without expert groups): same experts, weights and scores,
with gradients to the logits through both the weights and the scores.
``fused_dispatch`` also places the pairs by expert with a stable counting sort
on the device and returns the ``Dispatch`` the experts consume (dropless).

Shape letters: T tokens, E experts, K experts per token, C token chunks,
S = T*K routed rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import (
    MAX_SCALING,
    check_bool,
    check_choice,
    check_int_range,
    check_number,
    reject,
)
from moekit.dispatch.plan import Dispatch
from moekit.kernels import routing
from moekit.kernels.common import INTERPRET


@torch.library.custom_op("moekit::fused_route", mutates_args=())
def fused_route(logits_TE: Tensor, bias_E: Tensor | None, top_k: int, score: str,
                renormalize: bool, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(experts_TK int32, weights_TK fp32, scores_TE fp32, hist_CE int32)."""
    return routing.route_forward(logits_TE, bias_E, top_k, score, renormalize, scale)


@fused_route.register_fake
def _(logits_TE, bias_E, top_k, score, renormalize, scale):
    T, E = logits_TE.shape
    C = -(-T // routing.block_t(E, top_k))
    new = logits_TE.new_empty
    return (new(T, top_k, dtype=torch.int32), new(T, top_k, dtype=torch.float32),
            new(T, E, dtype=torch.float32), new(C, E, dtype=torch.int32))


@torch.library.custom_op("moekit::fused_route_bwd", mutates_args=())
def fused_route_bwd(logits_TE: Tensor, experts_TK: Tensor, dweights_TK: Tensor,
                    dscores_TE: Tensor, score: str, renormalize: bool, scale: float) -> Tensor:
    return routing.route_backward(logits_TE, experts_TK, dweights_TK, dscores_TE, score,
                                  renormalize, scale)


@fused_route_bwd.register_fake
def _(logits_TE, experts_TK, dweights_TK, dscores_TE, score, renormalize, scale):
    return torch.empty_like(logits_TE, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    logits_TE, _, _, score, renormalize, scale = inputs
    ctx.save_for_backward(logits_TE, output[0])
    ctx.score, ctx.renormalize, ctx.scale = score, renormalize, scale


def _backward(ctx, d_experts, dweights_TK, dscores_TE, d_hist):
    logits_TE, experts_TK = ctx.saved_tensors
    dweights_TK = torch.zeros_like(experts_TK, dtype=torch.float32) if dweights_TK is None \
        else dweights_TK.float().contiguous()
    dscores_TE = torch.zeros_like(logits_TE, dtype=torch.float32) if dscores_TE is None \
        else dscores_TE.float().contiguous()
    dlogits_TE = fused_route_bwd(logits_TE, experts_TK, dweights_TK, dscores_TE, ctx.score,
                                 ctx.renormalize, ctx.scale)
    # logits_TE, bias_E (selection only: no gradient), top_k, score, renormalize, scale
    return dlogits_TE.to(logits_TE.dtype), None, None, None, None, None


fused_route.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("moekit::place_by_expert", mutates_args=())
def place_by_expert(experts_TK: Tensor, start_CE: Tensor) -> Tensor:
    """order_S: the pair index (t*K + k) at each expert-sorted row, stable in t*K + k."""
    return routing.place(experts_TK, start_CE)


@place_by_expert.register_fake
def _(experts_TK, start_CE):
    return experts_TK.new_empty(experts_TK.numel(), dtype=torch.int64)


def _check(logits_TE: Tensor, top_k: int, score: str, bias_E: Tensor | None,
           renormalize: bool, scale: float) -> None:
    """Shapes, dtypes and Python values only (no tensor values: that would synchronise with
    the GPU). The kernel reads bias_E[e] for every expert e, unchecked: a shorter bias was
    read past its end, silently."""
    check_choice("score", score, tuple(routing.SCORE_IDS))
    if not isinstance(logits_TE, Tensor):
        raise ValueError(f"logits_TE={type(logits_TE).__name__} is not allowed: it must be a "
                         "[T, E] torch.Tensor")
    if logits_TE.dim() != 2:
        reject("logits_TE.shape", tuple(logits_TE.shape), "logits must be [T, E]")
    E = logits_TE.shape[-1]
    check_int_range("top_k", top_k, 1, E)  # a bool or 2.0 was taken as an expert count
    if bias_E is not None:
        if not isinstance(bias_E, Tensor):
            raise ValueError(f"bias_E={type(bias_E).__name__} is not allowed: it must be None "
                             "or an [E] torch.Tensor")
        if tuple(bias_E.shape) != (E,):
            reject("bias_E.shape", tuple(bias_E.shape), f"it must be (E,) = ({E},)")
    check_bool("renormalize", renormalize)
    check_number("scale", scale, 0, MAX_SCALING, low_open=True)  # as routed_scaling_factor
    if not logits_TE.is_cuda and not INTERPRET:
        raise ValueError(f"logits_TE.device={logits_TE.device} is not allowed: the Triton "
                         "router needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         "moekit.kernels is imported")


def fused_topk(logits_TE: Tensor, top_k: int, score: str = "softmax", *,
               bias_E: Tensor | None = None, renormalize: bool = True, scale: float = 1.0
               ) -> tuple[Tensor, Tensor, Tensor]:
    """(experts_TK int64, weights_TK fp32, scores_TE fp32) in one kernel.

    score "softmax": scores are the softmax over all experts; "sigmoid": the
    per-expert sigmoids (DeepSeek-V3; normalise them yourself for a distribution).
    ``bias_E`` shifts the selection only. Ties go to the lower expert index.
    """
    experts_TK, weights_TK, scores_TE, _ = _route(logits_TE, top_k, score, bias_E,
                                                  renormalize, scale)
    return experts_TK.long(), weights_TK, scores_TE


def _route(logits_TE, top_k, score, bias_E, renormalize, scale):
    _check(logits_TE, top_k, score, bias_E, renormalize, scale)
    bias = None if bias_E is None else bias_E.float().contiguous()
    return fused_route(logits_TE.float().contiguous(), bias, top_k, score, renormalize,
                       float(scale))


def fused_dispatch(logits_TE: Tensor, top_k: int, score: str = "softmax", *,
                   bias_E: Tensor | None = None, renormalize: bool = True, scale: float = 1.0
                   ) -> tuple[Dispatch, Tensor, Tensor]:
    """(Dispatch, experts_TK int64, scores_TE): routing plus a dropless expert-sorted plan.

    Equals ``sort_by_expert`` of the same plan with ``capacity=None``: rows of
    each expert in token-major pair order. ``weight_S`` carries the gradient.
    """
    experts_TK, weights_TK, scores_TE, hist_CE = _route(logits_TE, top_k, score, bias_E,
                                                        renormalize, scale)
    counts_E = hist_CE.sum(0, dtype=torch.int64)
    offsets_E = torch.cumsum(counts_E, 0)
    # row where chunk c's first pair for expert e goes: expert start + earlier chunks' pairs
    start_CE = torch.cumsum(hist_CE, 0, dtype=torch.int64) - hist_CE + (offsets_E - counts_E)
    order_S = place_by_expert(experts_TK, start_CE.to(torch.int32))
    dispatch = Dispatch(token_S=order_S // top_k,
                        weight_S=weights_TK.reshape(-1).index_select(0, order_S),
                        counts_E=counts_E, offsets_E=offsets_E.to(torch.int32),
                        assigned_E=counts_E)
    return dispatch, experts_TK.long(), scores_TE
