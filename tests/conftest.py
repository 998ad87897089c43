"""Session set-up shared by the tests.

Triton fixes, once per process, whether its own library functions and
moekit's kernels are interpreted or compiled: when triton is first imported and
when moekit.kernels is imported. On a machine without CUDA, import both here,
before any test module, with TRITON_INTERPRET=1, so that tests/test_triton.py
can run the kernels on CPU even if another module imports triton first. The
variable is restored at once; tests/test_triton.py sets it again while its own
tests run (the interpreter reads it at run time too).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def _import_kernels_interpreted() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import moekit.functions.experts  # noqa: F401
        import moekit.functions.routing  # noqa: F401
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


# The tests use tiny shapes, where a second OpenMP thread only adds barrier waits:
# with the other core busy, one MoE forward at T=512, D=16 took 370 ms on 2
# threads and 0.8 ms on 1 (measured here). Modules may raise it for themselves.
torch.set_num_threads(1)

if importlib.util.find_spec("triton") is not None and (
        not torch.cuda.is_available() or os.environ.get("MOEKIT_TEST_INTERPRET") == "1"):
    _import_kernels_interpreted()


@pytest.fixture
def two_threads():
    """Two threads for one test (the kernels' task splits and races need both)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)



@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (a killed writer's), checked
    to be held by no process now."""
    import subprocess
    import sys

    for _ in range(20):
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        try:
            os.kill(child.pid, 0)
        except ProcessLookupError:
            return child.pid
    raise RuntimeError("every exited child's pid was taken again at once")
