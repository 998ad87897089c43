"""Expert weights, activations and compute backends."""

from moekit.experts.activations import activate
from moekit.experts.experts import Experts, SharedExperts

__all__ = ["Experts", "SharedExperts", "activate"]
