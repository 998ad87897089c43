"""The MoE language model: config, transformer, sampling."""

from moekit.models.config import PRESETS, LMConfig, preset
from moekit.models.generate import generate, sample_next
from moekit.models.transformer import KVCache, LMOutput, MoETransformer

__all__ = ["PRESETS", "KVCache", "LMConfig", "LMOutput", "MoETransformer", "generate",
           "preset", "sample_next"]
