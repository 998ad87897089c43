"""What an int4 dot product costs with each kind of activation (AVX-512 BF16 / VNNI CPUs).

The decode issue asks int4 weight-only experts for >= 5x fp32's tokens/s at batch 1;
moekit's weight-only int4 kernel reached ~3.8-4.3x with table lookups (4.9-5.3x on the
Mixtral-like model with the block kernel, ``blocks`` below) and its int8-activation one
(W4A8) ~5-6x. This measures why, on one weight row per dot product (``blocks``: four) over
a pool of int4 rows in moekit's layout (``benchmarks/int4_dot.cpp``, built here with
``-march=native``):

- ``table``: fp32 activations, each group's 16 values looked up by the nibbles
  (vpermps) and multiplied by FMA (moekit's weight-only kernel where K is not a
  multiple of 128);
- ``bf16``: activations rounded to bf16, weights turned into bf16 by OR-ing an
  exponent onto the nibble, vdpbf16ps;
- ``bf16x2``: activations as two bf16 (hi + lo: 16 significant bits), two vdpbf16ps;
- ``int16``: activations rounded to int16 per 32 inputs, vpdpwssd;
- ``int8``: activations rounded to int8 per 32 inputs, vpdpbusd (moekit's W4A8);
- ``amx``: activations as bf16 hi + lo, 16 weight rows at a time through AMX tiles
  (tdpbf16ps; CPUs with AMX-BF16 and groups of 64+ only);
- ``mant``: fp32 activations, each nibble shifted into the top of an fp32 mantissa
  with 1.0's exponent (1 + q / 16: a shift and a vpternlogd per 16 weights, no
  shuffles), FMA; the 1 is taken off per group.
- ``blocks``: fp32 activations (exact) prescaled by 2^-4j; nibble j of each dword by an
  AND and an unsigned convert (nibble 0 by vpermps), FMA; 4 weight rows per pass sharing
  each activation load (moekit's weight-only int4 kernel since 2026-12-05).

Per pool and round every variant runs once (best of ``--reps`` passes); the report is
the median over rounds of int4 GB/s and of each round's ratio to ``table``, and each
variant's error against float64: "kernel" with the activations it represents, "total"
with the fp32 activations (relative to sum |w x| of the row, max over rows).

    PYTHONPATH=src python benchmarks/bench_int4_dot.py [--mib 16,256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_json  # noqa: E402
from moekit.quant.tensor import dequantize_NK, quantize_tensor  # noqa: E402

VARIANTS = ["table", "bf16", "bf16x2", "int16", "int8", "amx", "mant", "blocks"]
SOURCE = Path(__file__).resolve().with_name("int4_dot.cpp")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def build():
    from torch.utils.cpp_extension import load

    return load(name="moekit_bench_int4_dot", sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", default="16,256", help="int4 pool sizes in MiB (comma list)")
    p.add_argument("--K", type=int, default=1024, help="weights per row (a multiple of 128)")
    p.add_argument("--group", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=10, help="passes per variant and round (best)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    flags = cpu_flags()
    missing = {"avx512f", "avx512_bf16", "avx512_vnni"} - flags
    if missing:
        print(f"this CPU lacks {', '.join(sorted(missing))}: nothing to measure")
        return
    ext = build()
    torch.manual_seed(0)
    K, g = args.K, args.group
    variants = [v for v in VARIANTS if v != "amx" or ({"amx_tile", "amx_bf16"} <= flags
                                                       and g >= 64)]
    x = torch.randn(K)
    report = {"machine": machine(), "K": K, "group": g, "threads": args.threads,
              "rounds": args.rounds, "reps": args.reps, "pools": []}
    for mib in (int(m) for m in args.mib.split(",")):
        N = mib * 2**20 // (K // 2)
        q = quantize_tensor(torch.randn(1, K, N) / K**0.5, 4, g)
        data, scales, zeros = q.data[0], q.scales[0], q.zeros[0]
        w_NK = dequantize_NK(q, 0, 1)[0].double()
        scale_N = w_NK.abs() @ x.double().abs()  # sum |w x| per row
        ref = w_NK @ x.double()
        gbs: dict[str, list[float]] = {v: [] for v in variants}
        ratio: dict[str, list[float]] = {v: [] for v in variants}
        err: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            secs = {}
            for v in variants:
                out, xrep, secs[v] = ext.dot(VARIANTS.index(v), data, scales, zeros, g, x,
                                             args.threads, args.reps)
                gbs[v].append(data.numel() / secs[v] / 1e9)
                if v not in err:
                    kern = ((out.double() - w_NK @ xrep.double()).abs() / scale_N).max().item()
                    total = ((out.double() - ref).abs() / scale_N).max().item()
                    err[v] = {"kernel": kern, "total": total}
            for v in variants:
                ratio[v].append(secs["table"] / secs[v])
        rows = []
        print(f"pool {mib} MiB of int4 ({N} rows of K={K}, g={g}), {args.threads} threads, "
              f"median of {args.rounds} rounds:")
        for v in variants:
            row = {"variant": v, "gb_s": statistics.median(gbs[v]),
                   "speed_over_table": statistics.median(ratio[v]), **{
                       f"err_{k}": e for k, e in err[v].items()}}
            rows.append(row)
            print(f"  {v:7s} {row['gb_s']:6.1f} GB/s  {row['speed_over_table']:5.2f}x table  "
                  f"error kernel {row['err_kernel']:.1e}, total {row['err_total']:.1e}")
        report["pools"].append({"mib": mib, "rows": N, "variants": rows})
    out = Path(args.out or Path(__file__).parent / "results" / "bench_int4_dot.json")
    write_json(out, report, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
