"""Prefill of bf16 models with int8 / int4 weights against the same bf16 model unquantized.

bench_decode's models (``--models``), cast to bfloat16, then ``moekit.quantize`` (every
weight, int4 with groups of 64); one 512-token prefill each, the variants taking turns
(A B C A B C ...), medians of the per-round ratios to the unquantized bf16 model.

    PYTHONPATH=src python benchmarks/bench_bf16_quant_prefill.py [--reps 7] [--out F]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
import moekit  # noqa: E402
from harness import machine, write_json  # noqa: E402
from moekit.models import MoETransformer  # noqa: E402

VARIANTS = ("bf16", "bf16-int8", "bf16-int4")


def build(shape: str, variant: str):
    torch.manual_seed(0)
    model = MoETransformer(bd.lm_config(shape)).eval().to(torch.bfloat16)
    if variant == "bf16":
        return model
    bits = int(variant[-1])
    return moekit.quantize(model, bits=bits, **({"group_size": 64} if bits == 4 else {}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fine,mixtral")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bd.CLOCK[0] = time.perf_counter
    rows = []
    for shape in args.models.split(","):
        runs = {v: bd.prefill_runner(build(shape, v), args.tokens) for v in VARIANTS}
        for run in runs.values():  # warm-up: kernels built, buffers allocated
            run()
        ms = {v: [] for v in VARIANTS}
        for _ in range(args.reps):
            for v, run in runs.items():
                ms[v].append(run())
        for v in VARIANTS:
            ratio = statistics.median(a / b for a, b in zip(ms[v], ms["bf16"], strict=True))
            rows.append({"model": shape, "variant": v, "tokens": args.tokens,
                         "ms": statistics.median(ms[v]), "x_bf16": ratio})
            print(f"{shape} {v}: prefill of {args.tokens} tokens {statistics.median(ms[v]):.1f} "
                  f"ms, x bf16 unquantized {ratio:.2f}", flush=True)
    if args.out:
        write_json(args.out, {"machine": machine(), "command": sys.argv, "rows": rows},
                   indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
