"""moekit: Mixture-of-Experts layers for PyTorch.

Shape letters used across the package:
    T tokens, D hidden (model) size, F expert hidden size, E experts,
    K experts per token (top-k), S routed rows (T*K minus dropped),
    C capacity per expert, G router groups (or 2F for a fused gate+up).
"""

from moekit.config import MoEConfig
from moekit.dispatch.plan import Dispatch, RoutingPlan
from moekit.layer import MoE, MoEOutput, attach_bias_update, update_all_biases
from moekit.multigate import MultiGateMoE, MultiGateOutput
from moekit.routing.stats import RoutingStats

__version__ = "0.1.0"

__all__ = [
    "Dispatch",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MultiGateMoE",
    "MultiGateOutput",
    "RoutingPlan",
    "RoutingStats",
    "attach_bias_update",
    "update_all_biases",
]
