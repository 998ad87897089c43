"""The Triton kernels compile for a GPU (sm_90) on a machine without one.

Runs tests/triton_aot.py in a subprocess: kernels imported there are compiled
kernels, while tests/test_triton.py imports them interpreted in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_aot.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled for sm_90" in done.stdout
