"""This machine's memory read bandwidth: what a memory-bound decode step can reach.

A 1 GiB fp32 ``sum`` (median of ``reps``) from 4 KiB pages, and from the same buffer
moved into transparent huge pages by ``moekit.huge_pages`` (where the kernel does). On
a VM the two can differ a lot (the Intel Xeon KVM VM: 22.5-22.9 against 33.5-34.2 GB/s:
a TLB miss there walks two page tables). The benchmarks divide their bytes by the
faster reading, and so does ``moekit plan --decode --bandwidth-gbs measure``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

SUM_BYTES = 2**30


def read_bandwidths(reps: int = 5, clock: Callable[[], float] = time.perf_counter
                    ) -> dict[str, float | None]:
    """Bytes/s of the 1 GiB ``sum`` from 4 KiB pages ("4k") and from huge pages ("huge";
    None where the kernel did not move the buffer), each the median of ``reps`` timed by
    ``clock``."""
    import torch

    from moekit.hugepages import huge_pages

    def timed(x) -> float:
        x.sum()
        ts = []
        for _ in range(reps):
            t0 = clock()
            x.sum()
            ts.append(clock() - t0)
        return SUM_BYTES / statistics.median(ts)

    x = torch.ones(SUM_BYTES // 4)
    out: dict[str, float | None] = {"4k": timed(x), "huge": None}
    pages = huge_pages(x)
    if pages.collapsed >= 0.99 * pages.asked:
        out["huge"] = timed(x)
    del x
    return out


def read_bandwidth(reps: int = 5) -> float:
    """The faster of ``read_bandwidths``, bytes/s."""
    return max(b for b in read_bandwidths(reps).values() if b is not None)
