"""`moekit`'s exit statuses: 2 a usage error (argparse's code), 1 a runtime failure (a
checkpoint missing or corrupt, a missing file, a failed write), 130 Ctrl-C.

Before: `moekit convert`, `quantize`, `generate`, `analyze`, `serve` and `perplexity`
exited 2 for a corrupt checkpoint or a failed write, where `train` exited 1 for a failed
write; an OSError no command caught (a results file on a full disk) was a traceback.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from moekit import demo
from moekit.cli import main
from moekit.errors import CheckpointError, exit_code


@pytest.mark.parametrize("error,code", [
    (ValueError("--steps=0 is not allowed"), 2),
    (CheckpointError("step_00000001/model.safetensors is corrupt"), 1),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.txt"), 1),
    (OSError(errno.ENOSPC, "No space left on device"), 1),
    (KeyError("embed.weight"), 1),
])
def test_exit_code_of_each_kind_of_error(error, code):
    assert exit_code(error) == code


def test_an_argparse_usage_error_is_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--no-such-flag"])
    assert e.value.code == 2


def test_an_os_error_no_command_caught_is_one_line_and_1(monkeypatch, capsys):
    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/out/result.json")

    monkeypatch.setattr(demo, "run", full_disk)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err == "moekit demo: error: /runs/out/result.json: No space left on device\n"


def test_a_reader_of_stdout_that_went_away_ends_it_quietly_with_141():
    """`moekit plan ... | head -c 10`: the reader is gone before the command writes (closed
    right after the start, torch takes seconds to import): no error line, 128 + SIGPIPE."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "plan", "deepseek-v3"],
                            stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    os.close(r)
    err = proc.communicate(timeout=300)[1]
    assert (proc.returncode, err) == (141, b"")


def test_ctrl_c_is_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err == "moekit demo: interrupted\n"


def test_no_command_prints_the_commands_and_is_0(capsys):
    """`moekit` alone (no test ran it): the help, naming the commands, on stdout."""
    assert main([]) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out.startswith("usage: moekit")
    for name in ("train", "generate", "plan", "analyze", "quantize", "convert", "serve",
                 "perplexity", "bench"):
        assert name in out.out
