"""Writers fsync the data, rename it into place, then fsync the directory (power loss).

Before: the rename alone was atomic against kill -9 and a full disk, but the directory
was never fsynced (and results, LATEST's directory, quantized and converted outputs were
renamed without it), so after a power loss the new name could be on disk with data
that never reached it. ``os.fsync`` is recorded by the path its descriptor names.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch

from moekit.models import MoETransformer, preset
from moekit.train import rundir
from moekit.train.checkpoint import load_checkpoint, save_checkpoint
from moekit.train.temps import host_tag, writer_mark


@pytest.fixture
def synced(monkeypatch):
    """The paths fsynced, in order (what /proc says each descriptor is open on)."""
    seen: list[Path] = []
    real = os.fsync

    def record(fd):
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def _failing_fsync(monkeypatch, when):
    real = os.fsync

    def fail(fd):
        if when(Path(os.readlink(f"/proc/self/fd/{fd}"))):
            raise OSError(errno.EIO, "Input/output error (injected)")
        real(fd)

    monkeypatch.setattr(os, "fsync", fail)


def is_temp_of(p: Path, final: Path) -> bool:
    """Whether ``p`` is a temporary of ``final`` as write_files names them: beside it,
    ``.<name>.tmp``, this process as its writer, mkstemp's 8 characters, the suffix again
    (savefig reads it)."""
    return p.parent == final.parent and re.fullmatch(
        re.escape(f".{final.name}.tmp{writer_mark()}") + r"[a-z0-9_]{8}"
        + re.escape(final.suffix), p.name) is not None


def test_write_whole_fsyncs_the_file_then_its_directory(tmp_path, synced):
    path = tmp_path / "result.json"
    rundir.write_whole(path, "{}")
    assert len(synced) == 2 and is_temp_of(synced[0], path), synced
    assert synced[1] == tmp_path
    assert path.read_text() == "{}"


def test_a_failed_fsync_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    path.write_text("old")
    _failing_fsync(monkeypatch, lambda p: is_temp_of(p, path))
    with pytest.raises(OSError, match="injected"):
        rundir.write_whole(path, "new")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


def _lm():
    torch.manual_seed(0)
    lm = MoETransformer(preset("tiny"))
    return lm, torch.optim.AdamW(lm.parameters()), lm.config.to_dict()


def test_checkpoint_files_then_directory_then_run_dir_are_fsynced(tmp_path, synced):
    lm, optim, cfg = _lm()
    out = save_checkpoint(tmp_path, lm, optim, {"step": 1, "model_config": cfg})
    names = {p.name for p in synced}
    for f in ("model.safetensors", "optimizer.safetensors", "state.json", "manifest.json"):
        assert f in names, f"{f} was not fsynced: {sorted(names)}"
    # the checkpoint directory's entries, then the run directory that the rename changed,
    # then LATEST's temporary file, then the run directory again (LATEST's rename)
    last = max(i for i, p in enumerate(synced) if p.name.startswith(".step_00000001.tmp"))
    after = synced[last + 1:]
    assert after[0] == tmp_path
    assert after[1].name.startswith(".LATEST.") and after[2] == tmp_path
    assert (tmp_path / "LATEST").read_text() == out.name + "\n"


@pytest.mark.parametrize("failing", ["checkpoint file", "LATEST"])
def test_a_failed_fsync_keeps_the_previous_checkpoint_latest(tmp_path, monkeypatch, failing):
    lm, optim, cfg = _lm()
    save_checkpoint(tmp_path, lm, optim, {"step": 1, "model_config": cfg})
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(1.0)
    _failing_fsync(monkeypatch, (lambda p: p.name == "state.json") if failing != "LATEST"
                   else (lambda p: p.name.startswith(".LATEST.")))
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path, lm, optim, {"step": 2, "model_config": cfg})
    assert (tmp_path / "LATEST").read_text() == "step_00000001\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    loaded = load_checkpoint(tmp_path)
    assert loaded.path.name == "step_00000001"
    for k, v in before.items():
        assert torch.equal(loaded.model[k], v), k


def test_quantized_output_files_then_parent_are_fsynced(tmp_path, synced):
    from moekit.quant import io as qio
    from moekit.quant import quantize

    torch.manual_seed(0)
    model = quantize(MoETransformer(preset("tiny")).eval(), bits=8)
    qio.save_quantized(model, tmp_path / "q")
    names = [p.name for p in synced]
    assert {qio.MODEL_FILE, qio.META_FILE} <= set(names)
    assert synced[-1] == tmp_path  # the rename of .q.tmp* to q, after the files and .q.tmp*
    assert synced[-2].name.startswith(".q.tmp")


def _recorded(monkeypatch) -> list[tuple[str, Path]]:
    """("fsync", the path fsynced) and ("replace", the destination), in order."""
    seen: list[tuple[str, Path]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (
        seen.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (
        seen.append(("replace", Path(b))), real_replace(a, b)))
    return seen


def test_write_files_fsyncs_every_file_before_any_rename(tmp_path, monkeypatch):
    """A failed fsync of the second file must not leave the first renamed in, so every
    fsync comes before the first rename; the directory once after."""
    seen = _recorded(monkeypatch)
    rundir.write_files(tmp_path, {"a.md": lambda p: p.write_text("a"),
                                  "b.json": lambda p: p.write_text("b")})
    assert [what for what, _ in seen] == ["fsync", "fsync", "replace", "replace", "fsync"]
    assert is_temp_of(seen[0][1], tmp_path / "a.md"), seen
    assert is_temp_of(seen[1][1], tmp_path / "b.json"), seen
    assert [p for _, p in seen[2:]] == [tmp_path / "a.md", tmp_path / "b.json", tmp_path]


def test_write_files_a_failed_fsync_renames_none(tmp_path, monkeypatch):
    (tmp_path / "a.md").write_text("old a")
    (tmp_path / "b.json").write_text("old b")
    _failing_fsync(monkeypatch, lambda p: is_temp_of(p, tmp_path / "b.json"))
    with pytest.raises(OSError, match="injected"):
        rundir.write_files(tmp_path, {"a.md": lambda p: p.write_text("new a"),
                                      "b.json": lambda p: p.write_text("new b")})
    assert (tmp_path / "a.md").read_text() == "old a"
    assert (tmp_path / "b.json").read_text() == "old b"
    assert sorted(os.listdir(tmp_path)) == ["a.md", "b.json"]


def test_write_files_a_failed_directory_fsync_raises_with_the_new_files_in(tmp_path,
                                                                         monkeypatch):
    """What write_files' docstring promises past the renames (it had said "all of them or
    none ... what was there before stays"): the directory's fsync fails after every
    rename, so the error comes with each new file whole in place and no temporary left."""
    (tmp_path / "a.md").write_text("old a")
    _failing_fsync(monkeypatch, lambda p: p == tmp_path)
    with pytest.raises(rundir.ReplacedError, match="injected") as e:
        rundir.write_files(tmp_path, {"a.md": lambda p: p.write_text("new a"),
                                      "b.json": lambda p: p.write_text("new b")})
    assert e.value.errno == errno.EIO  # still the OSError callers catch, same errno
    assert rundir.left_by(e.value).startswith("the new files are in place, whole, but")
    assert (tmp_path / "a.md").read_text() == "new a"
    assert (tmp_path / "b.json").read_text() == "new b"
    assert sorted(os.listdir(tmp_path)) == ["a.md", "b.json"]


def test_tokenizer_copy_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    from moekit.inference.text import TOKENIZER_DIR, copy_tokenizer

    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (tmp_path / "dst").mkdir()
    seen = _recorded(monkeypatch)
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (
        seen.append(("rename", Path(b))), real_rename(a, b)))
    out = copy_tokenizer(src, tmp_path / "dst")
    tmp = seen[1][1]  # a new directory each copy (swap_in renames it, not os.replace)
    assert tmp.parent == tmp_path / "dst" and tmp.name.startswith(f".{TOKENIZER_DIR}.tmp")
    assert seen == [("fsync", tmp / "tokenizer.json"), ("fsync", tmp),
                    ("rename", out), ("fsync", tmp_path / "dst")]


def test_converted_files_are_fsynced_before_and_their_directory_after(tmp_path, monkeypatch):
    from moekit.integrations.hf.convert import moekit_to_hf

    lm, _, cfg = _lm()
    save_checkpoint(tmp_path / "run", lm, torch.optim.SGD(lm.parameters(), lr=0.0),
                    {"step": 1, "model_config": cfg})
    seen = _recorded(monkeypatch)
    out = moekit_to_hf(tmp_path / "run", tmp_path / "hf")
    names = ("model.safetensors", "config.json")
    first = min(seen.index(("replace", out / name)) for name in names)
    last = max(seen.index(("replace", out / name)) for name in names)
    for name in names:
        synced = [i for i, (what, p) in enumerate(seen)
                  if what == "fsync" and is_temp_of(p, out / name)]
        assert len(synced) == 1 and synced[0] < first, (name, seen)
    assert seen[last + 1] == ("fsync", out)
    # a failed fsync: the earlier output stays, no temporary is left
    before = {name: (out / name).read_bytes() for name in names}
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(1.0)
    save_checkpoint(tmp_path / "run", lm, torch.optim.SGD(lm.parameters(), lr=0.0),
                    {"step": 2, "model_config": cfg})
    _failing_fsync(monkeypatch, lambda p: is_temp_of(p, out / "config.json"))
    with pytest.raises(OSError, match="injected"):
        moekit_to_hf(tmp_path / "run", tmp_path / "hf")
    for name in names:  # model.safetensors' new data was fsynced but not renamed in
        assert (out / name).read_bytes() == before[name], name
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_failed_chmod_of_latest_leaves_no_descriptor_nor_temporary(tmp_path, monkeypatch):
    (tmp_path / "LATEST").write_text("step_00000001\n")
    before = len(os.listdir("/proc/self/fd"))

    def refuse(path, mode):
        raise PermissionError(errno.EPERM, "Operation not permitted (injected)", str(path))

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)  # write_whole's temporary (temp_file)
    with pytest.raises(PermissionError, match="injected"):
        rundir.write_latest(tmp_path, "step_00000002")
    assert len(os.listdir("/proc/self/fd")) == before  # the temporary's descriptor closed
    assert sorted(os.listdir(tmp_path)) == ["LATEST"]
    assert (tmp_path / "LATEST").read_text() == "step_00000001\n"


def test_two_writers_of_one_file_leave_one_whole_version_and_no_temporary(tmp_path):
    """Two writers of one file (two processes saving the same result.json) each wrote
    into the one temporary name ``.<name>.tmp<suffix>``: the second truncated the
    first's half-written data, and the first renamed the torn file into place (the
    second's rename then failed: FileNotFoundError). Both writers are held half-way
    through their data (a barrier) so that both are writing at once."""
    import threading

    path = tmp_path / "result.json"
    versions = ["A" * 100_000, "B" * 150_000]
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def writer(text):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text[:50_000])
                f.flush()
                barrier.wait()  # the other writer is half-way too
                f.write(text[50_000:])
        return write

    def save(text):
        try:
            rundir.write_files(tmp_path, {path.name: writer(text)})
        except BaseException as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=save, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert path.read_text() in versions
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask):
    """mkstemp makes its file 0600 and the rename keeps that: a results file other users
    could read before (written by open under the umask) must stay readable to them."""
    old = os.umask(umask)
    try:
        rundir.write_whole(tmp_path / "result.json", "{}")
        (tmp_path / "plain").write_text("{}")
    finally:
        os.umask(old)
    mode = (tmp_path / "result.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_writer_leaves_the_old_files_and_no_temporary(tmp_path):
    (tmp_path / "a.md").write_text("old a")

    def full_disk(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    with pytest.raises(OSError, match="injected"):
        rundir.write_files(tmp_path, {"a.md": lambda p: p.write_text("new a"),
                                      "b.json": full_disk})
    assert sorted(os.listdir(tmp_path)) == ["a.md"]
    assert (tmp_path / "a.md").read_text() == "old a"


def test_clean_run_dir_removes_the_temporaries_of_killed_writes(tmp_path, dead_pid):
    """Each write has its own temporary name now, so a killed writer's is no longer
    overwritten by the next: a new run in the directory removes it (one a dead process
    wrote, one of another host or boot, one named before the writer was in the name),
    and nothing that is not one (a user's file, a name without mkstemp's 8 characters
    or whose suffix is not the file's) is touched, nor a live writer's (this process)."""
    live = [rundir.temp_file(tmp_path, "result.json"), rundir.temp_file(tmp_path, "a.png"),
            rundir.temp_file(tmp_path, "metrics")]
    assert all(is_temp_of(p, tmp_path / n) for p, n in
               zip(live, ["result.json", "a.png", "metrics"], strict=True))
    other_host = "0" * 8 if host_tag() != "0" * 8 else "1" * 8
    killed = [tmp_path / f".result.json.tmp{host_tag()}-{dead_pid}-abcd1234.json",
              tmp_path / f".a.png.tmp{host_tag()}-{dead_pid}-abcd1234.png",
              tmp_path / f".metrics.tmp{other_host}-{os.getpid()}-abcd1234",
              tmp_path / ".result.json.tmpabcd1234.json"]
    for p in killed:
        p.write_text("x")
    kept = ["result.json", ".result.json.tmp-mine.json", ".result.json.tmpabcd1234.png",
            ".result.json.tmpabcd123.json", "notes.tmpabcd1234.txt", *(p.name for p in live)]
    for name in kept:
        (tmp_path / name).write_text("x")
    done = rundir.clean_run_dir(tmp_path)
    assert sorted(done) == sorted(f"removed {p.name}" for p in killed)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_a_failed_second_rename_says_which_file_is_new(tmp_path, monkeypatch):
    """The renames run one after another: the first done, the second refused. The error
    says which file is new; an error before any rename says that nothing changed."""
    (tmp_path / "a.md").write_text("old a")
    (tmp_path / "b.json").write_text("old b")
    replace = os.replace

    def refuse(src, dst):
        if Path(dst).name == "b.json":
            raise OSError(errno.EIO, "Input/output error (injected)", str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(rundir.ReplacedError) as e:
        rundir.write_files(tmp_path, {"a.md": lambda p: p.write_text("new a"),
                                      "b.json": lambda p: p.write_text("new b")})
    assert e.value.filename == str(tmp_path / "b.json")
    assert rundir.left_by(e.value) == "a.md is new (whole), the rest as before"
    assert [(tmp_path / n).read_text() for n in ("a.md", "b.json")] == ["new a", "old b"]
    assert sorted(os.listdir(tmp_path)) == ["a.md", "b.json"]
    monkeypatch.setattr(os, "replace", lambda src, dst: refuse(src, tmp_path / "b.json"))
    with pytest.raises(OSError) as e:
        rundir.write_files(tmp_path, {"a.md": lambda p: p.write_text("newer a")})
    assert not isinstance(e.value, rundir.ReplacedError)
    assert rundir.left_by(e.value) == "what was there before is unchanged"
    assert (tmp_path / "a.md").read_text() == "new a"
    assert sorted(os.listdir(tmp_path)) == ["a.md", "b.json"]
