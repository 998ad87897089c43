"""`moekit convert --overwrite`: a destination holding a checkpoint is refused without
it, and replaced whole with it (written beside it and swapped in: the old one stays
complete until the new one is, and if the conversion fails), as `moekit quantize
--overwrite` replaces its --out. And a destination holding anything else, such as a
tokenizer of the user's, is never written into: a conversion whose save failed had
deleted the tokenizer it copied over the user's, leaving none.

Oracle: the destination's files byte for byte against what was there before, or against
a conversion of the same source into a new directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.integrations.hf.convert import hf_to_moekit
from tests import hf_models
from tests.test_train_input_resume import one_error_line

transformers = hf_models.transformers


def _hf(path: Path, seed: int) -> Path:
    """A random Mixtral with a tokenizer file of its own (its bytes: the oracle)."""
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(**hf_models.COMMON, intermediate_size=24,
                                     num_local_experts=4, num_experts_per_tok=2)
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    (path / "tokenizer.json").write_text(f'{{"seed": {seed}}}')
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(first, second) transformers directories, and each converted to a new run
    (the expected contents, also of `--to hf` back)."""
    root = tmp_path_factory.mktemp("overwrite")
    hf = [_hf(root / f"hf{i}", seed=i) for i in (0, 1)]
    for i in (0, 1):
        assert cli_main(["convert", str(hf[i]), str(root / f"ref{i}")]) == 0
        assert cli_main(["convert", str(root / f"ref{i}"), str(root / f"back{i}")]) == 0
    return root


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _weights(run: Path) -> dict[str, bytes]:
    """A run's files that depend on the source alone (state.json and the manifest also
    hold the RNG state of the converting process)."""
    return {k: v for k, v in _files(run).items()
            if k.endswith(("model.safetensors", "optimizer.safetensors", "tokenizer.json",
                           "LATEST"))}


def test_an_existing_run_is_refused_without_overwrite(sources, tmp_path, capsys):
    dest = tmp_path / "lm"
    assert cli_main(["convert", str(sources / "hf0"), str(dest)]) == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
              for p in tmp_path.rglob("*")}
    capsys.readouterr()
    assert cli_main(["convert", str(sources / "hf1"), str(dest)]) == 2
    one_error_line(capsys, f"dest={str(dest)!r} is not allowed: it already holds a "
                    "checkpoint (LATEST, step_00000000); pick a new or empty directory, or "
                    "replace it whole with overwrite=True (moekit convert --overwrite)")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in tmp_path.rglob("*")} == before


def test_overwrite_replaces_the_run_whole(sources, tmp_path, monkeypatch):
    """The new run is written beside the old one, which stays whole until the swap; a
    file only the old run had (a later step) goes with it."""
    import moekit.train.checkpoint as ckpt_mod

    dest = tmp_path / "lm"
    assert cli_main(["convert", str(sources / "hf0"), str(dest)]) == 0
    (dest / "step_00000100").mkdir()
    (dest / "step_00000100" / "model.safetensors").write_bytes(b"trained since")
    old = _files(dest)
    real = ckpt_mod.save_stream
    seen = []

    def watching(*args, **kwargs):
        seen.append(_files(dest) == old)  # mid-conversion: the old run, untouched
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_stream", watching)
    assert cli_main(["convert", str(sources / "hf1"), str(dest), "--overwrite"]) == 0
    assert seen == [True]
    assert _weights(dest) == _weights(sources / "ref1")
    assert sorted(_files(dest)) == sorted(_files(sources / "ref1"))  # step_00000100: gone
    assert os.listdir(tmp_path) == ["lm"]  # no temporary, nothing aside


def test_a_failed_overwrite_keeps_the_old_run(sources, tmp_path, monkeypatch, capsys):
    """The save fails after the tokenizer was copied: the old run, its tokenizer
    included, stays as it was."""
    import moekit.train.checkpoint as ckpt_mod

    dest = tmp_path / "lm"
    assert cli_main(["convert", str(sources / "hf0"), str(dest)]) == 0
    before = _files(dest)
    assert before["tokenizer/tokenizer.json"] == b'{"seed": 0}'
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_stream", full)
    assert cli_main(["convert", str(sources / "hf1"), str(dest), "--overwrite"]) == 1
    one_error_line(capsys, f"could not write to {dest}: No space left on device")
    assert _files(dest) == before
    assert os.listdir(tmp_path) == ["lm"]


def test_to_hf_overwrite_replaces_the_directory_whole(sources, tmp_path, monkeypatch, capsys):
    """A shard of the old directory's that the new output does not write would have
    stayed beside it (two models' weights in one directory)."""
    from moekit.integrations.hf import convert

    dest = tmp_path / "hf"
    assert cli_main(["convert", str(sources / "ref0"), str(dest)]) == 0
    (dest / "model-00002-of-00002.safetensors").write_bytes(b"an older shard")
    old = _files(dest)
    capsys.readouterr()
    assert cli_main(["convert", str(sources / "ref1"), str(dest)]) == 2
    one_error_line(capsys, "already holds a checkpoint (config.json, model.safetensors)",
                    "--overwrite")
    assert _files(dest) == old

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(convert, "save_file", full)
        assert cli_main(["convert", str(sources / "ref1"), str(dest), "--overwrite"]) == 1
    one_error_line(capsys, f"could not write to {dest}: No space left on device")
    assert _files(dest) == old and os.listdir(tmp_path) == ["hf"]
    assert cli_main(["convert", str(sources / "ref1"), str(dest), "--overwrite"]) == 0
    assert _files(dest) == _files(sources / "back1")
    assert os.listdir(tmp_path) == ["hf"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_destination_holding_a_users_tokenizer_is_refused(sources, tmp_path,
                                                            monkeypatch, capsys, overwrite):
    """Before: the conversion wrote into it, its tokenizer copy replaced the user's (the
    old one deleted at once), and when the save then failed it deleted the copy: no
    tokenizer left. Now nothing is written into a directory that holds anything but a
    checkpoint, and a conversion is never merged into one."""
    import moekit.train.checkpoint as ckpt_mod

    dest = tmp_path / "lm"
    (dest / "tokenizer").mkdir(parents=True)
    (dest / "tokenizer" / "tokenizer.json").write_bytes(b'{"mine": true}')

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_stream", full)
    assert cli_main(["convert", str(sources / "hf1"), str(dest), *overwrite]) == 2
    one_error_line(capsys, f"dest={str(dest)!r} is not allowed: it exists and holds no "
                    "checkpoint", "pass a new or empty directory")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        hf_to_moekit(sources / "hf1", dest, overwrite=bool(overwrite))
    assert _files(dest) == {"tokenizer/tokenizer.json": b'{"mine": true}'}
    assert os.listdir(tmp_path) == ["lm"]


def test_help_names_overwrite(capsys):
    with pytest.raises(SystemExit):
        cli_main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ("--overwrite replace a checkpoint already in dest (whole: it stays as it was "
            "until the new one is complete); without it that is refused") in out
