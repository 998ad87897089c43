"""`moekit train --nproc N` flags refused by the launcher before torchrun starts (one line,
exit 2, nothing created): --nproc / --ep below 1, a batch that does not split over the
processes, an --ep that does not divide the experts. No test reached these branches of
train/launch.py (lines 60, 279, 282 had 0 hits)."""

from __future__ import annotations

import pytest

from moekit.cli import main as cli_main
from tests.test_newcomer import _one_error_line, _refuse_torchrun


@pytest.mark.parametrize("flags,words", [
    (["--nproc", "0"], ["--nproc=0 is not allowed: it must be >= 1"]),
    (["--nproc", "-2", "--ep", "1"], ["--nproc=-2 is not allowed: it must be >= 1"]),
    (["--nproc", "2", "--ep", "0"], ["--ep=0 is not allowed: it must be >= 1"]),
    (["--nproc", "2", "--batch-size", "3"],
     ["--batch-size=3 is not allowed with 2 processes: it must be a multiple of the number "
      "of processes"]),
    (["--nproc", "2", "--ep", "2", "--experts", "3", "--top-k", "1"],
     ["--ep=2 is not allowed with 3 experts: it must divide the number of experts"]),
])
def test_launcher_refuses_before_torchrun(tmp_path, monkeypatch, capsys, flags, words):
    _refuse_torchrun(monkeypatch)
    rc = cli_main(["train", "--preset", "tiny", *flags, "--out", str(tmp_path / "r")])
    assert rc == 2
    _one_error_line(capsys, *words)
    assert not (tmp_path / "r").exists()
