"""tune_malloc: freed memory is reused without page faults; bad input is named.

Each case runs in a fresh interpreter: malloc settings are process-wide.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import moekit

# Allocate, touch and free a 64 MiB block ten times; print the minor page faults
# of the last nine rounds (the first round faults the pages in either way).
PROBE = """
import resource, sys
from moekit.malloc import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
def touch():
    b = bytearray(64 << 20)  # zero-filled: every page is written
    return len(b)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env=env, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_malloc_reuses_freed_memory_without_page_faults():
    pages = 9 * (64 << 20) // 4096  # what re-faulting every round would cost
    default, tuned = _faults("default"), _faults("tuned")
    assert default > pages // 2, default  # glibc's default gives the block back each time
    assert tuned < pages // 50, tuned


@pytest.mark.parametrize("bad", [-1, 2**31, 1.5, True, "1g"])
def test_bad_top_pad_is_named(bad):
    with pytest.raises(ValueError, match="top_pad_bytes"):
        moekit.tune_malloc(bad)


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("MOEKIT_TUNE_MALLOC", "0")
    assert moekit.tune_malloc() is False
