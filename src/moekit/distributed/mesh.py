"""Process groups for expert parallelism (EP) composed with data parallelism (DP).

The world is a ``DeviceMesh`` of shape (dp, ep) with dimension names
("dp", "ep"): rank = dp_rank * ep + ep_rank. Experts are split over the "ep"
dimension (each EP rank holds ``num_experts / ep`` of them) and replicated
over "dp"; everything else (router, shared experts, the rest of a model) is
replicated over all ranks. Every rank sees its own tokens.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moekit.config import check_choice, check_number, check_positive_int

DEFAULT_TIMEOUT_S = 300.0
# What init_mesh derives from the backend (nccl -> cuda, gloo -> cpu). torch's
# init_device_mesh takes any all-letter name: "bogus" built a mesh whose device
# setup was skipped in silence, and "xla" failed later with an unrelated message.
DEVICE_TYPES = ("cpu", "cuda")


class CollectiveTimeoutError(RuntimeError):
    """A collective failed because a peer rank died or stopped answering in time."""


@dataclass(frozen=True)
class Comm:
    """One process group, plus what an error on it should tell the user."""

    group: dist.ProcessGroup
    name: str  # "ep", "dp" or "world"
    timeout_s: float

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def run(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a collective (or ``Work.wait``) and turn a peer failure into a clear error."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # DistBackendError and gloo/NCCL errors derive from it
            raise CollectiveTimeoutError(
                f"{what} on the {self.name!r} process group (size {self.size}) failed: a peer "
                f"rank died or did not answer within the collective timeout "
                f"timeout_s={self.timeout_s:g} (set it with moekit.distributed.init_distributed"
                f"(timeout_s=...) or `moekit train --timeout`). Backend error: {e}") from e


@dataclass(frozen=True)
class ExpertParallelMesh:
    """The (dp, ep) device mesh and its process groups."""

    device_mesh: DeviceMesh
    dp: int
    ep: int
    timeout_s: float
    world: Comm  # all ranks: dense gradients, router bias loads
    ep_comm: Comm  # ranks that share tokens through the all-to-all
    dp_comm: Comm  # replicas of the same experts: expert gradients

    @property
    def ep_rank(self) -> int:
        return self.ep_comm.rank

    @property
    def dp_rank(self) -> int:
        return self.dp_comm.rank

    @property
    def world_size(self) -> int:
        return self.dp * self.ep


# ~31,700 years: gloo keeps the timeout in int64 microseconds (8.6e13 s failed its
# "Invalid timeout" check; 1e12 s works); inf and nan overflowed datetime.timedelta
MAX_TIMEOUT_S = 1e12


def check_timeout(value: Any) -> None:
    check_number("timeout_s", value, 0, MAX_TIMEOUT_S, low_open=True)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> None:
    """``init_process_group`` from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    ``timeout_s`` bounds every collective: when a rank dies the others raise
    ``CollectiveTimeoutError`` instead of hanging. Does nothing if already initialised.
    """
    check_timeout(timeout_s)
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def init_mesh(dp: int, ep: int, timeout_s: float | None = None,
              device_type: str | None = None) -> ExpertParallelMesh:
    """Build the (dp, ep) mesh over the initialised default process group.

    ``device_type``: "cpu" or "cuda"; None takes it from the backend (nccl: "cuda").
    """
    check_positive_int("dp", dp)
    check_positive_int("ep", ep)
    if device_type is not None:  # before any process-group work
        check_choice("device_type", device_type, DEVICE_TYPES)
    if not dist.is_initialized():
        raise ValueError("init_mesh needs torch.distributed to be initialised: call "
                         "moekit.distributed.init_distributed() first (under torchrun)")
    world = dist.get_world_size()
    if dp * ep != world:
        raise ValueError(f"dp={dp} x ep={ep} = {dp * ep} is not allowed: it must equal the "
                         f"world size {world}")
    if timeout_s is None:
        timeout_s = group_timeout_s()
    check_timeout(timeout_s)  # it goes into every collective error message
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    mesh = init_device_mesh(device_type, (dp, ep), mesh_dim_names=("dp", "ep"))
    return ExpertParallelMesh(
        device_mesh=mesh, dp=dp, ep=ep, timeout_s=timeout_s,
        world=Comm(dist.group.WORLD, "world", timeout_s),
        ep_comm=Comm(mesh.get_group("ep"), "ep", timeout_s),
        dp_comm=Comm(mesh.get_group("dp"), "dp", timeout_s))


def group_timeout_s() -> float:
    """The default group's timeout (what init_process_group was given), in seconds, for
    the collective errors' messages. torch has no public getter of a group's timeout:
    ``ProcessGroup._get_backend`` and the backend options' ``_timeout`` are private, so
    both are looked up gently; where either is missing, DEFAULT_TIMEOUT_S."""
    get_backend = getattr(dist.group.WORLD, "_get_backend", None)
    device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    try:
        backend = get_backend(device) if callable(get_backend) else None
    except RuntimeError:  # no backend for that device type
        backend = None
    options = getattr(backend, "options", None)
    timeout = getattr(options, "_timeout", None)
    return float(timeout.total_seconds()) if timeout is not None else DEFAULT_TIMEOUT_S
