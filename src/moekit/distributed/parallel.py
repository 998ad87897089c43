"""Turn a model's MoE layers expert-parallel, and reduce gradients over the mesh.

Gradient reduction is an explicit, flattened ``all_reduce`` per group (our
choice over DDP/FSDP2: DDP would average expert gradients over every rank,
which is wrong for weights that exist on only one EP rank per replica):
- expert weights (``is_expert_parameter``): summed over their dp replicas;
  the all-to-all backward has already summed over the EP ranks' tokens;
- everything else: summed over all ranks.
Both are then divided by the world size, so every gradient equals the
single-process gradient of the mean of the per-rank losses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.layer import ExpertParallelMoE, is_expert_parameter
from moekit.distributed.mesh import Comm, ExpertParallelMesh
from moekit.layer import MoE
from moekit.routing.stats import RoutingStats


def parallelize(model: nn.Module, mesh: ExpertParallelMesh, **kwargs) -> nn.Module:
    """Replace every ``MoE`` in ``model`` (in place) by an ``ExpertParallelMoE`` shard.

    Build the full model with the same seed on every rank first, so the
    replicated weights agree; ``kwargs`` go to ``ExpertParallelMoE``.
    """
    if isinstance(model, MoE) and not isinstance(model, ExpertParallelMoE):
        return ExpertParallelMoE.from_moe(model, mesh, **kwargs)
    for name, child in model.named_children():
        setattr(model, name, parallelize(child, mesh, **kwargs))
    return model


def _all_reduce_grads(params: list[nn.Parameter], comm: Comm) -> None:
    if not params or comm.size == 1:
        return
    grads = [p.grad for p in params]
    # one flat buffer, one collective: what torch._utils._flatten_dense_tensors builds
    # (a cat of the flattened tensors, mixed dtypes promoted), with public ops
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.run("all_reduce of gradients", dist.all_reduce, flat, group=comm.group)
    for g, reduced in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(reduced.view_as(g))


@torch.no_grad()
def reduce_gradients(model: nn.Module, mesh: ExpertParallelMesh, average: bool = True) -> None:
    """All-reduce every gradient over the right group (see the module docstring).

    Parameters without a gradient get zeros first, so all ranks call the same
    collectives (a rank whose experts received no token has no expert grads).
    """
    expert, dense = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if is_expert_parameter(p) else dense).append(p)
    _all_reduce_grads(dense, mesh.world)
    _all_reduce_grads(expert, mesh.dp_comm)
    if average and mesh.world_size > 1:
        for p in expert + dense:
            p.grad.div_(mesh.world_size)


@torch.no_grad()
def global_tokens_per_expert(stats: RoutingStats, mesh: ExpertParallelMesh) -> torch.Tensor:
    """Routing load summed over all ranks ([E], int64), e.g. for logging balance."""
    load_E = stats.tokens_per_expert.clone()
    mesh.world.run("all_reduce of expert loads", dist.all_reduce, load_E,
                   group=mesh.world.group)
    return load_E
