"""Outputs a user keeps that a failed or killed write had damaged.

- ``copy_tokenizer`` (``moekit convert``'s tokenizer/): the old copy was deleted before
  the new one was fsynced and renamed in, so a failure there left no tokenizer at all.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from moekit.inference.text import TOKENIZER_DIR, copy_tokenizer


def _tokenizers(tmp_path: Path) -> tuple[Path, Path]:
    """(a source with a new tokenizer, a destination holding an old one)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"new": true}')
    (dst / TOKENIZER_DIR).mkdir(parents=True)
    (dst / TOKENIZER_DIR / "tokenizer.json").write_text('{"old": true}')
    return src, dst


def _eio(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error (injected)")


@pytest.mark.parametrize("failing", ["fsync", "rename"])
def test_a_failed_tokenizer_copy_keeps_the_old_one(tmp_path, monkeypatch, failing):
    src, dst = _tokenizers(tmp_path)
    if failing == "fsync":  # the new copy's data, before anything is renamed
        real = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: _eio() if os.readlink(
            f"/proc/self/fd/{fd}").endswith("tokenizer.json") else real(fd))
    else:  # the new copy onto its place, after the old one was moved aside
        real_rename = os.rename
        monkeypatch.setattr(os, "rename", lambda a, b: _eio() if Path(b).name == TOKENIZER_DIR
                            and ".tmp" in Path(a).name else real_rename(a, b))
    with pytest.raises(OSError, match="injected"):
        copy_tokenizer(src, dst)
    monkeypatch.undo()
    assert sorted(os.listdir(dst)) == [TOKENIZER_DIR]  # no temporary, nothing aside
    assert sorted(os.listdir(dst / TOKENIZER_DIR)) == ["tokenizer.json"]
    assert (dst / TOKENIZER_DIR / "tokenizer.json").read_text() == '{"old": true}'
    copy_tokenizer(src, dst)  # and a retry replaces it
    assert (dst / TOKENIZER_DIR / "tokenizer.json").read_text() == '{"new": true}'
    assert sorted(os.listdir(dst)) == [TOKENIZER_DIR]
