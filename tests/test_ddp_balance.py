"""Aux-loss-free balancing under plain DistributedDataParallel (gloo, 2 processes)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests import ddp_workers
from tests.dist_launch import launch

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
