"""Training input and the loop: what the run is given is checked before anything runs,
and no checkpoint holds weights that are NaN or inf. Each test failed before its fix.

Before: ``--data ""`` trained on the current directory (``Path("")`` is ``.``);
``--lr 1e39`` passed the checks and ended in a RuntimeError traceback from inside
AdamW's step ("value cannot be converted to type float without overflow");
``weight_decay=1e300`` turned the weights into NaN after a step whose loss and gradient
were finite, and that checkpoint was saved with LATEST moved onto it; ``beta1=1.0`` or
``beta2=1.0`` passed TrainConfig and were refused by torch as "Invalid beta parameter
at index 1"; ``load_corpus(val_percent="5")`` was a TypeError.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.models import LMConfig
from moekit.train import NonFiniteError, TrainConfig, Trainer, load_checkpoint, load_corpus
from moekit.train.checkpoint import LATEST

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
MODEL = LMConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=16, ffn_dim=16,
                 num_experts=4, top_k=2)
TRAIN = TrainConfig(steps=4, batch_size=2, seq_len=16, warmup_steps=0, eval_every=4,
                    eval_batches=1, save_every=1, log_every=1)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(TEXT * 60)
    return path


def train_fails(argv: list[str], tmp_path: Path, capsys, *words: str) -> None:
    out = tmp_path / "run"
    rc = cli_main(["train", "--preset", "tiny", "--steps", "2", "--seq-len", "16",
                   "--out", str(out), "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not out.exists()  # nothing created


def test_empty_data_is_refused_not_the_current_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text(TEXT * 60)  # what `.` would have trained on
    monkeypatch.chdir(tmp_path)
    train_fails(["--data", ""], tmp_path, capsys, "--data", "data=''",
                "must name a text file or directory")


@pytest.mark.parametrize("value", ["5", True, math.nan, 100])
def test_val_percent_of_the_wrong_type_or_range_is_named(text_file, value):
    with pytest.raises(ValueError) as e:
        load_corpus(str(text_file), val_percent=value)
    assert f"val_percent={value!r} is not allowed" in str(e.value) and "(0, 100)" in str(e.value)


@pytest.mark.parametrize("lr", ["1e39", "1e30", "11"])
def test_huge_lr_is_refused_before_the_run_starts(lr, text_file, tmp_path, capsys):
    train_fails(["--data", str(text_file), "--lr", lr, "--warmup", "0"], tmp_path, capsys,
                "--lr", f"lr={float(lr)!r}", "[0, 10]")


@pytest.mark.parametrize("field,value,allowed", [
    ("weight_decay", 1e300, "[0, 100]"),
    ("weight_decay", -0.1, "[0, 100]"),
    ("beta1", 1.0, "[0, 1)"),
    ("beta2", 1.0, "[0, 1)"),
])
def test_optimizer_values_adamw_cannot_use_are_named(field, value, allowed):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{field: value})
    assert f"{field}={value!r} is not allowed" in str(e.value) and allowed in str(e.value)


def test_the_largest_allowed_values_still_train(text_file, tmp_path):
    cfg = TRAIN.replace(lr=10.0, weight_decay=0.1, beta1=0.99, beta2=0.999, steps=2,
                        max_bad_steps=3)
    Trainer(MODEL, cfg, load_corpus(str(text_file)), tmp_path, progress=False).fit()


def poison_after_step(trainer: Trainer, step: int) -> None:
    """The optimizer step that makes ``step`` leaves a NaN in one weight (as a huge weight
    decay did), while that step's loss and gradient were finite."""
    calls = {"n": 0}

    def hook(optimizer, args, kwargs) -> None:
        calls["n"] += 1
        if calls["n"] == step:
            with torch.no_grad():
                trainer.model.embed.weight[0, 0] = math.nan

    trainer.optimizer.register_step_post_hook(hook)


def test_nan_weights_are_never_saved_and_latest_stays_on_the_good_one(text_file, tmp_path):
    trainer = Trainer(MODEL, TRAIN, load_corpus(str(text_file)), tmp_path, progress=False)
    poison_after_step(trainer, 3)
    with pytest.raises(NonFiniteError, match=r"step 3: 1 parameter\(s\) hold NaN or inf "
                                             r"\(embed.weight\).*step_00000002"):
        trainer.fit()
    assert (tmp_path / LATEST).read_text().strip() == "step_00000002"
    assert not (tmp_path / "step_00000003").exists()
    ck = load_checkpoint(tmp_path)
    assert ck.step == 2 and all(torch.isfinite(t).all() for t in ck.model.values())


def test_ctrl_c_after_nan_weights_does_not_save_them(text_file, tmp_path):
    trainer = Trainer(MODEL, TRAIN.replace(save_every=100), load_corpus(str(text_file)),
                      tmp_path, progress=False)
    poison_after_step(trainer, 1)

    def interrupt(module, inputs, output):  # Ctrl-C once: save at the step's end
        if trainer.step == 2 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return output

    sent: list[bool] = []

    trainer.model.embed.register_forward_hook(interrupt)
    try:
        with pytest.raises(NonFiniteError, match="hold NaN or inf.*no checkpoint was written "
                                                 "yet: run the command again"):
            trainer.fit()
    except KeyboardInterrupt:  # before the fix: saved, then re-raised (and ended pytest)
        pytest.fail(f"Ctrl-C saved the NaN weights: LATEST is {trainer.last_checkpoint}")
    assert not (tmp_path / LATEST).exists()


def test_cli_nan_weights_are_one_error_line_and_exit_1(text_file, tmp_path, capsys,
                                                       monkeypatch):
    from moekit.train import trainer as trainer_module
    real = trainer_module.make_optimizer

    def poisoned(model, cfg):
        optimizer = real(model, cfg)

        def hook(opt, args, kwargs) -> None:
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)

        optimizer.register_step_post_hook(hook)
        return optimizer

    monkeypatch.setattr(trainer_module, "make_optimizer", poisoned)
    out = tmp_path / "run"
    rc = cli_main(["train", "--preset", "tiny", "--steps", "2", "--seq-len", "16",
                   "--data", str(text_file), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "hold NaN or inf" in err and "Traceback" not in err, err
    assert "None" not in err and err.endswith("no checkpoint was written yet: run the "
                                              "command again, with that change, to start "
                                              "over"), err  # had named checkpoint None
    assert not (out / LATEST).exists()
    monkeypatch.undo()  # the change made: the same command starts the run over
    assert cli_main(["train", "--preset", "tiny", "--steps", "2", "--seq-len", "16",
                     "--data", str(text_file), "--out", str(out), "--no-progress"]) == 0
    assert (out / LATEST).read_text().strip() == "step_00000002"


def test_bad_steps_before_the_first_save_say_to_start_over(text_file, tmp_path):
    """max_bad_steps reached before any checkpoint: the error had ended "the last good
    checkpoint is None"."""
    trainer = Trainer(MODEL, TRAIN.replace(save_every=100, max_bad_steps=2),
                      load_corpus(str(text_file)), tmp_path, progress=False)

    def nan_batch(module, inputs, output):  # every training step's loss is NaN
        return output * math.nan if module.training else output

    trainer.model.embed.register_forward_hook(nan_batch)
    with pytest.raises(NonFiniteError) as e:
        trainer.fit()
    assert str(e.value).startswith("2 consecutive steps had a non-finite loss")
    assert str(e.value).endswith("; no checkpoint was written yet: run the command again, "
                                 "with that change, to start over"), e.value
    assert "None" not in str(e.value) and not (tmp_path / LATEST).exists()


def test_a_run_whose_last_step_is_skipped_still_saves_its_final_state(text_file, tmp_path):
    trainer = Trainer(MODEL, TRAIN.replace(steps=3, save_every=100),
                      load_corpus(str(text_file)), tmp_path, progress=False)

    def nan_batch(module, inputs, output):  # one bad batch: the last step's
        return output * math.nan if module.training and trainer.step == 2 else output

    trainer.model.embed.register_forward_hook(nan_batch)
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and summary["checkpoint"].endswith("step_00000003")
    ck = load_checkpoint(tmp_path)
    assert ck.step == 3 and all(torch.isfinite(t).all() for t in ck.model.values())


def test_steps_past_the_checkpoint_names_are_refused_up_front(text_file, tmp_path, capsys):
    """--steps 100000000 was accepted; the save at step 10**8 (step_100000000, nine digits)
    then stopped the run with a CheckpointError traceback."""
    with pytest.raises(ValueError, match=r"steps=100000000 is not allowed.*99,999,999"):
        TrainConfig(steps=10**8)
    assert TrainConfig(steps=99_999_999).steps == 99_999_999
    out = tmp_path / "run"
    assert cli_main(["train", "--preset", "tiny", "--data", str(text_file), "--steps",
                     str(10**8), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "steps=100000000" in err, err
    assert not out.exists()


def test_a_full_disk_during_a_save_is_one_line_naming_the_last_checkpoint(
        text_file, tmp_path, monkeypatch, capsys):
    """ENOSPC from a checkpoint save had ended `moekit train` with a traceback."""
    import errno

    from moekit.train import checkpoint as ckpt_io
    real, calls = ckpt_io.save_checkpoint, []

    def fills_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    monkeypatch.setattr(ckpt_io, "save_checkpoint", fills_the_disk)
    out = tmp_path / "run"
    assert cli_main(["train", "--preset", "tiny", "--data", str(text_file), "--steps", "3",
                     "--batch-size", "2", "--seq-len", "16", "--eval-every", "3",
                     "--eval-batches", "1", "--warmup", "1", "--save-every", "1",
                     "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for words in ("step 2", os.strerror(errno.ENOSPC), str(out / "step_00000001"),
                  f"--resume {out}"):
        assert words in err, err
    assert (out / LATEST).read_text().strip() == "step_00000001"


def test_a_full_disk_at_the_first_save_says_to_start_over(text_file, tmp_path, monkeypatch,
                                                          capsys):
    """No checkpoint yet: the line had named "the last complete checkpoint is None" and a
    --resume that fails; the same command then starts the run over."""
    import errno

    from moekit.train import checkpoint as ckpt_io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data", str(text_file), "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches",
            "1", "--warmup", "1", "--save-every", "1", "--out", str(out), "--no-progress"]
    monkeypatch.setattr(ckpt_io, "save_checkpoint", full)
    assert cli_main(argv) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert err == (f"moekit train: error: could not write to {out} at step 1: "
                   f"{os.strerror(errno.ENOSPC)}; no checkpoint was written yet: free space "
                   "and run the same command again to start over"), err
    assert cli_main(argv) == 0
    assert (out / LATEST).read_text().strip() == "step_00000002"
