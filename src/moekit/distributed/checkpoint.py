"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), reshardable over ep.

Expert weights are saved as DTensors sharded on the expert dimension over the
"ep" mesh dimension (replicated over "dp"), so the checkpoint stores the full
[E, ...] tensors once; any ep size (ep=1 being a plain ``moekit.MoE`` in one
process) loads them back. Keys are exactly the single-process model's keys.

Loading never runs code from the checkpoint: its ``.metadata`` pickle is read
with an allow-list (``moekit.distributed.dcp_safe``). Errors come out named: a
bad or unsafe checkpoint raises ``CheckpointError``, a peer rank that dies
during a save or load raises ``CollectiveTimeoutError``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, Replicate, Shard

from moekit.distributed.dcp_safe import SafeFileSystemReader, read_dcp_metadata
from moekit.distributed.layer import ExpertParallelMoE
from moekit.distributed.mesh import CollectiveTimeoutError, group_timeout_s
from moekit.errors import CheckpointError

METADATA_FILE = ".metadata"


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
    _run_dcp("save", path, dcp.save, state, checkpoint_id=str(path),
             no_dist=not dist.is_initialized())


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    extra: dict[str, Tensor] | None = None) -> None:
    """Load in place into ``model`` at whatever ep it was built with (every rank calls this)."""
    metadata = Path(path) / METADATA_FILE
    if not metadata.is_file():
        raise CheckpointError(f"checkpoint={str(path)!r} is not a DCP checkpoint: it has no "
                              f"{METADATA_FILE} file")
    read_dcp_metadata(str(metadata))  # every rank sees the same file: all raise or none
    targets = {"model": model_state_dict(model), **({"extra": extra} if extra else {})}
    # DCP fills what it is given in place, one tensor after another: loaded straight into
    # the model, a truncated data file had raised CheckpointError with router.weight
    # already overwritten. Load into copies (the model's size again, for the load only)
    # and copy them in once every rank's load succeeded.
    state = {part: {k: _copy(v) for k, v in tensors.items()} for part, tensors in targets.items()}
    _run_dcp("load", path, dcp.load, state, storage_reader=SafeFileSystemReader(str(path)),
             no_dist=not dist.is_initialized())
    with torch.no_grad():  # DTensor views share storage with the model's shards
        for part, tensors in targets.items():
            for key, target in tensors.items():
                _local(target).copy_(_local(state[part][key]))


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _copy(t: Tensor) -> Tensor:
    """A copy of ``t`` for DCP to load into; a DTensor keeps its mesh and global shape."""
    if not isinstance(t, DTensor):
        return t.detach().clone()
    return DTensor.from_local(t.to_local().detach().clone(), t.device_mesh, t.placements,
                              run_check=False, shape=t.shape, stride=t.stride())


def _run_dcp(what: str, path: str | os.PathLike, fn: Callable[..., Any], *args: Any,
             **kwargs: Any) -> Any:
    """Call ``dcp.save``/``dcp.load``; raise CheckpointError or CollectiveTimeoutError."""
    try:
        with _single_process_ok():
            return fn(*args, **kwargs)
    except CheckpointException as e:  # a BaseException: DCP gathered failures from ranks
        errors = [exc for exc, _ in e.failures.values()]
        named = next((x for x in errors if isinstance(x, CheckpointError)), None)
        if named is not None:
            raise named from e
        raise CheckpointError(f"DCP {what} of {str(path)!r} failed on ranks "
                              f"{sorted(e.failures)}: {errors[0]!r}") from e
    except RuntimeError as e:  # gloo/NCCL: a peer died while DCP gathered or scattered
        if not dist.is_initialized():
            raise
        timeout_s = group_timeout_s()
        raise CollectiveTimeoutError(
            f"DCP {what} of {str(path)!r} failed: a peer rank died or did not answer within "
            f"the collective timeout timeout_s={timeout_s:g}. Backend error: {e}") from e
