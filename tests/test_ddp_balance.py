"""Aux-loss-free balancing under plain DistributedDataParallel (gloo, 2 processes)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moekit import MoE, MoEConfig
from tests import ddp_workers
from tests.dist_launch import free_port, launch

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")


@pytest.mark.parametrize("how", ["update_all_biases", "group", "hook"])
def test_ddp_load_and_bias_follow_every_ranks_tokens(tmp_path, how):
    """DDP broadcasts rank 0's buffers before every forward: ``load`` then held rank 0's
    earlier micro-batches in place of each rank's own, and a bias update without a group
    stepped each rank from its own tokens (DDP then kept rank 0's). The load must be each
    rank's own count, and the bias the step from all ranks' tokens, on every rank."""
    res = launch(ddp_workers.ddp_bias_steps, 2, tmp_path, how)
    assert sorted(res) == [0, 1], "a rank crashed; see captured stderr"
    for rank, r in res.items():
        assert r["error"] is None, f"rank {rank}: {r['error']}"


def test_ddp_group_is_per_router_and_dropped_after_destroy(tmp_path):
    """The DDP group a router remembers lives on the router, is not copied by deepcopy
    or pickle, and is not used once destroy_process_group() has killed it (a collective
    over the dead group failed after a fresh init); the bias then steps locally."""
    res = launch(ddp_workers.ddp_group_after_destroy, 2, tmp_path)
    assert sorted(res) == [0, 1], "a rank crashed; see captured stderr"
    for rank, r in res.items():
        assert r["kept"] and r["copy"] is None and r["pickled"] is None
        assert r["error"] is None, f"rank {rank}: {r['error']}"
        assert r["bias"] == r["want"], f"rank {rank}"


def test_readme_ddp_recipe_builds_without_a_deprecation_warning():
    """The README's recipe for DDP's Python reducer or torch.compile passed
    ``broadcast_buffers=False``, which torch 2.13 deprecates with a FutureWarning
    (``forward_sync_buffers`` replaces it). Built as the README says (gloo, a world of
    one), DDP must not warn of a deprecation and must not sync buffers in forward."""
    found = re.findall(r"Under DDP's Python reducer or `torch.compile` pass `(\w+)=False`",
                       " ".join(README.read_text().split()))
    assert len(found) == 1, f"the README's DDP recipe: {found}"
    moe = MoE(MoEConfig(dim=8, ffn_dim=4, num_experts=4, top_k=2, router="sigmoid")).train()
    assert not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp = DistributedDataParallel(moe, **{found[0]: False})
    finally:
        dist.destroy_process_group()
    deprecations = [str(w.message) for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecations == []
    assert ddp.forward_sync_buffers is False
