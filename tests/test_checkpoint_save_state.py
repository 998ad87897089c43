"""save_checkpoint must refuse a state its own loader refuses, before anything changes.

Before: the checkpoint was written, LATEST moved onto it and older good checkpoints were
pruned; only the next load said the state was bad, so the run could not be resumed.
"""

from __future__ import annotations

import os

import pytest
import torch

from moekit.errors import CheckpointError
from moekit.models import MoETransformer, preset
from moekit.train.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    lm = MoETransformer(preset("tiny"))
    optim = torch.optim.AdamW(lm.parameters())
    cfg = lm.config.to_dict()
    for step in (1, 2):
        save_checkpoint(tmp_path, lm, optim, {"step": step, "model_config": cfg}, keep=2)
    return tmp_path, lm, optim, cfg


@pytest.mark.parametrize("bad,match", [
    ({"step": 3.0}, r"step=3\.0 is not allowed"),
    ({"step": "3"}, r"step='3' is not allowed"),
    ({"step": 100_000_000}, r"step=100000000 is not allowed"),  # step_ takes 8 digits
    ({"step": -1}, r"step=-1 is not allowed"),
    ({"step": 3, "counters": {"tokens": 1.5}}, r"counters=.* is not allowed"),
    ({"step": 3, "model_config": None}, r"model_config"),
])
def test_state_the_loader_refuses_is_refused_before_anything_is_written(saved, bad, match):
    run, lm, optim, cfg = saved
    before = sorted(os.listdir(run))
    with pytest.raises(CheckpointError, match=match):
        save_checkpoint(run, lm, optim, {"model_config": cfg, **bad}, keep=2)
    assert sorted(os.listdir(run)) == before  # nothing written, nothing pruned
    assert load_checkpoint(run).step == 2


def test_state_without_model_config_is_refused(saved):
    run, lm, optim, _ = saved
    with pytest.raises(CheckpointError, match="lacks the key 'model_config'"):
        save_checkpoint(run, lm, optim, {"step": 3}, keep=2)
    assert load_checkpoint(run).step == 2
    assert (run / "step_00000001").is_dir()
