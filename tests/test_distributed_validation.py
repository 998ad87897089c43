"""Validation under ``--nproc`` shared out over the ranks, on gloo with 2 ranks
(tests/dist_validation.py): each rank runs 1/world of the micro-batches (plus, under
ep > 1 where the count does not divide, one uncounted forward), and every rank reports the
loss one process gives on the same windows.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests import dist_validation as V
from tests.dist_launch import launch_two

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> dict[int, dict]:
    return launch_two(V.run, tmp_path_factory, "validation")


@pytest.mark.parametrize("name", V.CASES)
def test_validation_shared_over_ranks(world2, name):
    for rank, res in world2.items():
        assert res[name]["error"] is None, f"rank {rank}: {res[name]['error']}"
    vals = [res[name]["val"] for res in world2.values()]
    assert vals[0] == vals[1], "the ranks report different validation losses"
    # the number every rank computed before (one-process evaluate): the same micro-batch
    # losses up to fp32 rounding (ep > 1 exchanges rows; here they came out bitwise equal)
    # and the fp64 sum in another order; one micro-batch missed or counted twice moves
    # the mean by ~1e-4
    one = world2[0][name]["one_process"]
    assert abs(vals[0] - one) <= 1e-6 * one, f"val loss {vals[0]}, one process {one}"
