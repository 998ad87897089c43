"""Keep freed CPU memory in the process: glibc malloc settings for training loops.

glibc's defaults hand large freed blocks back to the kernel (``munmap`` and
heap trimming), so a training loop that frees and re-allocates the same
activations every step page-faults them in again, zero-filled, every step.
``tune_malloc()`` makes the allocator keep them, the runtime equivalent of
starting Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>
MALLOC_TOP_PAD_=1GiB`` (what ``benchmarks/harness.py`` sets for every timing).

Measured on the 2-core dev box (torch 2.13.0+cpu):
``python benchmarks/bench_malloc.py --rounds 3 --steps 60`` (``moekit train``,
default model) 10,506 -> 11,155, 9,150 -> 10,557 and 9,621 -> 11,130 tokens/s,
median x1.15, with the same losses (checked on one pair); one fwd+bwd of an MoE
layer at T=256/E=64/K=8, D=512: 95 -> 62 ms. The cost: the process's resident memory
no longer shrinks after a peak. ``moekit train``, ``moekit compare`` and ``moekit
generate`` call it (``MOEKIT_TUNE_MALLOC=0`` turns that off); library users opt in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_INT_MAX = 2**31 - 1  # mallopt takes an int
ENV = "MOEKIT_TUNE_MALLOC"


def tune_malloc(top_pad_bytes: int = 1 << 30) -> bool:
    """Make glibc keep freed memory for reuse; True if applied, False where not glibc
    or where ``MOEKIT_TUNE_MALLOC=0``.

    ``top_pad_bytes`` is how much the heap grows at a time (address space; pages
    become resident only when touched). Process-wide and not undone.
    """
    if isinstance(top_pad_bytes, bool) or not isinstance(top_pad_bytes, int) \
            or not 0 <= top_pad_bytes <= _INT_MAX:
        raise ValueError(f"top_pad_bytes={top_pad_bytes!r} is not allowed: it must be an int "
                         f"in [0, {_INT_MAX}]")
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0),  # no mmap'd blocks: freed memory stays in the heap
        (_M_TRIM_THRESHOLD, _INT_MAX),  # never give the heap's top back
        (_M_TOP_PAD, top_pad_bytes),
    ))
