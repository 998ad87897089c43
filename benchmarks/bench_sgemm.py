"""moekit's fp32 GEMM for experts of few rows (``sgemm_rows``) against aten's mm.

Same process, same inputs, A/B alternating (``MOEKIT_SGEMM=1`` / ``0``, read on every
call), median of the per-pair time ratios (harness.compare):

- ``grouped_mm_out`` over E experts of R rows each, [X -> Y] fp32 weights, 4 weight sets
  in turn (each call reads its weights from memory, as a prefill does);
- the MoE layers of bench_decode's models (fused backend, inference mode) on T random
  tokens: their routing is balanced, as a trained router's is (bench_decode's own
  random-weight models route most prefill rows to a few experts).

    PYTHONPATH=src python benchmarks/bench_sgemm.py            # the sweep and both layers
    PYTHONPATH=src python benchmarks/bench_sgemm.py --quick    # 2 shapes, 3 pairs

A ratio below 1: moekit's GEMM took less time. On a CPU without AVX-512F both sides run
aten's mm (the script says so). Shape letters: E experts, R rows per expert, X input
width, Y output width, T tokens, D hidden, F expert hidden, K experts per token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Step, compare, machine, write_json  # noqa: E402
from moekit import MoE, MoEConfig  # noqa: E402
from moekit.functions import cpu_ext  # noqa: E402

# (E, R, X, Y): the fine model's gate+up and down at 4-191 rows, Mixtral-like gate+up,
# and a training-sized expert (under the 2 MiB weight sgemm_rows needs: aten on both sides)
SWEEP = [(64, r, 1024, 1024) for r in (4, 8, 16, 32, 64, 96, 128)] + [
    (64, 64, 512, 1024), (8, 64, 1024, 4096), (64, 32, 512, 512)]
QUICK = [(64, 32, 1024, 1024), (64, 64, 512, 1024)]
# bench_decode's models' MoE layers: (D, F, E, K)
LAYERS = {"fine": (1024, 512, 64, 8), "mixtral": (1024, 2048, 8, 2)}


def with_sgemm(flag: str, fn):
    def run():
        os.environ["MOEKIT_SGEMM"] = flag
        return fn()
    return run


def _no_backward(_y) -> None:
    return None


def ab(fn, reps: int) -> dict:
    """moekit's GEMM (a) against aten's mm (b)."""
    a, b = Step(with_sgemm("1", fn), _no_backward), Step(with_sgemm("0", fn), _no_backward)
    r = compare(a, b, reps)
    return {"moekit_ms": r["a_fwd_ms"], "aten_ms": r["b_fwd_ms"], "ratio": r["ratio_fwd"]}


def grouped(ext, E: int, R: int, X: int, Y: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ends = [R * (i + 1) for i in range(E)]
    a = torch.randn(E * R, X, generator=gen)
    weights = [torch.randn(E, X, Y, generator=gen) for _ in range(4)]
    out = torch.empty(E * R, Y)

    def run():
        for w in weights:
            ext.grouped_mm_out(a, w, ends, out)

    row = {"E": E, "R": R, "X": X, "Y": Y, **ab(run, reps)}
    flops = 2 * E * R * X * Y * len(weights)
    row["moekit_gflops"] = flops / row["moekit_ms"] / 1e6
    row["aten_gflops"] = flops / row["aten_ms"] / 1e6
    print(f"grouped E={E:3d} R={R:3d} [{X:4d} -> {Y:4d}]: moekit {row['moekit_gflops']:6.1f} "
          f"GFLOP/s, aten {row['aten_gflops']:6.1f}, time ratio {row['ratio']:.3f}", flush=True)
    return row


def layers(name: str, T: int, reps: int) -> dict:
    D, F, E, K = LAYERS[name]
    torch.manual_seed(0)
    moes = [MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=K), backend="fused").eval()
            for _ in range(4)]
    x = torch.randn(1, T, D)

    def run():
        with torch.inference_mode():
            for m in moes:
                m(x)

    row = {"model": name, "tokens": T, "layers": len(moes), **ab(run, reps)}
    print(f"{name} MoE layers x{len(moes)}, {T} tokens: moekit {row['moekit_ms']:.1f} ms, "
          f"aten {row['aten_ms']:.1f} ms, time ratio {row['ratio']:.3f}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 shapes, fine layers, 3 pairs")
    p.add_argument("--reps", type=int, default=9, help="timed A/B pairs")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON path (default: none)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ext = cpu_ext.get()
    if ext is None:
        raise SystemExit("the C++ CPU kernels did not build: nothing to compare")
    os.environ["MOEKIT_SGEMM"] = "1"
    if ext.sgemm_max_rows() == 0:
        print("no AVX-512F on this CPU: both sides run aten's mm")
    reps = 3 if args.quick else args.reps
    rows = [grouped(ext, *shape, reps) for shape in (QUICK if args.quick else SWEEP)]
    rows += [layers(name, args.tokens, reps) for name in (["fine"] if args.quick else LAYERS)]
    if args.out:
        write_json(args.out, {"machine": machine(), "threads": args.threads, "reps": reps,
                              "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
