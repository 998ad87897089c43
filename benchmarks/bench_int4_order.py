"""int4 weights x int8 activations for several rows at once: moekit's weight layout
against one in the order ``vpdpbusd`` sums (AVX-512 VNNI CPUs).

At batch 16 the fine decode model's touched experts have ~2.4 rows each, and moekit's
W4A8 expert kernel (``i4a8_rows_vnni``) is bound by its instructions there, not by the
bytes (docs/cpu-inference.md, "where batch-16 int4a8's instructions go"): its NK layout
puts one output's inputs along the vector, so every 128 weights of every output cost each
row two ``vpdpbusd``, a convert, a scale product and an FMA, and every output a
horizontal sum per row. This measures a layout with 16 outputs across the vector and 4
inputs per lane, which converts and scales once per 16 outputs and 32 inputs instead
(``benchmarks/int4_order.cpp``, built here with ``-march=native``):

- ``rows``: moekit's kernel and layout (two output rows per pass, as in
  ``src/moekit/csrc/cpu_decode.cpp``);
- ``order``: the prototype (weights repacked from moekit's layout before timing).

For each row count, every variant runs over a pool of weight sets (an expert's [N, K]
int4 each; the pool's size sets whether they come from cache or memory), best of
``--reps`` passes, and the report is the median over ``--rounds`` of the time per weight
set and of each round's ratio ``order / rows``. Both are checked against float64 (the
dequantized weights times the rounded activations).

    PYTHONPATH=src python benchmarks/bench_int4_order.py [--rows 1,2,3,4,8] [--mib 1,64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int4_dot import cpu_flags  # noqa: E402
from harness import machine, write_json  # noqa: E402
from moekit.quant.tensor import dequantize_NK, quantize_tensor  # noqa: E402

SOURCE = Path(__file__).resolve().with_name("int4_order.cpp")
VARIANTS = ["rows", "order"]


def has_vnni() -> bool:
    return {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags()


def build():
    from torch.utils.cpp_extension import load

    return load(name="moekit_bench_int4_order", sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)


def int8_rows(x_RK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """moekit's W4A8 rounding: per 32 inputs, scale max|x| / 127, round half to even."""
    R, K = x_RK.shape
    chunks = x_RK.reshape(R, K // 32, 32)
    sx = chunks.abs().amax(-1) / 127
    q = torch.where(sx[..., None] > 0, torch.round(chunks / sx[..., None]), 0.0)
    return q.clamp(-127, 127).to(torch.int8).reshape(R, K), sx.contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,3,4,8", help="activation rows (comma list, 1-8)")
    p.add_argument("--mib", default="1,64", help="int4 pool sizes in MiB (comma list)")
    p.add_argument("--K", type=int, default=512, help="inputs (a multiple of 128)")
    p.add_argument("--N", type=int, default=1024, help="outputs (a multiple of 32)")
    p.add_argument("--group", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5, help="passes per variant and round (best)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not has_vnni():
        print("this CPU lacks AVX-512 VNNI: nothing to measure")
        return
    ext = build()
    torch.manual_seed(0)
    K, N, g = args.K, args.N, args.group
    report = {"machine": machine(), "K": K, "N": N, "group": g, "threads": args.threads,
              "rounds": args.rounds, "reps": args.reps, "pools": []}
    for mib in (int(m) for m in args.mib.split(",")):
        P = max(1, mib * 2**20 // (N * K // 2))
        q = quantize_tensor(torch.randn(P, K, N) / K**0.5, 4, g)
        w_NK = dequantize_NK(q, 0, 1)[0].double()
        print(f"pool {mib} MiB: {P} weight sets of [N={N}, K={K}] int4 g{g}, "
              f"{args.threads} threads, median of {args.rounds} rounds")
        rows_out = []
        for R in (int(r) for r in args.rows.split(",")):
            xq, sx = int8_rows(torch.randn(R, K))
            x_used = (xq.double().reshape(R, K // 32, 32) * sx.double()[..., None]).reshape(R, K)
            ref = x_used @ w_NK.T
            scale = x_used.abs() @ w_NK.abs().T
            us: dict[str, list[float]] = {v: [] for v in VARIANTS}
            ratio: list[float] = []
            err = {}
            for _ in range(args.rounds):
                secs = {}
                for v in VARIANTS:
                    y, secs[v] = ext.run(VARIANTS.index(v), q.data, q.scales, q.zeros, g, xq,
                                         sx, args.threads, args.reps)
                    us[v].append(secs[v] * 1e6)
                    err.setdefault(v, ((y.double() - ref).abs() / scale).max().item())
                ratio.append(secs["order"] / secs["rows"])
            row = {"rows": R, **{f"{v}_us": statistics.median(us[v]) for v in VARIANTS},
                   "order_over_rows": statistics.median(ratio),
                   **{f"{v}_err": err[v] for v in VARIANTS}}
            gb = (N * K // 2 + 2 * N * (K // g) * 4) / 1e3  # int4 + scales + zeros, per us
            print(f"  {R} rows: rows {row['rows_us']:7.1f} us ({gb / row['rows_us']:5.1f} GB/s), "
                  f"order {row['order_us']:7.1f} us ({gb / row['order_us']:5.1f} GB/s), "
                  f"order / rows {row['order_over_rows']:.2f}; error {row['rows_err']:.1e} / "
                  f"{row['order_err']:.1e}")
            rows_out.append(row)
        report["pools"].append({"mib": mib, "weight_sets": P, "rows": rows_out})
    out = Path(args.out or Path(__file__).parent / "results" / "bench_int4_order.json")
    write_json(out, report, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
