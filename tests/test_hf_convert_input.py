"""`moekit convert`: nothing of the source is dropped, bad sources are named, and an
interrupted ``--to hf`` write leaves no partial file behind.

Before: a Mixtral directory holding tensors its config.json has no place for (a layer
more than num_hidden_layers, a bias) converted with exit 0 and those tensors silently
left out; a tensor of the wrong shape or a truncated shard ended the CLI in a
RuntimeError / SafetensorError traceback; ``--to hf`` wrote model.safetensors in place,
so a failed write left a partial file that made the retry refuse the directory.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.integrations.hf import convert, convert_tensors
from moekit.safetensors_write import save_file
from tests import hf_models

transformers = hf_models.transformers


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**hf_models.COMMON, intermediate_size=24,
                                     num_local_experts=4, num_experts_per_tok=2)
    path = tmp_path_factory.mktemp("mixtral") / "hf"
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="moekit convert")
    convert.add_arguments(parser)
    return convert.run(parser.parse_args(argv))


def _edited(hf_dir, tmp_path, edit):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    f = src / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(str(f)).items()}  # no mmap of f
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("extra", [
    "model.layers.2.self_attn.q_proj.weight",  # a layer config.json does not have
    "model.layers.0.self_attn.q_proj.bias",  # moekit's attention has no bias
])
def test_tensors_the_config_has_no_place_for_are_not_dropped(hf_dir, tmp_path, capsys, extra):
    src = _edited(hf_dir, tmp_path, lambda t: t.update({extra: torch.ones(32)}))
    assert cli(str(src), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"source={str(src)!r} is not allowed" in err and extra in err
    assert "would drop them" in err
    assert not (tmp_path / "out").exists()


def test_saved_rotary_inv_freq_is_not_counted_as_dropped(hf_dir, tmp_path):
    # older exports keep the rotary buffer; moekit derives it from rope_theta
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    src = _edited(hf_dir, tmp_path, lambda t: t.update({name: torch.ones(4)}))
    assert cli(str(src), str(tmp_path / "out")) == 0


def test_tied_lm_head_copy_is_not_counted_as_dropped(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**hf_models.COMMON, intermediate_size=24,
                                     num_local_experts=4, num_experts_per_tok=2,
                                     tie_word_embeddings=True)
    model = transformers.MixtralForCausalLM(cfg)
    (tmp_path / "src").mkdir()
    sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in sd  # the copy some tied checkpoints keep
    save_file(sd, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(tmp_path / "src")
    assert cli(str(tmp_path / "src"), str(tmp_path / "out")) == 0


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.update({"model.norm.weight": torch.ones(31)}), "do not fit its config.json"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.ones(15, 32)}),
     "do not fit its config.json"),
    (lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"),
     "has no tensor 'model.layers.1.block_sparse_moe.experts.3.w2.weight'"),
])
def test_tensors_that_do_not_fit_the_config_are_named(hf_dir, tmp_path, capsys, edit, match):
    src = _edited(hf_dir, tmp_path, edit)
    assert cli(str(src), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"source={str(src)!r} is not allowed" in err and match in err
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_named(hf_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert cli(str(src), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "shard model.safetensors is not a readable safetensors file" in err


def test_a_read_failing_mid_conversion_leaves_no_checkpoint(hf_dir, tmp_path, monkeypatch,
                                                              capsys):
    """The conversion reads and writes a tensor at a time: a shard that fails on the last
    layer's experts (a disk error, a file changed underneath) leaves no step directory
    and no LATEST, and the retry converts."""
    from safetensors import SafetensorError

    real = convert_tensors.ShardTensors.__init__

    class Failing:  # a shard handle whose reads of one expert fail
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def get_tensor(self, name):
            if name.startswith("model.layers.1.block_sparse_moe.experts.3"):
                raise SafetensorError("simulated read error")
            return self.handle.get_tensor(name)

    def failing(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.handles = [Failing(h) for h in self.handles]

    monkeypatch.setattr(convert_tensors.ShardTensors, "__init__", failing)
    assert cli(str(hf_dir), str(tmp_path / "lm")) == 2
    assert "simulated read error" in capsys.readouterr().err
    assert not list((tmp_path / "lm").glob("step_*")) and not (tmp_path / "lm" / "LATEST").exists()
    monkeypatch.setattr(convert_tensors.ShardTensors, "__init__", real)
    assert cli(str(hf_dir), str(tmp_path / "lm")) == 0


def test_interrupted_write_to_hf_leaves_nothing_and_the_retry_works(hf_dir, tmp_path,
                                                                     monkeypatch, capsys):
    assert cli(str(hf_dir), str(tmp_path / "lm")) == 0
    real = convert.save_file

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # part of the file, then the "crash"
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(convert, "save_file", crash_mid_write)
    assert cli(str(tmp_path / "lm"), str(tmp_path / "back")) == 1  # a failed write: 1, as train
    assert "simulated" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()

    (tmp_path / "given").mkdir()  # a directory the user made: kept, left empty
    assert cli(str(tmp_path / "lm"), str(tmp_path / "given")) == 1
    assert list((tmp_path / "given").iterdir()) == []

    monkeypatch.setattr(convert, "save_file", real)
    assert cli(str(tmp_path / "lm"), str(tmp_path / "back")) == 0
    want, got = load_file(hf_dir / "model.safetensors"), \
        load_file(tmp_path / "back" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() raises it: no path


def test_a_full_disk_names_the_destination(hf_dir, tmp_path, monkeypatch, capsys):
    """A failed write, either way, had read "[Errno 28] No space left on device", no path."""
    from moekit.train import checkpoint as ckpt_io

    assert cli(str(hf_dir), str(tmp_path / "lm")) == 0
    capsys.readouterr()
    for module, writer, source, dest in ((ckpt_io, "save_stream", hf_dir, tmp_path / "lm2"),
                                         (convert, "save_file", tmp_path / "lm",
                                          tmp_path / "back")):
        with monkeypatch.context() as m:
            m.setattr(module, writer, _disk_full)
            assert cli(str(source), str(dest)) == 1  # a failed write
        err = capsys.readouterr().err.strip()
        assert err == (f"moekit convert: error: could not write to {dest}: "
                       f"{os.strerror(errno.ENOSPC)}"), err
    with pytest.raises(convert.WriteError) as e:  # still an OSError, with its errno
        with monkeypatch.context() as m:
            m.setattr(convert, "save_file", _disk_full)
            convert.moekit_to_hf(tmp_path / "lm", tmp_path / "back")
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC


def test_a_read_only_destination_is_named(hf_dir, tmp_path, monkeypatch, capsys):
    """An error that names its file (mkdir, open) names that file."""
    real = Path.mkdir
    dest = tmp_path / "ro" / "lm"

    def read_only(self, *args, **kwargs):
        if self == dest:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert cli(str(hf_dir), str(dest)) == 1  # a failed write
    err = capsys.readouterr().err.strip()
    assert err == f"moekit convert: error: could not write to {dest}: {os.strerror(errno.EROFS)}"


def test_a_conversion_removes_what_killed_conversions_left(hf_dir, tmp_path):
    """A conversion killed mid-write leaves its ``.step_00000000.tmp*`` directory in dest
    (a retry is allowed: there is no checkpoint); each had stayed there beside the run."""
    import tempfile
    dest = tmp_path / "lm"
    dest.mkdir()
    for _ in range(2):
        killed = tempfile.mkdtemp(dir=dest, prefix=".step_00000000.tmp")
        (dest / Path(killed).name / "model.safetensors").write_bytes(b"\x00" * 100)
    assert cli(str(hf_dir), str(dest)) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["LATEST", "step_00000000"]
