"""Quantized linear layers past the decode kernel's rows: ``q_linear_out`` against
dequantize + ``F.linear``.

Same process, same inputs, A/B alternating, median of the per-pair time ratios
(harness.compare; below 1: ``q_linear_out`` took less time):

- layers: one [K -> N] int8 / int4 (g64) weight, M rows: ``q_linear_out`` (dequantized in
  its GEMM's packing, no float copy of the weight) against ``dequantize_NK`` + ``F.linear``;
- with ``--a8``: weights quantized with activations="int8": ``q_linear_out`` rounding the
  rows to int8 (igemm_a8, AVX-512 VNNI) against the same call on float rows (how such
  weights prefilled before it) and against ``F.linear`` on the dequantized weights;
- models: bench_decode's quantized models (``scope="all"``: attention and head quantized
  too) with ``decode.QUANT_GEMM_MAX_ROWS`` at 256 (q_linear_out for 33-256 rows) against
  32 (the dequantize path): a 128-token prefill and a decode step of 64 sequences.

    PYTHONPATH=src python benchmarks/bench_quant_linear.py [--reps 7] [--skip-models] [--a8]

Needs moekit's C++ GEMM (an AVX-512F CPU); elsewhere it says so and exits. Shape
letters: M rows, K input width, N output width, B sequences, L prompt tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Step, compare, machine, write_json  # noqa: E402
from moekit.functions import cpu_ext, decode  # noqa: E402
from moekit.quant.tensor import dequantize_NK, quantize_tensor  # noqa: E402

FORMATS = [(8, None), (4, 64)]
LAYERS = [(K, N, M) for K, N in ((1024, 1024), (1024, 8192)) for M in (64, 128, 256, 512, 1024)]


def _forward_only(fn) -> Step:
    return Step(fn, lambda _: None)


def bench_layers(ext, reps: int) -> list[dict]:
    rows = []
    for bits, g in FORMATS:
        for K, N, M in LAYERS:
            q = quantize_tensor(torch.randn(1, K, N) / K**0.5, bits, g)
            x, out = torch.randn(M, K), torch.empty(M, N)
            args = (x, q.data, q.scales, q.zeros, bits, g or 0, out, False)
            r = compare(_forward_only(lambda a=args: ext.q_linear_out(*a)),
                        _forward_only(lambda x=x, q=q: F.linear(x, dequantize_NK(q, 0, 1)[0])),
                        reps)
            rows.append({"bits": bits, "group": g, "K": K, "N": N, "M": M,
                         "q_linear_ms": r["a_fwd_ms"], "dequantize_linear_ms": r["b_fwd_ms"],
                         "ratio": r["ratio_fwd"]})
            print(f"int{bits} [{K} -> {N}] {M:5d} rows: q_linear_out {r['a_fwd_ms']:7.2f} ms, "
                  f"dequantize + F.linear {r['b_fwd_ms']:7.2f} ms, ratio {r['ratio_fwd']:.2f}",
                  flush=True)
    return rows


def bench_a8_layers(ext, reps: int) -> list[dict]:
    rows = []
    for bits, g in FORMATS:
        for K, N in ((1024, 1024), (1024, 8192)):
            for M in (64, 256, 1024):
                q = quantize_tensor(torch.randn(1, K, N) / K**0.5, bits, g, activations="int8")
                x, out = torch.randn(M, K), torch.empty(M, N)
                args = (x, q.data, q.scales, q.zeros, bits, g or 0, out)
                a8 = _forward_only(lambda a=args: ext.q_linear_out(*a, True))
                floats = compare(a8, _forward_only(lambda a=args: ext.q_linear_out(*a, False)),
                                 reps)
                w = dequantize_NK(q, 0, 1)[0]
                mkl = compare(a8, _forward_only(lambda x=x, w=w: F.linear(x, w)), reps)
                rows.append({"bits": bits, "group": g, "K": K, "N": N, "M": M,
                             "a8_ms": floats["a_fwd_ms"], "float_rows_ms": floats["b_fwd_ms"],
                             "ratio_float_rows": floats["ratio_fwd"],
                             "f_linear_ms": mkl["b_fwd_ms"], "ratio_f_linear": mkl["ratio_fwd"]})
                print(f"int{bits}a8 [{K} -> {N}] {M:5d} rows: int8 rows {floats['a_fwd_ms']:7.2f} "
                      f"ms ({2 * M * K * N / floats['a_fwd_ms'] / 1e6:.0f} GOP/s), float rows "
                      f"{floats['b_fwd_ms']:7.2f} ms (ratio {floats['ratio_fwd']:.2f}), F.linear "
                      f"on dequantized {mkl['b_fwd_ms']:7.2f} ms (ratio {mkl['ratio_fwd']:.2f})",
                      flush=True)
    return rows


def bench_models(reps: int) -> list[dict]:
    import bench_decode as bd
    from moekit.models.transformer import StaticKVCache

    def timed(fn, limit: int) -> Step:
        def forward():
            decode.QUANT_GEMM_MAX_ROWS = limit
            with torch.inference_mode():
                fn()
        return Step(forward, lambda _: None)

    rows = []
    for variant in ("int8", "int4"):
        for shape in ("fine", "mixtral"):
            model = bd.build(shape, variant)
            # a 128-token prefill of one prompt (the cache emptied first, untimed)
            ids = bd.prompts(1, 128, seed=2)
            cache = StaticKVCache.for_model(model, 1, 128)
            prefill = lambda m=model, c=cache, i=ids: (c.reset(), m.infer(i, c))  # noqa: E731
            # one-token steps of 64 sequences after a 16-token prompt; each timed call adds
            # one position, alternating sides, so both see the same cache lengths
            ids64 = bd.prompts(64, 16, seed=2)
            cache64 = StaticKVCache.for_model(model, 64, 16 + 2 * reps + 8)
            with torch.inference_mode():
                model.infer(ids64, cache64)
            step = lambda m=model, c=cache64, i=ids64: m.infer(i[:, :1], c)  # noqa: E731
            for what, fn in (("prefill, 1 x 128 tokens", prefill),
                             ("decode step, 64 sequences", step)):
                r = compare(timed(fn, 256), timed(fn, 32), reps)
                rows.append({"variant": variant, "shape": shape, "what": what,
                             "q_linear_ms": r["a_fwd_ms"], "dequantize_ms": r["b_fwd_ms"],
                             "ratio": r["ratio_fwd"]})
                print(f"{variant} {shape} {what}: q_linear_out {r['a_fwd_ms']:.1f} ms, "
                      f"dequantize {r['b_fwd_ms']:.1f} ms, ratio {r['ratio_fwd']:.3f}",
                      flush=True)
    decode.QUANT_GEMM_MAX_ROWS = 256
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7, help="A/B pairs per row (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--a8", action="store_true",
                   help="int8-activation weights: the int8 rows' GEMM against float rows "
                        "(layers only)")
    p.add_argument("--out", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ext = cpu_ext.get()
    if ext is None or not hasattr(ext, "q_linear_out") or ext.sgemm_max_rows() == 0:
        print("bench_quant_linear: moekit's C++ GEMM does not run here (it needs an AVX-512F "
              "CPU and the built extension); nothing to compare")
        return 0
    if args.a8:
        if not ext.int8_activations_gemm_ok():
            print("bench_quant_linear --a8: the int8-activation GEMM needs AVX-512 VNNI")
            return 0
        result = {"machine": machine(), "a8_layers": bench_a8_layers(ext, args.reps)}
    else:
        result = {"machine": machine(), "layers": bench_layers(ext, args.reps)}
    if not args.skip_models and not args.a8:
        result["models"] = bench_models(args.reps)
    if args.out:
        write_json(args.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
