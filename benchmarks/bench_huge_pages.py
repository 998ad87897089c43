"""What moving a model's weights into transparent huge pages (``moekit.huge_pages``) gives
a decode step, and what it costs once.

For each model shape (bench_decode.py's "fine" and "mixtral"), weight variant and batch
size, two copies of the same model (same seed, same weights) generate greedily through
the engine, alternating (A B B A ...): one as allocated (4 KiB pages where transparent
huge pages are "madvise"), one after ``huge_pages``. The ratio is the median over pairs
of (huge step / 4 KiB step); both must give the same tokens. Also the seconds
``huge_pages`` took, the share of each copy in huge pages (``huge_share``; glibc's
default malloc, so each large tensor maps fresh memory and the first copy stays in 4 KiB
pages), and a 1 GiB ``sum`` from each kind of page before and after.

    PYTHONPATH=src python benchmarks/bench_huge_pages.py [--models fine,mixtral]
        [--variants fp32,bf16,int8,int4] [--batches 1,8] [--reps 9] [--new-tokens 32]
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
import harness  # noqa: E402

VARIANTS = ("fp32", "bf16", "int8", "int4")


def huge_share(model) -> float | None:
    """Share of the model's 2 MiB-aligned tensor spans in transparent huge pages: one 4 KiB
    page per 2 MiB looked up in /proc/self/pagemap and /proc/kpageflags (its THP flag,
    bit 22); None where those are not readable (they need root). smaps cannot tell: the
    kernel merges neighbouring anonymous mappings, both copies' tensors into one."""
    import struct

    from moekit.hugepages import HUGE_PAGE, _spans, _tensors

    try:
        pagemap, flags = open("/proc/self/pagemap", "rb"), open("/proc/kpageflags", "rb")
    except OSError:
        return None
    huge = total = 0
    with pagemap, flags:
        for lo, hi in _spans(_tensors(model)):
            for address in range(lo, hi, HUGE_PAGE):
                pagemap.seek(address // 4096 * 8)
                entry = struct.unpack("<Q", pagemap.read(8))[0]
                pfn = entry & ((1 << 55) - 1)
                total += 1
                if not entry >> 63:  # not present: not in a huge page
                    continue
                if pfn == 0:  # the PFN hidden from this user
                    return None
                flags.seek(pfn * 8)
                huge += struct.unpack("<Q", flags.read(8))[0] >> 22 & 1
    return huge / max(total, 1)


def run(args) -> list[dict]:
    import torch

    from moekit.hugepages import huge_pages

    torch.set_num_threads(2)
    rows = []
    before = harness.read_bandwidths()
    print(f"1 GiB sum: 4 KiB pages {before['4k'] / 1e9:.1f} GB/s, huge pages "
          f"{(before['huge'] or 0) / 1e9:.1f} GB/s")
    for shape in args.models.split(","):
        for variant in args.variants.split(","):
            for B in (int(b) for b in args.batches.split(",")):
                plain, huge = bd.build(shape, variant), bd.build(shape, variant)
                pages = huge_pages(huge)
                ids = bd.prompts(B, bd.PROMPT_LEN)
                a = bd.Runner(plain, ids, args.new_tokens, huge=False)
                b = bd.Runner(huge, ids, args.new_tokens, huge=False)
                p = bd.paired(a, b, args.reps)
                row = {"model": shape, "variant": variant, "B": B, "4k_ms": p["anchor_ms"],
                       "huge_ms": p["ms"], "huge_x_4k": p["ratio"], "pairs": p["pairs"],
                       "same_tokens": a.tokens == b.tokens,
                       "4k_copy_in_huge_pages": huge_share(plain),
                       "huge_copy_in_huge_pages": huge_share(huge),
                       "collapsed_MiB": pages.collapsed / 2**20,
                       "asked_MiB": pages.asked / 2**20, "collapse_s": pages.seconds,
                       "reason": pages.reason}
                print(f"{shape:8s} {variant:5s} B={B:<3d} 4 KiB {p['anchor_ms']:7.2f} ms  "
                      f"huge {p['ms']:7.2f} ms  x {p['ratio']:.3f}  same tokens "
                      f"{row['same_tokens']}  ({pages}; share in huge pages: 4 KiB copy "
                      f"{row['4k_copy_in_huge_pages']}, huge copy "
                      f"{row['huge_copy_in_huge_pages']})", flush=True)
                rows.append(row)
                del plain, huge, a, b
                gc.collect()
    return rows


def add(p) -> None:
    p.add_argument("--models", default="fine,mixtral")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batches", default="1,8")


def check(args) -> None:
    for flag, value, allowed in (("--models", args.models, tuple(bd.SHAPES)),
                                 ("--variants", args.variants, VARIANTS)):
        bd._names(flag, value, allowed)
    bd._sizes("--batches", args.batches)


if __name__ == "__main__":
    # glibc's default: each large tensor its own mapping, given back when freed (with the
    # tuned malloc a model built where an earlier one was collapsed reuses its huge pages)
    harness.use_malloc("default")  # (may re-execute this process)
    sys.exit(harness.pairs_main(sys.argv[1:], __doc__, "bench_huge_pages", 9, run, add, check))
