"""moekit's C++ CPU kernels (``moekit/csrc/cpu_experts.cpp``, ``cpu_decode.cpp``), built on
first use.

``get()`` compiles the source with ``torch.utils.cpp_extension.load`` the first
time it is called on a machine (about 40 s on the 2-core dev box; the library is
cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, and
loads in well under a second afterwards). It needs a C++ compiler and ninja (a
dependency of moekit). Where the build fails, ``get()`` warns once with the
reason and returns None, and the fused expert path runs the same GEMMs as a
Python loop of ``mm`` (same results, slower for fine-grained MoE).
``MOEKIT_CPU_EXT=0`` skips the build.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

NAME = "moekit_cpu_experts"
SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cpu_experts.cpp"
ENV = "MOEKIT_CPU_EXT"

_module: ModuleType | None = None
_tried = False


def _cached(name: str) -> bool:
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return any(root.glob(f"**/{name}/{name}.so"))


def _gist(e: Exception) -> str:
    """The compiler's first error line where there is one, else the message's end."""
    text = str(e).strip()
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    return (errors[0] if errors else text)[-400:]


def _build(name: str, source: Path, what: str, fallback: str) -> ModuleType | None:
    """Compile (first time on a machine) and load one C++ source; None with a warning."""
    try:
        from torch.utils.cpp_extension import load

        if not _cached(name):
            print(f"moekit: building the C++ CPU {what} (once per machine and torch "
                  "version, about a minute)...", file=sys.stderr, flush=True)
        # -fopenmp: at::parallel_for is an inline OpenMP region; -O3 and the two math
        # flags (no errno, no trap semantics) let the SwiGLU loops vectorize
        return load(name=name, sources=[str(source)],
                    extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # any build or load failure falls back to the Python path
        warnings.warn(f"moekit: the C++ CPU {what} could not be built or loaded "
                      f"({type(e).__name__}: {_gist(e)}); {fallback} "
                      f"Set {ENV}=0 to skip the build.", RuntimeWarning, stacklevel=3)
        return None


def get() -> ModuleType | None:
    """The compiled kernels, or None (disabled by MOEKIT_CPU_EXT=0, or the build failed)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get(ENV, "1") == "0":
        return None
    _module = _build(NAME, SOURCE, "expert kernels",
                     "the fused CPU path uses a Python loop of mm instead (same results, "
                     "slower with many experts).")
    return _module


DECODE_NAME = "moekit_cpu_decode"
DECODE_SOURCE = SOURCE.with_name("cpu_decode.cpp")
_decode: list[ModuleType | None] = []  # [] until tried, then [module or None]


def get_decode() -> ModuleType | None:
    """The decode kernels (``csrc/cpu_decode.cpp``), or None (disabled or build failed)."""
    if not _decode:
        disabled = os.environ.get(ENV, "1") == "0"
        _decode.append(None if disabled else _build(
            DECODE_NAME, DECODE_SOURCE, "decode kernels",
            "backend 'auto' keeps the fused path for decoding, and quantized experts "
            "are dequantized with torch ops."))
    return _decode[0]
