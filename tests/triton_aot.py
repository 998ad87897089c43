"""Compile every Triton kernel ahead of time for a CUDA target, no GPU needed.

The interpreter tests (tests/test_triton.py) check what the kernels compute;
this checks that the compiled path builds: Triton's frontend type checks,
constexpr branches and ptxas, for sm_90 by default. Run as a script (the
kernels must be imported without TRITON_INTERPRET):

    python tests/triton_aot.py [--full] [--arch 90]

Default: every kernel in bf16 with SwiGLU (about 15 s of CPU time when
Triton's cache is cold); --full adds fp32 (IEEE dots) and every activation.
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
                    "h_ptr": ty, "dh_ptr": ty, "dwt_ptr": "fp32"},
                   {"HAS_BIAS": True, "BLOCK_E": 64, **acts, **common})
    for a_act in (True, False):
        compile_kernel(grouped._wgrad_kernel, target,
                       {**row, "a_ptr": ty, "wt_ptr": "fp32", "b_ptr": ty, "dw_ptr": ty,
                        "db_ptr": ty},
                       {"A_ACT": a_act, "B_GATHER": a_act, "HAS_BIAS": a_act, **acts,
                        **common})


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
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
