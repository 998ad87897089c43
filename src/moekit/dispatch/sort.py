"""Sort routed pairs by expert and apply the capacity policy, on the device.

No host synchronisation: every shape here depends only on T, K and E, so the
dropless path can be captured by CUDA graphs and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from moekit.config import DROP_POLICIES, check_choice, check_int_range, reject
from moekit.dispatch.plan import Dispatch, RoutingPlan
from moekit.routing.hashing import check_id_range


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


def _check_plan(plan: Any, num_experts: Any) -> None:
    """ValueError naming the field unless ``plan`` holds three 1-D tensors of one length S
    (int64 tokens and experts, floating weights) and its experts lie in [0, num_experts).

    Shapes and dtypes always (free); the expert ids' values only on the CPU outside
    torch.compile: on CUDA the scan would cost a host sync every step (an id out of range
    there is a device-side assert in the scatter instead of this error).
    """
    if not isinstance(plan, RoutingPlan):
        raise ValueError(f"plan={type(plan).__name__} is not allowed: it must be a "
                         "moekit.RoutingPlan")
    for name in ("token_S", "expert_S", "weight_S"):
        t = getattr(plan, name)
        if not isinstance(t, Tensor):
            raise ValueError(f"plan.{name}={type(t).__name__} is not allowed: it must be a "
                             "1-D torch.Tensor")
        if t.dim() != 1:
            reject(f"plan.{name}.shape", tuple(t.shape), "it must be 1-D [S], one entry per "
                   "routed (token, expert) pair")
    for name in ("token_S", "expert_S"):  # scatter_add_ into int64 counts takes int64 ids
        dtype = getattr(plan, name).dtype
        if dtype != torch.int64:
            reject(f"plan.{name}.dtype", dtype, "it must be torch.int64 (cast with .long())")
    if not plan.weight_S.is_floating_point():
        reject("plan.weight_S.dtype", plan.weight_S.dtype, "it must be a floating dtype")
    S = plan.expert_S.shape[0]
    for name in ("token_S", "weight_S"):
        shape = tuple(getattr(plan, name).shape)
        if shape != (S,):
            reject(f"plan.{name}.shape", shape, f"it must be plan.expert_S.shape = ({S},)")
    check_int_range("num_experts", num_experts, 1 if S else 0)  # 0 only for no pairs
    if plan.expert_S.device.type == "cpu" and not torch.compiler.is_compiling():
        check_id_range("plan.expert_S", plan.expert_S, num_experts, "num_experts")


def capacity_keep(plan: RoutingPlan, num_experts: int, capacity: int, policy: str) -> Tensor:
    """Which pairs fit under ``capacity`` rows per expert (bool, per pair).

    policy "position": earlier tokens first (pair order); "probability": larger
    combine weight first, i.e. batch-prioritised routing (Riquelme et al. 2021), a NaN
    weight last.
    """
    _check_plan(plan, num_experts)
    check_int_range("capacity", capacity, 0)
    check_choice("policy", policy, DROP_POLICIES)
    return _keep(plan, num_experts, capacity, policy)


def _keep(plan: RoutingPlan, num_experts: int, capacity: int, policy: str) -> Tensor:
    S = plan.expert_S.shape[0]
    if policy == "position":
        priority_S = -torch.arange(S, device=plan.expert_S.device, dtype=torch.float64)
    else:  # a NaN weight (a token holding NaN or inf) last, not first as argsort has it
        priority_S = plan.weight_S.double().nan_to_num(nan=-math.inf)
    return _rank_within_expert(plan.expert_S, priority_S, num_experts) < capacity


def sort_by_expert(plan: RoutingPlan, num_experts: int, capacity: int | None,
                   policy: str = "position") -> Dispatch:
    """Rows sorted by expert; with ``capacity`` the pairs over it go last with weight 0."""
    _check_plan(plan, num_experts)
    if capacity is not None:
        check_int_range("capacity", capacity, 0)
    check_choice("policy", policy, DROP_POLICIES)
    assigned_E = _counts(plan.expert_S, num_experts)
    if capacity is None or plan.expert_choice:
        order_S = torch.argsort(plan.expert_S, stable=True)
        counts_E, weight_S = assigned_E, plan.weight_S[order_S]
    else:
        keep_S = _keep(plan, num_experts, capacity, policy)
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
        capped=capacity is not None and not plan.expert_choice,
    )
