"""What a router decides (RoutingPlan) and the sorted rows experts consume (Dispatch).

Shape letters: T tokens, D hidden, E experts, K experts per token, S routed
(token, expert) pairs: T*K for token-choice routers, E*C for expert choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class RoutingPlan:
    """A router's decision as flat (token, expert, weight) pairs.

    Token-choice routers list pairs token-major (pair ``t*K + k`` is token t's
    k-th choice); expert choice lists them expert-major.
    """

    token_S: Tensor  # int64 source token of each pair
    expert_S: Tensor  # int64 expert of each pair
    weight_S: Tensor  # fp32 combine weight
    probs_TE: Tensor  # fp32 routing distribution per token, for losses and stats
    logits_TE: Tensor | None  # fp32 router logits (None for routers without logits)
    top_k: int  # K (expert choice: average pairs per token)
    expert_choice: bool = False


@dataclass(frozen=True)
class Dispatch:
    """Routed rows sorted by expert; kept rows first, dropped rows (weight 0) after.

    ``offsets_E[e]`` is the end of expert e's rows; rows at and past
    ``offsets_E[-1]`` were dropped by the capacity policy and contribute nothing.
    """

    token_S: Tensor  # int64 source token of each row
    weight_S: Tensor  # fp32 combine weight, 0 on dropped rows
    counts_E: Tensor  # int64 kept rows per expert
    offsets_E: Tensor  # int32 inclusive cumulative sum of counts_E
    assigned_E: Tensor  # int64 rows each expert was assigned before the capacity cut
    # a capacity was applied, so rows past offsets_E[-1] may be dropped ones (grouped_mm
    # computes them on zeros then: False spares that pass where nothing can be dropped)
    capped: bool = False

    @property
    def num_rows(self) -> int:
        return self.token_S.shape[0]
