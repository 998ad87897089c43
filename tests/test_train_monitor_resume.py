"""The router-collapse warning's patience across a resume: the checkpoint carries the
monitor's streaks, so an interrupted and resumed run warns at the step the
uninterrupted one does. Before, the patience restarted at the resume: a collapse that
began before it warned ``patience`` steps after it, and a run resumed more often than
that never warned.

collapse_fraction=0 makes every expert that receives a token "hot" (share > 0), so the
rule alone says when a warning is due: at step == collapse_patience, for every layer.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from moekit.models import LMConfig
from moekit.train import CheckpointError, TrainConfig, Trainer, encode, rundir
from moekit.train.checkpoint import STATE_FILE
from moekit.train.checkpoint_state import _check_collapse
from moekit.train.data import Corpus
from moekit.train.interrupt import StopAtBoundary
from moekit.train.monitor import CollapseMonitor, RouterCollapseWarning

MODEL = LMConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=32, ffn_dim=16,
                 num_experts=4, top_k=2)  # 2 MoE layers of 4 experts
TRAIN = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=1e-3, warmup_steps=0,
                    eval_every=6, eval_batches=1, save_every=6, seed=5,
                    collapse_fraction=0.0, collapse_patience=4)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"


def corpus() -> Corpus:
    data = encode(TEXT * 40).to(torch.uint8)
    return Corpus(data[:2000], data[2000:], "inline", 1, 1)


class StopsAt(Trainer):
    """A trainer that gets a SIGTERM during step ``stop_at`` (the loop stops after it)."""

    stop_at = 3

    def agreed_stop(self, signum: int | None) -> int | None:
        return signal.SIGTERM if self.step == self.stop_at else signum


def collapse_steps(trainer: Trainer) -> list[tuple[int, str]]:
    return [(r["step"], r["message"]) for r in trainer.history if r["kind"] == "collapse"]


def interrupted(tmp_path: Path, train: TrainConfig = TRAIN) -> Path:
    """The run directory of a run stopped by SIGTERM after step 3 (saved there)."""
    run = tmp_path / "cut"
    with pytest.raises(StopAtBoundary):
        StopsAt(MODEL, train, corpus(), run, progress=False).fit()
    assert (run / "LATEST").read_text().strip() == "step_00000003"
    return run


def test_a_resumed_run_warns_at_the_step_the_uninterrupted_one_does(tmp_path):
    whole = Trainer(MODEL, TRAIN, corpus(), tmp_path / "whole", progress=False)
    with pytest.warns(RouterCollapseWarning):
        whole.fit()
    warned = collapse_steps(whole)
    assert [step for step, _ in warned] == [4, 4], warned  # both layers, at the patience
    resumed = Trainer.resume(interrupted(tmp_path), corpus(), progress=False)
    with pytest.warns(RouterCollapseWarning):  # it had restarted: due at step 7, past the end
        resumed.fit()
    assert collapse_steps(resumed) == warned


def test_a_warning_given_before_the_resume_is_not_given_again(tmp_path):
    """Warned at step 2, saved at 3: the episode goes on, and so does its silence."""
    train = TRAIN.replace(collapse_patience=2)
    whole = Trainer(MODEL, train, corpus(), tmp_path / "whole", progress=False)
    with pytest.warns(RouterCollapseWarning):
        whole.fit()
    assert [step for step, _ in collapse_steps(whole)] == [2, 2]
    resumed = Trainer.resume(interrupted(tmp_path, train), corpus(), progress=False)
    resumed.fit()
    assert collapse_steps(resumed) == []  # it had warned again at step 5


def test_a_checkpoint_saved_before_the_monitor_was_resumes_with_a_fresh_patience(tmp_path):
    run = interrupted(tmp_path, TRAIN.replace(steps=8))
    ckpt = run / "step_00000003"
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["collapse_monitor"]["hot"] == [[layer, expert, 3] for layer in (0, 1)
                                                for expert in range(4)]
    del state["collapse_monitor"]  # as written before the monitor was saved
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    (ckpt / rundir.MANIFEST).unlink()
    rundir.write_manifest(ckpt, sorted(p.name for p in ckpt.iterdir()))
    resumed = Trainer.resume(run, corpus(), progress=False)
    assert resumed.monitor.hot == {} and resumed.monitor.warned == set()
    with pytest.warns(RouterCollapseWarning):
        resumed.fit()
    assert [step for step, _ in collapse_steps(resumed)] == [7, 7]  # 3 + patience 4


def test_monitor_state_round_trips_through_json():
    monitor = CollapseMonitor(fraction=0.9, patience=3)
    load = torch.tensor([[10, 10, 10, 10], [0, 95, 5, 0]])  # layer 1: 1 hot, 0 and 3 cold
    with pytest.warns(RouterCollapseWarning):
        for _ in range(3):
            monitor.update(load, tokens=100)
    state = json.loads(json.dumps(monitor.state()))
    assert state == {"hot": [[1, 1, 3]], "cold": [[1, 0, 3], [1, 3, 3]],
                     "warned": [["cold", 1, 0], ["cold", 1, 3], ["hot", 1, 1]]}
    again = CollapseMonitor(fraction=0.9, patience=3)
    again.load_state(state)
    assert (again.hot, again.cold, again.warned) == (monitor.hot, monitor.cold, monitor.warned)
    again.load_state(None)
    assert (again.hot, again.cold, again.warned) == ({}, {}, set())


@pytest.mark.parametrize("bad", [
    [], {"hot": [], "cold": []}, {"hot": [[0, 0, 0]], "cold": [], "warned": []},
    {"hot": [[2, 0, 1]], "cold": [], "warned": []},  # layer 2 of 2 MoE layers
    {"hot": [], "cold": [[0, 4, 1]], "warned": []},  # expert 4 of 4
    {"hot": [], "cold": [], "warned": [["warm", 0, 0]]},
    {"hot": [[0, 0]], "cold": [], "warned": []}, {"hot": [[0, 0, 1.5]], "cold": [], "warned": []},
])
def test_a_malformed_saved_monitor_is_refused(tmp_path, bad):
    _check_collapse(None, MODEL.to_dict(), tmp_path)
    _check_collapse({"hot": [[1, 3, 9]], "cold": [], "warned": [["hot", 1, 3]]},
                    MODEL.to_dict(), tmp_path)
    with pytest.raises(CheckpointError, match="collapse_monitor"):
        _check_collapse(bad, MODEL.to_dict(), tmp_path)
