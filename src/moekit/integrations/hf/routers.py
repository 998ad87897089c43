"""Router forwards for transformers MoE models, computed with moekit's routing functions.

Each mixin replaces the ``forward`` of one transformers router class and returns
exactly what the original returns (``router_logits`` first, which transformers
records for the model's load-balancing loss), in the same dtypes; tied scores go
where transformers' ``torch.topk`` sends them (``ties="topk"``; moekit's own layer
takes the lower index).

Shape letters: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.routing.token_choice import sigmoid_topk, softmax_over_topk, softmax_topk


def rows(hidden_states: Tensor, D: int) -> Tensor:
    """``hidden_states.reshape(-1, D)``; the tensor itself where it is [T, D] already (the
    MoE blocks hand their routers that: the reshape was a view op per call)."""
    if hidden_states.dim() == 2 and hidden_states.shape[1] == D:
        return hidden_states
    return hidden_states.reshape(-1, D)


class SoftmaxTopKRouter:
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over all E in fp32, keep the top K.

    Mixtral always renormalises the K weights and returns them in fp32; the
    Qwen/OLMoE routers renormalise only with ``norm_topk_prob`` and cast the
    weights back to the logits' dtype. A router without ``norm_topk_prob``
    (Mixtral, Qwen3.5-MoE, Qwen3-VL-MoE) always renormalises, Jamba's never.
    """

    _moekit_cast_weights = True
    _moekit_renormalize = True  # where the router has no norm_topk_prob

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_TD = rows(hidden_states, self.hidden_dim)
        logits_TE = F.linear(x_TD, self.weight)
        # the instance's own attribute (transformers sets it in __init__; no router class
        # defines one): getattr sent Mixtral's router, which has none, through
        # nn.Module.__getattr__ and an AttributeError on every call
        renormalize = self.__dict__.get("norm_topk_prob", self._moekit_renormalize)
        # casts only where the dtype changes: .float() / .to() of a tensor already in
        # that dtype return it, but each still went through the dispatcher
        f32_TE = logits_TE if logits_TE.dtype == torch.float32 else logits_TE.float()
        experts_TK, weights_TK, _ = softmax_topk(f32_TE, self.top_k, renormalize=renormalize,
                                                 ties="topk", probs=False)
        if self._moekit_cast_weights and weights_TK.dtype != logits_TE.dtype:
            weights_TK = weights_TK.to(logits_TE.dtype)
        return logits_TE, weights_TK, experts_TK


class MixtralRouter(SoftmaxTopKRouter):
    _moekit_cast_weights = False


class JambaRouter(SoftmaxTopKRouter):
    """Jamba: the top K of the softmax as they are (no renormalisation), cast back."""

    _moekit_renormalize = False


class SigmoidGroupRouter:
    """DeepSeek-V3: fp32 sigmoid scores; ``e_score_correction_bias`` shifts selection only;
    group-limited (groups scored by their two best experts); routed scaling. Also the
    routers that copy it line for line (GLM-4.5/4.6 MoE, Dots1, Kimi-Linear, ...:
    ``architectures.py``)."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_TD = hidden_states.view(-1, self.hidden_dim)
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        experts_TK, weights_TK, _ = sigmoid_topk(
            logits_TE, self.top_k, bias_E=self.e_score_correction_bias,
            renormalize=self.norm_topk_prob, num_groups=self.num_group,
            topk_groups=self.topk_group, scale=self.routed_scaling_factor, ties="topk")
        return logits_TE, weights_TK, experts_TK


class DeepseekV2Router:
    """DeepSeek-V2: softmax over E in fp32, the top K ("greedy", or "group_limited_greedy":
    within the ``topk_group`` groups whose best expert scores highest), not renormalised,
    times ``routed_scaling_factor``. Another ``topk_method`` runs transformers' forward."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            return super().forward(hidden_states)
        x_TD = hidden_states.view(-1, self.hidden_dim)
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        groups = self.num_group if self.topk_method == "group_limited_greedy" else 1
        experts_TK, weights_TK, _ = softmax_topk(
            logits_TE, self.top_k, renormalize=False, num_groups=groups,
            topk_groups=self.topk_group, scale=self.routed_scaling_factor, ties="topk")
        return logits_TE, weights_TK, experts_TK


class SigmoidBiasRouter:
    """MiniMax-M2, Step-3.7, MiniMax-M3-VL: fp32 sigmoid of the logits (computed in the
    weight's dtype), ``e_score_correction_bias`` for selection only (the block passes it
    to MiniMax-M2's router; the others hold it), the K chosen scores renormalised."""

    def forward(self, hidden_states: Tensor,
                e_score_correction_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if e_score_correction_bias is None:
            e_score_correction_bias = self.e_score_correction_bias
        logits_TE = self._moekit_logits(rows(hidden_states, self.hidden_dim))
        experts_TK, weights_TK, _ = sigmoid_topk(
            logits_TE.float(), self.top_k, bias_E=e_score_correction_bias,
            scale=self._moekit_scale(), ties="topk")
        return logits_TE, weights_TK, experts_TK

    def _moekit_logits(self, x_TD: Tensor) -> Tensor:
        return F.linear(x_TD.to(self.weight.dtype), self.weight)

    def _moekit_scale(self) -> float:
        return 1.0


class HYV3Router(SigmoidBiasRouter):
    """HY-V3: as MiniMax-M2 with fp32 logits, the weights times ``router_scaling_factor``."""

    def _moekit_logits(self, x_TD: Tensor) -> Tensor:
        return F.linear(x_TD.float(), self.weight.float())

    def _moekit_scale(self) -> float:
        return self.router_scaling_factor


class GraniteRouter:
    """GraniteMoE (and -Shared, -Hybrid, -SWA): fp32 logits, their top K, a softmax over
    those K, the weights cast to the input's dtype."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits_TE = F.linear(hidden_states, self.weight).float()
        experts_TK, weights_TK, _ = softmax_over_topk(logits_TE, self.top_k, ties="topk")
        return logits_TE, weights_TK.type_as(hidden_states), experts_TK


class GptOssRouter:
    """GPT-OSS (logits with a bias) and Aria (none): top K of the logits, softmax over
    those K only, in the logits' dtype."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits_TE = F.linear(hidden_states, self.weight, getattr(self, "bias", None))
        experts_TK, weights_TK, _ = softmax_over_topk(logits_TE, self.top_k, ties="topk")
        return logits_TE, weights_TK, experts_TK
