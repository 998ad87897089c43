"""Sort routed pairs by expert and apply the capacity policy, on the device.

No host synchronisation: every shape here depends only on T, K and E, so the
dropless path can be captured by CUDA graphs and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.dispatch.plan import Dispatch, RoutingPlan


def _counts(expert_S: Tensor, num_experts: int, keep_S: Tensor | None = None) -> Tensor:
    ones = torch.ones_like(expert_S) if keep_S is None else keep_S.long()
    return torch.zeros(num_experts, dtype=torch.long, device=expert_S.device).scatter_add_(
        0, expert_S, ones)


def _rank_within_expert(expert_S: Tensor, priority_S: Tensor, num_experts: int) -> Tensor:
    """0-based rank of each pair among its expert's pairs, highest priority first."""
    by_priority = torch.argsort(priority_S, descending=True, stable=True)
    by_expert = by_priority[torch.argsort(expert_S[by_priority], stable=True)]
    starts_E = torch.cumsum(_counts(expert_S, num_experts), 0) - _counts(expert_S, num_experts)
    position = torch.arange(expert_S.shape[0], device=expert_S.device)
    rank_S = torch.empty_like(position)
    rank_S[by_expert] = position - starts_E[expert_S[by_expert]]
    return rank_S


def capacity_keep(plan: RoutingPlan, num_experts: int, capacity: int, policy: str) -> Tensor:
    """Which pairs fit under ``capacity`` rows per expert (bool, per pair).

    policy "position": earlier tokens first (pair order); "probability": larger
    combine weight first, i.e. batch-prioritised routing (Riquelme et al. 2021).
    """
    S = plan.expert_S.shape[0]
    if policy == "position":
        priority_S = -torch.arange(S, device=plan.expert_S.device, dtype=torch.float64)
    else:
        priority_S = plan.weight_S.double()
    return _rank_within_expert(plan.expert_S, priority_S, num_experts) < capacity


def sort_by_expert(plan: RoutingPlan, num_experts: int, capacity: int | None,
                   policy: str = "position") -> Dispatch:
    """Rows sorted by expert; with ``capacity`` the pairs over it go last with weight 0."""
    assigned_E = _counts(plan.expert_S, num_experts)
    if capacity is None or plan.expert_choice:
        order_S = torch.argsort(plan.expert_S, stable=True)
        counts_E, weight_S = assigned_E, plan.weight_S[order_S]
    else:
        keep_S = capacity_keep(plan, num_experts, capacity, policy)
        key_S = torch.where(keep_S, plan.expert_S, num_experts)  # dropped rows sort last
        order_S = torch.argsort(key_S, stable=True)
        counts_E = _counts(plan.expert_S, num_experts, keep_S)
        weight_S = torch.where(keep_S, plan.weight_S, 0.0)[order_S]
    return Dispatch(
        token_S=plan.token_S[order_S],
        weight_S=weight_S,
        counts_E=counts_E,
        offsets_E=torch.cumsum(counts_E, 0).to(torch.int32),
        assigned_E=assigned_E,
    )
