"""moekit: Mixture-of-Experts layers for PyTorch.

Shape letters used across the package:
    T tokens, D hidden (model) size, F expert hidden size, E experts,
    K experts per token (top-k), S routed rows (T*K minus dropped),
    C capacity per expert, G router groups (or 2F for a fused gate+up).
"""

import moekit._quiet  # noqa: F401  (before torch: see the module)
from moekit.config import MoEConfig
from moekit.dispatch.plan import Dispatch, RoutingPlan
from moekit.hugepages import HugePages, huge_pages
from moekit.layer import MoE, MoEOutput, attach_bias_update, update_all_biases
from moekit.malloc import tune_malloc
from moekit.multigate import MultiGateMoE, MultiGateOutput
from moekit.routing.stats import RoutingStats

__version__ = "0.1.0"

_LAZY = {
    # transformers is an optional extra: imported only when these are used.
    "apply_hf": ("moekit.integrations.hf", "apply"),
    "revert_hf": ("moekit.integrations.hf", "revert"),
    "quantize": ("moekit.quant", "quantize"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")


__all__ = [
    "Dispatch",
    "HugePages",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MultiGateMoE",
    "MultiGateOutput",
    "RoutingPlan",
    "RoutingStats",
    "apply_hf",
    "attach_bias_update",
    "huge_pages",
    "quantize",
    "revert_hf",
    "tune_malloc",
    "update_all_biases",
]
