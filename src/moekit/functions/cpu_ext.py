"""moekit's C++ CPU kernels (``moekit/csrc/cpu_experts.cpp``, ``cpu_decode.cpp``,
``cpu_bf16.cpp``), built on first use.

``get()`` / ``get_decode()`` compile their source with ``torch.utils.cpp_extension.load``
the first time they are called in an environment (35-45 s each on the 2-core dev box;
the library is cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``, in a directory keyed by the source, the flags and the
environment, and loads in well under a second afterwards; every build prints a line
saying so). It needs a C++ compiler and ninja (a dependency of moekit). Where a build
fails, the getter warns once with the reason and returns None, and moekit runs the
same arithmetic with torch ops (same results, slower). ``MOEKIT_CPU_EXT=0`` skips the
builds.

``bf16()`` does the same for the bf16 kernels (``moekit/csrc/cpu_bf16.cpp``, a
separate library so that they build only when bf16 runs): the module where the CPU
has AVX-512 BF16 and no AMX (checked at run time), else None and the bf16 GEMMs stay
on aten's mm, which runs AMX tiles (oneDNN) where the CPU has them: on an AMX machine
the moekit bf16 layer took 1.2-3.7x longer on the kernels than on aten's mm (the
kernels' ``vdpbf16ps`` gives half the products per second of fp32 FMAs there).
``MOEKIT_BF16_KERNEL=0`` forces the fallback, ``=1`` the kernels wherever they run; it
is read on every call, so a test can flip it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
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
# Held while a getter builds or loads its module: a second thread's first call waits for
# it. Before, ``get()`` marked itself tried before building, so threads of a server whose
# first requests came together got None and ran the torch fallback (3 threads: 2 saw
# None); ``get_decode()`` built and loaded its module once per thread. Re-entrant:
# ``bf16()`` calls ``get()`` inside it. Once loaded, the getters read without it.
_BUILD_LOCK = threading.RLock()


FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
BUILD_SECONDS = "35-45 s on 2 cores"  # measured on the 2-core dev box; README says the same


def build_dir(name: str | None = None, source: Path | None = None,
              flags: list[str] | None = None) -> Path:
    """One build directory per source, flags and environment (torch version and install
    path, Python headers, compiler). Before, every environment shared one directory:
    ninja silently rebuilt (43 s) whenever another virtualenv had built there last."""
    import sysconfig

    import torch
    from torch.utils.cpp_extension import get_default_build_root, include_paths

    name, source = name or NAME, source or SOURCE
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    parts = [torch.__version__, *include_paths(), sysconfig.get_paths()["include"],
             os.environ.get("CXX", "c++"), *(flags or FLAGS), source.read_text()]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return root / f"{name}-{key}"


def _source_copy(source: Path, where: Path) -> Path:
    """``source`` copied into its build directory (written atomically, only where missing
    or different), the path the build names. The directory is keyed by the source's text,
    so every checkout of the same source finds the same file there: built from the
    checkout's own path, torch's ninja file changed with each clone and each one rebuilt
    the kernels (70-140 s on a loaded 2-core box) and ran into another's lock."""
    text = source.read_bytes()
    copy = where / source.name
    if not copy.exists() or copy.read_bytes() != text:
        part = copy.with_name(f"{copy.name}.{os.getpid()}.part")
        part.write_bytes(text)
        os.replace(part, copy)
    return copy


def _cached(where: Path, name: str) -> bool:
    return (where / f"{name}.so").exists()


# A build's lock (torch's, created empty) older than this is a killed build's: torch
# would wait on it forever. A build takes 35-45 s on 2 idle cores and 1-3 minutes
# with the box loaded several times over; a lock left by a killed build once held up
# every later run for an hour.
STALE_LOCK_S = 15 * 60


def _clear_stale_lock(lock: Path) -> None:
    """Remove ``lock`` if it is older than STALE_LOCK_S, else say whose build we wait for."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        print(f"moekit: removing the build lock {lock}: it is {age / 60:.0f} minutes old, "
              "left by a build that was killed", file=sys.stderr, flush=True)
        lock.unlink(missing_ok=True)
    else:
        print(f"moekit: waiting for another build's lock {lock} ({age:.0f} s old; one older "
              f"than {STALE_LOCK_S // 60} minutes is removed as a killed build's)",
              file=sys.stderr, flush=True)


def _gist(e: Exception) -> str:
    """The compiler's first error line where there is one, else the message's end."""
    text = str(e).strip()
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    return (errors[0] if errors else text)[-400:]


def _build(name: str, source: Path, what: str, fallback: str,
           flags: list[str] | None = None) -> ModuleType | None:
    """Compile (first time in an environment) and load one C++ source; None with a warning."""
    flags = flags or FLAGS
    try:
        from torch.utils.cpp_extension import load

        where = build_dir(name, source, flags)
        if not _cached(where, name):  # every build says so: once per environment and source
            print(f"moekit: building the C++ CPU {what} into {where} ({BUILD_SECONDS}"
                  "; once per environment)...", file=sys.stderr, flush=True)
        # also where a built module is rebuilt (torch's ninja sees its source moved, e.g.
        # a clone of the same tree built it): a killed rebuild's lock hung every later run
        _clear_stale_lock(where / "lock")
        where.mkdir(parents=True, exist_ok=True)
        # -fopenmp: at::parallel_for is an inline OpenMP region; -O3 and the two math
        # flags (no errno, no trap semantics) let the SwiGLU loops vectorize
        return load(name=name, sources=[str(_source_copy(source, where))], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=False)
    except Exception as e:  # any build or load failure falls back to the torch path
        warnings.warn(f"moekit: the C++ CPU {what} could not be built or loaded "
                      f"({type(e).__name__}: {_gist(e)}); {fallback} "
                      f"Set {ENV}=0 to skip the build.", RuntimeWarning, stacklevel=3)
        return None


def get() -> ModuleType | None:
    """The compiled kernels, or None (disabled by MOEKIT_CPU_EXT=0, or the build failed)."""
    global _module, _tried
    if _tried:
        return _module
    with _BUILD_LOCK:
        if not _tried and os.environ.get(ENV, "1") != "0":
            _module = _build(NAME, SOURCE, "expert kernels",
                             "the fused CPU path uses a Python loop of mm instead (same "
                             "results, slower with many experts).")
        _tried = True  # only now: a concurrent first call waits above, never sees None
    return _module


DECODE_NAME = "moekit_cpu_decode"
DECODE_SOURCE = SOURCE.with_name("cpu_decode.cpp")
_decode: list[ModuleType | None] = []  # [] until tried, then [module or None]
AMX_ENV = "MOEKIT_AMX"  # 0: projections stay off AMX tiles (read once, as ISA_ENV)
TERMS_ENV = "MOEKIT_INT8_TERMS"  # 0: int8 experts stay on the FMA kernel (read once)
ISA_ENV = "MOEKIT_CPU_ISA"  # caps the decode kernels' path, read once when they load
ISAS = ("avx512", "avx2", "generic")


def get_decode() -> ModuleType | None:
    """The decode kernels (``csrc/cpu_decode.cpp``), or None (disabled or build failed).

    They run AVX-512 or AVX2 intrinsics where the CPU has them, else compiler-vectorized
    loops; ``MOEKIT_CPU_ISA=avx2`` or ``generic`` caps that (tests of the narrower paths
    on a wider CPU), and ``kernels.isa()`` says which path runs. On AVX-512 CPUs with
    AMX-BF16, bf16 projections with unit stride along K run on AMX tiles (``amx()``), and
    with AMX-INT8, int8 / int4 weight-only projections and experts of 2 to 32 rows
    (``amx_int8()``); ``MOEKIT_AMX=0`` keeps them all on the FMA kernels. With AVX-512
    VNNI, int8 weight-only experts off AMX (one row, or AMX off) run on each row's four
    exact int8 terms (``int8_terms()``), those of at most ``int8_terms_max_rows()`` rows
    (one on Intel, where the FMA kernel is faster from two; no limit on AMD);
    ``MOEKIT_INT8_TERMS=0`` keeps them all on the FMA kernel.
    """
    if not _decode:
        with _BUILD_LOCK:
            if not _decode:
                _load_decode()
    return _decode[0]


def _load_decode() -> None:
    """``get_decode``'s first call (under _BUILD_LOCK): the settings checked, the module
    built or loaded (or None), set up, then published in ``_decode`` (a thread reading
    it without the lock never sees it before set_amx / set_int8_terms)."""
    cap = os.environ.get(ISA_ENV, "")
    if cap and cap not in ISAS:
        raise ValueError(f"{ISA_ENV}={cap!r} is not one of {', '.join(ISAS)} "
                         "(or unset: the widest this CPU has)")
    amx_off = _switched_off(AMX_ENV, "no AMX tiles", "AMX where the CPU has it")
    terms_off = _switched_off(TERMS_ENV, "int8 experts on the FMA kernel",
                              "on int8 terms where the CPU has AVX-512 VNNI")
    disabled = os.environ.get(ENV, "1") == "0"
    module = None if disabled else _build(
        DECODE_NAME, DECODE_SOURCE, "decode kernels",
        "backend 'auto' keeps the fused path for decoding, and quantized experts "
        "are dequantized with torch ops.")
    if module is not None and amx_off:
        module.set_amx(False)
    if module is not None and terms_off:
        module.set_int8_terms(False)
    _decode.append(module)


def _switched_off(env: str, off: str, on: str) -> bool:
    """Whether the on / off variable ``env`` is 0; any value but 0, 1 or unset is refused."""
    setting = os.environ.get(env, "")
    if setting not in ("0", "1", ""):
        raise ValueError(f"{env}={setting!r} is not allowed: 0 ({off}), 1 or unset ({on})")
    return setting == "0"


def native_bf16() -> bool:
    """True where the CPU runs bf16 natively (AVX-512 BF16), by torch's own check."""
    import torch

    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check is not None and check())


def amx() -> bool:
    """True where the CPU has AMX tiles (aten's bf16 mm runs them through oneDNN)."""
    import torch

    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check is not None and check())


BF16_SETTINGS = ("0", "1", "")


def bf16() -> ModuleType | None:
    """The AVX-512 BF16 kernels, or None: forced off (MOEKIT_BF16_KERNEL=0 or
    MOEKIT_CPU_EXT=0), left to aten's AMX path (unset, on a CPU with AMX), the CPU
    lacks the instructions, or the build failed. MOEKIT_BF16_KERNEL=1 takes the kernels
    wherever they run."""
    global _bf16, _bf16_tried
    setting = os.environ.get(BF16_ENV, "")
    if setting not in BF16_SETTINGS:
        raise ValueError(f"{BF16_ENV}={setting!r} is not allowed: 0 (aten's mm), 1 (the "
                         "kernels) or unset (the kernels unless the CPU has AMX)")
    if setting == "0" or (setting == "" and amx()) or get() is None:
        return None
    if not _bf16_tried:
        with _BUILD_LOCK:
            if not _bf16_tried:
                module = _build(BF16_NAME, BF16_SOURCE, "bf16 kernels",
                                "bf16 experts use aten's mm instead.")
                _bf16 = module if module is not None and module.available() else None
                _bf16_tried = True  # after the build, as get()'s
    return _bf16
