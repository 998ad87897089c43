"""Run MoE models larger than memory: experts stay in the checkpoint's safetensors
files and a byte-budget cache holds the hot ones, with LRU / LFU eviction and a
prefetch that applies the next MoE layer's router to the current hidden state.

>>> from moekit.offload import load_offloaded
>>> model = load_offloaded("runs/train", expert_memory="512MiB")   # moekit checkpoint
>>> out = generate(model, ids, 100)
>>> print(model.expert_offload.stats.summary())   # hit rates, bytes read, Belady
>>> model.expert_offload.close()                  # stops the prefetch thread

transformers checkpoints: ``moekit.integrations.hf.load_offloaded(path, expert_memory=...)``.
"""

from moekit.offload.cache import ExpertCache, PrefetchError, check_budget
from moekit.offload.lm import OffloadedExperts, load_offloaded
from moekit.offload.policy import LFU, LRU, belady, flatten, make_policy, simulate
from moekit.offload.runtime import ExpertOffload
from moekit.offload.safetensors_io import ShardError, drop_page_cache, read_header
from moekit.offload.stats import LayerStats, OffloadStats
from moekit.offload.store import ExpertMemoryError, ExpertStore, Part, parse_bytes

__all__ = ["LFU", "LRU", "ExpertCache", "ExpertMemoryError", "ExpertOffload", "ExpertStore",
           "LayerStats", "OffloadStats", "OffloadedExperts", "Part", "PrefetchError",
           "ShardError", "belady", "check_budget", "drop_page_cache", "flatten",
           "load_offloaded", "make_policy", "parse_bytes", "read_header", "simulate"]
