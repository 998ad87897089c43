"""GPU routing: fused_dispatch against softmax_topk + sort_by_expert, eager and replayed.

Eager calls at these sizes measure Python and kernel launches (bench_triton.py's
routing row); replaying one call captured in a CUDA graph measures the GPU's own
time. Both paths have no host sync, so both capture. Skips without CUDA.

    python benchmarks/bench_triton_routing.py

Shape letters: T tokens, E experts, K experts per token.
"""

import argparse
import sys

import torch

from moekit.dispatch.plan import RoutingPlan
from moekit.dispatch.sort import sort_by_expert
from moekit.functions.routing import fused_dispatch
from moekit.routing.token_choice import softmax_topk


def unfused(logits, K):
    T, E = logits.shape
    e, w, p = softmax_topk(logits, K)
    plan = RoutingPlan(token_S=torch.arange(T, device="cuda").repeat_interleave(K),
                       expert_S=e.reshape(-1), weight_S=w.reshape(-1), probs_TE=p,
                       logits_TE=logits, top_k=K)
    return sort_by_expert(plan, E, None).weight_S


def ms(fn, n=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


SHAPES = [(4096, 8, 2), (4096, 64, 8), (16384, 64, 8)]


def main(argv: list[str] | None = None) -> int:
    # no options: the parser is there so --help describes the script instead of running it
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_routing: skipped, no CUDA device")
        return 0
    for name in ("fused", "topk+sort"):  # a failed capture (host sync) comes last
        for T, E, K in SHAPES:
            logits = torch.randn(T, E, device="cuda")
            fn = ((lambda lg=logits, k=K: fused_dispatch(lg, k)[0].weight_S) if name == "fused"
                  else (lambda lg=logits, k=K: unfused(lg, k)))
            eager = ms(fn)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g):
                    fn()
                graph = ms(g.replay)
            except Exception as exc:  # noqa: BLE001
                print(name, "graph capture failed:", type(exc).__name__, str(exc)[:100])
                graph = float("nan")
            print(f"{name:10} T{T} E{E} K{K}: eager {eager * 1e3:.0f} us/call, "
                  f"graph replay {graph * 1e3:.0f} us/call", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
