"""Expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPU).

Launch with torchrun; see README "Expert parallelism" for a walk-through.
"""

from moekit.distributed.layer import ExpertParallelMoE, ExpertParallelStats, is_expert_parameter
from moekit.distributed.mesh import (
    CollectiveTimeoutError,
    ExpertParallelMesh,
    init_distributed,
    init_mesh,
)
from moekit.distributed.parallel import global_tokens_per_expert, parallelize, reduce_gradients

__all__ = [
    "CollectiveTimeoutError",
    "ExpertParallelMesh",
    "ExpertParallelMoE",
    "ExpertParallelStats",
    "global_tokens_per_expert",
    "init_distributed",
    "init_mesh",
    "is_expert_parameter",
    "parallelize",
    "reduce_gradients",
]
