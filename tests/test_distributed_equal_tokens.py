"""``ExpertParallelMoE(equal_tokens_per_rank=True)`` on gloo, 2 ranks (tests/dist_equal_tokens.py):
capacity mode without the exchange of the capacities gives bitwise what the exchanging
layer gives, a broken promise at the first call is a ValueError on every rank, and the
--nproc trainer makes the promise (its ranks' micro-batches hold the same T).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests import dist_equal_tokens as Q
from tests.dist_launch import assert_all_ranks, launch_two

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> dict[int, dict]:
    return launch_two(Q.run, tmp_path_factory, "equal_tokens")


@pytest.mark.parametrize("name", [*Q.CASES, "broken_promise", "dropless_ignores_promise",
                                  "bad_flag", "trainer_uses_promise"])
def test_equal_tokens_per_rank(world2, name):
    assert_all_ranks(world2, name)
