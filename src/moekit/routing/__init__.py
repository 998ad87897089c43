"""Routers, balance losses and routing statistics."""

from moekit.routing.losses import seq_aux_loss, switch_aux_loss, z_loss
from moekit.routing.router import Router, RouterOutput
from moekit.routing.stats import RoutingStats, routing_stats

__all__ = ["Router", "RouterOutput", "RoutingStats", "routing_stats", "seq_aux_loss",
           "switch_aux_loss", "z_loss"]
