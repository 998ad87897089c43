"""The per-step hook: before a MoE layer's experts run, fetch the ones it routed to,
queue the next layer's predicted experts, and run the touched experts through the
same backend function the resident model uses.

Touched experts are renumbered 0..E'-1 in increasing id order, so the sorted
rows, each expert's GEMM and the combine's summation order are those of the
resident model: the output is bitwise equal, not merely close.

Shape letters: T tokens, D hidden, E experts, E' experts this step touches,
K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moekit.dispatch.plan import Dispatch
from moekit.offload.cache import ExpertCache

Predictor = Callable[[Tensor], Tensor]  # x_TD -> expert ids [T, K] of the next MoE layer


def compact(d: Dispatch, touched_E: Tensor) -> Dispatch:
    """The same rows with experts renumbered to their position in ``touched_E`` (sorted)."""
    counts = d.counts_E.index_select(0, touched_E)
    return Dispatch(token_S=d.token_S, weight_S=d.weight_S, counts_E=counts,
                    offsets_E=torch.cumsum(counts, 0).to(torch.int32),
                    assigned_E=d.assigned_E.index_select(0, touched_E))


def rank_predictions(experts_TK: Tensor, limit: int) -> list[int]:
    """The ``limit`` experts most tokens are predicted to use (ties: lower id first)."""
    ids, counts = torch.unique(experts_TK.reshape(-1), return_counts=True)
    order = sorted(zip(counts.tolist(), ids.tolist(), strict=True),
                   key=lambda ci: (-ci[0], ci[1]))
    return sorted(e for _, e in order[:limit])


class ExpertOffload:
    """Ties an ExpertCache to a model's MoE layers (numbered 0..L-1 in forward order).

    ``predictors[l]`` maps layer l's expert input to layer l+1's expert choice; the
    prefetch of layer l+1 is queued after layer l's own experts are in hand and
    before they run, so the reads overlap this layer's compute and the next
    attention block. At most ``prefetch_limit`` experts are queued per step (a
    long prompt would otherwise ask for every expert of the next layer).
    """

    def __init__(self, cache: ExpertCache, predictors: list[Predictor | None],
                 prefetch: bool, prefetch_limit: int) -> None:
        self.cache, self.predictors = cache, predictors
        self.prefetch, self.prefetch_limit = prefetch, prefetch_limit

    @property
    def stats(self):
        return self.cache.stats

    def run(self, layer: int, x_TD: Tensor, dispatch: Dispatch,
            compute: Callable[[Dispatch, list[Any]], Tensor], out_dim: int) -> Tensor:
        """Fetch the experts ``dispatch`` uses, queue the next layer's, then ``compute``."""
        touched_E = torch.nonzero(dispatch.counts_E).flatten()
        parts = self.cache.get(layer, touched_E.tolist())
        self._prefetch_next(layer, x_TD)
        if touched_E.numel() == 0:  # every row dropped: nothing to compute
            return x_TD.new_zeros(x_TD.shape[0], out_dim)
        return compute(compact(dispatch, touched_E), parts)

    @torch.no_grad()
    def _prefetch_next(self, layer: int, x_TD: Tensor) -> None:
        predict = self.predictors[layer] if layer < len(self.predictors) else None
        if not self.prefetch or predict is None:
            return
        self.cache.prefetch(layer + 1, rank_predictions(predict(x_TD), self.prefetch_limit))

    def close(self, timeout: float | None = 10.0) -> bool:
        return self.cache.close(timeout)
