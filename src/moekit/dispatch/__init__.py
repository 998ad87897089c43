"""Routing plans, sorting by expert and capacity policies."""

from moekit.dispatch.plan import Dispatch, RoutingPlan
from moekit.dispatch.sort import capacity_keep, sort_by_expert

__all__ = ["Dispatch", "RoutingPlan", "capacity_keep", "sort_by_expert"]
