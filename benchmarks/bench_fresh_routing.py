"""An MoE layer's training step with new routing every step, against the same input again.

Benchmarks that time one input over and over (``bench_cpu.py`` does) give every expert
the same row count each step. Training does not: the counts change every step, and
where a GEMM library builds code per shape (aten's bf16 / fp16 mm on CPU runs oneDNN,
which builds and caches a primitive per GEMM shape) the step then pays for building.
This times, paired in one run (``harness.compare``), moekit's layer fwd+bwd on a fresh
input every step ("fresh": a pool of inputs, none used twice) against one input reused
("fixed"), per dtype. moekit's C++ grouped GEMMs keep bf16 / fp16 to few shapes
(``moekit/csrc/cpu_experts.cpp``, "Few GEMM shapes"), so fresh / fixed should be ~1.

    PYTHONPATH=src python benchmarks/bench_fresh_routing.py [--dtypes fp32,bf16] [--reps 9]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CONFIGS = [(4096, 64, 8, 256), (4096, 8, 2, 1024), (2048, 8, 2, 256)]  # T, E, K, F


def steps(T: int, E: int, K: int, F: int, D: int, dtype: str, pool: int, threads: int):
    """(fresh, fixed): bench_cpu's moekit step (the same layer, weights and gradient), the
    first turning through ``pool`` inputs, the second on one."""
    import bench_cpu

    shape = dict(T=T, E=E, K=K, F=F, D=D, dtype=dtype, threads=threads)
    return (bench_cpu.build_step("moekit", **shape, inputs=pool),
            bench_cpu.build_step("moekit", **shape))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reps", type=int, default=9, help="timed pairs (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    harness.check_flags(args.threads, args.reps, args.out)
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:  # all of them before anything runs
        if dtype not in names:
            raise SystemExit(f"bench_fresh_routing.py: error: --dtypes={args.dtypes!r} is not "
                             f"allowed: {dtype!r} is not one of {', '.join(names)}")
    import torch

    torch.set_num_threads(args.threads)
    report = {"machine": harness.machine(), "dim": args.dim, "reps": args.reps, "rows": []}
    print(f"{'T, E, K, F':22s} {'dtype':6s} {'fresh ms':>9s} {'fixed ms':>9s} {'fresh/fixed':>12s}")
    for dtype in dtypes:
        for T, E, K, F in CONFIGS:
            fresh, fixed = steps(T, E, K, F, args.dim, names[dtype], pool=args.reps + 1,
                                 threads=args.threads)
            r = harness.compare(fresh, fixed, args.reps, warmup=1)
            row = {"T": T, "E": E, "K": K, "F": F, "dtype": dtype, "fresh_ms": r["a_total_ms"],
                   "fixed_ms": r["b_total_ms"], "fresh_over_fixed": r["ratio_total"]}
            report["rows"].append(row)
            print(f"{f'{T}, {E}, {K}, {F}':22s} {dtype:6s} {row['fresh_ms']:9.1f} "
                  f"{row['fixed_ms']:9.1f} {row['fresh_over_fixed']:12.2f}")
    out = Path(args.out or Path(__file__).parent / "results" / "bench_fresh_routing.json")
    harness.write_json(out, report, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
