"""Token-choice routers: each token picks K experts.

Pure functions of fp32 logits. Shape letters: T tokens, E experts, K experts per
token, G router groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.routing.topk import Ties, top_choice


def limit_groups(select_TE: Tensor, num_groups: int, topk_groups: int,
                 group_score: str, ties: Ties = "lower") -> Tensor:
    """Mask (to -inf) the experts outside each token's best ``topk_groups`` groups.

    group_score "max": a group scores its best expert (DeepSeek-V2);
    "top2_sum": the sum of its two best experts (DeepSeek-V3).
    """
    T, E = select_TE.shape
    grouped_TGX = select_TE.view(T, num_groups, E // num_groups)
    if group_score == "top2_sum" and grouped_TGX.shape[-1] >= 2:
        score_TG = grouped_TGX.topk(2, dim=-1).values.sum(-1)
    else:
        score_TG = grouped_TGX.amax(-1)
    kept_TG = torch.zeros_like(score_TG, dtype=torch.bool)
    kept_TG.scatter_(1, top_choice(score_TG, topk_groups, ties), True)
    kept_TE = kept_TG.repeat_interleave(E // num_groups, dim=1)
    return select_TE.masked_fill(~kept_TE, float("-inf"))


def _select(select_TE: Tensor, k: int, num_groups: int, topk_groups: int,
            group_score: str, ties: Ties) -> Tensor:
    if num_groups > 1:
        select_TE = limit_groups(select_TE, num_groups, topk_groups, group_score, ties)
    return top_choice(select_TE, k, ties)


def _finish(weights_TK: Tensor, renormalize: bool, scale: float) -> Tensor:
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return weights_TK * scale if scale != 1.0 else weights_TK


def _wide(x: Tensor) -> Tensor:
    """fp64 for selection keys (MPS has no fp64: fp32 there)."""
    return x if x.device.type == "mps" else x.double()


# Selection never ranks saturated fp32 scores: softmax underflows to 0 past a logit
# gap of ~104 and sigmoid rounds to 1.0 past a logit of ~17, and topk then broke the
# ties arbitrarily (the sigmoid router sent 167 of 256 tokens at x*100 to the wrong
# experts). Without a bias the key is the logit itself (softmax and sigmoid are
# monotone, and a group's best expert is its best logit); with a bias, or for the
# sigmoid's top-2-sum group score, the score + bias is formed in fp64 as the rule
# says. Cost, routing fwd+bwd at T=4096 E=64 K=8 against the old selection
# (benchmarks/bench_routing.py, same-run A/B, 2-core EPYC at load average 13-20, so
# +-0.1): softmax 0.93-0.99x, softmax groups 0.97-1.05x, sigmoid+bias 0.79-0.81x,
# sigmoid+bias groups 0.89-0.99x; softmax+bias 1.14-1.22x (its fp64 softmax).


def softmax_topk(logits_TE: Tensor, top_k: int, *, renormalize: bool = True,
                 bias_E: Tensor | None = None, num_groups: int = 1, topk_groups: int = 1,
                 scale: float = 1.0, ties: Ties = "lower", probs: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Softmax over all experts, keep the top K (Mixtral renormalises, Qwen2-MoE not).

    Returns (experts_TK, weights_TK, probs_TE). ``bias_E`` shifts selection only.
    ``probs=False``: for a caller that wants the choice alone (the Hugging Face routers);
    probs_TE may then be None, and is where renormalising leaves it unused.
    """
    probs_TE = logits_TE.softmax(-1) if probs or not renormalize else None
    select_TE = logits_TE if bias_E is None else _wide(logits_TE).softmax(-1) + _wide(bias_E)
    experts_TK = _select(select_TE, top_k, num_groups, topk_groups, "max", ties)
    if renormalize:  # p_k / sum_j p_j over the chosen K = softmax of their logits, never 0/0
        weights_TK = _finish(logits_TE.gather(1, experts_TK).softmax(-1), False, scale)
    else:
        weights_TK = _finish(probs_TE.gather(1, experts_TK), False, scale)
    return experts_TK, weights_TK, probs_TE


def softmax_over_topk(logits_TE: Tensor, top_k: int, *, bias_E: Tensor | None = None,
                      scale: float = 1.0, renormalize: bool = True, ties: Ties = "lower"
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Top K of the logits, then a softmax over those K logits only (GPT-OSS, Shazeer et
    al. 2017). ``renormalize=False``: the chosen experts' softmax probabilities over all
    E instead, which need not sum to 1 (OLMoE / Qwen2-MoE's ``norm_topk_prob=False``)."""
    select_TE = logits_TE if bias_E is None else logits_TE + bias_E
    experts_TK = top_choice(select_TE, top_k, ties)
    probs_TE = logits_TE.softmax(-1)
    weights_TK = (logits_TE.gather(1, experts_TK).softmax(-1) if renormalize
                  else probs_TE.gather(1, experts_TK))
    return experts_TK, _finish(weights_TK, False, scale), probs_TE


def sigmoid_topk(logits_TE: Tensor, top_k: int, *, bias_E: Tensor | None,
                 renormalize: bool = True, num_groups: int = 1, topk_groups: int = 1,
                 scale: float = 1.0, ties: Ties = "lower") -> tuple[Tensor, Tensor, Tensor]:
    """DeepSeek-V3: sigmoid scores, bias for selection only, routed scaling.

    The returned distribution is the scores normalised to sum to 1 per token,
    which is what the sequence-level balance loss uses.
    """
    if bias_E is None and num_groups == 1:
        select_TE = logits_TE
    else:
        select_TE = _wide(logits_TE).sigmoid()
        select_TE = select_TE if bias_E is None else select_TE + _wide(bias_E)
    experts_TK = _select(select_TE, top_k, num_groups, topk_groups, "top2_sum", ties)
    chosen_TK = logits_TE.gather(1, experts_TK)
    # s_k / sum_j s_j = softmax of log s: sums to 1 even when every s underflows to 0
    weights_TK = (F.logsigmoid(chosen_TK).softmax(-1) if renormalize
                  else chosen_TK.sigmoid())
    probs_TE = F.logsigmoid(logits_TE).softmax(-1)
    return experts_TK, _finish(weights_TK, False, scale), probs_TE


def noisy_logits(logits_TE: Tensor, noise_logits_TE: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
    """Shazeer et al. 2017: H = x W_g + N(0, 1) * softplus(x W_noise)."""
    noise_TE = torch.randn(logits_TE.shape, device=logits_TE.device, dtype=logits_TE.dtype,
                           generator=generator)
    return logits_TE + noise_TE * F.softplus(noise_logits_TE)


def jitter(x_TD: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """Switch Transformer: multiply the router input by U(1 - eps, 1 + eps)."""
    u_TD = torch.rand(x_TD.shape, device=x_TD.device, dtype=x_TD.dtype, generator=generator)
    return x_TD * (1.0 - eps + 2.0 * eps * u_TD)
