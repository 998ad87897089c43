"""``save_quantized`` replaces its output atomically and leaves nothing behind on failure.

Before: a write that failed left its ``.<out>.tmp*`` directory next to the output, and
an overwrite deleted the old output before renaming the new one into place, so a crash
between the two lost both.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moekit.models import LMConfig, MoETransformer
from moekit.quant import io as qio
from moekit.quant import quantize
from moekit.train import rundir

CFG = LMConfig(vocab_size=64, dim=32, num_layers=1, num_heads=2, max_seq_len=16, ffn_dim=32,
               num_experts=4, top_k=2)


def _quantized(seed: int) -> MoETransformer:
    torch.manual_seed(seed)
    return quantize(MoETransformer(CFG).eval(), bits=8)


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _quantized_run(tmp_path, capsys) -> tuple:
    """A training checkpoint in tmp_path/run and its int8 `moekit quantize` in tmp_path/q:
    (run, out, the output's files), the command's output read away."""
    from moekit.cli import main as cli_main
    from moekit.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = MoETransformer(CFG)
    run = tmp_path / "run"
    save_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 1, "model_config": CFG.to_dict()})
    out = tmp_path / "q"
    assert cli_main(["quantize", str(run), "--bits", "8", "--out", str(out)]) == 0
    before = _files(out)
    capsys.readouterr()
    return run, out, before


def _assert_same_weights(model: MoETransformer, out) -> None:
    loaded = qio.load_quantized(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def _dies_midway(monkeypatch) -> None:
    """The weights are half written when the process gets an error (disk full)."""
    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qio, "save_file", half_written)


def test_failed_overwrite_keeps_the_old_output_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    old = _quantized(0)
    out = qio.save_quantized(old, tmp_path / "q")
    before = _files(out)
    _dies_midway(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        qio.save_quantized(_quantized(1), out)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no .q.tmp*, no .q.old
    assert _files(out) == before
    _assert_same_weights(old, out)


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    _dies_midway(monkeypatch)
    with pytest.raises(OSError):
        qio.save_quantized(_quantized(0), tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_old_output_without_leftovers(tmp_path, monkeypatch):
    out = qio.save_quantized(_quantized(0), tmp_path / "q")
    new = _quantized(1)
    renames = []
    real_rename = os.rename

    def watched(src, dst):  # the old output must still exist whenever the new is not there
        renames.append((str(src), str(dst)))
        assert out.exists() or rundir.aside_of(out).exists()
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", watched)
    qio.save_quantized(new, out)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    _assert_same_weights(new, out)
    assert renames and renames[-1][1] == str(out)


def test_output_holding_other_files_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a quantized checkpoint"):
        qio.save_quantized(_quantized(0), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert _files(out) == {"notes.txt": b"mine"}


def test_output_left_aside_by_a_killed_overwrite_is_read(tmp_path):
    """Killed between swap_in's two renames: the old output lies under .<name>.old."""
    old, out = _quantized(0), tmp_path / "q"
    qio.save_quantized(old, out)
    os.rename(out, rundir.aside_of(out))  # what the first rename leaves
    assert qio.is_quantized_checkpoint(out)
    _assert_same_weights(old, out)
    new = _quantized(1)
    qio.save_quantized(new, out)  # the next save puts a complete output back
    _assert_same_weights(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_missing_model_file_is_a_named_checkpoint_error(tmp_path, capsys):
    """quantized.json without model.safetensors: a CheckpointError naming the file (was
    sha256's FileNotFoundError, a traceback out of `moekit generate`), as a float
    checkpoint's missing file is."""
    from moekit.cli import main as cli_main
    from moekit.train.checkpoint import CheckpointError

    out = qio.save_quantized(_quantized(0), tmp_path / "q")
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        qio.load_quantized(out)
    assert cli_main(["generate", "--checkpoint", str(out), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("moekit generate: error: ") and len(err.splitlines()) == 1, err
    assert str(out / "model.safetensors") in err


def _with_bad_value(out, name: str, value: float) -> None:
    """``out``'s tensor ``name`` with one element set to ``value``, the SHA-256 in
    quantized.json fixed up to match (as the tester did)."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(out / "model.safetensors"))
    meta = json.loads((out / "quantized.json").read_text())
    meta["sha256"] = rundir.sha256(out / "model.safetensors")
    (out / "quantized.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("bits,part,value", [
    (8, "scales", float("nan")), (4, "scales", float("inf")), (4, "zeros", float("-inf")),
])
def test_non_finite_scales_or_zero_points_are_refused_at_load(tmp_path, capsys, bits, part,
                                                              value):
    """One non-finite scale or zero point: a CheckpointError naming the tensor at load (was:
    loaded, then `generate` died in sampling and `perplexity` printed nan with exit 0).
    A finite change loads (the check is of finiteness, not of the values)."""
    from moekit.cli import main as cli_main
    from moekit.train.checkpoint import CheckpointError

    torch.manual_seed(0)
    q = quantize(MoETransformer(CFG).eval(), bits=bits, group_size=None if bits == 8 else 32)
    out = qio.save_quantized(q, tmp_path / "q")
    name = f"blocks.0.ffn.experts.w_in.{part}"
    _with_bad_value(out, name, 0.5)
    assert qio.load_quantized(out).state_dict()[name].view(-1)[3] == 0.5
    _with_bad_value(out, name, value)
    with pytest.raises(CheckpointError, match=rf"{name} holds 1 non-finite value"):
        qio.load_quantized(out)
    for argv in (["generate", "--max-new-tokens", "2"], ["perplexity"]):
        assert cli_main([*argv, "--checkpoint", str(out)]) == 1  # the checkpoint: not usage
        err = capsys.readouterr().err.strip()
        assert name in err and len(err.splitlines()) == 1, err


def test_quantizing_a_quantized_checkpoint_says_it_is_already_quantized(tmp_path, capsys):
    """`moekit quantize q8 --bits 4` said "no state.json or LATEST there": now that it is
    already quantized, and to quantize the float run; nothing is written."""
    from moekit.cli import main as cli_main

    out = qio.save_quantized(_quantized(0), tmp_path / "q8")
    assert cli_main(["quantize", str(out), "--bits", "4", "--out", str(tmp_path / "qq")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"checkpoint={str(out)!r} is already quantized" in err
    assert "int8" in err and "float run" in err and "state.json" not in err
    assert not (tmp_path / "qq").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_get_the_mode_mkdir_gives_under_the_umask(tmp_path, umask):
    """A quantized output and a training checkpoint's step directory were 0700 whatever
    the umask (tempfile.mkdtemp's mode, kept by the swap into place); now what a plain
    mkdir gives beside them."""
    import stat

    from moekit.train.checkpoint import save_checkpoint

    old = os.umask(umask)
    try:
        (tmp_path / "plain").mkdir()
        qio.save_quantized(_quantized(0), tmp_path / "q")
        model = MoETransformer(CFG)
        save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                        {"step": 3, "model_config": CFG.to_dict()})
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o777 & ~umask
    for d in (tmp_path / "q", tmp_path / "run" / "step_00000003"):
        assert stat.S_IMODE(d.stat().st_mode) == want, d
    # LATEST was 0600 (tempfile.mkstemp's mode) whatever the umask: others could read
    # the step directory but not the file naming it; now what open() gives under the umask
    assert stat.S_IMODE((tmp_path / "run" / "LATEST").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("where", ["rename", "rename and its undoing", "directory fsync"])
def test_cli_says_what_a_failure_at_the_swap_left(tmp_path, monkeypatch, capsys, where):
    """A failure at the swap into place: the rename of the new output (the old one,
    already moved aside, is renamed back, so it is unchanged as the message says; it had
    stayed under .q.old with q missing), or the directory's fsync after it (the new
    output is in place: the message had said "what was there before is unchanged").
    Where the old one cannot be renamed back either, the message says where it waits."""
    import errno

    from moekit.cli import main as cli_main

    run, out, before = _quantized_run(tmp_path, capsys)
    if where.startswith("rename"):
        rename = os.rename

        def refuse(src, dst):  # the new output's rename (and the old one's back)
            if Path(dst) == out and (where != "rename" or ".q.tmp" in Path(src).name):
                raise OSError(errno.EIO, "Input/output error (injected)")
            rename(src, dst)
        monkeypatch.setattr(os, "rename", refuse)
    else:
        fsync = os.fsync

        def fail(fd):
            if Path(os.readlink(f"/proc/self/fd/{fd}")) == tmp_path:
                raise OSError(errno.EIO, "Input/output error (injected)")
            fsync(fd)
        monkeypatch.setattr(os, "fsync", fail)
    assert cli_main(["quantize", str(run), "--bits", "4", "--group-size", "32",
                     "--out", str(out), "--overwrite"]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    left = {"rename": "what was there before is unchanged",
            "rename and its undoing": "q is missing: the one there before waits under "
                                      ".q.old, which readers use",
            "directory fsync": "the new files are in place, whole, but the directory's "
                               "fsync failed: a power loss before the disk syncs may undo "
                               "the renames"}[where]
    assert err == (f"moekit quantize: error: could not write out={str(out)!r}: "
                   f"Input/output error (injected); {left}"), err
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    if where == "rename":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "run"]  # no .q.old
        assert _files(out) == before
    elif where == "rename and its undoing":
        assert sorted(p.name for p in tmp_path.iterdir()) == [".q.old", "run"]
        assert _files(tmp_path / ".q.old") == before
        assert qio.read_meta(qio.located(out))["bits"] == 8  # what readers use
    else:
        assert qio.read_meta(out)["bits"] == 4  # the new output
        qio.load_quantized(out)  # whole: its SHA-256 checks


def test_cli_disk_full_is_one_line_and_keeps_the_old_output(tmp_path, monkeypatch, capsys):
    """`moekit quantize` onto a full disk ended in a traceback (the OSError of the write);
    now one line naming --out, and the output quantized before still loads."""
    from moekit.cli import main as cli_main

    run, out, before = _quantized_run(tmp_path, capsys)

    def half_written(layout, tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qio, "save_stream", half_written)
    assert cli_main(["quantize", str(run), "--bits", "4", "--group-size", "32",
                     "--out", str(out), "--overwrite"]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert err == (f"moekit quantize: error: could not write out={str(out)!r}: No space "
                   "left on device; what was there before is unchanged"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "run"]  # no .q.tmp*
    assert _files(out) == before
    assert qio.load_quantized(out).config == CFG


def test_a_save_cleans_up_what_killed_saves_left(tmp_path):
    """A save killed mid-write leaves its ``.q.tmp*`` directory (a whole model); every
    one had stayed beside the output for good. The next save removes them, and nothing
    else: not another output's, not a file of the user's."""
    import tempfile
    killed = [Path(tempfile.mkdtemp(dir=tmp_path, prefix=".q.tmp")) for _ in range(2)]
    for d in killed:
        (d / qio.MODEL_FILE).write_bytes(b"\x00" * 100)
    others = [tmp_path / ".q2.tmpabcd1234", tmp_path / ".q.tmp-mine"]
    others[0].mkdir()
    others[1].write_text("the user's")
    out = qio.save_quantized(_quantized(0), tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["q", *(p.name for p in others)])
    _assert_same_weights(_quantized(0), out)


def test_cli_names_the_group_size_that_tiles_the_model(tmp_path, capsys):
    """The tiny preset (D = 32) at int4's default group size 64: refused leading with
    --group-size and saying that 32 tiles every input dimension; 32 then quantizes it."""
    from moekit.cli import main as cli_main
    from moekit.models import preset
    from moekit.train.checkpoint import save_checkpoint

    cfg = preset("tiny")
    assert cfg.dim == 32
    model = MoETransformer(cfg)
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 1, "model_config": cfg.to_dict()})
    argv = ["quantize", str(tmp_path / "run"), "--bits", "4", "--out", str(tmp_path / "q")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moekit quantize: error: --group-size: group_size=64 does not "
                          "divide the input dimension of ") and err.endswith(
        "; group_size=32 tiles every input dimension"), err
    assert cli_main([*argv, "--group-size", "32"]) == 0


def test_cli_refuses_an_earlier_output_unless_told_to_overwrite(tmp_path, capsys):
    """`moekit quantize --out q` onto an earlier output replaced it silently, while `moekit
    convert` refuses a destination holding a checkpoint. Now refused (exit 2, naming
    --out and --overwrite) before anything is read or written, q as it was; with
    --overwrite it is replaced whole; an empty directory is still taken as it is."""
    from moekit.cli import main as cli_main

    run, out, before = _quantized_run(tmp_path, capsys)
    argv = ["quantize", str(run), "--bits", "4", "--group-size", "32", "--out", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"moekit quantize: error: --out: out={str(out)!r} is not allowed: it "
                   "already holds a quantized checkpoint (quantized.json); pick a new or "
                   "empty directory, or replace it whole with overwrite=True (moekit "
                   "quantize --overwrite)"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "run"]
    assert _files(out) == before
    # the output a killed overwrite left aside (.q.old, q missing) is refused alike
    os.rename(out, rundir.aside_of(out))
    assert cli_main(argv) == 2 and "already holds a quantized checkpoint" in \
        capsys.readouterr().err
    assert _files(rundir.aside_of(out)) == before
    os.rename(rundir.aside_of(out), out)
    with pytest.raises(ValueError, match="already holds a quantized checkpoint"):
        qio.quantize_checkpoint(run, out, 8, overwrite=False)  # the library's switch
    assert cli_main([*argv, "--overwrite"]) == 0
    capsys.readouterr()
    assert qio.read_meta(out)["bits"] == 4 and _files(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "run"]
    (tmp_path / "empty").mkdir()
    assert cli_main([*argv[:-1], str(tmp_path / "empty")]) == 0
    assert qio.read_meta(tmp_path / "empty")["bits"] == 4
