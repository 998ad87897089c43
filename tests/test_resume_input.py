"""`moekit train --resume` / ``Trainer.resume``: a checkpoint that cannot be resumed is
refused with a clear error, before the global RNG or the run directory changes.

Before: resuming a directory written by ``moekit convert --to moekit`` ended in an
uncaught ``KeyError: 'train_config'`` traceback; and ``Trainer.resume`` cleaned the run
directory (killed saves' temp files) and reseeded the global RNG before the checkpoint
was restored, so a resume that then failed had already changed both.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.train import CheckpointError, Trainer, load_checkpoint, rundir
from moekit.train import checkpoint as ckpt_io
from tests import test_checkpoint_security as shared

STEP, TEXT = shared.STEP, shared.TEXT
corpus, saved_run = shared.corpus, shared.saved_run  # the fixtures: one tiny run


@pytest.fixture
def run(tmp_path, saved_run) -> Path:
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


@pytest.fixture
def converted(tmp_path, saved_run) -> Path:
    """A run directory written by `moekit convert --to moekit` (via a Mixtral export)."""
    assert cli_main(["convert", "--to", "hf", str(saved_run), str(tmp_path / "hf")]) == 0
    assert cli_main(["convert", "--to", "moekit", str(tmp_path / "hf"),
                     str(tmp_path / "conv")]) == 0
    return tmp_path / "conv"


def add_leftovers(run: Path) -> None:
    """What killed saves leave: ``clean_run_dir`` removes these."""
    (run / ".step_00000004.tmpab12cd").mkdir()
    (run / ".step_00000004.tmpab12cd" / "model.safetensors").write_bytes(b"\x00" * 64)
    (run / ".LATEST.x8k2").write_text("step_00000004\n")


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with the bytes of each file (None for directories)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def rewrite_state(ckpt: Path, change) -> None:
    """Edit state.json and re-hash it: a consistent checkpoint the model cannot take."""
    state = json.loads((ckpt / ckpt_io.STATE_FILE).read_text())
    change(state)
    (ckpt / ckpt_io.STATE_FILE).write_text(json.dumps(state))
    rundir.write_manifest(ckpt, list(ckpt_io.FILES))


def test_converted_checkpoint_is_refused_naming_it(converted, corpus):
    add_leftovers(converted)
    before = tree(converted)
    torch.manual_seed(4321)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError) as info:
        Trainer.resume(converted, corpus, progress=False)
    msg = str(info.value)
    assert str(converted / "step_00000000") in msg and "no training state" in msg
    assert "moekit generate" in msg
    assert torch.equal(rng, torch.get_rng_state())
    assert tree(converted) == before


def test_cli_resume_of_converted_checkpoint_is_a_one_line_error(converted, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    capsys.readouterr()
    rc = cli_main(["train", "--resume", str(converted), "--data", str(data), "--steps", "4",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1, err  # the checkpoint: a runtime failure, not a usage error
    assert err.startswith("moekit train: error: ") and err.count("\n") == 1, err
    assert "step_00000000" in err and "no training state" in err and "Traceback" not in err


def _no_eps(state) -> None:
    del state["optimizer"]["param_groups"][1]["eps"]


def _model_config_changed(state) -> None:
    state["model_config"]["num_experts"] = 8  # valid, but not the saved tensors' shape


@pytest.mark.parametrize("damage", [_no_eps, _model_config_changed])
def test_failed_resume_changes_neither_rng_nor_run_directory(run, corpus, damage):
    rewrite_state(run / STEP, damage)
    load_checkpoint(run)  # loads: only assigning it to the model fails
    add_leftovers(run)
    before = tree(run)
    torch.manual_seed(4321)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError):
        Trainer.resume(run, corpus, progress=False)
    assert torch.equal(rng, torch.get_rng_state())
    assert tree(run) == before


def test_successful_resume_still_cleans_and_sets_the_saved_rng(run, corpus):
    add_leftovers(run)
    saved_rng = torch.tensor(load_checkpoint(run).state["torch_rng"], dtype=torch.uint8)
    torch.manual_seed(4321)
    trainer = Trainer.resume(run, corpus, progress=False)
    assert trainer.step == 2 and trainer.last_checkpoint == run / STEP
    assert torch.equal(torch.get_rng_state(), saved_rng)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_resume_after_a_crash_between_the_renames_restores_the_checkpoint(run, corpus):
    """swap_in died after moving step_2 aside: the resume reads it there and puts it back."""
    os.rename(run / STEP, rundir.aside_of(run / STEP))
    trainer = Trainer.resume(run, corpus, progress=False)
    assert trainer.step == 2 and trainer.last_checkpoint == run / STEP
    assert (run / STEP).is_dir() and not rundir.aside_of(run / STEP).exists()
