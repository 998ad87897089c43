"""moekit's C++ CPU kernels (``moekit/csrc/cpu_experts.cpp``), built on first use.

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


def _cached() -> bool:
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return any(root.glob(f"**/{NAME}/{NAME}.so"))


def _gist(e: Exception) -> str:
    """The compiler's first error line where there is one, else the message's end."""
    text = str(e).strip()
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    return (errors[0] if errors else text)[-400:]


def get() -> ModuleType | None:
    """The compiled kernels, or None (disabled by MOEKIT_CPU_EXT=0, or the build failed)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get(ENV, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        if not _cached():
            print("moekit: building the C++ CPU expert kernels (once per machine and torch "
                  "version, about a minute)...", file=sys.stderr, flush=True)
        # -fopenmp: at::parallel_for is an inline OpenMP region; -O3 and the two math
        # flags (no errno, no trap semantics) let the SwiGLU loops vectorize
        _module = load(name=NAME, sources=[str(SOURCE)],
                       extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
                       extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # any build or load failure falls back to the Python loop
        warnings.warn(f"moekit: the C++ CPU expert kernels could not be built or loaded "
                      f"({type(e).__name__}: {_gist(e)}); the fused CPU path "
                      f"uses a Python loop of mm instead (same results, slower with many "
                      f"experts). Set {ENV}=0 to skip the build.", RuntimeWarning, stacklevel=2)
        _module = None
    return _module
