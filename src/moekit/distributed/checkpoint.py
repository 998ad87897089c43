"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), reshardable over ep.

Expert weights are saved as DTensors sharded on the expert dimension over the
"ep" mesh dimension (replicated over "dp"), so the checkpoint stores the full
[E, ...] tensors once; any ep size (ep=1 being a plain ``moekit.MoE`` in one
process) loads them back. Keys are exactly the single-process model's keys.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moekit.distributed.layer import ExpertParallelMoE


def _global_view(p: Tensor, module: ExpertParallelMoE) -> DTensor:
    shape = (module.config.num_experts, *p.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(p.detach(), module.mesh.device_mesh, [Replicate(), Shard(0)],
                              run_check=False, shape=torch.Size(shape), stride=stride)


@contextlib.contextmanager
def _single_process_ok():
    """ep=1 without a process group is intended: silence DCP's warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def model_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with expert shards as global-shaped DTensors sharing storage."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            prefix = f"{name}.experts." if name else "experts."
            for pname, p in module.experts.named_parameters():
                state[prefix + pname] = _global_view(p, module)
    return state


def save_checkpoint(path: str | os.PathLike, model: nn.Module,
                    extra: dict[str, Tensor] | None = None) -> None:
    """Save ``model`` (every rank calls this) under the directory ``path``."""
    state = {"model": model_state_dict(model), **({"extra": extra} if extra else {})}
    with _single_process_ok():
        dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    extra: dict[str, Tensor] | None = None) -> None:
    """Load in place into ``model`` at whatever ep it was built with (every rank calls this)."""
    state = {"model": model_state_dict(model), **({"extra": extra} if extra else {})}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    with torch.no_grad():  # DTensor views share storage; plain tensors were loaded in place
        own = model.state_dict()
        for key, value in state["model"].items():
            local = value.to_local() if isinstance(value, DTensor) else value
            if own[key].data_ptr() != local.data_ptr():
                own[key].copy_(local)
