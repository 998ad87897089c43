"""CPU MoE benchmark: moekit against a dense equal-FLOP FFN, transformers and the reference.

Every "x dense" figure is the median of per-pair ratios against the dense
SwiGLU FFN D -> K*F -> D (same active FLOPs) measured in the same run, pairs
alternating. Run ``python benchmarks/bench_cpu.py --help`` or ``moekit bench``.

Shape letters: T tokens, D hidden, F expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (benchmarks/ is not a package)

CONFIGS = [  # (T, E, K, F)
    (4096, 8, 2, 1024),
    (4096, 64, 8, 256),
    (4096, 128, 8, 128),
    (256, 8, 2, 1024),
    (256, 64, 8, 256),
]
QUICK_CONFIGS = [(256, 64, 8, 256), (4096, 64, 8, 256)]
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
MOEKIT_IMPLS = ("moekit", "moekit-grouped_mm", "moekit-loop")
ALL_IMPLS = (*MOEKIT_IMPLS, "reference",
             *(f"hf-{m}-{i}" for m in ("mixtral", "olmoe") for i in HF_IMPLS))
QUICK_IMPLS = ("moekit", "moekit-loop", "hf-mixtral-grouped_mm", "hf-olmoe-grouped_mm")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
BATCHED_MM_LIMIT_GIB = 1.0  # transformers' batched_mm copies one weight matrix per routed row
REFERENCE_MAX_T = 256  # the per-row oracle builds an autograd graph of ~10 nodes per row
REFERENCE_MAX_ROWS = 512  # and each row's w[e] makes a full-size zero gradient in backward


# -- the variants, each built as a harness.Step ------------------------------------

def _init(params, dtype, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    for p in params:
        with torch.no_grad():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        p.data = p.data.to(dtype)


def _step(params, forward, xs, dtype):
    """A Step on the inputs ``xs`` in turn (one: the same input, and routing, every step)."""
    import torch

    gy = torch.randn(xs[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    turn = [0]

    def fwd():
        x = xs[turn[0] % len(xs)]
        turn[0] += 1
        for p in [*params, x]:
            p.grad = None
        return forward(x)

    return harness.Step(forward=fwd, backward=lambda y: y.backward(gy))


def _dense(T, K, F, D, dtype):
    import torch
    import torch.nn.functional as Fn

    w_in = torch.nn.Parameter(torch.empty(D, 2 * K * F))
    w_out = torch.nn.Parameter(torch.empty(K * F, D))
    _init([w_in, w_out], dtype, 0)

    def forward(x):
        gate, up = (x @ w_in).chunk(2, dim=-1)
        return (Fn.silu(gate) * up) @ w_out

    return [w_in, w_out], forward


def _moekit(impl, T, E, K, F, D, dtype):
    from moekit import MoE, MoEConfig

    backend = "fused" if impl == "moekit" else impl.split("-", 1)[1]
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=K), backend=backend)
    _init(list(moe.parameters()), dtype, 0)
    return list(moe.parameters()), lambda x: moe(x).output


def _reference(T, E, K, F, D, dtype):
    from moekit import MoE, MoEConfig
    from moekit.dispatch.sort import sort_by_expert
    from moekit.experts.reference import reference_experts

    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=K), backend="loop")
    _init(list(moe.parameters()), dtype, 0)

    def forward(x):
        d = sort_by_expert(moe.router(x).plan, E, None)
        return reference_experts(moe.experts, x, d)

    return list(moe.parameters()), forward


def _hf(impl, T, E, K, F, D, dtype):
    _, model, experts_impl = impl.split("-", 2)
    if model == "mixtral":
        from transformers import MixtralConfig as Config
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        cfg = Config(hidden_size=D, intermediate_size=F, num_local_experts=E,
                     num_experts_per_tok=K)
    else:
        from transformers import OlmoeConfig as Config
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
        cfg = Config(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                     norm_topk_prob=True)
    cfg._experts_implementation = experts_impl  # how transformers picks the experts forward
    block = Block(cfg)
    _init(list(block.parameters()), dtype, 0)

    def forward(x):
        y = block(x[None])
        return (y[0] if isinstance(y, tuple) else y)[0]

    return list(block.parameters()), forward


def build_step(impl: str, T: int, E: int, K: int, F: int, D: int, dtype: str,
               threads: int = 2, inputs: int = 1) -> harness.Step:
    """A forward+backward step of ``impl`` on T tokens (memory subprocesses call it), on
    ``inputs`` different inputs in turn (``--fresh-inputs``: a new routing every step)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    if impl == "dense":
        params, forward = _dense(T, K, F, D, dt)
    elif impl == "reference":
        params, forward = _reference(T, E, K, F, D, dt)
    elif impl.startswith("moekit"):
        params, forward = _moekit(impl, T, E, K, F, D, dt)
    else:
        params, forward = _hf(impl, T, E, K, F, D, dt)
    xs = [torch.randn(T, D).to(dt).requires_grad_(True) for _ in range(inputs)]
    return _step(params, forward, xs, dt)


# -- the time breakdown of moekit's layer ---------------------------------------------

def breakdown(T: int, E: int, K: int, F: int, D: int, dtype: str) -> dict:
    """ms of routing / dispatch / experts / combine in one profiled forward+backward.

    Runs the layer's own pieces (router, sort_by_expert, experts) under named
    profiler ranges; inside the fused Function the gathers (index_select)
    count as dispatch and the scatters (index_add_) as combine. Profiling adds
    overhead to small ops, so read the shares, not the absolute times.
    """
    import torch
    from torch.profiler import profile, record_function

    from moekit import MoE, MoEConfig
    from moekit.dispatch.sort import sort_by_expert
    from moekit.routing.stats import routing_stats

    dt = getattr(torch, dtype)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=K))
    _init(list(moe.parameters()), dt, 0)
    x = torch.randn(T, D).to(dt).requires_grad_(True)

    def step():
        with record_function("moekit.routing"):
            routed = moe.router(x)
        with record_function("moekit.dispatch"):
            d = sort_by_expert(routed.plan, E, None)
        y = moe.experts(x, d)
        with record_function("moekit.routing"):
            routing_stats(routed.plan, d, T, routed.z_loss, routed.aux_loss)
        y.backward(torch.ones_like(y))

    step()
    with profile() as prof:
        step()
    return _classify(prof.events())


def _category(ev) -> str:
    names, p = [], ev
    while p is not None:
        names.append(p.name)
        p = p.cpu_parent
    if any(n in ("FusedExperts", "FusedExpertsBackward") for n in names):
        if ev.name == "aten::index_select":
            return "dispatch"
        return "combine" if ev.name in ("aten::index_add_", "aten::scatter_add_") else "experts"
    if "moekit.dispatch" in names or any("IndexBackward" in n for n in names):
        return "dispatch"
    return "routing"


def _classify(events) -> dict:
    ms = {"routing": 0.0, "dispatch": 0.0, "experts": 0.0, "combine": 0.0}
    for ev in events:
        ms[_category(ev)] += ev.self_cpu_time_total / 1e3
    total = sum(ms.values())
    return {**{f"{k}_ms": v for k, v in ms.items()},
            **{f"{k}_pct": 100 * v / total for k, v in ms.items()}}


# -- the run ------------------------------------------------------------------------------

def _batched_mm_gib(T, K, F, D, dtype) -> float:
    return T * K * 2 * F * D * (4 if dtype == "float32" else 2) / 2**30


def _impls(args, T, K, F, D, dtype) -> list[tuple[str, str]]:
    """(impl, why skipped or '') in the order they run."""
    out = [(m, "") for m in args.impls if m.startswith("moekit")]
    slow_max_t = min(REFERENCE_MAX_T, args.slow_max_t or REFERENCE_MAX_T)
    if "reference" in args.impls:
        ok = T <= slow_max_t and T * K <= REFERENCE_MAX_ROWS and dtype == "float32"
        out.append(("reference", "" if ok else
                    f"per-row oracle: run once, fp32, T <= {slow_max_t} and T*K <= "
                    f"{REFERENCE_MAX_ROWS} only (about 1.5 min per step at 512 rows here)"))
    hf = [m for m in args.impls if m.startswith("hf-")]
    if hf and not _has_transformers():
        return out + [(m, "transformers not installed") for m in hf]
    for m in hf:
        need = _batched_mm_gib(T, K, F, D, dtype)
        if dtype != "float32" and not m.endswith("grouped_mm"):
            out.append((m, "bf16: transformers grouped_mm only (time)"))
        elif args.slow_max_t and T > args.slow_max_t and not m.endswith("grouped_mm"):
            out.append((m, f"--slow-max-t {args.slow_max_t}: grouped_mm only at this T (time)"))
        elif m.endswith("batched_mm") and need > BATCHED_MM_LIMIT_GIB:
            out.append((m, f"batched_mm would copy {need:.0f} GiB of weights"))
        else:
            out.append((m, ""))
    return out


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run_config(args, T, E, K, F, dtype) -> list[dict]:
    D, rows = args.dim, []
    shape = dict(T=T, E=E, K=K, F=F, D=D, dtype=dtype, threads=args.threads)
    inputs = args.warmup + args.reps + 1 if args.fresh_inputs else 1
    dense = build_step("dense", **shape, inputs=inputs)
    for impl, skip in _impls(args, T, K, F, D, dtype):
        row = {"config": f"T{T} E{E} K{K} F{F}", **shape, "impl": impl}
        if skip:
            rows.append({**row, "skipped": skip})
            _print_row(rows[-1])
            continue
        step = build_step(impl, **shape, inputs=inputs)
        if impl == "reference":
            row.update(_reference_timing(step, dense, 1))
        else:
            row.update(harness.compare(step, dense, args.reps, args.warmup))
        if args.memory and dtype == "float32":
            row["peak_mib"] = harness.peak_growth_mib(__file__, "build_step",
                                                      {"impl": impl, **shape})
        rows.append(row)
        _print_row(row)
        del step
    if args.memory and dtype == "float32":
        peak = harness.peak_growth_mib(__file__, "build_step", {"impl": "dense", **shape})
        for r in rows:
            r["dense_peak_mib"] = peak
    return rows


def matmul_gflops(dtype: str, n: int = 2048, reps: int = 3) -> float:
    """GFLOP/s of one large n x n x n matmul in ``dtype``, best of ``reps``: the machine's
    GEMM peak that the MoE layers' FLOP rates are put against, measured in the same run."""
    import torch

    a = torch.randn(n, n).to(getattr(torch, dtype))
    b = torch.randn(n, n).to(a.dtype)
    a @ b  # warm-up
    best = min(harness.time_alone(harness.Step(forward=lambda: a @ b, backward=lambda y: None),
                                  1, warmup=0)["a_fwd_ms"] for _ in range(reps))
    return 2 * n**3 / (best * 1e6)


def _add_flop_rates(rows: list[dict], peak: float) -> None:
    """fwd+bwd of the SwiGLU experts: 3 GEMMs per projection, 6 T K D F multiply-adds each
    way (gate+up 2F wide, down F wide) = 18 T K D F FLOPs, for the layer and for dense."""
    for r in rows:
        if "a_total_ms" in r:
            flops = 18 * r["T"] * r["K"] * r["D"] * r["F"]
            r.update(gflops=flops / (r["a_total_ms"] * 1e6), matmul_peak_gflops=peak,
                     dense_gflops=flops / (r["b_total_ms"] * 1e6))
            r["peak_share"] = r["gflops"] / peak


def _reference_timing(step, dense, reps) -> dict:
    """The per-row oracle is too slow to pair: its median against dense timed right after."""
    a = harness.time_alone(step, reps, warmup=0)
    b = harness.time_alone(dense, 3, warmup=1)
    return {**a, "b_total_ms": b["a_total_ms"], "b_fwd_ms": b["a_fwd_ms"],
            "b_bwd_ms": b["a_bwd_ms"], "ratio_total": a["a_total_ms"] / b["a_total_ms"],
            "ratio_fwd": a["a_fwd_ms"] / b["a_fwd_ms"], "ratio_bwd": a["a_bwd_ms"] / b["a_bwd_ms"],
            "unpaired": True}


HEADER = (f"{'config':20s} {'dtype':5s} {'impl':24s} {'fwd ms':>8s} {'bwd ms':>9s} "
          f"{'total ms':>9s} {'dense ms':>9s} {'x dense':>8s} {'fwd x':>6s} {'bwd x':>6s} "
          f"{'peak MiB':>8s}")


def _print_row(r: dict) -> None:
    dt = "fp32" if r["dtype"] == "float32" else "bf16"
    if "skipped" in r:
        print(f"{r['config']:20s} {dt:5s} {r['impl']:24s} skipped: {r['skipped']}", flush=True)
        return
    mark = "*" if r.get("unpaired") else " "
    peak = f"{r['peak_mib']:8.0f}" if "peak_mib" in r else f"{'-':>8s}"
    print(f"{r['config']:20s} {dt:5s} {r['impl']:24s} {r['a_fwd_ms']:8.1f} {r['a_bwd_ms']:9.1f} "
          f"{r['a_total_ms']:9.1f} {r['b_total_ms']:9.1f} {r['ratio_total']:7.2f}{mark} "
          f"{r['ratio_fwd']:6.2f} {r['ratio_bwd']:6.2f} {peak}", flush=True)


def summarize(rows: list[dict]) -> list[dict]:
    """Per config and dtype: moekit's ratio, the best transformers one, and their quotient."""
    out = []
    for key in sorted({(r["config"], r["dtype"]) for r in rows}):
        group = [r for r in rows if (r["config"], r["dtype"]) == key and "ratio_total" in r]
        mk = next((r for r in group if r["impl"] == "moekit"), None)
        hf = [r for r in group if r["impl"].startswith("hf-")]
        if mk is None:
            continue
        s = {"config": key[0], "dtype": key[1], "moekit_x_dense": mk["ratio_total"],
             "moekit_peak_share": mk.get("peak_share"), "dense_peak_share":
             mk["dense_gflops"] / mk["matmul_peak_gflops"] if "dense_gflops" in mk else None,
             "moekit_peak_mib": mk.get("peak_mib"), "dense_peak_mib": mk.get("dense_peak_mib")}
        if hf:
            best = min(hf, key=lambda r: r["ratio_total"])
            s.update(best_hf=best["impl"], best_hf_x_dense=best["ratio_total"],
                     speedup_vs_best_hf=best["ratio_total"] / mk["ratio_total"])
        out.append(s)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return p.parse_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="2 configs, fp32, 3 pairs, no reference or eager: a smoke run "
                   "(--configs, --dtypes, --impls, --reps given as well win)")
    p.add_argument("--configs", default=None,
                   help="T,E,K,F;T,E,K,F;... (default: the five from the issue)")
    p.add_argument("--dim", type=int, default=512, help="D (default 512)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16 (default both)")
    p.add_argument("--impls", default=None, help="comma list; default: all")
    p.add_argument("--reps", type=int, default=None, help="timed A/B pairs (median; default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed A/B pairs first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slow-max-t", type=int, default=None,
                   help="run transformers eager/batched_mm only up to this T (default: always)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the fresh-process peak-memory runs")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument("--fresh-inputs", action="store_true",
                   help="a new input (so new routing) every step, as in training; by default "
                        "one input, whose expert row counts repeat every step")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """The parsed flags checked and resolved, in a new namespace: --quick's choices where
    no flag was given (an explicit --configs, --dtypes, --impls or --reps wins), lists
    parsed. ValueError naming the first bad flag, its value and what is allowed; nothing
    is built, timed or written before it returns."""
    from moekit.bench import refuse_repeats
    from moekit.config import MAX_EXPERTS, check_positive_int, reject

    a = argparse.Namespace(**vars(args))
    if a.reps is None:
        a.reps = 3 if a.quick else 5
    harness.check_flags(a.threads, a.reps, a.out)
    check_positive_int("--dim", a.dim)
    if isinstance(a.warmup, bool) or not isinstance(a.warmup, int) or a.warmup < 0:
        reject("--warmup", a.warmup, "it must be an int >= 0")
    if a.slow_max_t is not None:
        check_positive_int("--slow-max-t", a.slow_max_t)
    dtypes = a.dtypes if a.dtypes is not None else "fp32" if a.quick else "fp32,bf16"
    if any(d not in DTYPES for d in dtypes.split(",")):
        reject("--dtypes", dtypes, f"it must be a comma list of {', '.join(DTYPES)}")
    a.dtypes = [DTYPES[d] for d in dtypes.split(",")]
    impls = a.impls if a.impls is not None else ",".join(QUICK_IMPLS) if a.quick else None
    if impls is not None and any(m not in ALL_IMPLS for m in impls.split(",")):
        reject("--impls", impls, f"it must be a comma list of {', '.join(ALL_IMPLS)}")
    a.impls = impls.split(",") if impls is not None else list(ALL_IMPLS)
    a.configs = (_parse_configs(a.configs) if a.configs is not None else
                 QUICK_CONFIGS if a.quick else CONFIGS)
    for T, E, K, F in a.configs:
        if E > MAX_EXPERTS or K > E:
            reject("--configs", args.configs, f"in 'T,E,K,F' = '{T},{E},{K},{F}' it must be "
                   f"K <= E <= {MAX_EXPERTS}; here K={K}, E={E}")
    # the entries are well formed: now the repeats (None: the default or --quick's list)
    for flag, value, entries in (("--configs", args.configs, a.configs),
                                 ("--dtypes", args.dtypes, str(args.dtypes).split(",")),
                                 ("--impls", args.impls, a.impls)):
        if value is not None:
            refuse_repeats(flag, value, entries)
    return a


def _parse_configs(text: str) -> list[tuple[int, int, int, int]]:
    from moekit.config import reject

    out = []
    for entry in text.split(";"):
        try:
            values = tuple(int(v) for v in entry.split(","))
        except ValueError:
            values = ()
        if len(values) != 4 or min(values) < 1:
            reject("--configs", text, f"{entry!r} is not T,E,K,F: each ';'-separated entry "
                   "must be four positive ints (tokens, experts, top-k, expert hidden size), "
                   "e.g. 4096,64,8,256;256,8,2,1024")
        out.append(values)
    return out


def main(argv=None) -> int:
    try:
        args = check_args(parse_args(argv))
    except ValueError as e:
        print(f"bench_cpu.py: error: {e}", file=sys.stderr)
        return 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for flags that ``check_args`` returned (``moekit bench`` calls it)."""
    malloc = harness.use_malloc(args.malloc)  # may re-exec this process
    import torch

    torch.set_num_threads(args.threads)
    info = harness.machine()
    print(f"moekit bench  torch {info['torch']}  {info['threads']} threads  {info['cpu']}  "
          f"malloc: {malloc}  load avg {info['load_average_1m']}  "
          f"{harness.compute_phrase(info['compute'])}  D={args.dim}  "
          f"median of {args.reps} A/B pairs after {args.warmup} warm-up  inputs: "
          f"{'a new one every step' if args.fresh_inputs else 'one, reused'}")
    print("x dense = median over pairs of (impl time / dense SwiGLU FFN D->K*F->D time);"
          " * = unpaired (median vs dense timed right after); peak = growth of one fwd+bwd,"
          " fresh process (fp32 only)")
    print(HEADER)
    rows, breakdowns, t0 = [], [], time.time()
    for dtype in args.dtypes:
        peak = matmul_gflops(dtype)
        print(f"{dtype}: one 2048^3 matmul runs at {peak:.0f} GFLOP/s (the peak below)")
        for T, E, K, F in args.configs:
            rows += run_config(args, T, E, K, F, dtype)
            _add_flop_rates(rows, peak)
            _write(args, info, rows, breakdowns, summarize(rows), time.time() - t0)  # so far
            if args.breakdown and dtype == "float32":
                b = {"config": f"T{T} E{E} K{K} F{F}", "dtype": dtype,
                     **breakdown(T, E, K, F, args.dim, dtype)}
                breakdowns.append(b)
                print("  breakdown (profiled fwd+bwd, moekit): " + "  ".join(
                    f"{k} {b[k + '_pct']:.1f}%" for k in
                    ("routing", "dispatch", "experts", "combine")), flush=True)
    summary = summarize(rows)
    _print_summary(summary)
    _write(args, info, rows, breakdowns, summary, time.time() - t0)
    print(f"\nwrote {args.out}")
    return 0


def _print_summary(summary: list[dict]) -> None:
    print("\nsummary: moekit x dense, best transformers x dense, moekit speed-up over it "
          "(quotient of the two medians), peak MiB moekit / dense")
    for s in summary:
        dt = "fp32" if s["dtype"] == "float32" else "bf16"
        hf = (f"{s['best_hf']:24s} {s['best_hf_x_dense']:6.2f}  speed-up "
              f"{s['speedup_vs_best_hf']:5.2f}x" if "best_hf" in s else "no transformers run")
        mem = (f"  peak {s['moekit_peak_mib']:.0f} / {s['dense_peak_mib']:.0f} MiB = "
               f"{s['moekit_peak_mib'] / max(s['dense_peak_mib'], 1e-9):.2f}x"
               if s.get("moekit_peak_mib") is not None else "")
        share = (f"  {100 * s['moekit_peak_share']:.0f}% of matmul peak (dense "
                 f"{100 * s['dense_peak_share']:.0f}%)" if s.get("moekit_peak_share") else "")
        print(f"{s['config']:20s} {dt:5s} moekit {s['moekit_x_dense']:5.2f}  {hf}{mem}{share}")


def _write(args, info, rows, breakdowns, summary, seconds) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if not getattr(args, "out", None):
        args.out = str(Path(__file__).resolve().parent / "results" / f"bench_cpu_{stamp}.json")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": " ".join(sys.argv), "seconds": round(seconds, 1),
               "args": {k: v for k, v in vars(args).items()}, "rows": rows,
               "breakdown": breakdowns, "summary": summary}
    harness.write_json(path, payload, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
