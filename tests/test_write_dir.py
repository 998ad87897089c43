"""``rundir.write_dir``: the one way moekit writes a whole directory a user keeps
(checkpoints, the sharded save's completion, quantized outputs, the tokenizer copy,
converted runs, bench_offload's checkpoint): written beside its place, swapped in whole.

Oracle: the directory's files read back byte for byte, and the parent's listing (no
temporary, nothing aside) after each outcome.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moekit.train.rundir import aside_of, write_dir
from moekit.train.temps import host_tag


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _old(tmp_path: Path) -> Path:
    final = tmp_path / "out"
    (final / "sub").mkdir(parents=True)
    (final / "a.txt").write_bytes(b"old a")
    (final / "sub" / "gone.txt").write_bytes(b"old only")
    return final


def _new(tmp: Path) -> None:
    (tmp / "a.txt").write_bytes(b"new a")
    (tmp / "b.txt").write_bytes(b"new b")


def test_success_replaces_the_directory_whole(tmp_path):
    final = _old(tmp_path)
    assert write_dir(final, _new) == final
    assert _files(final) == {"a.txt": b"new a", "b.txt": b"new b"}  # sub/gone.txt: gone
    assert os.listdir(tmp_path) == ["out"]  # no temporary, nothing aside


def test_a_new_directory_and_its_parents_are_made(tmp_path):
    final = tmp_path / "x" / "y" / "out"
    write_dir(final, _new)
    assert _files(final) == {"a.txt": b"new a", "b.txt": b"new b"}
    assert os.listdir(final.parent) == ["out"]


@pytest.mark.parametrize("exists", [True, False])
def test_fill_raising_leaves_the_previous_directory_and_no_temporary(tmp_path, exists):
    final = _old(tmp_path) if exists else tmp_path / "out"
    before = _files(final) if exists else None

    def half_then_fail(tmp: Path) -> None:
        (tmp / "a.txt").write_bytes(b"half")
        raise KeyboardInterrupt("stopped mid-write (simulated)")

    with pytest.raises(KeyboardInterrupt):
        write_dir(final, half_then_fail)
    assert os.listdir(tmp_path) == (["out"] if exists else [])
    if exists:
        assert _files(final) == before


def test_overwrite_false_refuses_a_non_empty_directory_before_writing(tmp_path):
    final = _old(tmp_path)
    before = _files(final)
    called = []
    with pytest.raises(ValueError, match=r"final=.*out.* is not allowed: it exists and is "
                       r"not an empty directory, and overwrite=False keeps it"):
        write_dir(final, called.append, overwrite=False)
    assert called == [] and _files(final) == before and os.listdir(tmp_path) == ["out"]
    (tmp_path / "file").write_bytes(b"mine")  # a file in the way: refused the same
    with pytest.raises(ValueError, match="overwrite=False"):
        write_dir(tmp_path / "file", _new, overwrite=False)
    assert (tmp_path / "file").read_bytes() == b"mine"


def test_overwrite_false_takes_an_empty_directory(tmp_path):
    (tmp_path / "out").mkdir()
    write_dir(tmp_path / "out", _new, overwrite=False)
    assert _files(tmp_path / "out") == {"a.txt": b"new a", "b.txt": b"new b"}
    assert os.listdir(tmp_path) == ["out"]


def test_overwrite_false_refuses_what_appeared_while_filling(tmp_path):
    """Another writer filled ``final`` while ``fill`` ran: its files stay."""
    final = tmp_path / "out"

    def racing(tmp: Path) -> None:
        _new(tmp)
        final.mkdir()
        (final / "theirs.txt").write_bytes(b"theirs")

    with pytest.raises(ValueError, match="overwrite=False"):
        write_dir(final, racing, overwrite=False)
    assert _files(final) == {"theirs.txt": b"theirs"} and os.listdir(tmp_path) == ["out"]


def test_check_runs_before_writing_and_again_before_the_swap(tmp_path):
    final = _old(tmp_path)
    before = _files(final)
    seen = []

    def check(p: Path) -> None:
        seen.append(p)
        if len(seen) == 2:
            raise ValueError("out changed (simulated)")

    with pytest.raises(ValueError, match="simulated"):
        write_dir(final, _new, check=check)
    assert seen == [final, final]
    assert _files(final) == before and os.listdir(tmp_path) == ["out"]


def test_then_runs_with_the_new_directory_in_place_and_the_old_one_aside(tmp_path):
    final = _old(tmp_path)
    seen = {}

    def then() -> None:
        seen["final"], seen["aside"] = _files(final), _files(aside_of(final))

    write_dir(final, _new, then=then)
    assert seen == {"final": {"a.txt": b"new a", "b.txt": b"new b"},
                    "aside": {"a.txt": b"old a", "sub/gone.txt": b"old only"}}
    assert os.listdir(tmp_path) == ["out"]  # the old one deleted after then


def test_then_raising_keeps_the_old_directory_aside(tmp_path):
    """As a checkpoint killed before LATEST moved: the new one in place, the old one
    under ``.<name>.old`` (which ``clean_run_dir`` removes)."""
    final = _old(tmp_path)
    before = _files(final)

    def then() -> None:
        raise KeyboardInterrupt("killed (simulated)")

    with pytest.raises(KeyboardInterrupt):
        write_dir(final, _new, then=then)
    assert _files(final) == {"a.txt": b"new a", "b.txt": b"new b"}
    assert _files(aside_of(final)) == before
    assert sorted(os.listdir(tmp_path)) == [aside_of(final).name, "out"]


def test_a_given_temporary_is_filled_swapped_in_and_on_failure_left(tmp_path):
    final, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    tmp.mkdir()
    (tmp / "shard").write_bytes(b"rank 1's")

    def fail(t: Path) -> None:
        raise OSError(28, "No space left on device (simulated)")

    with pytest.raises(OSError, match="simulated"):
        write_dir(final, fail, tmp=tmp)
    assert _files(tmp) == {"shard": b"rank 1's"} and not final.exists()
    write_dir(final, _new, tmp=tmp)
    assert _files(final) == {"a.txt": b"new a", "b.txt": b"new b", "shard": b"rank 1's"}
    assert os.listdir(tmp_path) == ["out"]


def test_a_dead_writers_temporary_goes_a_live_ones_stays(tmp_path, dead_pid):
    dead = tmp_path / f".out.tmp{host_tag()}-{dead_pid}-abcd1234"
    live = tmp_path / f".out.tmp{host_tag()}-{os.getpid()}-abcd1234"
    for d in (dead, live):
        d.mkdir()
        (d / "a.txt").write_bytes(b"half")
    write_dir(tmp_path / "out", _new)
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, "out"])
