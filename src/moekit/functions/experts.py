"""Fused expert compute as ``torch.library`` custom ops with autograd and fake kernels.

Forward (two kernels): gather + up projection + activation, then the down
projection with the weighted combine scattered into the tokens. Backward (four
kernels): dA = dy[tok] @ W_out^T with the activation derivative, the combine
weight's gradient and the recomputed activation in its epilogue; dx by a
scatter GEMM against W_in^T; dW_in = x[tok]^T dh and dW_out = (weight * act)^T dy[tok]
(+ bias sums) per expert.

Only the pre-activation h_SG [S, G] is kept for backward; the activation
output a_SF is a forward temporary. The backward's first kernel recomputes it and
writes weight * act(h) [S, F], a backward temporary, so that dW_out's GEMM reads
plain rows instead of recomputing the activation in its inner loop (which kept
that loop's loads from being pipelined: 108-115 TFLOP/s against 250-275 for dW_in
on an H200, benchmarks/bench_triton_bwd.py, 2026-12-04).

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU kinds else
F, E experts, S routed rows sorted by expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import reject
from moekit.kernels import grouped
from moekit.kernels.common import ACT_IDS, GLU_ACTS, INTERPRET


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("moekit::fused_experts_fwd", mutates_args=())
def fused_experts_fwd(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                      w_in_EDG: Tensor, w_out_EFD: Tensor, b_in_EG: Tensor | None,
                      b_out_ED: Tensor | None, act: str, limit: float, alpha: float,
                      save_h: bool) -> tuple[Tensor, Tensor]:
    """(y_TD, h_SG): the combined expert output and, when ``save_h``, the pre-activations."""
    a_SF, h_SG = grouped.up_project(x_TD, token_S, offsets_E, w_in_EDG, b_in_EG, act, limit,
                                    alpha, save_h)
    y_TD = grouped.scatter_rows(a_SF, token_S, weight_S, offsets_E, w_out_EFD, b_out_ED,
                                x_TD.shape[0])
    return y_TD.to(x_TD.dtype), (h_SG if h_SG is not None else _empty(x_TD))


@fused_experts_fwd.register_fake
def _(x_TD, token_S, weight_S, offsets_E, w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, act, limit,
      alpha, save_h):
    y_TD = x_TD.new_empty(x_TD.shape[0], w_out_EFD.shape[2])
    h_SG = x_TD.new_empty(token_S.shape[0], w_in_EDG.shape[2]) if save_h else _empty(x_TD)
    return y_TD, h_SG


@torch.library.custom_op("moekit::fused_experts_bwd", mutates_args=())
def fused_experts_bwd(dy_TD: Tensor, x_TD: Tensor, token_S: Tensor, weight_S: Tensor,
                      offsets_E: Tensor, w_in_EDG: Tensor, w_out_EFD: Tensor,
                      b_in_EG: Tensor | None, b_out_ED: Tensor | None, h_SG: Tensor, act: str,
                      limit: float, alpha: float, need_x: bool, need_w: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx_TD, dweight_S, dw_in, dw_out, db_in, db_out); skipped ones are empty."""
    dh_SG, dweight_S, aw_SF = grouped.down_backward(dy_TD, token_S, weight_S, offsets_E,
                                                    w_out_EFD, b_out_ED, h_SG, act, limit,
                                                    alpha, store_aw=need_w)
    dx_TD = _empty(x_TD)
    if need_x:
        dx_TD = grouped.scatter_rows(dh_SG, token_S, None, offsets_E, w_in_EDG.transpose(1, 2),
                                     None, x_TD.shape[0]).to(x_TD.dtype)
    grads = [_empty(x_TD)] * 4
    if need_w:
        dw_in, db_in = grouped.weight_grad(x_TD, token_S, offsets_E, dh_SG, a_gather=True,
                                           b_gather=False, with_bias=b_in_EG is not None)
        # (weight * act(h))^T dy[tok]: the combine weight sits in the left operand, which
        # the backward's first kernel wrote, so both operands are plain loads
        dw_out, db_out = grouped.weight_grad(aw_SF, token_S, offsets_E, dy_TD, a_gather=False,
                                             b_gather=True, with_bias=b_out_ED is not None,
                                             bias_weight_S=weight_S)
        grads = [dw_in, dw_out, *(g if g is not None else _empty(x_TD) for g in (db_in, db_out))]
    return dx_TD, dweight_S, *grads


@fused_experts_bwd.register_fake
def _(dy_TD, x_TD, token_S, weight_S, offsets_E, w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, h_SG,
      act, limit, alpha, need_x, need_w):
    dx_TD = torch.empty_like(x_TD) if need_x else _empty(x_TD)
    dweight_S = weight_S.new_empty(token_S.shape[0], dtype=torch.float32)
    grads = [_empty(x_TD)] * 4
    if need_w:
        grads = [torch.empty_like(w_in_EDG), torch.empty_like(w_out_EFD),
                 *(torch.empty_like(b) if b is not None else _empty(x_TD)
                   for b in (b_in_EG, b_out_ED))]
    return dx_TD, dweight_S, *grads


def _setup_context(ctx, inputs, output) -> None:
    x_TD, token_S, weight_S, offsets_E, w_in, w_out, b_in, b_out, act, limit, alpha, _ = inputs
    ctx.save_for_backward(x_TD, token_S, weight_S, offsets_E, w_in, w_out, b_in, b_out,
                          output[1])
    ctx.act, ctx.limit, ctx.alpha = act, limit, alpha


def _backward(ctx, dy_TD: Tensor, _dh: Tensor):
    x_TD, token_S, weight_S, offsets_E, w_in, w_out, b_in, b_out, h_SG = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_w = any(need[i] for i in (4, 5, 6, 7))
    dx, dweight, dw_in, dw_out, db_in, db_out = fused_experts_bwd(
        dy_TD.contiguous(), x_TD, token_S, weight_S, offsets_E, w_in, w_out, b_in, b_out, h_SG,
        ctx.act, ctx.limit, ctx.alpha, need[0], need_w)
    return (dx if need[0] else None,  # x_TD
            None,  # token_S
            dweight.to(weight_S.dtype) if need[2] else None,  # weight_S
            None,  # offsets_E
            dw_in if need[4] else None, dw_out if need[5] else None,  # w_in, w_out
            db_in if need[6] else None, db_out if need[7] else None,  # b_in, b_out
            None, None, None, None)  # act, limit, alpha, save_h


fused_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_shapes(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                  w_in_EDG: Tensor, w_out_EFD: Tensor, b_in_EG: Tensor | None,
                  b_out_ED: Tensor | None, act: str) -> None:
    """Shapes and dtypes only (no values are read: that would synchronise with the GPU).

    The kernels index the biases by expert and column and the rows by token id, unchecked:
    a bias of the wrong shape read past its end (1e23 or NaN outputs, silently)."""
    for name, t in (("x_TD", x_TD), ("token_S", token_S), ("weight_S", weight_S),
                    ("offsets_E", offsets_E), ("w_in_EDG", w_in_EDG), ("w_out_EFD", w_out_EFD),
                    ("b_in_EG", b_in_EG), ("b_out_ED", b_out_ED)):
        if not isinstance(t, Tensor) and not (t is None and name.startswith("b_")):
            raise ValueError(f"{name}={type(t).__name__} is not allowed: it must be a "
                             "torch.Tensor")
    if not x_TD.is_floating_point():
        reject("x_TD.dtype", x_TD.dtype, "it must be a floating dtype")
    for name, t in (("token_S", token_S), ("offsets_E", offsets_E)):
        if t.dtype not in (torch.int64, torch.int32):
            reject(f"{name}.dtype", t.dtype, "it must be torch.int64 or torch.int32")
    if token_S.dim() != 1:
        reject("token_S.shape", tuple(token_S.shape), "it must be 1-D [S]")
    E, D, G = w_in_EDG.shape if w_in_EDG.dim() == 3 else (None, None, None)
    F = None if G is None else (G // 2 if act in GLU_ACTS else G)
    wants = [("x_TD.shape", tuple(x_TD.shape), (x_TD.shape[0] if x_TD.dim() else 0, D)),
             ("w_out_EFD.shape", tuple(w_out_EFD.shape), (E, F, D)),
             ("weight_S.shape", tuple(weight_S.shape), tuple(token_S.shape)),
             ("offsets_E.shape", tuple(offsets_E.shape), (E,))]
    wants += [(f"{name}.shape", tuple(b.shape), want)
              for name, b, want in (("b_in_EG", b_in_EG, (E, G)), ("b_out_ED", b_out_ED, (E, D)))
              if b is not None]
    if G is None or (act in GLU_ACTS and G % 2):
        raise ValueError(f"w_in_EDG.shape={tuple(w_in_EDG.shape)} is not allowed: it must be "
                         f"[E, D, G] with G = 2F (gate, then up) for act={act!r}")
    for name, got, want in wants:
        if got != want:
            raise ValueError(f"{name}={got} is not allowed: with w_in_EDG.shape="
                             f"{tuple(w_in_EDG.shape)} and act={act!r} it must be {want}")


def fused_experts(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                  w_in_EDG: Tensor, w_out_EFD: Tensor, b_in_EG: Tensor | None,
                  b_out_ED: Tensor | None, act: str = "swiglu", limit: float = 7.0,
                  alpha: float = 1.702) -> Tensor:
    """y_TD[token] += weight * (act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]).

    Rows are sorted by expert; ``offsets_E`` (int32) ends each expert's rows and
    rows past ``offsets_E[-1]`` are ignored. Weights and biases are cast to
    ``x_TD.dtype``; the combine accumulates in fp32.
    """
    if act not in ACT_IDS:
        raise ValueError(f"act={act!r} is not allowed: it must be one of {', '.join(ACT_IDS)}")
    _check_shapes(x_TD, token_S, weight_S, offsets_E, w_in_EDG, w_out_EFD, b_in_EG,
                  b_out_ED, act)
    if not x_TD.is_cuda and not INTERPRET:
        raise ValueError(f"x_TD.device={x_TD.device} is not allowed: the Triton experts need "
                         "CUDA tensors, or TRITON_INTERPRET=1 set before moekit.kernels is "
                         "imported")
    params = [None if p is None else p.to(x_TD.dtype).contiguous()
              for p in (w_in_EDG, w_out_EFD, b_in_EG, b_out_ED)]
    tensors = (x_TD, weight_S, *params)
    save_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y_TD, _ = fused_experts_fwd(x_TD.contiguous(), token_S.contiguous(),
                                weight_S.float().contiguous(), offsets_E.to(torch.int32),
                                *params, act, float(limit), float(alpha), save_h)
    return y_TD
