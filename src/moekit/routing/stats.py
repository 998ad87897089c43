"""Routing statistics, as detached device tensors (reading them is the caller's sync).

Shape letters: T tokens, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moekit.dispatch.plan import Dispatch, RoutingPlan


@dataclass(frozen=True)
class RoutingStats:
    tokens_per_expert: Tensor  # int64 [E], rows each expert was assigned (before drops)
    dropped_fraction: Tensor  # routed pairs removed by the capacity policy (expert
    #                           choice: tokens that no expert took)
    load_max_over_mean: Tensor  # max / mean of tokens_per_expert (1.0 = balanced)
    router_entropy: Tensor  # mean over tokens of the routing distribution's entropy (nats)
    z_loss: Tensor  # unweighted router z-loss
    aux_loss: Tensor  # the weighted auxiliary loss that the layer returned

    def to_dict(self) -> dict[str, float | list[int]]:
        """Plain Python values (synchronises with the device)."""
        out: dict[str, float | list[int]] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if v.dim() else float(v)
        return out


def routing_stats(plan: RoutingPlan, dispatch: Dispatch, num_tokens: int,
                  z_loss: Tensor, aux_loss: Tensor) -> RoutingStats:
    with torch.no_grad():
        assigned_E = dispatch.assigned_E
        load = assigned_E.float()
        kept = dispatch.counts_E.sum().float()
        # (total - kept) / max(total, 1): zero tokens drop nothing (1 - 0/1 said 1.0,
        # and expert choice's mean over no tokens said NaN)
        if plan.expert_choice:
            covered_T = torch.zeros(num_tokens, device=load.device, dtype=torch.bool)
            covered_T[plan.token_S] = True
            dropped = (num_tokens - covered_T.sum().float()) / max(num_tokens, 1)
        else:
            pairs = plan.expert_S.shape[0]
            dropped = (pairs - kept) / max(pairs, 1)
        p_TE = plan.probs_TE
        entropy = -(p_TE * p_TE.clamp_min(1e-20).log()).sum() / max(p_TE.shape[0], 1)
        return RoutingStats(
            tokens_per_expert=assigned_E,
            dropped_fraction=dropped,
            load_max_over_mean=load.max() / load.mean().clamp_min(1e-20),
            router_entropy=entropy,
            z_loss=z_loss.detach(),
            aux_loss=aux_loss.detach(),
        )
