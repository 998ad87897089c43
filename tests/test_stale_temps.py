"""A killed writer's temporary beside an output is removed by the next write of it, where
its writer is surely dead; a live writer's never is.

Before: outside a run directory (``analyze --out``, benchmark results, ``quantize
--out``) each killed write left its temporary for good (a whole model for quantize),
and ``quantize`` removed every ``.<out>.tmp*`` directory, a save running beside it
included. A temporary's name now holds its writer (``temps.writer_mark``: host tag and
pid); ``dead_pid`` (conftest) is a reaped child's pid, ``live_pid`` a sleeping child's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moekit.train import rundir, temps
from moekit.train.temps import host_tag, writer_gone, writer_mark

OTHER_HOST = "0" * 8 if host_tag() != "0" * 8 else "1" * 8


@pytest.fixture
def live_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def _temp(folder: Path, target: str, host: str, pid: int, suffix: str = "") -> Path:
    p = folder / f".{target}.tmp{host}-{pid}-abcd1234{suffix}"
    p.write_text("half written")
    return p


def test_a_write_removes_its_targets_temporaries_whose_writers_are_dead(tmp_path, dead_pid,
                                                                       live_pid):
    (tmp_path / "result.json").write_text("old")
    dead = _temp(tmp_path, "result.json", host_tag(), dead_pid, ".json")
    kept = [_temp(tmp_path, "result.json", host_tag(), live_pid, ".json"),  # writing now
            _temp(tmp_path, "result.json", host_tag(), os.getpid(), ".json"),  # this one
            _temp(tmp_path, "result.json", OTHER_HOST, dead_pid, ".json"),  # another host
            _temp(tmp_path, "other.json", host_tag(), dead_pid, ".json"),  # another target
            tmp_path / ".result.json.tmpabcd1234.json"]  # written before the mark: unknown
    kept[-1].write_text("half written")
    rundir.write_whole(tmp_path / "result.json", "new")
    assert (tmp_path / "result.json").read_text() == "new"
    assert not dead.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["result.json", *(p.name for p in kept)])
    assert all(p.read_text() == "half written" for p in kept)


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from moekit.train import rundir

    def write(tmp):
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)

    rundir.write_files(Path(sys.argv[1]), {"result.json": write})
""")


def test_a_writer_killed_mid_write_leaves_the_old_file_and_the_next_write_its_temporary(
        tmp_path):
    (tmp_path / "result.json").write_text("old")
    env = {**os.environ, "PYTHONPATH": str(Path(rundir.__file__).parents[2])}
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], env=env)
    assert child.returncode == -signal.SIGKILL
    left = sorted(set(os.listdir(tmp_path)) - {"result.json"})
    assert len(left) == 1 and left[0].startswith(".result.json.tmp" + host_tag() + "-")
    assert (tmp_path / left[0]).read_text() == "half"
    assert (tmp_path / "result.json").read_text() == "old"
    rundir.write_whole(tmp_path / "result.json", "new")
    assert sorted(os.listdir(tmp_path)) == ["result.json"]
    assert (tmp_path / "result.json").read_text() == "new"


def test_a_quantize_save_removes_dead_saves_directories_not_a_live_ones(tmp_path, dead_pid,
                                                                       live_pid):
    from moekit.models import LMConfig, MoETransformer
    from moekit.quant import io as qio
    from moekit.quant import quantize

    dirs = {name: tmp_path / f".q.tmp{host}-{pid}-abcd1234" for name, host, pid in [
        ("dead", host_tag(), dead_pid), ("live", host_tag(), live_pid),
        ("other host", OTHER_HOST, dead_pid)]}
    for d in dirs.values():
        d.mkdir()
        (d / qio.MODEL_FILE).write_bytes(b"\x00" * 100)
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, dim=32, num_layers=1, num_heads=2, max_seq_len=16,
                   ffn_dim=32, num_experts=4, top_k=2)
    qio.save_quantized(quantize(MoETransformer(cfg).eval(), bits=8), tmp_path / "q")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["q", dirs["live"].name, dirs["other host"].name])
    assert (dirs["live"] / qio.MODEL_FILE).read_bytes() == b"\x00" * 100


def test_clean_run_dir_leaves_a_live_savers_temporaries(tmp_path, dead_pid, live_pid):
    """A run directory's owner removes any temporary there, but not one whose writer is
    alive on this host: another process is saving into it."""
    live = [tmp_path / f".step_00000004.tmp{host_tag()}-{live_pid}-abcd1234",
            _temp(tmp_path, "LATEST", host_tag(), live_pid)]
    live[0].mkdir()
    dead = [tmp_path / f".step_00000004.tmp{host_tag()}-{dead_pid}-abcd1234",
            _temp(tmp_path, "LATEST", host_tag(), dead_pid),
            _temp(tmp_path, "LATEST", OTHER_HOST, live_pid)]
    dead[0].mkdir()
    done = rundir.clean_run_dir(tmp_path)
    assert sorted(done) == sorted(f"removed {p.name}" for p in dead)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in live)


def test_a_tokenizer_copy_removes_a_killed_copys_directory(tmp_path, dead_pid, live_pid):
    from moekit.inference.text import TOKENIZER_DIR, copy_tokenizer

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "tokenizer.json").write_text("{}")
    dead = dst / f".{TOKENIZER_DIR}.tmp{host_tag()}-{dead_pid}-abcd1234"
    live = dst / f".{TOKENIZER_DIR}.tmp{host_tag()}-{live_pid}-abcd1234"
    for d in (dead, live):
        d.mkdir()
    copy_tokenizer(src, dst)
    assert sorted(os.listdir(dst)) == sorted([TOKENIZER_DIR, live.name])


@pytest.mark.parametrize("name,gone", [
    ("{host}-{dead}-abcd1234", True),
    ("{host}-{live}-abcd1234", False),
    ("{host}-{me}-abcd1234", False),
    ("{other}-{dead}-abcd1234", False),  # a pid of another host, boot or namespace
    ("{host}-0-abcd1234", False),  # os.kill(0, ...) signals this process group
    ("{host}-9999999999-abcd1234", False),  # past pid_t: unknown, kept
    ("abcd1234", False),  # unmarked
])
def test_writer_gone_only_for_a_dead_pid_of_this_host(name, gone, dead_pid, live_pid):
    name = ".result.json.tmp" + name.format(host=host_tag(), dead=dead_pid, live=live_pid,
                                            me=os.getpid(), other=OTHER_HOST) + ".json"
    assert writer_gone(name) is gone


def test_another_process_on_this_host_marks_with_the_same_tag_and_its_own_pid():
    """What lets a later process judge a killed writer's temporary: the same host tag,
    and the writer's own pid (read at each call, so a forked child writes under its own)."""
    env = {**os.environ, "PYTHONPATH": str(Path(rundir.__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", "import os; from moekit.train.temps import "
                          "writer_mark; print(writer_mark(), os.getpid())"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == f"{host_tag()}-{out[1]}-" != writer_mark()


def test_a_folder_that_cannot_be_listed_removes_nothing_and_raises_nothing(tmp_path):
    assert temps.remove_dead_temps(tmp_path / "absent", ["result.json"]) == []
