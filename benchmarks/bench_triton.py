"""GPU benchmark of the fused Triton MoE kernels (skips without CUDA).

For each shape it times, alternating the candidates every repetition (A B C A B C ...):
  moekit-triton   fused_experts: gather + GLU epilogue, combine in the down GEMM
  grouped_mm      moekit's torch._grouped_mm backend on the same Dispatch
  dense           a dense SwiGLU FFN of hidden size K*F over all T tokens
                  (the same active FLOPs: 6*T*K*D*F forward)
and prints forward and forward+backward ms, TFLOP/s, the median of the
per-repetition ratios (forward+backward) to dense and to grouped_mm, and the
peak memory one forward+backward adds. Routing is timed separately:
fused_dispatch (one routing kernel + one placement kernel) against
softmax_topk + sort_by_expert.

    python benchmarks/bench_triton.py [--dtype bf16] [--reps 20] [--json out.json]

Shape letters: T tokens, D hidden, F expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = [
    # (T, D, F, E, K)
    (4096, 2048, 1408, 8, 2),  # Mixtral-like few experts
    (4096, 2048, 768, 64, 8),  # fine-grained (Qwen3-30B-A3B-like)
    (16384, 2048, 768, 64, 8),
    (1024, 2048, 768, 64, 8),  # small batch: few rows per expert
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn) -> float:
    """Milliseconds of one call, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def make_case(T, D, F_, E, K, dtype):
    from moekit.dispatch.plan import RoutingPlan
    from moekit.dispatch.sort import sort_by_expert
    from moekit.routing.token_choice import softmax_topk

    dev = "cuda"
    x = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=True)
    logits = torch.randn(T, E, device=dev)
    experts_TK, weights_TK, probs = softmax_topk(logits, K)
    plan = RoutingPlan(token_S=torch.arange(T, device=dev).repeat_interleave(K),
                       expert_S=experts_TK.reshape(-1), weight_S=weights_TK.reshape(-1),
                       probs_TE=probs, logits_TE=logits, top_k=K)
    d = sort_by_expert(plan, E, None)
    w_in = (torch.randn(E, D, 2 * F_, device=dev) / D ** 0.5).to(dtype).requires_grad_()
    w_out = (torch.randn(E, F_, D, device=dev) / F_ ** 0.5).to(dtype).requires_grad_()
    w1 = (torch.randn(D, 2 * K * F_, device=dev) / D ** 0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(K * F_, D, device=dev) / F_ ** 0.5).to(dtype).requires_grad_()
    return x, logits, d, w_in, w_out, w1, w2


def candidates(x, d, w_in, w_out, w1, w2):
    from moekit.experts.backends import grouped_mm_experts
    from moekit.functions.experts import fused_experts

    def swiglu(h):
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u

    return {
        "moekit-triton": lambda: fused_experts(x, d.token_S, d.weight_S, d.offsets_E, w_in,
                                               w_out, None, None),
        "grouped_mm": lambda: grouped_mm_experts(x, d, w_in, w_out, None, None, swiglu),
        "dense": lambda: swiglu(x @ w1) @ w2,
    }


def measure(fns: dict, reps: int, backward: bool) -> dict[str, list[float]]:
    grad = None

    def run(fn):
        y = fn()
        if backward:
            y.backward(grad if grad is not None else torch.ones_like(y))

    for fn in fns.values():  # warm-up: compile, autotune
        for _ in range(3):
            run(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(lambda fn=fn: run(fn)))
    return times


def peak_mib(fn) -> float:
    """Peak memory one forward + backward adds on top of what is already allocated."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = fn()
    y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    return {name: statistics.median(a / b for a, b in zip(t, times[base], strict=True))
            for name, t in times.items()}


def bench_shape(shape, dtype, reps: int) -> list[dict]:
    T, D, F_, E, K = shape
    x, logits, d, w_in, w_out, w1, w2 = make_case(*shape, dtype)
    fns = candidates(x, d, w_in, w_out, w1, w2)
    fwd = measure(fns, reps, backward=False)
    tot = measure(fns, reps, backward=True)
    flops = 6 * T * K * D * F_
    r_dense, r_gmm = ratios(tot, "dense"), ratios(tot, "grouped_mm")
    rows = []
    for name in fns:
        f_ms, t_ms = statistics.median(fwd[name]), statistics.median(tot[name])
        rows.append({"shape": f"T{T} D{D} F{F_} E{E} K{K}", "impl": name, "fwd_ms": f_ms,
                     "fwd_bwd_ms": t_ms, "fwd_tflops": flops / f_ms / 1e9,
                     "fwd_bwd_tflops": 3 * flops / t_ms / 1e9, "x_dense": r_dense[name],
                     "x_grouped_mm": r_gmm[name], "peak_mib": peak_mib(fns[name])})
    rows.append(bench_routing(logits, E, K, reps) | {"shape": f"T{T} D{D} F{F_} E{E} K{K}"})
    return rows


def bench_routing(logits, E: int, K: int, reps: int) -> dict:
    from moekit.dispatch.plan import RoutingPlan
    from moekit.dispatch.sort import sort_by_expert
    from moekit.functions.routing import fused_dispatch
    from moekit.routing.token_choice import softmax_topk

    T = logits.shape[0]

    def unfused():
        experts_TK, weights_TK, probs = softmax_topk(logits, K)
        plan = RoutingPlan(token_S=torch.arange(T, device="cuda").repeat_interleave(K),
                           expert_S=experts_TK.reshape(-1), weight_S=weights_TK.reshape(-1),
                           probs_TE=probs, logits_TE=logits, top_k=K)
        return sort_by_expert(plan, E, None).weight_S

    fns = {"fused_dispatch": lambda: fused_dispatch(logits, K)[0].weight_S,
           "topk+sort": unfused}
    t = measure(fns, reps, backward=False)
    return {"impl": "routing, eager: fused", "fwd_ms": statistics.median(t["fused_dispatch"]),
            "x_unfused": ratios(t, "topk+sort")["fused_dispatch"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: skipped, no CUDA device (the kernels are GPU-only; CPU "
              "correctness is covered by tests/test_triton.py under TRITON_INTERPRET=1)")
        return 0
    import triton

    print(f"moekit bench_triton  torch {torch.__version__}  triton {triton.__version__}  "
          f"{torch.cuda.get_device_name()}  {args.dtype}  median of {args.reps}")
    print(f"{'shape':26} {'impl':24} {'fwd ms':>8} {'f+b ms':>8} {'f TF/s':>7} "
          f"{'f+b TF/s':>8} {'x dense':>7} {'x gmm':>6} {'peak MiB':>8}")
    rows = []
    for shape in SHAPES:
        for r in bench_shape(shape, DTYPES[args.dtype], args.reps):
            rows.append(r)
            if "x_unfused" in r:
                print(f"{r['shape']:26} {r['impl']:24} {r['fwd_ms']:8.3f}   "
                      f"x topk+sort {r['x_unfused']:.2f} (eager calls, launch-bound: "
                      "bench_triton_routing.py replays CUDA graphs)")
            else:
                print(f"{r['shape']:26} {r['impl']:24} {r['fwd_ms']:8.3f} "
                      f"{r['fwd_bwd_ms']:8.3f} {r['fwd_tflops']:7.1f} {r['fwd_bwd_tflops']:8.1f} "
                      f"{r['x_dense']:7.2f} {r['x_grouped_mm']:6.2f} {r['peak_mib']:8.0f}")
    if args.json:
        from harness import write_json  # benchmarks/harness.py, beside this file

        write_json(args.json, {"device": torch.cuda.get_device_name(),
                               "torch": torch.__version__, "dtype": args.dtype, "rows": rows},
                   indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
