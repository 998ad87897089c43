"""Compile every Triton kernel ahead of time for a CUDA target, no GPU needed.

The interpreter tests (tests/test_triton.py) check what the kernels compute;
this checks that the compiled path builds: Triton's frontend type checks,
constexpr branches and ptxas, for sm_90 by default. Run as a script (the
kernels must be imported without TRITON_INTERPRET):

    python tests/triton_aot.py [--full] [--arch 90]

Default: every kernel in bf16 with SwiGLU (about 15 s of CPU time when
Triton's cache is cold); --full adds fp32 (IEEE dots) and every activation.
--tiles compiles each grouped kernel in bf16 with every launch configuration its
autotuner may pick (BASE_* + WIDE_*), specialised as the JIT does for one shape
(T=4096 D=2048 F=768 E=64 K=8), and prints registers and stack bytes per thread
(a stack is spilled registers) from the cuobjdump Triton ships; a few minutes.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from moekit.kernels import grouped, routing  # noqa: E402
from moekit.kernels.common import ACT_IDS, GLU_ACTS  # noqa: E402

BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}


def compile_kernel(kernel, target, ptr_types: dict, consts: dict, num_warps: int = 4) -> None:
    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {name: "constexpr" if name in consts else
           "*" + ptr_types[name] if name in ptr_types else "i32" for name in jit.arg_names}
    src = triton.compiler.ASTSource(fn=jit, signature=sig, constexprs=consts)
    options = triton.compiler.make_backend(target).parse_options(
        {"num_warps": num_warps, "num_stages": 3})
    triton.compile(src, target=target, options=options.__dict__)


def compile_grouped(target, ty: str, act: str) -> None:
    prec = "ieee" if ty == "fp32" else None
    acts = {"ACT": ACT_IDS[act], "GLU": act in GLU_ACTS, "LIMIT": 7.0, "ALPHA": 1.702}
    common = {"UPCAST": False, "PREC": prec, **BLOCKS}
    row = {"tok_ptr": "i64", "off_ptr": "i32"}
    compile_kernel(grouped._up_kernel, target,
                   {**row, "x_ptr": ty, "w_ptr": ty, "b_ptr": ty, "h_ptr": ty, "a_ptr": ty},
                   {"HAS_BIAS": True, "STORE_H": True, "BLOCK_E": 64, **acts, **common})
    compile_kernel(grouped._down_bwd_kernel, target,
                   {**row, "dy_ptr": ty, "wt_ptr": "fp32", "w_ptr": ty, "b_ptr": ty,
                    "h_ptr": ty, "dh_ptr": ty, "dwt_ptr": "fp32", "aw_ptr": ty},
                   {"HAS_BIAS": True, "STORE_AW": True, "BLOCK_E": 64, **acts, **common})
    for a_gather in (True, False):  # dW_in (bias unweighted), dW_out (bias weighted)
        compile_kernel(grouped._wgrad_kernel, target,
                       {**row, "a_ptr": ty, "wt_ptr": "fp32", "b_ptr": ty, "dw_ptr": ty,
                        "db_ptr": ty},
                       {"A_GATHER": a_gather, "B_GATHER": not a_gather, "HAS_BIAS": True,
                        "BIAS_WEIGHT": not a_gather, **common})


def compile_rest(target, ty: str) -> None:
    prec = "ieee" if ty == "fp32" else None
    for weighted in (True, False):
        compile_kernel(grouped._scatter_kernel, target,
                       {"a_ptr": ty, "tok_ptr": "i64", "wt_ptr": "fp32", "off_ptr": "i32",
                        "w_ptr": ty, "b_ptr": ty, "out_ptr": "fp32"},
                       {"HAS_WEIGHT": weighted, "HAS_BIAS": weighted, "UPCAST": False,
                        "PREC": prec, "BLOCK_E": 64, **BLOCKS})
    tiles = {"K": 8, "BLOCK_T": 16, "BLOCK_E": 64, "BLOCK_K": 8, "RENORM": True, "SCALE": 2.5}
    for score in routing.SCORE_IDS.values():
        compile_kernel(routing._route_kernel, target,
                       {"logits_ptr": "fp32", "bias_ptr": "fp32", "experts_ptr": "i32",
                        "weights_ptr": "fp32", "scores_ptr": "fp32", "hist_ptr": "i32"},
                       {"SCORE": score, "HAS_BIAS": True, **tiles})
        compile_kernel(routing._route_bwd_kernel, target,
                       {"logits_ptr": "fp32", "experts_ptr": "i32", "dweights_ptr": "fp32",
                        "dscores_ptr": "fp32", "dlogits_ptr": "fp32"},
                       {"SCORE": score, **tiles})
    compile_kernel(routing._place_kernel, target,
                   {"experts_ptr": "i32", "start_ptr": "i32", "order_ptr": "i64"},
                   {"K": 8, "BLOCK_T": 16, "BLOCK_P": 128})


# Integer arguments of each grouped kernel at T=4096 D=2048 F=768 (G=2F) E=64 K=8, bf16:
# the JIT turns a 1 into a constant and marks multiples of 16 (tiles_report).
_E, _D, _F, _S = 64, 2048, 768, 32768
_G = 2 * _F


def _wgrad_case(a_gather: bool, M: int, N: int) -> tuple:
    """dW_in (A gathered from x) or dW_out (B gathered from dy), A [S, M], B [S, N]."""
    return (grouped._wgrad_kernel,
            {"a_ptr": "bf16", "tok_ptr": "i64", "wt_ptr": "fp32", "off_ptr": "i32",
             "b_ptr": "bf16", "dw_ptr": "bf16", "db_ptr": "bf16"},
            {"A_GATHER": a_gather, "B_GATHER": not a_gather, "HAS_BIAS": False,
             "BIAS_WEIGHT": False},
            dict(M=M, N=N, M_BUCKET=512, stride_a=M, stride_b=N, stride_dwe=M * N,
                 stride_dwm=N, stride_db=N))


TILE_CASES = {  # name: (kernel, pointer types, constexprs, integer arguments)
    "up": (grouped._up_kernel,
           {"x_ptr": "bf16", "tok_ptr": "i64", "off_ptr": "i32", "w_ptr": "bf16",
            "b_ptr": "bf16", "h_ptr": "bf16", "a_ptr": "bf16"},
           {"HAS_BIAS": False, "STORE_H": True, "BLOCK_E": 64},
           dict(E=_E, D=_D, F=_F, M_BUCKET=512, stride_x=_D, stride_we=_D * _G, stride_wd=_G,
                stride_wg=1, stride_be=_G, stride_h=_G, stride_a=_F)),
    "scatter (down+combine)": (
        grouped._scatter_kernel,
        {"a_ptr": "bf16", "tok_ptr": "i64", "wt_ptr": "fp32", "off_ptr": "i32", "w_ptr": "bf16",
         "b_ptr": "bf16", "out_ptr": "fp32"},
        {"HAS_WEIGHT": True, "HAS_BIAS": False, "BLOCK_E": 64},
        dict(E=_E, K=_F, N=_D, M_BUCKET=512, stride_a=_F, stride_we=_F * _D, stride_wk=_D,
             stride_wn=1, stride_be=_D, stride_o=_D)),
    "down_bwd": (grouped._down_bwd_kernel,
                 {"dy_ptr": "bf16", "tok_ptr": "i64", "wt_ptr": "fp32", "off_ptr": "i32",
                  "w_ptr": "bf16", "b_ptr": "bf16", "h_ptr": "bf16", "dh_ptr": "bf16",
                  "dwt_ptr": "fp32", "aw_ptr": "bf16"},
                 {"HAS_BIAS": False, "STORE_AW": True, "BLOCK_E": 64},
                 dict(E=_E, D=_D, F=_F, M_BUCKET=512, stride_dy=_D, stride_we=_F * _D,
                      stride_wf=_D, stride_wd=1, stride_be=_D, stride_h=_G, stride_dh=_G,
                      stride_aw=_F)),
    "wgrad dW_in": _wgrad_case(a_gather=True, M=_D, N=_G),
    "wgrad dW_out": _wgrad_case(a_gather=False, M=_F, N=_D),
}


def tiles_report(target) -> None:
    """Registers and stack (spill) bytes of every autotuned tile, as the JIT compiles them."""
    import subprocess
    import tempfile

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    acts = {"ACT": ACT_IDS["swiglu"], "GLU": True, "LIMIT": 7.0, "ALPHA": 1.702}
    tiles = {grouped._up_kernel: grouped.BASE_ROW + grouped.WIDE_UP,
             grouped._scatter_kernel: grouped.BASE_ROW + grouped.WIDE_SCATTER,
             grouped._down_bwd_kernel: grouped.BASE_ROW + grouped.WIDE_DOWN_BWD,
             grouped._wgrad_kernel: grouped.BASE_WGRAD + grouped.WIDE_WGRAD}
    for name, (kernel, ptrs, consts, ints) in TILE_CASES.items():
        jit = kernel.fn
        for m, n, k, warps, stages in tiles[kernel]:
            c = {**consts, "UPCAST": False, "PREC": None, "BLOCK_M": m, "BLOCK_N": n,
                 "BLOCK_K": k, **{a: v for a, v in acts.items() if a in jit.arg_names}}
            sig, attrs = {}, {}
            for i, arg in enumerate(jit.arg_names):
                if arg in c:
                    sig[arg] = "constexpr"
                elif arg in ptrs:
                    sig[arg], attrs[(i,)] = "*" + ptrs[arg], [["tt.divisibility", 16]]
                elif ints[arg] == 1:
                    sig[arg], c[arg] = "constexpr", 1
                else:
                    sig[arg] = "i32"
                    if ints[arg] % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            src = triton.compiler.ASTSource(fn=jit, signature=sig, constexprs=c, attrs=attrs)
            options = triton.compiler.make_backend(target).parse_options(
                {"num_warps": warps, "num_stages": stages})
            compiled = triton.compile(src, target=target, options=options.__dict__)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                                       text=True, check=True).stdout
            res = dict(part.split(":") for part in usage.split("Resource usage:")[-1].split()
                       if ":" in part)
            print(f"{name:24} {m:>3}x{n:<3}x{k:<3} warps {warps} stages {stages}: "
                  f"{res.get('REG', '?'):>3} registers, {res.get('STACK', '?'):>4} B stack",
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--tiles", action="store_true",
                   help="registers and spills of every autotuned tile (see the docstring)")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    if args.tiles:
        tiles_report(target)
        return 0
    dtypes = ("bf16", "fp32") if args.full else ("bf16",)
    acts = tuple(ACT_IDS) if args.full else ("swiglu",)
    for ty in dtypes:
        for act in acts:
            compile_grouped(target, ty, act)
        compile_rest(target, ty)
        print(f"compiled for sm_{args.arch}: {ty}, activations {', '.join(acts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
