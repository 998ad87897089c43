"""Plan MoE runs: parameters, FLOPs, memory, communication, time and energy.

>>> from moekit.plan import Cluster, Layout, TrainSetup, get_gpu, get_preset, make_plan
>>> plan = make_plan(get_preset("mixtral-8x7b").spec, Cluster(gpu=get_gpu("h100"),
...                  num_gpus=64), TrainSetup(), Layout(dp=8, tp=8, ep=8, zero=1))
"""

from moekit.plan.cluster import GPUS, PRECISIONS, Cluster, GPUSpec, Layout, TrainSetup, get_gpu
from moekit.plan.cost import Plan, make_plan
from moekit.plan.hf import from_hf_config, from_moe_config, read_spec_file
from moekit.plan.params import ParamCounts, count_params
from moekit.plan.presets import PRESETS, get_preset
from moekit.plan.search import search
from moekit.plan.spec import ModelSpec

__all__ = [
    "GPUS", "PRECISIONS", "PRESETS", "Cluster", "GPUSpec", "Layout", "ModelSpec",
    "ParamCounts", "Plan", "TrainSetup", "count_params", "from_hf_config", "from_moe_config",
    "get_gpu", "get_preset", "make_plan", "read_spec_file", "search",
]
