"""The decode kernels' Python side: which path a projection or a quantized prefill takes,
and every tunable that choice reads; the names of its sibling modules stay importable from
here.

The routed and shared experts' rows on the decode kernels (two C++ calls per layer in
``moekit/csrc/cpu_decode.cpp``: gate+up with the activation fused, then the down projection
with the weighted combine fused; ``decode_rows``, ``decode_rows_list``, ``topk_rows``,
``shared_rows``) live in ``decode_experts.py``.

For many rows with quantized weights (prefill), ``dequantized_experts`` runs an fp32
SwiGLU layer without biases in one C++ call that dequantizes inside its GEMMs' packing
(``swiglu_experts_q_out``, AVX-512F CPUs; weights quantized with activations="int8"
have their inputs rounded to int8 there too, as the decode kernels round them, on a VNNI
GEMM where the CPU has AVX-512 VNNI); anything else it turns back into float a block of
experts at a time and runs on the fused path.

``dense_rows`` runs a dense projection (attention, LM head, dense FFN; float or
quantized) through the same kernel as one "expert" every row is routed to, for
the few rows of a decode step, where it reads the weight faster than aten's mm.

The rest of a decode step (routing, attention for one new token, the residual norm)
lives in ``decode_step.py``, how the kernels are called (``available``, ``wargs``,
``plain_f32``, ``ACT_CODES``) in ``decode_args.py``.

The tunables (QUANT_ONE_CALL, DEQUANT_BLOCK_EXPERTS, QUANT_LINEAR_MAX_ROWS, ...) and the
functions tests patch on this module (``dense_rows``, ``quantized_experts_into``,
``weight_gemm_min_rows``, ``dequantize_NK``) stay here beside the functions that read them
as globals, so setting ``decode.X`` still reaches its reader.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations
else F, E experts, S routed rows sorted by expert.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

from moekit.functions import cpu_ext
from moekit.functions.decode_args import (
    ACT_CODES,
    ActFn,
    all_rows,
    available,
    f32,
    grad_wanted,
    isa,
    kernel_bits,
    no_grad_unless_wanted,
    plain_f32,
    wargs,
)
from moekit.functions.decode_experts import (
    decode_rows,
    decode_rows_list,
    shared_args,
    shared_rows,
    topk_rows,
    topk_rows_call,
)
from moekit.functions.decode_step import (
    ADD_NORM_MAX_ROWS,
    CACHES_UNDER,
    KV_SCALE_BYTES,
    ROUTE_KERNEL_MAX_TOKENS,
    STEP_DTYPES,
    add_norm_ok,
    add_rms_norm,
    attend_one,
    attend_one_ok,
    cache_takes,
    qk_norm_,
    rms_norm,
    route_sort,
    sort_topk,
    sort_topk_ok,
)
from moekit.functions.moe_experts import fused_experts
from moekit.functions.row_buffers import Workspace, kept_buffers
from moekit.quant.tensor import QuantizedTensor, dequantize_NK

# the public names, decode_args.py's, decode_step.py's and decode_experts.py's included
# (importable from here as before)
__all__ = [
    "A8_LINEAR_MIN_ROWS", "ACT_CODES", "ADD_NORM_MAX_ROWS", "AMX_MAX_ROWS", "ActFn",
    "CACHES_UNDER", "DEQUANT_BLOCK_EXPERTS", "FLOAT_KERNEL_MAX_ROWS", "KV_SCALE_BYTES",
    "QUANT_GEMM_MAX_ROWS", "QUANT_LINEAR_MAX_ROWS", "QUANT_ONE_CALL",
    "ROUTE_KERNEL_MAX_TOKENS", "STEP_DTYPES", "WEIGHT_GEMM_MIN_ROWS", "add_norm_ok",
    "add_rms_norm", "amx", "attend_one", "attend_one_ok", "available", "cache_takes",
    "decode_rows", "decode_rows_list", "dense_kernel_ok", "dense_rows", "dequantized_dtype",
    "dequantized_experts", "f32", "float_kernel_max_rows", "grad_wanted",
    "int8_activations_gemm", "int8_gemm_here", "isa", "kernel_bits",
    "no_grad_unless_wanted", "plain_f32", "project", "qk_norm_", "quant_gemm_ok",
    "quant_gemm_rows", "quant_one_call_applies", "quant_one_call_format",
    "quantized_experts_into", "rms_norm", "route_sort", "shared_args", "shared_rows",
    "sort_topk", "sort_topk_ok", "topk_rows", "topk_rows_call", "wargs",
    "weight_gemm_min_rows",
]

DEQUANT_BLOCK_EXPERTS = 8  # experts dequantized at a time for prefill: bounded float copy
# Whether a quantized prefill runs an fp32 SwiGLU layer on swiglu_experts_q_out where it
# applies (tests and A/B runs flip it; MOEKIT_SGEMM=0 also turns it off)
QUANT_ONE_CALL = True


def _dequantized(w: QuantizedTensor, e0: int, runs: list[list[int]], buf: Tensor,
                 dtype: torch.dtype) -> Tensor:
    """Experts e0.. of ``w`` as [len(buf), K, N] in ``dtype``: each run of experts
    dequantized into its slots of ``buf`` ([., N, K], float32 or bfloat16), the other
    slots as they were."""
    for run in runs:
        dequantize_NK(w, run[0], run[-1] + 1, buf[run[0] - e0:run[-1] + 1 - e0])
    return buf.to(dtype).transpose(1, 2)


def quant_one_call_format(dtype: torch.dtype, bits: int, group_size: int | None, D: int,
                          F: int, biased: bool, kind: str | None) -> bool:
    """Whether a quantized prefill of ``dtype`` activations runs swiglu_experts_q_out on
    experts of this format (both projections ``bits`` / ``group_size``, input widths D and
    F): SwiGLU, no biases, float32, widths that are multiples of 32, and moekit's GEMM
    enabled on this CPU (AVX-512F, MOEKIT_SGEMM). The expert cache decides with this too."""
    return (QUANT_ONE_CALL and kind == "swiglu" and not biased and dtype == torch.float32
            and bits in (8, 4) and D % 32 == 0 and F % 32 == 0
            and _q_gemm_module("swiglu_experts_q_out") is not None)


def _q_gemm_module(entry: str):
    """The C++ module where it has ``entry`` (a call on sgemm_q) and moekit's GEMM runs on
    this CPU (AVX-512F, MOEKIT_SGEMM), else None."""
    ext = cpu_ext.get()
    return ext if ext is not None and hasattr(ext, entry) and ext.sgemm_max_rows() > 0 else None


def dequantized_dtype(dtype: torch.dtype) -> torch.dtype:
    """What prefill dequantizes weights to for ``dtype`` activations: bf16 straight to
    bf16 (no float32 copy written and read again), anything else to float32."""
    return dtype if dtype == torch.bfloat16 else torch.float32


def quant_one_call_applies(dtype: torch.dtype, w_in: QuantizedTensor, w_out: QuantizedTensor,
                           biased: bool, kind: str | None) -> bool:
    """``quant_one_call_format`` for these weights (CPU, one format for both)."""
    return (w_in.data.device.type == "cpu"
            and (w_in.bits, w_in.group_size, w_in.activations, w_in.layout)
            == (w_out.bits, w_out.group_size, w_out.activations, w_out.layout)
            # o16: only the int8-activation GEMM reads it (elsewhere prefill dequantizes)
            and (w_in.layout == "nk" or int8_gemm_here())
            and quant_one_call_format(dtype, w_in.bits, w_in.group_size, w_in.shape[1],
                                      w_out.shape[1], biased, kind))


def _quant_one_call(x_TD: Tensor, w_in: QuantizedTensor, w_out: QuantizedTensor,
                    biased: bool, kind: str | None):
    """The C++ module for swiglu_experts_q_out where it applies to this call, else None."""
    if (x_TD.device.type == "cpu" and x_TD.dim() == 2 and x_TD.stride(1) == 1
            and quant_one_call_applies(x_TD.dtype, w_in, w_out, biased, kind)):
        return cpu_ext.get()
    return None


def quantized_experts_into(ext, out_TD: Tensor, x_TD: Tensor, token_S: Tensor,
                           weight_S: Tensor, offsets_E: Tensor,
                           w_in: QuantizedTensor | list[QuantizedTensor],
                           w_out: QuantizedTensor | list[QuantizedTensor]) -> Tensor:
    """out_TD (float32) += the experts' weighted SwiGLU outputs, one swiglu_experts_q_out
    call (``ext`` from ``_quant_one_call``); the weights a stack or one-expert lists (the
    expert cache's: bitwise the stacked call's output)."""
    ends = offsets_E.tolist()
    S = ends[-1] if ends else 0
    first = w_out[0] if isinstance(w_out, list) else w_out
    F, D = first.shape[1:]
    ws = Workspace(x_TD, S, kept_buffers())
    rows = (token_S[:S].to(torch.int64).contiguous(), plain_f32(weight_S[:S]))
    scratch = (ws.get("a", S, F), ws.get("y", S, D), out_TD)
    fmt = (49 if first.layout == "o16" else first.bits, first.group_size or 0)
    a8 = int8_activations_gemm(ext, first)
    if isinstance(w_in, list):
        parts = [([q.data[0] for q in ws], [q.scales[0] for q in ws],
                  None if ws[0].zeros is None else [q.zeros[0] for q in ws])
                 for ws in (w_in, w_out)]
        ext.swiglu_experts_q_list_out(x_TD, *rows, *parts[0], *parts[1], *fmt, ends, *scratch,
                                      a8)
    else:
        ext.swiglu_experts_q_out(x_TD, *rows, w_in.data, w_in.scales, w_in.zeros, w_out.data,
                                 w_out.scales, w_out.zeros, *fmt, ends, *scratch, a8)
    return out_TD


def int8_gemm_here() -> bool:
    """Whether prefill's GEMMs round int8-activation weights' inputs on this CPU (AVX-512
    VNNI, moekit's GEMM enabled): ``int8_activations_gemm`` for any such weight."""
    ext = _q_gemm_module("q_linear_out")
    return ext is not None and QUANT_ONE_CALL and ext.int8_activations_gemm_ok()


def int8_activations_gemm(ext, w: QuantizedTensor) -> bool:
    """Whether the prefill GEMMs (``ext``'s swiglu_experts_q_out / q_linear_out) round the
    inputs of ``w`` to int8 as its decode kernels do: weights quantized with
    activations="int8", on a CPU with AVX-512 VNNI (igemm_a8). Elsewhere such weights
    prefill on float inputs, the dequantized weights' exact product."""
    return w.activations == "int8" and ext.int8_activations_gemm_ok()


def dequantized_experts(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                        w_in: QuantizedTensor, w_out: QuantizedTensor, b_in_EG: Tensor | None,
                        b_out_ED: Tensor | None, act: ActFn, kind: str | None) -> Tensor:
    """Prefill with quantized weights. An fp32 SwiGLU layer without biases is one C++ call
    that dequantizes each weight block inside its GEMMs' packing (never writing the float
    weights; each output equals the fused path's on ``dequantize``'s weights, bitwise
    where both run moekit's GEMM). Otherwise: per block of experts, dequantize to x's
    dtype and run the fused path on that block's rows. Reads the offsets on the host.

    Only the experts with rows are dequantized, into one buffer per weight (float32, or
    bfloat16 for bf16 activations) that every block reuses (a fresh buffer per block
    spent ~3/4 of the dequantization in first-touch page faults); the slots of experts
    without rows are stale and never read: the fused path runs only experts with rows."""
    ext = _quant_one_call(x_TD, w_in, w_out, b_in_EG is not None or b_out_ED is not None, kind)
    if ext is not None:
        return quantized_experts_into(ext, torch.zeros_like(x_TD), x_TD, token_S, weight_S,
                                      offsets_E, w_in, w_out)
    ends = offsets_E.tolist()
    E = len(ends)
    has_rows = [end > start for start, end in zip([0] + ends[:-1], ends, strict=True)]
    y_TD = torch.zeros_like(x_TD)
    B = min(E, DEQUANT_BLOCK_EXPERTS)
    # The buffers come from the kept row buffers where a generation holds them: fresh ones
    # were page-faulted in again every layer (glibc's defaults hand large blocks back).
    like = torch.empty(0, dtype=dequantized_dtype(x_TD.dtype), device=w_in.data.device)
    ws = Workspace(like, B, kept_buffers(x_TD))  # (fresh where autograd saves tensors)
    bufs = [ws.get(name, B, w.shape[1] * w.shape[2]).view(B, w.shape[2], w.shape[1])
            for name, w in (("dequantized w_in", w_in), ("dequantized w_out", w_out))]
    for e0 in range(0, E, DEQUANT_BLOCK_EXPERTS):
        e1 = min(E, e0 + DEQUANT_BLOCK_EXPERTS)
        r0, r1 = (ends[e0 - 1] if e0 else 0), ends[e1 - 1]
        if r1 == r0:
            continue
        runs = [list(run) for rows, run in itertools.groupby(range(e0, e1), has_rows.__getitem__)
                if rows]  # consecutive experts with rows: one call each
        wi, wo = (_dequantized(w, e0, runs, buf[:e1 - e0], x_TD.dtype)
                  for w, buf in zip((w_in, w_out), bufs, strict=True))
        bi = None if b_in_EG is None else b_in_EG[e0:e1]
        bo = None if b_out_ED is None else b_out_ED[e0:e1]
        y_TD += fused_experts(x_TD, token_S[r0:r1], weight_S[r0:r1], offsets_E[e0:e1] - r0,
                              wi, wo, bi, bo, act, kind)
    return y_TD


# -- dense projections (attention, LM head, dense FFN): one "expert", all rows --------------

# Rows up to which a float (fp32 / bf16) projection runs on the decode kernel instead of
# torch's GEMM. One [1024 -> 3072] projection, weights out of cache, 1 thread CPU time
# (12 matrices in turn, box loaded ~3.5 on 2 cores), kernel / F.linear:
#   fp32 0.65 at 1 row, 0.72 at 4, 1.39 at 16;  bf16 0.46 at 1 row, 0.68 at 4, 2.7 at 16.
# With the fp32 NK kernel that blocks 4 rows x 4 columns in registers (a decode step's
# dense weights, 65 MB, load ~8.5): fp32 0.94-0.98 at 1 row, 0.73 at 4, 0.80-0.83 at 16,
# 0.90 at 32, 0.92 at 64; bf16 keeps one row at a time there. Those were AVX-512 BF16
# machines. On AVX2 (Zen 3; [1024 -> 1024], 48 matrices in turn, 1 thread CPU time,
# load ~2.5): fp32 0.96 at 1 row, 0.74 at 4, 1.09 at 16, 1.19 at 32; bf16 0.24-0.26
# from 8 to 64 rows (torch's bf16 GEMM has no native bf16 there to use). The same Zen 3
# idle, [1024 -> 3072], 24 matrices in turn (300 MB), wall time: fp32 2 threads 0.65 at
# 1 row, 0.36 at 4, 0.52 at 8, 0.66 at 16, 0.87 at 32, 0.99 at 64, 1.33 at 128;
# 1 thread 0.67 at 8, 0.85 at 16, 1.07 at 32, 1.13 at 64. So fp32 takes the kernel up
# to 32 rows on AVX2 too (it was 8: a batch of 16 spent 15 ms of a 66 ms Mixtral-shaped
# step in aten's GEMMs).
def float_kernel_max_rows(dtype: torch.dtype) -> int:
    """Rows up to which a ``dtype`` projection runs on the decode kernel on this CPU."""
    if FLOAT_KERNEL_MAX_ROWS is not None:
        return FLOAT_KERNEL_MAX_ROWS.get(dtype, 0)
    return _cpu_max_rows(dtype)


@functools.cache
def _cpu_max_rows(dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return 32 if isa() in ("avx512", "avx2") else 8
    if dtype == torch.bfloat16:
        if not cpu_ext.native_bf16():
            return 64
        return AMX_MAX_ROWS if amx() else 8
    return 0


# bf16 projections with unit stride along K (nn.Linear weights) of up to this many rows run
# on AMX tiles where the CPU has them (amx_nk_rows in moekit/csrc/cpu_decode.cpp: K a
# multiple of 32, N of 16; others on the FMA kernel). One [1024 -> 3072] / [1024 -> 1024]
# projection, cold weights, 2 threads, the Xeon VM, us, FMA kernel / aten / AMX: 8 rows
# 389 / 421 / 271 and 146 / 165 / 98; 16 rows 646 / 424 / 277 and 245 / 161 / 108. So on
# AMX bf16 takes the kernel to 16 rows (8 without: past that aten's GEMM is faster).
AMX_MAX_ROWS = 16


def amx() -> bool:
    """Whether bf16 NK projections of up to AMX_MAX_ROWS rows run on AMX tiles here."""
    ext = cpu_ext.get_decode()
    return ext is not None and bool(ext.amx())


FLOAT_KERNEL_MAX_ROWS: dict[torch.dtype, int] | None = None  # None: by the CPU, as above
# Quantized projections: the kernel up to this many rows, then dequantize + torch's GEMM.
# Same setting, kernel / (dequantize + F.linear): int8 0.16 at 1 row, 0.22 at 4, 0.81 at
# 16, 1.11 at 64; int4 0.18, 0.20, 0.61, 1.07.
QUANT_LINEAR_MAX_ROWS = 32
# fp32 rows past that, up to this many, go to one q_linear_out call where moekit's GEMM
# runs (AVX-512F): it dequantizes inside its packing and writes no float copy of the
# weight. Time over dequantize + F.linear (benchmarks/bench_quant_linear.py, 2 threads,
# this Xeon), int8 / int4 g64, at 64 / 128 / 256 / 512 / 1024 rows: [1024 -> 1024] 0.55 /
# 0.77 / 0.86 / 1.07 / 1.23 and 0.60 / 0.71 / 0.85 / 1.11 / 1.24; [1024 -> 8192] 0.31 /
# 0.47 / 0.60 / 0.91 / 1.09 and 0.28 / 0.42 / 0.61 / 0.92 / 1.01 (MKL's GEMM is the
# faster one at many rows, where the copy costs relatively little).
QUANT_GEMM_MAX_ROWS = 256
# Weights with int8 activations where the prefill GEMM rounds the inputs too (igemm_a8:
# int8_gemm_here): the GEMM from this many rows. decode.dense_rows over q_linear_out with
# int8 rows (a /tmp script, cold weights, 2 threads, the Zen 4 VM, medians of 9) at 8 / 16 /
# 32 rows: [1024 -> 1024] int8 1.50 / 1.97 / 2.51, int4 g64 1.11 / 1.34 / 1.78; [1024 ->
# 3072] int8 1.38 / 1.80 / 2.38, int4 1.00 / 1.30 / 1.64; [1024 -> 256] int8 1.86 / 2.15 /
# 2.48, int4 1.44 / 1.62 / 1.84. Whole decode steps (the engine's, 24 tokens, paired in one
# process, median of 9) with the GEMM from 8 rows against from 33: int8 weights fine /
# Mixtral-like at batch 8 0.978 / 0.969, at 16 0.926 / 0.905; int4 at 8 1.010 / 1.021, at
# 16 0.960 / 0.959. By bits; DecodePlan's steps take the same limits (set_a8_gemm).
A8_LINEAR_MIN_ROWS = {8: 8, 4: 16}
# Weight-only int8 / int4 projections of this many fp32 rows or more run q_linear_out
# (moekit's GEMM) instead of the decode kernel, on Intel CPUs without AMX-INT8 (elsewhere
# the decode kernel up to QUANT_LINEAR_MAX_ROWS, as before). q_linear_out / decode kernel
# (a /tmp script: 16 cold copies, medians of 9 paired in one process, 2 threads, an Ice Lake
# Xeon VM with AVX-512 VNNI and no AMX, 2026-12-07) at 8 / 12 / 16 / 20 / 24 rows: int8
# [1024 -> 1024] 1.21 / 0.99 / 0.88 / 0.78 / 0.70, [1024 -> 3072] 1.53 / 1.11-1.18 /
# 1.02-1.10 / 0.80 / 0.84, [512 -> 1024] 1.06 / 0.71 / 0.68 / - / 0.56; int4 g64 (the same
# shapes) 0.94 / 0.78 / 0.72 / 0.65 / 0.60, 1.08 / 0.82-0.85 / 0.75 / 0.74 / 0.66, 0.73 /
# 0.70 / 0.63 / - / 0.46. In batch-16 int4 steps of the fine model (bench_decode's step
# calls, 3 pairs) the attention projections took 4.4-5.4 ms against 5.1-7.7 on the decode
# kernel. By bits; DecodePlan's steps take the same limits (set_q_gemm).
WEIGHT_GEMM_MIN_ROWS = {8: 20, 4: 12}


def weight_gemm_min_rows(bits: int) -> int | None:
    """The fewest rows from which a weight-only int8 / int4 projection runs q_linear_out
    here (WEIGHT_GEMM_MIN_ROWS on an Intel CPU without AMX-INT8 where moekit's GEMM runs),
    or None: the decode kernel up to QUANT_LINEAR_MAX_ROWS rows."""
    ext = cpu_ext.get_decode()
    if (ext is None or not QUANT_ONE_CALL or _q_gemm_module("q_linear_out") is None
            or ext.cpu_vendor() != "intel" or ext.amx_int8()):
        return None
    return WEIGHT_GEMM_MIN_ROWS[bits]


def _weight_gemm(w: QuantizedTensor, rows: int) -> bool:
    """Whether a weight-only projection of ``rows`` rows takes q_linear_out here."""
    least = None if w.activations == "int8" else weight_gemm_min_rows(w.bits)
    return least is not None and rows >= least


def dense_kernel_ok(x: Tensor, w: Tensor | QuantizedTensor, rows: int) -> bool:
    """Whether a [K -> N] projection of ``rows`` rows should run on the decode kernel:
    only where no gradient is wanted through x or w (``grad_wanted``; the kernel has no
    backward). A frozen model with grad mode on takes it, as no_grad does (it took
    F.linear: no_grad's output up to rounding); quantized weights with x requiring grad
    dequantize instead (their few rows returned an output without a graph: x's gradient,
    and the norm weights' before it, silently lost)."""
    if (x.device.type != "cpu" or torch.compiler.is_compiling() or not available()
            or grad_wanted(x, w)):
        return False
    if isinstance(w, QuantizedTensor):
        if w.activations == "int8" and rows >= A8_LINEAR_MIN_ROWS[w.bits] and int8_gemm_here() \
                and quant_gemm_ok(x, w):
            return False
        if _weight_gemm(w, rows) and quant_gemm_ok(x, w):
            return False
        return rows <= QUANT_LINEAR_MAX_ROWS
    return (rows <= float_kernel_max_rows(w.dtype) and not torch.is_autocast_enabled("cpu")
            and x.dtype in (torch.float32, torch.bfloat16))


def quant_gemm_ok(x: Tensor, w_1KN: QuantizedTensor) -> bool:
    """The rows-independent half of ``quant_gemm_rows``' conditions: float32 rows on the
    CPU, a one-matrix CPU weight with K a multiple of 32, no gradient wanted through x."""
    return (x.dtype == torch.float32 and x.device.type == "cpu"
            and w_1KN.data.device.type == "cpu" and w_1KN.shape[0] == 1
            and x.shape[-1] % 32 == 0 and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling())


def quant_gemm_rows(x_TK: Tensor, w_1KN: QuantizedTensor) -> Tensor | None:
    """x_TK @ w_1KN[0] (float32) on q_linear_out where it applies, else None: float32 rows
    on the CPU, QUANT_LINEAR_MAX_ROWS < rows <= QUANT_GEMM_MAX_ROWS (any number from
    A8_LINEAR_MIN_ROWS where the inputs are rounded to int8: ``int8_activations_gemm``), K a
    multiple of 32, no gradient wanted through x, moekit's GEMM enabled on this CPU
    (QUANT_ONE_CALL)."""
    rows, K = x_TK.shape
    if not (QUANT_ONE_CALL and quant_gemm_ok(x_TK, w_1KN)):
        return None
    ext = _q_gemm_module("q_linear_out")
    if ext is None:
        return None
    a8 = int8_activations_gemm(ext, w_1KN)
    if not (QUANT_LINEAR_MAX_ROWS < rows <= QUANT_GEMM_MAX_ROWS
            or a8 and rows >= A8_LINEAR_MIN_ROWS[w_1KN.bits]
            or not a8 and _weight_gemm(w_1KN, rows) and rows <= QUANT_GEMM_MAX_ROWS):
        return None
    y = torch.empty(rows, w_1KN.shape[2])
    ext.q_linear_out(plain_f32(x_TK), w_1KN.data, w_1KN.scales, w_1KN.zeros, w_1KN.bits,
                     w_1KN.group_size or 0, y, a8)
    return y


def dense_rows(x_TK: Tensor, w_1KN: Tensor | QuantizedTensor) -> Tensor:
    """x_TK @ w_1KN[0] on the decode kernel (one expert that every row goes to), in x's
    dtype. ``w_1KN``: a float [1, K, N] view with unit stride along K or N (an
    ``nn.Linear`` weight is ``w[None].transpose(1, 2)``) or a QuantizedTensor of E=1."""
    ext = cpu_ext.get_decode()
    rows_T, offsets_1 = all_rows(x_TK.shape[0])
    y = ext.gate_up(plain_f32(x_TK), rows_T, offsets_1, *wargs(w_1KN), None, 0, 0.0, 1.0)
    return y if y.dtype == x_TK.dtype else y.to(x_TK.dtype)


def project(x: Tensor, w: Tensor | QuantizedTensor) -> Tensor:
    """x @ w for a float [K, N] weight or a [1, K, N] QuantizedTensor (shared experts):
    the decode kernel for few rows, quantized fp32 rows up to QUANT_GEMM_MAX_ROWS on
    q_linear_out, else torch's matmul (quantized: dequantized first)."""
    x_TK = x.reshape(-1, x.shape[-1])
    quantized = isinstance(w, QuantizedTensor)
    if dense_kernel_ok(x, w, x_TK.shape[0]):
        y = dense_rows(x_TK, w if quantized else w[None])
    else:
        y = quant_gemm_rows(x_TK, w) if quantized else None
        if y is None:
            y = x_TK @ (w.dequantize(0, 1, x.dtype)[0] if quantized else w)
    return y.view(*x.shape[:-1], y.shape[-1])
