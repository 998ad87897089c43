"""Two outputs a user keeps that a failed or killed write had damaged.

- ``copy_tokenizer`` (``moekit convert``'s tokenizer/): the old copy was deleted before
  the new one was fsynced and renamed in, so a failure there left no tokenizer at all.
- ``benchmarks/bench_offload.py make``: ``save_pretrained`` writes config.json first,
  straight into ``--ckpt``; a make killed in its shards left a directory that the next
  run took as made (it checks config.json) and benchmarked with shards missing.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moekit.inference.text import TOKENIZER_DIR, copy_tokenizer

ROOT = Path(__file__).resolve().parents[1]


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


MAKE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    import bench_offload
    import transformers
    from pathlib import Path

    bench_offload.SHAPE = dict(L=1, D=64, F=32, E=4, K=2, V=128)
    if sys.argv[3] == "kill":
        real = transformers.PreTrainedModel.save_pretrained

        def killed(self, path, **kwargs):
            self.config.save_pretrained(path)  # what save_pretrained writes first
            os.kill(os.getpid(), signal.SIGKILL)

        transformers.PreTrainedModel.save_pretrained = killed
    bench_offload.make(Path(sys.argv[1]))
""")


def test_a_killed_bench_offload_make_leaves_no_checkpoint_the_next_run_takes(tmp_path):
    pytest.importorskip("transformers")
    ckpt = tmp_path / "olmoe"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def make(how: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", MAKE, str(ckpt), str(ROOT / "benchmarks"),
                               how], env=env, capture_output=True, text=True)

    assert make("kill").returncode == -signal.SIGKILL
    assert not ckpt.exists()  # before: olmoe/config.json, and no shard
    assert len(os.listdir(tmp_path)) == 1  # the killed make's temporary, with config.json
    done = make("whole")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["olmoe"]  # the killed one's removed
    assert {"config.json", "model.safetensors"} <= set(os.listdir(ckpt))
