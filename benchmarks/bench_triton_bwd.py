"""Where the fused Triton MoE step spends its time, kernel by kernel (GPU; skips without).

For each shape it times the six kernels of one forward + backward
(``moekit.kernels.grouped``: up projection, down projection + combine, the
backward's down GEMM with the activation derivative, dx, dW_in, dW_out) with
two launch-configuration sets, and torch._grouped_mm on the same six GEMMs
(the rows already sorted; gathers not counted):

  base   the BASE_* tiles alone (what the kernels autotuned over before WIDE_*)
  wide   BASE_* + WIDE_* (the configuration lists in use)

Each set is autotuned once; the repetitions then alternate base, wide and
grouped_mm (A B C A B C ...), swapping the autotuners' chosen configurations,
and the table gives medians, TFLOP/s and the configuration each set chose. The
last rows time fused_experts forward + backward through autograd with each set.
Each piece's output with each set is checked against torch._grouped_mm and torch
ops in fp32 (relative Frobenius error; bf16 rounding gives about 1e-3 to 1e-2).

    PYTHONPATH=src:. python benchmarks/bench_triton_bwd.py [--reps 20] [--json out.json]

Shape letters: T tokens, D hidden, F expert hidden (G = 2F), E experts, K experts per
token, S = T*K routed rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import timed  # noqa: E402

SHAPES = [(4096, 2048, 1408, 8, 2), (4096, 2048, 768, 64, 8)]  # (T, D, F, E, K)
ACT = ("swiglu", 7.0, 1.702)


def timer(device: str):
    """bench_triton's CUDA-event timer; wall time for the interpreter's dry run."""
    if device == "cuda":
        return timed

    def wall(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return wall


def make_case(T, D, F_, E, K, dtype, device):
    from moekit.dispatch.plan import RoutingPlan
    from moekit.dispatch.sort import sort_by_expert
    from moekit.kernels import grouped
    from moekit.routing.token_choice import softmax_topk

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, D, device=device, generator=g).to(dtype)
    logits = torch.randn(T, E, device=device, generator=g)
    experts_TK, weights_TK, probs = softmax_topk(logits, K)
    plan = RoutingPlan(token_S=torch.arange(T, device=device).repeat_interleave(K),
                       expert_S=experts_TK.reshape(-1), weight_S=weights_TK.reshape(-1),
                       probs_TE=probs, logits_TE=logits, top_k=K)
    d = sort_by_expert(plan, E, None)
    w_in = (torch.randn(E, D, 2 * F_, device=device, generator=g) / D ** 0.5).to(dtype)
    w_out = (torch.randn(E, F_, D, device=device, generator=g) / F_ ** 0.5).to(dtype)
    dy = torch.randn(T, D, device=device, generator=g).to(dtype)
    offsets = d.offsets_E.to(torch.int32)
    _, h = grouped.up_project(x, d.token_S, offsets, w_in, None, *ACT, True)
    return x, d, offsets, w_in, w_out, dy, h


def pieces(x, d, offsets, w_in, w_out, dy, h):
    """name -> (triton call, grouped_mm call, FLOPs): the six GEMMs of one step."""
    from moekit.kernels import grouped

    T, D = x.shape
    S, G = h.shape
    F_ = G // 2
    tok, wt = d.token_S, d.weight_S.float()
    a = torch.nn.functional.silu(h[:, :F_]) * h[:, F_:]
    dh, _, aw = grouped.down_backward(dy, tok, wt, offsets, w_out, None, h, *ACT, store_aw=True)
    xs, dys = x[tok], dy[tok]
    gmm = torch._grouped_mm
    return {
        "up (gather+GLU)": (
            lambda: grouped.up_project(x, tok, offsets, w_in, None, *ACT, True),
            lambda: gmm(xs, w_in, offs=offsets), 2 * S * D * G),
        "down+combine": (
            lambda: grouped.scatter_rows(a, tok, wt, offsets, w_out, None, T),
            lambda: gmm(a, w_out, offs=offsets), 2 * S * F_ * D),
        "bwd dA+act'": (
            lambda: grouped.down_backward(dy, tok, wt, offsets, w_out, None, h, *ACT,
                                          store_aw=True),
            lambda: gmm(dys, w_out.transpose(1, 2), offs=offsets), 2 * S * D * F_),
        "bwd dx": (
            lambda: grouped.scatter_rows(dh, tok, None, offsets, w_in.transpose(1, 2), None, T),
            lambda: gmm(dh, w_in.transpose(1, 2), offs=offsets), 2 * S * G * D),
        "bwd dW_in": (
            lambda: grouped.weight_grad(x, tok, offsets, dh, True, False, False),
            lambda: gmm(xs.t(), dh, offs=offsets), 2 * S * D * G),
        "bwd dW_out": (
            lambda: grouped.weight_grad(aw, tok, offsets, dy, False, True, False),
            lambda: gmm(a.t(), dys, offs=offsets), 2 * S * F_ * D),
    }


def references(x, d, offsets, w_in, w_out, dy, h) -> dict:
    """fp32 results of the six pieces from torch._grouped_mm and torch ops (the check)."""
    T, D = x.shape
    F_ = h.shape[1] // 2
    tok, wt = d.token_S, d.weight_S.float()[:, None]
    gmm = torch._grouped_mm
    xs, dys = x[tok], dy[tok]
    a = torch.nn.functional.silu(h[:, :F_]) * h[:, F_:]
    g, u = h.float().chunk(2, dim=1)
    dA = gmm(dys, w_out.transpose(1, 2), offs=offsets).float() * wt
    sg = torch.sigmoid(g)
    dh = torch.cat([dA * u * sg * (1 + g * (1 - sg)), dA * g * sg], dim=1)

    def combine(rows):
        return torch.zeros(T, rows.shape[1], device=x.device).index_add_(0, tok, rows)

    return {"up (gather+GLU)": gmm(xs, w_in, offs=offsets).float(),
            "down+combine": combine(gmm(a, w_out, offs=offsets).float() * wt),
            "bwd dA+act'": dh,
            "bwd dx": combine(gmm(dh.to(x.dtype), w_in.transpose(1, 2), offs=offsets).float()),
            "bwd dW_in": gmm(xs.t(), dh.to(x.dtype), offs=offsets).float(),
            "bwd dW_out": gmm(a.t(), (dys.float() * wt).to(x.dtype), offs=offsets).float()}


def rel_error(name: str, out, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| for the tensor a piece produces (h of up, dh of dA)."""
    if name == "up (gather+GLU)":
        out = out[1]
    elif isinstance(out, tuple):
        out = out[0]
    out = out.float()
    return float((out - ref).norm() / ref.norm())


def kernels():
    from moekit.kernels import grouped

    return {"up": (grouped._up_kernel, grouped.BASE_ROW),
            "scatter": (grouped._scatter_kernel, grouped.BASE_ROW),
            "down_bwd": (grouped._down_bwd_kernel, grouped.BASE_ROW),
            "wgrad": (grouped._wgrad_kernel, grouped.BASE_WGRAD)}


def tune(variant: str, calls, full: dict) -> dict:
    """Autotune every kernel over ``variant``'s configurations; its caches."""
    from moekit.kernels.grouped import config_shape

    for name, (k, base) in kernels().items():
        if hasattr(k, "configs"):  # an Autotuner (not under the interpreter's one config)
            keep = full[name] if variant == "wide" else [
                c for c in full[name] if config_shape(c) in set(base)] or full[name]
            k.configs, k.cache = keep, {}
    for fn in calls:
        for _ in range(2):
            fn()
    return {name: dict(getattr(k, "cache", {})) for name, (k, _) in kernels().items()}


def use(caches: dict) -> None:
    for name, (k, _) in kernels().items():
        if hasattr(k, "cache"):
            k.cache = caches[name]


def chosen(caches: dict) -> dict[str, list[str]]:
    from moekit.kernels.grouped import config_shape

    return {name: sorted({"x".join(map(str, config_shape(c))) for c in cache.values()})
            for name, cache in caches.items()}


def bench_shape(shape, dtype, reps: int, device: str,
                sets: tuple[str, ...] = ("base", "wide")) -> list[dict]:
    from moekit.functions.experts import fused_experts

    T, D, F_, E, K = shape
    x, d, offsets, w_in, w_out, dy, h = make_case(*shape, dtype, device)
    parts = pieces(x, d, offsets, w_in, w_out, dy, h)
    xg, wi, wo = (t.clone().requires_grad_() for t in (x, w_in, w_out))

    def step():
        y = fused_experts(xg, d.token_S, d.weight_S, offsets, wi, wo, None, None, *ACT)
        y.backward(dy)

    triton_calls = [t for t, _, _ in parts.values()] + [step]
    full = {name: list(getattr(k, "configs", [])) for name, (k, _) in kernels().items()}
    caches = {v: tune(v, triton_calls, full) for v in sets}
    refs = references(x, d, offsets, w_in, w_out, dy, h)
    errors = {}
    for v in sets:
        use(caches[v])
        errors[v] = {name: rel_error(name, parts[name][0](), refs[name]) for name in parts}
    for _, g, _ in parts.values():
        g()
    timed = timer(device)
    times: dict[tuple[str, str], list[float]] = {}
    names = [*parts, "fwd+bwd (autograd)"]
    for _ in range(reps):
        for v in (*sets, "grouped_mm"):
            if v != "grouped_mm":
                use(caches[v])
            for name in names:
                if name in parts:
                    fn = parts[name][1] if v == "grouped_mm" else parts[name][0]
                elif v == "grouped_mm":
                    continue
                else:
                    fn = step
                times.setdefault((name, v), []).append(timed(fn))
    use(caches[sets[-1]])
    rows = []
    for name in names:
        flops = parts[name][2] if name in parts else sum(p[2] for p in parts.values())
        r = {"shape": f"T{T} D{D} F{F_} E{E} K{K}", "piece": name}
        for v in (*sets, "grouped_mm"):
            if (name, v) in times:
                ms = statistics.median(times[name, v])
                r[f"{v}_ms"], r[f"{v}_tflops"] = ms, flops / ms / 1e9
        if name in parts:
            r["rel_error"] = {v: errors[v][name] for v in errors}
        if len(sets) == 2:
            r["wide_x_base"] = statistics.median(
                w / b for w, b in zip(times[name, "wide"], times[name, "base"], strict=True))
        rows.append(r)
    rows.append({"shape": f"T{T} D{D} F{F_} E{E} K{K}", "chosen": {
        v: chosen(caches[v]) for v in sets}})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--sets", choices=["both", "wide"], default="both",
                   help="wide: time only the configurations in use (half the autotuning)")
    p.add_argument("--tiny", action="store_true",
                   help="one small shape (a dry run, e.g. under TRITON_INTERPRET=1 on a CPU)")
    args = p.parse_args(argv)
    import os

    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not torch.cuda.is_available() and not interpret:
        print("bench_triton_bwd: skipped, no CUDA device (TRITON_INTERPRET=1 with --tiny "
              "runs the script's logic on a CPU)")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [(64, 64, 32, 4, 2)] if args.tiny else SHAPES
    print(f"moekit bench_triton_bwd  torch {torch.__version__}  "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}  "
          f"{dtype}  median of {args.reps}")
    print(f"{'shape':26} {'piece':20} {'base ms':>8} {'wide ms':>8} {'gmm ms':>8} "
          f"{'base TF':>7} {'wide TF':>7} {'gmm TF':>7} {'wide/base':>9} {'rel err base/wide':>17}")
    rows = []
    for shape in shapes:
        sets = ("base", "wide") if args.sets == "both" else ("wide",)
        for r in bench_shape(shape, dtype, args.reps, device, sets):
            rows.append(r)
            if "chosen" in r:
                for v, c in r["chosen"].items():
                    print(f"{r['shape']:26} chosen ({v}): "
                          + "; ".join(f"{k} {' '.join(x)}" for k, x in c.items()))
                continue
            r = {"base_ms": float("nan"), "base_tflops": float("nan"),
                 "wide_x_base": float("nan"), **r}
            if "rel_error" in r:
                r["rel_error"] = {"base": float("nan"), **r["rel_error"]}
            g_ms = f"{r['grouped_mm_ms']:8.3f}" if "grouped_mm_ms" in r else f"{'':8}"
            g_tf = f"{r['grouped_mm_tflops']:7.1f}" if "grouped_mm_ms" in r else f"{'':7}"
            print(f"{r['shape']:26} {r['piece']:20} {r['base_ms']:8.3f} {r['wide_ms']:8.3f} "
                  f"{g_ms} {r['base_tflops']:7.1f} {r['wide_tflops']:7.1f} {g_tf} "
                  f"{r['wide_x_base']:9.2f} "
                  + (" {base:.1e} / {wide:.1e}".format(**r["rel_error"]) if "rel_error" in r
                     else ""))
    if args.json:
        from harness import write_json  # benchmarks/harness.py, beside this file

        write_json(args.json, {"device": device, "torch": torch.__version__, "rows": rows},
                   indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
