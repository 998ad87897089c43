"""autograd Functions behind the fast expert paths."""

from moekit.functions.moe_experts import FusedExperts, fused_experts

__all__ = ["FusedExperts", "fused_experts"]
