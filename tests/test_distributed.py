"""Expert parallelism on gloo: every check runs in a few spawned process groups.

One spawn per world size runs many checks (spawning costs ~2-5 s a process on
2 cores); each test below asserts one of them. The single-process reference is
``moekit.MoE`` with the same weights, run on each rank's tokens in turn.
`moekit train --nproc` (torchrun) as a user runs it: tests/test_distributed_cli.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moekit import MoE
from moekit.distributed.checkpoint import load_checkpoint
from tests import dist_workers as W
from tests.dist_launch import assert_all_ranks, launch

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt") / "ep2"


@pytest.fixture(scope="module")
def world2(tmp_path_factory, ckpt_dir) -> dict[int, dict]:
    res = launch(W.run_world2, 2, tmp_path_factory.mktemp("w2"), str(ckpt_dir))
    assert sorted(res) == [0, 1], "a rank crashed; see captured stderr"
    return res


@pytest.fixture(scope="module")
def world4(tmp_path_factory, ckpt_dir, world2) -> dict[int, dict]:
    res = launch(W.run_world4, 4, tmp_path_factory.mktemp("w4"), str(ckpt_dir))
    assert sorted(res) == [0, 1, 2, 3], "a rank crashed; see captured stderr"
    return res

@pytest.mark.parametrize("name", [
    "ep2_dropless", "ep2_capacity", "ep2_sigmoid_dropless", "ep2_expert_choice",
    "ep2_dropless_bf16", "ep2_capacity_bf16",
    "ep2_allgather_dropless", "ep2_allgather_capacity", "ep2_overlap_dropless",
    "ep2_dedup_dropless", "ep2_dedup_sigmoid", "ep2_dedup_expert_choice", "ep2_dedup_bf16",
    "ep2_infer_capacity", "ep2_infer_sigmoid_capacity", "ep2_infer_allgather_capacity",
    "ep2_infer_expert_choice", "ep2_infer_dedup", "ep2_bias_update", "ep2_bad_ep",
    "ep2_bad_dedup", "ckpt_save_ep2",
    "train_ep2_matches_one_process",
    "resume_newest_complete_runs_no_code",
    "train_ep2_consolidated", "resume_newer_one_process_checkpoint",
    "resume_keeps_load_since_validation", "val_under_grad_accum_as_one_process",
    "resume_keeps_collapse_patience"])
def test_world2(world2, name):
    assert_all_ranks(world2, name)


@pytest.mark.parametrize("name", [
    "ep4_dropless", "ep4_capacity", "dp2ep2_dropless", "dp2ep2_capacity",
    "dp2ep2_allgather", "ep4_dedup_dropless", "dp2ep2_dedup", "dp2ep2_infer_capacity",
    "ep4_capacity_uneven_T", "dp2ep2_allgather_uneven_T",
    "ckpt_load_ep4",
    "train_resume_ep4"])
def test_world4(world4, name):
    assert_all_ranks(world4, name)


@pytest.mark.parametrize("saved", ["ep2", "ep2_then_ep4"])
def test_checkpoint_loads_at_ep1(world2, world4, ckpt_dir, saved):
    """ep=1 is a plain MoE in one process, no process group; ep2 -> ep4 -> ep1 round trip."""
    want = W.full_layer(4, 4, None, seed=7)
    moe = W.full_layer(4, 4, None, seed=99)
    load_checkpoint(ckpt_dir.parent / saved, moe)
    for name, t in moe.state_dict().items():
        assert torch.equal(t, want.state_dict()[name]), name
    assert isinstance(moe, MoE)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_dead_rank_raises_timeout_error(tmp_path, how):
    """A killed rank resets its sockets (fast error); a frozen one trips the timeout."""
    timeout_s = 4.0
    start = time.monotonic()
    res = launch(W.run_kill, 2, tmp_path, timeout_s, how, timeout_s=60, wait_for=1)
    assert list(res) == [0], "rank 1 was to die, rank 0 to report"
    assert res[0]["error"] is not None, "rank 0 never failed"
    assert "timeout_s=4" in res[0]["error"] and "CollectiveTimeoutError" not in res[0]["error"]
    assert res[0]["elapsed"] < timeout_s + 10
    if how == "stop":
        assert res[0]["elapsed"] >= timeout_s - 0.5, "failed before the timeout expired"
    assert time.monotonic() - start < 60


def test_rank_killed_before_the_bias_update_raises_named_error(tmp_path):
    """The aux-loss-free bias update's all-reduce goes through the mesh's Comm like the
    dispatch's collectives: a dead peer is a CollectiveTimeoutError naming it (it had been
    gloo's own RuntimeError)."""
    res = launch(W.run_kill_before_bias_update, 2, tmp_path, 4.0, timeout_s=60, wait_for=1)
    assert list(res) == [0], "rank 1 was to die, rank 0 to report"
    assert res[0]["error"] is not None, "rank 0 raised no CollectiveTimeoutError"
    assert "all_reduce of the router's expert loads" in res[0]["error"]


def test_rank_killed_during_dcp_save_raises_named_error(tmp_path):
    res = launch(W.run_kill_in_save, 2, tmp_path, 4.0, str(tmp_path / "ckpt"), timeout_s=60,
                 wait_for=1)
    assert list(res) == [0], "rank 1 was to die, rank 0 to report"
    error = res[0]["error"]
    assert error is not None and error.startswith("CollectiveTimeoutError: DCP save"), error
    assert "timeout_s=4" in error and res[0]["elapsed"] < 4.0 + 10


def test_interrupt_right_after_a_save_does_not_save_again(tmp_path):
    """The "already saved this step" check of fit compared dcp_step_* with step_*: a
    SIGTERM right after the save at step 2 wrote dcp_step_00000002 again."""
    out = tmp_path / "run"
    res = launch(W.run_interrupt_after_save, 2, tmp_path, str(out), timeout_s=120)
    assert sorted(res) == [0, 1], "a rank crashed; see captured stderr"
    for rank, r in res.items():
        assert r["error"] is None, f"rank {rank}: {r['error']}"
        assert r["step"] == 2 and r["saves"] == [2], f"rank {rank}: {r}"
        assert r["last"] == str(out / "dcp_step_00000002"), f"rank {rank}: {r}"
    assert (out / "dcp_step_00000002" / "manifest.json").is_file()


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    out = tmp_path / "run"
    res = launch(W.run_signal_one_rank, 2, tmp_path, str(out), timeout_s=120)
    assert sorted(res) == [0, 1], "a rank crashed; see captured stderr"
    for rank, r in res.items():
        assert r["error"] is None, f"rank {rank}: {r['error']}"
        assert r["step"] == 2 and r["last"] == str(out / "dcp_step_00000002"), r
        assert r["elapsed"] < 15, f"rank {rank} took {r['elapsed']:.1f} s to stop"
        assert r["resumed_at"] == 2 and r["differ"] == [], f"rank {rank}: {r}"
        assert 0 < r["resumed_wall_s"] < 60, r  # trainer.json's: rank 0's fit, to the save
    # the stop's checkpoint, whole, then the resumed run's last (keep_checkpoints=2)
    assert sorted(p.name for p in out.glob("dcp_step_*")) == [
        "dcp_step_00000002", "dcp_step_00000004"]
    assert (out / "dcp_step_00000002" / "manifest.json").is_file()
