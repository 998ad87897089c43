"""moekit's dispatch and expert backends run on a transformers experts module's own tensors.

transformers v5 stores experts as stacked tensors ``gate_up_proj`` [E, 2F, D] and
``down_proj`` [E, D, F] (``is_transposed``: [E, D, 2F] and [E, F, D]); experts
without a gate (NemotronH) hold ``up_proj`` [E, F, D] instead of ``gate_up_proj``.
moekit's backends want ``w_in`` [E, D, G] and ``w_out`` [E, F, D]; transposed views
give exactly that with no copy, so the Parameters, and the state_dict, stay
untouched. After ``moekit.quantize`` the two are ``QuantizedTensor`` modules of that
shape.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F (gate and up; F without
a gate), E experts, K experts per token, S routed rows (T*K).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.dispatch.plan import Dispatch
from moekit.experts.activations import swiglu_oai
from moekit.experts.backends import decode_experts, decode_topk_experts, grouped_mm_supported
from moekit.experts.experts import auto_backend_name, autocast_experts, resolve_backend
from moekit.functions import decode
from moekit.integrations.hf.experts_plan import PLAN_ATTR, current_plan, plan_may_run
from moekit.quant.tensor import QuantizedTensor


def dispatch_from_topk(experts_TK: Tensor, weights_TK: Tensor, num_experts: int,
                       keep_TK: Tensor | None = None) -> Dispatch:
    """Rows sorted by expert from a router's top-k choice; rows not kept go last, weight 0.

    Within an expert the rows keep token order (stable sort), so each token's
    outputs are summed in expert order, as transformers' eager loop sums them.
    """
    T, K = experts_TK.shape
    if keep_TK is None and decode.sort_topk_ok(experts_TK, weights_TK):
        token_S, weight_S, counts_E, offsets_E = decode.sort_topk(experts_TK, weights_TK,
                                                                  num_experts)
        return Dispatch(token_S=token_S, weight_S=weight_S, counts_E=counts_E,
                        offsets_E=offsets_E, assigned_E=counts_E)
    expert_S = experts_TK.reshape(-1)
    weight_S = weights_TK.reshape(-1)
    ones_S = torch.ones_like(expert_S)
    assigned_E = torch.zeros(num_experts, dtype=torch.long, device=expert_S.device)
    assigned_E.scatter_add_(0, expert_S, ones_S)
    if keep_TK is None:
        order_S = torch.argsort(expert_S, stable=True)
        counts_E = assigned_E
    else:
        keep_S = keep_TK.reshape(-1)
        order_S = torch.argsort(torch.where(keep_S, expert_S, num_experts), stable=True)
        counts_E = torch.zeros_like(assigned_E).scatter_add_(0, expert_S, keep_S.long())
        weight_S = torch.where(keep_S, weight_S, 0.0)
    token_S = torch.arange(T, device=expert_S.device).repeat_interleave(K)
    return Dispatch(token_S=token_S[order_S], weight_S=weight_S[order_S], counts_E=counts_E,
                    offsets_E=torch.cumsum(counts_E, 0).to(torch.int32), assigned_E=assigned_E,
                    capped=keep_TK is not None)


def run_experts(x_TD: Tensor, dispatch: Dispatch, w_in_EDG: Tensor, w_out_EFD: Tensor,
                b_in_EG: Tensor | None, b_out_ED: Tensor | None,
                act: Callable[[Tensor], Tensor], backend: str) -> Tensor:
    """The combined expert output [T, D] from moekit's chosen backend.

    "auto" with an activation that has no ``kind`` (GPT-OSS's interleaved clamped
    SwiGLU, Switch's ReLU + dropout) keeps to grouped_mm where it applies: a fused
    backend falls back to autograd on recomputed chunks for those, which measured
    0.58x transformers' grouped_mm at GPT-OSS E32 K4 against grouped_mm's 1.13x
    (benchmarks/bench_hf.py with the issue3 fused backend merged).
    """
    x_TD, (w_in_EDG, w_out_EFD, b_in_EG, b_out_ED) = autocast_experts(
        x_TD, (w_in_EDG, w_out_EFD, b_in_EG, b_out_ED))
    fn = experts_backend(x_TD, dispatch.num_rows, w_in_EDG, w_out_EFD, act, backend)
    return fn(x_TD, dispatch, w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, act)


def experts_backend(x_TD: Tensor, rows: int, w_in_EDG: Tensor, w_out_EFD: Tensor,
                    act: Callable[[Tensor], Tensor], backend: str) -> Callable[..., Tensor]:
    """The backend function ``run_experts`` runs for ``rows`` routed rows."""
    if (backend == "auto" and getattr(act, "kind", None) is None
            and auto_backend_name(x_TD, w_in_EDG, w_out_EFD, rows) != "decode"
            and grouped_mm_supported(x_TD, w_in_EDG, w_out_EFD)):
        backend = "grouped_mm"
    return resolve_backend(backend, x_TD, w_in_EDG, w_out_EFD, rows)


def run_experts_topk(x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, num_experts: int,
                     w_in_EDG: Tensor, w_out_EFD: Tensor, b_in_EG: Tensor | None,
                     b_out_ED: Tensor | None, act: Callable[[Tensor], Tensor],
                     backend: str) -> Tensor:
    """``run_experts`` on a router's top-k choice [T, K]: where it would run the decode
    kernels with an activation they know, the sort and both kernels in one C++ call
    (``backends.decode_topk_experts``, the same bits); else ``dispatch_from_topk``, then
    the backend. A patched OLMoE-class layer at batch 1 spent ~260-290 us outside its
    kernels (each torch op ~5-15 us after the experts' weights stream), ~125-160 us now.
    Under CPU autocast both take the autocast dtype, as transformers' ``F.linear`` experts
    do (they had stayed fp32: another result than the unpatched model's, bf16 kernels unused)."""
    x_TD, (w_in_EDG, w_out_EFD, b_in_EG, b_out_ED) = autocast_experts(
        x_TD, (w_in_EDG, w_out_EFD, b_in_EG, b_out_ED))
    fn = experts_backend(x_TD, experts_TK.numel(), w_in_EDG, w_out_EFD, act, backend)
    if fn is decode_experts:
        y_TD = decode_topk_experts(x_TD, experts_TK, weights_TK, num_experts, w_in_EDG,
                                   w_out_EFD, b_in_EG, b_out_ED, act)
        if y_TD is not None:
            return y_TD
    dispatch = dispatch_from_topk(experts_TK, weights_TK, num_experts)
    return fn(x_TD, dispatch, w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, act)


class GluAct:
    """``act_fn(gate) * up`` on the fused [gate | up] projection, gate first.

    ``kind`` is "swiglu" when ``act_fn`` is SiLU, so a fused moekit backend can use
    its closed-form SwiGLU backward; None (autograd) for anything else.
    """

    def __init__(self, act_fn: Callable[[Tensor], Tensor]) -> None:
        self.act_fn = act_fn
        silu = type(act_fn).__name__ in ("SiLU", "SiLUActivation") or act_fn is F.silu
        self.kind = "swiglu" if silu else None

    def __call__(self, h_SG: Tensor) -> Tensor:
        gate_SF, up_SF = h_SG.chunk(2, dim=-1)
        return self.act_fn(gate_SF) * up_SF


def interleaved_swiglu_oai(limit: float, alpha: float) -> Callable[[Tensor], Tensor]:
    """GPT-OSS stores gate and up interleaved (gate0, up0, gate1, ...) in one projection."""
    def act(h_SG: Tensor) -> Tensor:
        return swiglu_oai(h_SG[..., ::2], h_SG[..., 1::2], limit, alpha)
    return act


class PlainAct:
    """``act_fn(up)`` for experts without a gate (the projection is F wide).

    ``kind`` is "relu2" when ``act_fn`` is transformers' ``ReLUSquaredActivation``
    (relu(h)^2, as moekit's relu2 kernels compute it), so the decode kernels fuse it;
    None (run in Python between the two projections) for anything else.
    """

    def __init__(self, act_fn: Callable[[Tensor], Tensor]) -> None:
        self.act_fn = act_fn
        self.kind = "relu2" if type(act_fn).__name__ == "ReLUSquaredActivation" else None

    def __call__(self, h_SF: Tensor) -> Tensor:
        return self.act_fn(h_SF)


class StackedExperts:
    """Mixin for transformers' ``@use_experts_implementation`` experts classes.

    Same call as the original: ``(hidden_states [T, D], top_k_index [T, K],
    top_k_weights [T, K]) -> [T, D]``.
    """

    _moekit_backend: str = "auto"
    # the input and output stacks, by attribute name (moekit.quantize replaces them)
    _moekit_weights: tuple[str, str] = ("gate_up_proj", "down_proj")

    @staticmethod
    def _moekit_supports(module: object) -> bool:
        return supports_stacked(module)

    def _moekit_act(self) -> Callable[[Tensor], Tensor]:
        if not getattr(self, "is_concatenated", True):  # GPT-OSS
            return interleaved_swiglu_oai(self.limit, self.alpha)
        if type(self)._apply_gate.__name__ != "_default_apply_gate":  # the model's own gating
            return self._apply_gate
        return GluAct(self.act_fn)  # transformers' default: act_fn(gate) * up

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        # nothing to differentiate (frozen experts, grad mode on): no_grad's plan, backend
        # and kernels, so no_grad's output bit for bit (it took the fused GEMMs)
        with decode.no_grad_unless_wanted(hidden_states, top_k_weights, modules=(self,)):
            # a decode step: the one C++ call with arguments prepared once (experts_plan.py)
            if plan_may_run():
                y_TD = current_plan(self)(hidden_states, top_k_index, top_k_weights)
                if y_TD is not None:
                    return y_TD
            return self._moekit_forward(hidden_states, top_k_index, top_k_weights)

    def _moekit_forward(self, hidden_states: Tensor, top_k_index: Tensor,
                        top_k_weights: Tensor) -> Tensor:
        w_in, w_out = (getattr(self, a) for a in self._moekit_weights)
        # a QuantizedTensor (moekit.quantize) already has the [E, D, G] / [E, F, D] shape
        if not self.is_transposed and not isinstance(w_in, QuantizedTensor):
            w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
        b_in = self.gate_up_proj_bias if self.has_bias else None
        b_out = self.down_proj_bias if self.has_bias else None
        y_TD = run_experts_topk(hidden_states, top_k_index, top_k_weights, self.num_experts,
                                w_in, w_out, b_in, b_out, self._moekit_act(),
                                self._moekit_backend)
        # Tensor.to even to the same dtype: ~20 us at batch 1 right after the weights stream
        return y_TD if y_TD.dtype == hidden_states.dtype else y_TD.to(hidden_states.dtype)

    # The plan holds views of the weights: dropped where they may change, so that weights
    # replaced (quantize, .to, assign) are freed now; current_plan checks the rest per call.
    def _apply(self, fn, recurse=True):
        self.__dict__.pop(PLAN_ATTR, None)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop(PLAN_ATTR, None)
        return super()._load_from_state_dict(*args, **kwargs)

    def __setattr__(self, name: str, value: object) -> None:
        self.__dict__.pop(PLAN_ATTR, None)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self.__dict__.pop(PLAN_ATTR, None)
        super().__delattr__(name)


class UngatedExperts(StackedExperts):
    """Mixin for ``@use_experts_implementation(has_gate=False)`` classes (NemotronH):
    ``down(act(x @ up))``, ``up_proj`` [E, F, D] read as moekit's non-GLU ``w_in``
    [E, D, F] (the layout moekit's relu2 / gelu experts have)."""

    _moekit_weights = ("up_proj", "down_proj")

    @staticmethod
    def _moekit_supports(module: object) -> bool:
        return supports_ungated(module)

    def _moekit_act(self) -> Callable[[Tensor], Tensor]:
        return PlainAct(self.act_fn)


class Llama4Experts(StackedExperts):
    """Mixin for Llama 4's ``Llama4TextExperts`` (not a ``@use_experts_implementation``
    class): ``gate_up_proj`` [E, D, 2F] and ``down_proj`` [E, F, D] (the transposed layout),
    no biases, ``up * act(gate)``. transformers calls it on every token repeated E times;
    patched, it takes the routing (``StackedExperts``' call) from the patched block
    (``blocks.Llama4Block``), which only calls it that way."""

    is_transposed = True
    has_bias = False

    @staticmethod
    def _moekit_supports(module: object) -> bool:
        return hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")

    def _moekit_act(self) -> Callable[[Tensor], Tensor]:
        return GluAct(self.act_fn)


def supports_stacked(module: object) -> bool:
    """Whether a ``@use_experts_implementation`` module has a layout StackedExperts handles."""
    return (getattr(module, "has_gate", False) and not getattr(module, "has_post_expert_norm", True)
            and hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"))


def supports_ungated(module: object) -> bool:
    """Whether an experts module without a gate has the layout UngatedExperts handles
    (no biases: it would read ``up_proj_bias``, which no such family has yet)."""
    return (getattr(module, "has_gate", True) is False
            and not getattr(module, "has_post_expert_norm", True)
            and not getattr(module, "has_bias", True)
            and hasattr(module, "up_proj") and hasattr(module, "down_proj"))
