"""moekit's C++ CPU kernels (``moekit/csrc/cpu_experts.cpp``), built on first use.

``get()`` compiles the source with ``torch.utils.cpp_extension.load`` the first
time it is called on a machine (about 40 s on the 2-core dev box; the library is
cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, and
loads in well under a second afterwards). It needs a C++ compiler and ninja (a
dependency of moekit). Where the build fails, ``get()`` warns once with the
reason and returns None, and the fused expert path runs the same GEMMs as a
Python loop of ``mm`` (same results, slower for fine-grained MoE).
``MOEKIT_CPU_EXT=0`` skips the build.

``bf16()`` does the same for the bf16 kernels (``moekit/csrc/cpu_bf16.cpp``,
a second library so that they build only when bf16 runs): the module where
the CPU has AVX-512 BF16 (checked at run time), else None and the bf16 GEMMs
stay on aten's mm. ``MOEKIT_BF16_KERNEL=0`` forces that fallback; it is read
on every call, so a test can flip it.
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
BF16_NAME = "moekit_cpu_bf16"
BF16_SOURCE = SOURCE.with_name("cpu_bf16.cpp")
BF16_ENV = "MOEKIT_BF16_KERNEL"

_module: ModuleType | None = None
_tried = False
_bf16: ModuleType | None = None
_bf16_tried = False


def _cached(name: str) -> bool:
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return any(root.glob(f"**/{name}/{name}.so"))


def _load(name: str, source: Path) -> ModuleType:
    from torch.utils.cpp_extension import load

    if not _cached(name):
        print("moekit: building the C++ CPU expert kernels (once per machine and torch "
              "version, about a minute)...", file=sys.stderr, flush=True)
    # -fopenmp: at::parallel_for is an inline OpenMP region; -O3 and the two math
    # flags (no errno, no trap semantics) let the SwiGLU loops vectorize
    return load(name=name, sources=[str(source)],
                extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
                extra_ldflags=["-fopenmp"], verbose=False)


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
        _module = _load(NAME, SOURCE)
    except Exception as e:  # any build or load failure falls back to the Python loop
        warnings.warn(f"moekit: the C++ CPU expert kernels could not be built or loaded "
                      f"({type(e).__name__}: {_gist(e)}); the fused CPU path "
                      f"uses a Python loop of mm instead (same results, slower with many "
                      f"experts). Set {ENV}=0 to skip the build.", RuntimeWarning, stacklevel=2)
        _module = None
    return _module


def native_bf16() -> bool:
    """True where the CPU runs bf16 natively (AVX-512 BF16), by torch's own check."""
    import torch

    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check is not None and check())


def bf16() -> ModuleType | None:
    """The AVX-512 BF16 kernels, or None: forced off (MOEKIT_BF16_KERNEL=0 or
    MOEKIT_CPU_EXT=0), the CPU lacks the instructions, or the build failed."""
    global _bf16, _bf16_tried
    if os.environ.get(BF16_ENV, "1") == "0" or get() is None:
        return None
    if not _bf16_tried:
        _bf16_tried = True
        try:
            module = _load(BF16_NAME, BF16_SOURCE)
            _bf16 = module if module.available() else None
        except Exception as e:  # any build or load failure keeps aten's bf16 mm
            warnings.warn(f"moekit: the bf16 CPU kernels could not be built or loaded "
                          f"({type(e).__name__}: {_gist(e)}); bf16 experts use aten's mm "
                          f"instead. Set {BF16_ENV}=0 to skip the build.", RuntimeWarning,
                          stacklevel=2)
    return _bf16
