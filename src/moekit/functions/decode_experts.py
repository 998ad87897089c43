"""The routed and shared experts' rows on the decode kernels: few rows, only the touched
experts, no autograd.

Two C++ calls per layer (``moekit/csrc/cpu_decode.cpp``), each one parallel region:
gate+up with the activation fused, then the down projection with the weighted combine
fused (``decode_rows``; ``decode_rows_list`` on per-expert weight lists, ``topk_rows`` on a
router's top-k choice in one call, ``shared_rows`` for shared experts). Weights are plain
fp32 / bf16 stacks in either layout (moekit's [E, D, G] or transformers' transposed views)
or ``QuantizedTensor`` (int8 / int4, dequantized inside the kernel). Activations without a
kernel epilogue (any callable that is not one of moekit's five kinds) run in Python between
the two calls. The names stay importable from ``moekit.functions.decode``, and callers
elsewhere call them as ``decode.X`` (tests patch them there).

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations else F,
E experts, K experts per token, S routed rows sorted by expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moekit.functions.decode_args import (
    ActFn,
    all_rows,
    f32,
    kernels_for,
    list_args,
    plain_f32,
    wargs,
)
from moekit.quant.tensor import QuantizedTensor


def decode_rows(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                w_in: Tensor | QuantizedTensor, w_out: Tensor | QuantizedTensor,
                b_in_EG: Tensor | None, b_out_ED: Tensor | None, act: ActFn,
                spec: tuple[str, float, float] | None) -> Tensor:
    """y_TD = sum over the kept rows r (sorted by expert, ``offsets_E`` their ends) of
    weight_S[r] * expert_e(x_TD[token_S[r]]); output in x's dtype.

    ``spec`` = (activation kind, swiglu_limit, swiglu_alpha) when ``act`` is one the
    kernel knows; None runs ``act`` in Python on the fp32 gate+up output.
    """
    ext, code, limit, alpha = kernels_for(spec)
    # conversions only where needed: every Python-side op of a decode step runs right
    # after a weight stream has evicted its code and data (~0.1 ms for the first one)
    x = plain_f32(x_TD)
    h = ext.gate_up(x, token_S, offsets_E, *wargs(w_in), f32(b_in_EG), code, limit, alpha)
    if code == 0:
        h = act(h).float().contiguous()
    out = torch.empty_like(x)
    ext.down_combine(h, token_S, plain_f32(weight_S), offsets_E, *wargs(w_out),
                     f32(b_out_ED), out)
    return out if x_TD.dtype == torch.float32 else out.to(x_TD.dtype)


def topk_rows(x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, num_experts: int,
              w_in: Tensor | QuantizedTensor, w_out: Tensor | QuantizedTensor,
              b_in_EG: Tensor | None, b_out_ED: Tensor | None,
              spec: tuple[str, float, float]) -> Tensor | None:
    """``decode_rows`` on a router's top-k choice [T, K] (``sort_topk``'s rows) in one C++
    call, the same bits; None where ``spec``'s activation is not one the kernels run (it
    would run in Python between the two kernels)."""
    ext, code, limit, alpha = kernels_for(spec)
    if code == 0:
        return None
    return ext.topk_experts(x_TD, experts_TK, weights_TK, num_experts, *wargs(w_in), b_in_EG,
                            code, limit, alpha, *wargs(w_out), b_out_ED)


def topk_rows_call(w_in: Tensor | QuantizedTensor, w_out: Tensor | QuantizedTensor,
                   b_in_EG: Tensor | None, b_out_ED: Tensor | None,
                   spec: tuple[str, float, float]) -> tuple[Callable, tuple] | None:
    """``topk_rows``' C++ call and its arguments after ``num_experts``, prepared once for a
    caller that makes it many times with the same weights (a patched transformers experts
    module: ``integrations.hf.experts_plan``): ``fn(x_TD, experts_TK, weights_TK,
    num_experts, *tail)`` is ``topk_rows``' call. None where ``topk_rows`` returns None (an
    activation the kernels do not run) or where ``wargs`` would copy a weight (a layout
    the kernels do not read): a copy held across calls would miss later weight updates."""
    ext, code, limit, alpha = kernels_for(spec)
    plain = [w for w in (w_in, w_out) if not isinstance(w, QuantizedTensor)]
    if code == 0 or any(w.stride(2) != 1 and w.stride(1) != 1 for w in plain):
        return None
    return ext.topk_experts, (*wargs(w_in), b_in_EG, code, limit, alpha, *wargs(w_out),
                              b_out_ED)


def decode_rows_list(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                     w_in: list[Tensor | QuantizedTensor], w_out: list[Tensor | QuantizedTensor],
                     b_in_EG: Tensor | None, b_out_ED: Tensor | None, act: ActFn,
                     spec: tuple[str, float, float] | None, out_TD: Tensor | None = None,
                     plan_experts: int = 0) -> Tensor:
    """``decode_rows`` with the weights as lists, one entry per entry of ``offsets_E``:
    a [K, N] tensor (either unit-stride layout) or a one-expert QuantizedTensor. No
    stacked copy; bitwise equal to ``decode_rows`` on the stacked weights.

    ``out_TD`` (fp32 [T, D]): add into it instead of returning a fresh tensor, so a
    step can run its experts in chunks (in expert order); ``plan_experts`` is then
    the step's total touched experts, which the kernels' K split depends on.
    Returns fp32 when ``out_TD`` is given, else x's dtype.
    """
    ext, code, limit, alpha = kernels_for(spec)
    x = plain_f32(x_TD)
    h = ext.gate_up_list(x, token_S, offsets_E, *list_args(w_in), f32(b_in_EG), code, limit,
                         alpha, plan_experts)
    if code == 0:
        h = act(h).float().contiguous()
    out = torch.empty_like(x) if out_TD is None else out_TD
    ext.down_combine_list(h, token_S, plain_f32(weight_S), offsets_E,
                          *list_args(w_out), f32(b_out_ED), out, out_TD is not None,
                          plan_experts)
    return out if out_TD is not None else out.to(x_TD.dtype)


def shared_rows(x_TD: Tensor, w_in: Tensor | QuantizedTensor, w_out: Tensor | QuantizedTensor,
                b_in_G: Tensor | None, b_out_D: Tensor | None, gate_1D: Tensor | None,
                spec: tuple[str, float, float]) -> Tensor:
    """Shared experts (one FFN every row goes through) on the decode kernels: gate+up with
    the activation fused, then the down projection whose combine weight is
    sigmoid(x @ gate) per row (Qwen2-MoE's shared-expert gate; 1 without one). ``w_in``
    [D, G] / ``w_out`` [F, D] float or [1, D, G] / [1, F, D] quantized; output in x's
    dtype. DecodeStep (csrc/cpu_decode.cpp) makes the same calls."""
    ext, code, limit, alpha = kernels_for(spec)
    x = plain_f32(x_TD)
    rows_T, ends_1 = all_rows(x.shape[0])
    w_in, w_out, b_in, b_out, gate_D1 = shared_args(w_in, w_out, b_in_G, b_out_D, gate_1D)
    h = ext.gate_up(x, rows_T, ends_1, *w_in, b_in, code, limit, alpha)
    weight_T = (torch.ones(x.shape[0]) if gate_D1 is None
                else torch.sigmoid(torch.mm(x, gate_D1)).view(-1))
    out = torch.empty_like(x)
    ext.down_combine(h, rows_T, weight_T, ends_1, *w_out, b_out, out)
    return out if x_TD.dtype == torch.float32 else out.to(x_TD.dtype)


def shared_args(w_in: Tensor | QuantizedTensor, w_out: Tensor | QuantizedTensor,
                b_in_G: Tensor | None, b_out_D: Tensor | None, gate_1D: Tensor | None
                ) -> tuple:
    """The kernel arguments ``shared_rows`` passes (and DecodePlan gives DecodeStep):
    the weights' as one expert, the biases [1, G] / [1, D] fp32, the gate [D, 1] fp32."""
    w_in = w_in if isinstance(w_in, QuantizedTensor) else w_in[None]
    w_out = w_out if isinstance(w_out, QuantizedTensor) else w_out[None]
    b_in, b_out = (None if b is None else f32(b[None]) for b in (b_in_G, b_out_D))
    return (wargs(w_in), wargs(w_out), b_in, b_out,
            None if gate_1D is None else f32(gate_1D).t())
