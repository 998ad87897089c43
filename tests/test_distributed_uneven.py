"""Expert parallelism with a different number of tokens on each rank (T = 5 and 9, and
an empty rank), on gloo: every dispatcher, with and without a capacity, forward,
backward and ``infer``. One 2-process world runs every check (tests/dist_uneven.py).

Capacity mode and the all_gather dispatcher exchanged no sizes: such ranks aborted in
gloo ("Received data size doesn't match expected size") while the peer reported a dead
rank.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests import dist_uneven as U
from tests.dist_launch import assert_all_ranks, launch

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> dict[int, dict]:
    res = launch(U.run, 2, tmp_path_factory.mktemp("uneven"), timeout_s=120)
    assert sorted(res) == [0, 1], "a rank crashed; see captured stderr"
    return res


@pytest.mark.parametrize("name", [*U.CASES, *U.INFER_CASES])
def test_uneven_tokens(world2, name):
    assert_all_ranks(world2, name)
