"""The decode kernels' narrower paths, run on a CPU that has a wider one.

moekit/csrc/cpu_decode.cpp runs AVX-512 intrinsics, AVX2 intrinsics or
compiler-vectorized loops ("generic"), whichever is the widest the CPU has. The
other test modules cover only that one; here every narrower path this CPU can run
(``MOEKIT_CPU_ISA`` caps it, read once when the kernels load, so each runs in a
fresh process) passes the same oracle tests: the per-token reference for the
expert kernels, dequantize-then-matmul for int8 / int4 (and int4 with int8
activations), torch for the dense rows and for dequantization to bf16, and float64
attention for ``attend_one`` over fp32, bf16 and int8 caches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.functions import cpu_ext
from moekit.functions import decode as decode_fn

pytestmark = pytest.mark.skipif(not decode_fn.available(), reason="decode kernels not built")

ROOT = Path(__file__).resolve().parents[1]
ORACLE_TESTS = ("matches_reference or single_touched or dense_rows or quantized_experts_match "
                "or quantized_linear or float_linear or int8_activation or bf16_rounds "
                "or swiglu_matches")


def _narrower() -> list[str]:
    kernels = cpu_ext.get_decode()
    here = kernels.isa() if kernels is not None else "generic"
    return list(cpu_ext.ISAS[cpu_ext.ISAS.index(here) + 1:])


def _isa_under(cap: str) -> str:
    env = {**os.environ, cpu_ext.ISA_ENV: cap}
    code = "from moekit.functions import cpu_ext; print(cpu_ext.get_decode().isa())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("cap", ["avx2", "generic"])
def test_narrower_path_matches_the_oracles(cap):
    if cap not in _narrower():
        pytest.skip(f"this CPU runs {cap} or narrower already: the other modules cover it")
    assert _isa_under(cap) == cap
    env = {**os.environ, cpu_ext.ISA_ENV: cap}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_decode.py", "tests/test_quant.py", "tests/test_quant_a8.py",
         "tests/test_decode_step.py", "-k",
         ORACLE_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    # 0: tests ran and passed (5 would be none selected, 1 a failure)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_unknown_cap_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(cpu_ext.ISA_ENV, "avx1024")
    monkeypatch.setattr(cpu_ext, "_decode", [])
    with pytest.raises(ValueError, match=r"MOEKIT_CPU_ISA='avx1024' is not one of avx512, avx2"):
        cpu_ext.get_decode()
    assert cpu_ext._decode == []  # nothing loaded, nothing cached
