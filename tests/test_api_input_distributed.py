"""moekit.distributed entry points on bad input, in one world-size-1 gloo group: a
ValueError naming the argument, before a process group or layer is set up."""

from __future__ import annotations

import math
import re
import socket

import pytest
import torch.distributed as dist
from torch import nn

import moekit
from moekit.distributed import ExpertParallelMoE, init_distributed, init_mesh, parallelize

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")

CFG = moekit.MoEConfig(dim=8, ffn_dim=8, num_experts=4, top_k=2)
BAD_TIMEOUTS = [True, math.inf, math.nan, -1.0, 0, "30", 1e13]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def world1():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("timeout_s", BAD_TIMEOUTS)
def test_init_distributed_checks_timeout_first(monkeypatch, timeout_s):
    """True was taken as a 1-second collective timeout; inf raised OverflowError."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=re.escape(f"timeout_s={timeout_s!r} is not allowed")):
        init_distributed(timeout_s=timeout_s)
    assert not dist.is_initialized()


@pytest.mark.parametrize("timeout_s", BAD_TIMEOUTS)
def test_init_mesh_checks_timeout(world1, timeout_s):
    """Was stored as given and only broke the collective error message later."""
    with pytest.raises(ValueError, match=re.escape(f"timeout_s={timeout_s!r} is not allowed")):
        init_mesh(1, 1, timeout_s=timeout_s)
    assert init_mesh(1, 1, timeout_s=30).timeout_s == 30


def test_layer_needs_an_expert_parallel_mesh(world1):
    """A torch DeviceMesh or None raised AttributeError: ... has no attribute 'ep'."""
    mesh = init_mesh(1, 1)
    for bad in (mesh.device_mesh, None, (1, 1)):
        name = type(bad).__name__
        with pytest.raises(ValueError, match=f"mesh={name} is not allowed: it must be the "
                           "ExpertParallelMesh"):
            ExpertParallelMoE(CFG, bad)  # type: ignore[arg-type]
        model = nn.Sequential(moekit.MoE(CFG))
        with pytest.raises(ValueError, match=f"mesh={name} is not allowed"):
            parallelize(model, bad)  # type: ignore[arg-type]
        assert type(model[0]) is moekit.MoE
    with pytest.raises(ValueError, match="moe=Linear is not allowed: it must be a full "
                       "moekit.MoE"):
        ExpertParallelMoE.from_moe(nn.Linear(2, 2), mesh)  # type: ignore[arg-type]
    ep = ExpertParallelMoE.from_moe(moekit.MoE(CFG), mesh)
    assert ep.num_local == 4


def test_init_mesh_needs_dp_times_ep_to_be_the_world_size(world1):
    with pytest.raises(ValueError, match=r"dp=1 x ep=2 = 2 is not allowed: it must equal the "
                                         r"world size 1"):
        init_mesh(1, 2)
    mesh = init_mesh(1, 1)
    assert (mesh.dp, mesh.ep, mesh.dp_rank, mesh.ep_rank) == (1, 1, 0, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dispatcher="alltoall"), r"dispatcher='alltoall' is not allowed: it must be one of "
                                  r"all_to_all, all_to_all_dedup, all_gather"),
    (dict(overlap_chunks=0), r"overlap_chunks=0 is not allowed: it must be a positive int"),
    (dict(overlap_chunks=True), r"overlap_chunks=True is not allowed"),
    (dict(overlap_chunks=2.0), r"overlap_chunks=2.0 is not allowed"),
    (dict(dispatcher="all_to_all_dedup", overlap_chunks=2),
     r"dispatcher='all_to_all_dedup' is not allowed with overlap_chunks=2: its exchange is "
     r"not chunked"),
])
def test_layer_refuses_bad_dispatch_options_by_name(world1, kwargs, match):
    mesh = init_mesh(1, 1)
    with pytest.raises(ValueError, match=match):
        ExpertParallelMoE(CFG, mesh, **kwargs)
    model = nn.Sequential(moekit.MoE(CFG))
    with pytest.raises(ValueError, match=match):
        parallelize(model, mesh, **kwargs)
    assert type(model[0]) is moekit.MoE


def test_layer_needs_a_moe_config(world1):
    """(A config of the language model, LMConfig, is the likely mix-up.)"""
    from moekit.models import LMConfig

    mesh = init_mesh(1, 1)
    lm = LMConfig(dim=8, num_layers=1, num_heads=2, ffn_dim=8, num_experts=4, top_k=2)
    for bad in (lm, {"dim": 8}, None):
        with pytest.raises(ValueError, match=f"config={type(bad).__name__} is not allowed: "
                                             "it must be a moekit.MoEConfig"):
            ExpertParallelMoE(bad, mesh)  # type: ignore[arg-type]
