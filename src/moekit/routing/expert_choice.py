"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

Shape letters: T tokens, E experts, C tokens per expert (capacity).
"""

from __future__ import annotations

from torch import Tensor

from moekit.routing.topk import top_indices


def expert_choice(logits_TE: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (tokens_EC, weights_EC, probs_TE); weights are the token's softmax score.
    Equal scores go to the earlier token (``top_indices``); a NaN score (a token
    holding NaN or inf) ranks below every token: ranked first, as topk ranks NaN, one
    such token took a slot of every expert (at capacity 1 all of them, and every other
    token's output was 0)."""
    probs_TE = logits_TE.softmax(-1)
    probs_ET = probs_TE.t()
    tokens_EC = top_indices(probs_ET.nan_to_num(nan=-1.0), capacity)  # probs are >= 0
    return tokens_EC, probs_ET.gather(1, tokens_EC), probs_TE
