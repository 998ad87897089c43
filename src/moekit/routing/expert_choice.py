"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

Shape letters: T tokens, E experts, C tokens per expert (capacity).
"""

from __future__ import annotations

from torch import Tensor


def expert_choice(logits_TE: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (tokens_EC, weights_EC, probs_TE); weights are the token's softmax score."""
    probs_TE = logits_TE.softmax(-1)
    weights_EC, tokens_EC = probs_TE.t().topk(capacity, dim=-1)
    return tokens_EC, weights_EC, probs_TE
