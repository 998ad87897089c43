"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

Shape letters: T tokens, E experts, C tokens per expert (capacity).
"""

from __future__ import annotations

from torch import Tensor

from moekit.routing.topk import top_indices


def expert_choice(logits_TE: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (tokens_EC, weights_EC, probs_TE); weights are the token's softmax score.
    Equal scores go to the earlier token (``top_indices``)."""
    probs_TE = logits_TE.softmax(-1)
    probs_ET = probs_TE.t()
    tokens_EC = top_indices(probs_ET, capacity)
    return tokens_EC, probs_ET.gather(1, tokens_EC), probs_TE
