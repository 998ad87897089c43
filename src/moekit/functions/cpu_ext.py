"""moekit's C++ CPU kernels (``moekit/csrc/cpu_experts.cpp``), built on first use.

``get()`` compiles the source with ``torch.utils.cpp_extension.load`` the first
time it is called in an environment (about 40 s on the 2-core dev box; the library
is cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, in
a directory keyed by the source, the flags and the environment, and loads in well
under a second afterwards; every build prints a line saying so). It needs a C++
compiler and ninja (a dependency of moekit). Where the build fails, ``get()`` warns once with the
reason and returns None, and the fused expert path runs the same GEMMs as a
Python loop of ``mm`` (same results, slower for fine-grained MoE).
``MOEKIT_CPU_EXT=0`` skips the build.
"""

from __future__ import annotations

import hashlib
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


FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
BUILD_SECONDS = "35-45 s on 2 cores"  # measured on the 2-core dev box; README says the same


def build_dir() -> Path:
    """One build directory per source, flags and environment (torch version and install
    path, Python headers, compiler). Before, every environment shared one directory:
    ninja silently rebuilt (43 s) whenever another virtualenv had built there last."""
    import sysconfig

    import torch
    from torch.utils.cpp_extension import get_default_build_root, include_paths

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    parts = [torch.__version__, *include_paths(), sysconfig.get_paths()["include"],
             os.environ.get("CXX", "c++"), *FLAGS, SOURCE.read_text()]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return root / f"{NAME}-{key}"


def _cached(where: Path) -> bool:
    return (where / f"{NAME}.so").exists()


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

        where = build_dir()
        if not _cached(where):  # every build says so: once per environment and source
            print(f"moekit: building the C++ CPU expert kernels into {where} ({BUILD_SECONDS}"
                  "; once per environment)...", file=sys.stderr, flush=True)
        where.mkdir(parents=True, exist_ok=True)
        # -fopenmp: at::parallel_for is an inline OpenMP region; -O3 and the two math
        # flags (no errno, no trap semantics) let the SwiGLU loops vectorize
        _module = load(name=NAME, sources=[str(SOURCE)], extra_cflags=FLAGS,
                       extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=False)
    except Exception as e:  # any build or load failure falls back to the Python loop
        warnings.warn(f"moekit: the C++ CPU expert kernels could not be built or loaded "
                      f"({type(e).__name__}: {_gist(e)}); the fused CPU path "
                      f"uses a Python loop of mm instead (same results, slower with many "
                      f"experts). Set {ENV}=0 to skip the build.", RuntimeWarning, stacklevel=2)
        _module = None
    return _module
