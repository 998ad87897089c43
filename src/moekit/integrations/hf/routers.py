"""Router forwards for transformers MoE models, computed with moekit's routing functions.

Each mixin replaces the ``forward`` of one transformers router class and returns
exactly what the original returns (``router_logits`` first, which transformers
records for the model's load-balancing loss), in the same dtypes.

Shape letters: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from moekit.routing.token_choice import sigmoid_topk, softmax_over_topk, softmax_topk


class SoftmaxTopKRouter:
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over all E in fp32, keep the top K.

    Mixtral always renormalises the K weights and returns them in fp32; the
    Qwen/OLMoE routers renormalise only with ``norm_topk_prob`` and cast the
    weights back to the logits' dtype.
    """

    _moekit_cast_weights = True

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_TD = hidden_states.reshape(-1, self.hidden_dim)
        logits_TE = F.linear(x_TD, self.weight)
        experts_TK, weights_TK, _ = softmax_topk(
            logits_TE.float(), self.top_k, renormalize=getattr(self, "norm_topk_prob", True))
        if self._moekit_cast_weights:
            weights_TK = weights_TK.to(logits_TE.dtype)
        return logits_TE, weights_TK, experts_TK


class MixtralRouter(SoftmaxTopKRouter):
    _moekit_cast_weights = False


class SigmoidGroupRouter:
    """DeepSeek-V3: fp32 sigmoid scores; ``e_score_correction_bias`` shifts selection only;
    group-limited (groups scored by their two best experts); routed scaling."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_TD = hidden_states.view(-1, self.hidden_dim)
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        experts_TK, weights_TK, _ = sigmoid_topk(
            logits_TE, self.top_k, bias_E=self.e_score_correction_bias,
            renormalize=self.norm_topk_prob, num_groups=self.num_group,
            topk_groups=self.topk_group, scale=self.routed_scaling_factor)
        return logits_TE, weights_TK, experts_TK


class GptOssRouter:
    """GPT-OSS: logits with a bias, top K of the logits, softmax over those K only."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits_TE = F.linear(hidden_states, self.weight, self.bias)
        experts_TK, weights_TK, _ = softmax_over_topk(logits_TE, self.top_k)
        return logits_TE, weights_TK, experts_TK
