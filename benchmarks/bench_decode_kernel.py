"""One MoE layer's decode step: the decode kernels vs the fused backend, vs the roofline.

For T tokens (each routed to K random distinct experts), times the expert compute
of one layer (gate+up, activation, down, weighted combine) with
``backend="decode"`` against ``backend="fused"`` (same fp32 weights, A/B
alternating, median of per-pair ratios), then the decode kernels with fp32,
bf16, int8 and int4 weights against fp32 decode. The roofline of a step is the
bytes of the distinct experts it touches / the read bandwidth measured in the
same run (a 1 GiB fp32 ``sum``).

    PYTHONPATH=src python benchmarks/bench_decode_kernel.py            # D=1024 E=64 K=8 F=512
    PYTHONPATH=src python benchmarks/bench_decode_kernel.py --crossover  # decode vs fused by rows
    PYTHONPATH=src python benchmarks/bench_decode_kernel.py --cpu-time   # 1 thread, CPU time

Shape letters: T tokens, D hidden, F expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Step, compare, machine, read_bandwidth, write_json  # noqa: E402
from moekit import MoEConfig  # noqa: E402
from moekit.experts import Experts  # noqa: E402
from moekit.experts.backends import BACKENDS  # noqa: E402
from moekit.inference import sorted_rows  # noqa: E402
from moekit.quant.tensor import QuantizedTensor, quantize_tensor  # noqa: E402


def expert_bytes(w) -> int:
    if isinstance(w, QuantizedTensor):
        return w.nbytes_per_expert()
    return w[0].numel() * w.element_size()


def routing(T: int, E: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    experts_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights_TK = torch.rand(T, K, generator=g)
    return sorted_rows(experts_TK, weights_TK / weights_TK.sum(1, keepdim=True), E)


def step(backend: str, x, d, w_in, w_out, act) -> Step:
    fn = BACKENDS[backend]
    return Step(lambda: fn(x, d, w_in, w_out, None, None, act), lambda y: None)


def weights(ex: Experts) -> dict:
    return {"fp32": (ex.w_in, ex.w_out),
            "bf16": (ex.w_in.bfloat16(), ex.w_out.bfloat16()),
            "int8": (quantize_tensor(ex.w_in, 8), quantize_tensor(ex.w_out, 8)),
            "int4-g64": (quantize_tensor(ex.w_in, 4, 64), quantize_tensor(ex.w_out, 4, 64))}


def main_table(args, ex: Experts, bw: float) -> list[dict]:
    D, E, K = args.dim, args.experts, args.top_k
    ws = weights(ex)
    rows = []
    print(f"{'T':>3} {'touched':>7} {'weights':>9} {'decode ms':>9} {'vs fused':>8} "
          f"{'roofline ms':>11} {'x roofline':>10} {'tok/s vs fp32':>13}")
    for T in args.tokens:
        d = routing(T, E, K, seed=T)
        touched = int((d.counts_E > 0).sum())
        x = torch.randn(T, D)
        vs_fused = compare(step("decode", x, d, ex.w_in, ex.w_out, ex._act),
                           step("fused", x, d, ex.w_in, ex.w_out, ex._act), args.reps, 3)
        for name, (wi, wo) in ws.items():
            r = (vs_fused if name == "fp32" else
                 compare(step("decode", x, d, wi, wo, ex._act),
                         step("decode", x, d, ex.w_in, ex.w_out, ex._act), args.reps, 3))
            ms = r["a_fwd_ms"]
            roof = touched * (expert_bytes(wi) + expert_bytes(wo)) / (bw * 1e9) * 1e3
            row = {"T": T, "touched": touched, "weights": name, "decode_ms": ms,
                   "roofline_ms": roof, "x_roofline": ms / roof,
                   "ratio_vs_fused": vs_fused["ratio_fwd"] if name == "fp32" else None,
                   "fused_ms": vs_fused["b_fwd_ms"] if name == "fp32" else None,
                   "tokens_per_s_vs_fp32": 1.0 if name == "fp32" else 1 / r["ratio_fwd"]}
            rows.append(row)
            vf = f"{row['ratio_vs_fused']:.3f}" if name == "fp32" else ""
            print(f"{T:>3} {touched:>7} {name:>9} {ms:>9.3f} {vf:>8} {roof:>11.3f} "
                  f"{ms / roof:>10.2f} {row['tokens_per_s_vs_fp32']:>13.2f}", flush=True)
    return rows


def cpu_time_table(args, ex: Experts) -> list[dict]:
    """1 thread, the thread's own CPU time (best of --reps): on a box loaded far past its
    cores, wall time mostly measures waiting for a core; CPU time still includes
    the memory stalls, so it stays a fair x-roofline (bandwidth measured the same way)."""
    clk = time.thread_time
    big = torch.ones(1 << 28)
    big.sum()
    bw = big.numel() * 4 / min(_timed(clk, big.sum) for _ in range(5)) / 1e9
    del big
    rows = []
    print(f"1 thread, thread CPU time, best of {args.reps}; read bandwidth {bw:.1f} GB/s")
    print(f"{'T':>3} {'touched':>7} {'weights':>9} {'backend':>7} {'ms':>7} {'roofline ms':>11} "
          f"{'x roofline':>10}")
    for T in args.tokens:
        d = routing(T, args.experts, args.top_k, seed=T)
        touched = int((d.counts_E > 0).sum())
        x = torch.randn(T, args.dim)
        ws = weights(ex)
        cases = [("fp32", "fused")] + [(name, "decode") for name in ws]
        for name, backend in cases:
            wi, wo = ws[name]
            call = step(backend, x, d, wi, wo, ex._act).forward
            call()
            ms = 1e3 * min(_timed(clk, call) for _ in range(args.reps))
            roof = touched * (expert_bytes(wi) + expert_bytes(wo)) / (bw * 1e9) * 1e3
            rows.append({"T": T, "touched": touched, "weights": name, "backend": backend,
                         "ms": ms, "roofline_ms": roof, "x_roofline": ms / roof,
                         "bandwidth_gbs": bw})
            print(f"{T:>3} {touched:>7} {name:>9} {backend:>7} {ms:>7.2f} {roof:>11.2f} "
                  f"{ms / roof:>10.2f}", flush=True)
    return rows


def _timed(clk, fn) -> float:
    t0 = clk()
    fn()
    return clk() - t0


def crossover(args, ex: Experts) -> list[dict]:
    out = []
    print(f"{'T':>4} {'rows':>5} {'decode ms':>9} {'fused ms':>9} {'decode/fused':>12}")
    for T in args.crossover_tokens:
        d = routing(T, args.experts, args.top_k, seed=T)
        x = torch.randn(T, args.dim)
        r = compare(step("decode", x, d, ex.w_in, ex.w_out, ex._act),
                    step("fused", x, d, ex.w_in, ex.w_out, ex._act), args.reps, 2)
        out.append({"T": T, "rows": T * args.top_k, "decode_ms": r["a_fwd_ms"],
                    "fused_ms": r["b_fwd_ms"], "ratio": r["ratio_fwd"]})
        print(f"{T:>4} {T * args.top_k:>5} {r['a_fwd_ms']:>9.3f} {r['b_fwd_ms']:>9.3f} "
              f"{r['ratio_fwd']:>12.3f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--ffn-dim", type=int, default=512)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--crossover", action="store_true")
    p.add_argument("--cpu-time", action="store_true",
                   help="1 thread, thread CPU time (for a heavily loaded box)")
    p.add_argument("--crossover-tokens", type=int, nargs="+",
                   default=[4, 8, 16, 24, 32, 48, 64, 96])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1 if args.cpu_time else args.threads)
    torch.manual_seed(0)
    cfg = MoEConfig(dim=args.dim, ffn_dim=args.ffn_dim, num_experts=args.experts,
                    top_k=args.top_k)
    ex = Experts(cfg).requires_grad_(False)
    info = machine()
    bw = read_bandwidth() / 1e9  # GB/s
    print(f"bench_decode_kernel  torch {info['torch']}  {args.threads} threads  {info['cpu']}  "
          f"load {info['load_average_1m']}  D={args.dim} E={args.experts} K={args.top_k} "
          f"F={args.ffn_dim} swiglu  read bandwidth {bw:.1f} GB/s (1 GiB sum)  "
          f"median of {args.reps} A/B pairs")
    with torch.inference_mode():
        if args.cpu_time:
            rows = cpu_time_table(args, ex)
        else:
            rows = crossover(args, ex) if args.crossover else main_table(args, ex, bw)
    info["load_average_1m_end"] = round(__import__("os").getloadavg()[0], 2)
    if args.out:
        write_json(args.out, {"machine": info, "bandwidth_gbs": bw, "args": vars(args),
                              "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
