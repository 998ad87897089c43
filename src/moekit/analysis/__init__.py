"""Routing analysis of trained MoE models: load, drops, entropy, co-activation,
token specialisation (`moekit analyze`)."""

from moekit.analysis.analyze import analyze_model
from moekit.analysis.collect import RoutingCollector

__all__ = ["RoutingCollector", "analyze_model"]
