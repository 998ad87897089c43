"""Expert compute over rows sorted by expert, then the weighted combine.

Every backend computes, for the rows of a Dispatch,
    y_TD[token] += weight * (act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e])
and must agree with ``moekit.experts.reference``.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations
(else F), E experts, S routed rows.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch
from torch import Tensor

from moekit.dispatch.plan import Dispatch
from moekit.functions import decode
from moekit.functions.decode_args import grad_wanted
from moekit.functions.grouped_mm import grouped_mm
from moekit.functions.moe_experts import fused_experts
from moekit.quant.tensor import QuantizedTensor

ActFn = Callable[[Tensor], Tensor]


def _combine(y_SD: Tensor, d: Dispatch, T: int) -> Tensor:
    # index_add_ instead of y[token] += ...: advanced-index scatter costs ~4x
    # index_add_ in backward on CPU (DESIGN.md measurements).
    y_SD = y_SD * d.weight_S.to(y_SD.dtype)[:, None]
    return y_SD.new_zeros(T, y_SD.shape[1]).index_add_(0, d.token_S, y_SD)


def _one_expert(x_ND: Tensor, e: int, w_in_EDG: Tensor, w_out_EFD: Tensor,
                b_in_EG: Tensor | None, b_out_ED: Tensor | None, act: ActFn) -> Tensor:
    h = x_ND @ w_in_EDG[e]
    h = act(h if b_in_EG is None else h + b_in_EG[e])
    y = h @ w_out_EFD[e]
    return y if b_out_ED is None else y + b_out_ED[e]


def loop_experts(x_TD: Tensor, d: Dispatch, w_in_EDG: Tensor, w_out_EFD: Tensor,
                 b_in_EG: Tensor | None, b_out_ED: Tensor | None, act: ActFn) -> Tensor:
    """A Python loop over experts on sorted rows (reads counts on the host)."""
    x_SD = x_TD.index_select(0, d.token_S)
    weights = (w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, act)
    counts = d.counts_E.tolist()
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        outs.append(_one_expert(x_SD[start:start + n], e, *weights))
        start += n
    if not outs:  # no row: expert 0 on none, so y stays in x's and the weights' graph
        # (a new_zeros cut it: with router='hash' no other input needs a gradient, and
        # y.sum().backward() of an empty batch raised)
        outs.append(_one_expert(x_SD[:0], 0, *weights))
    kept = sum(counts)
    y_SD = torch.cat(outs)
    if kept < d.num_rows:  # dropped rows: weight 0, output 0
        y_SD = torch.cat([y_SD, y_SD.new_zeros(d.num_rows - kept, y_SD.shape[1])])
    return _combine(y_SD, d, x_TD.shape[0])


def _group_bias(b_EX: Tensor, offsets_E: Tensor, S: int) -> Tensor:
    """Per-row bias: expert e's bias repeated over its rows (dropped rows get the last)."""
    rows = torch.arange(S, device=offsets_E.device, dtype=offsets_E.dtype)
    expert_S = torch.searchsorted(offsets_E, rows, right=True).clamp_max(b_EX.shape[0] - 1)
    return b_EX.index_select(0, expert_S)


def grouped_mm_experts(x_TD: Tensor, d: Dispatch, w_in_EDG: Tensor, w_out_EFD: Tensor,
                       b_in_EG: Tensor | None, b_out_ED: Tensor | None, act: ActFn) -> Tensor:
    """Grouped GEMMs (``torch._grouped_mm``) over sorted rows; no host synchronisation.

    Dropped rows are folded into the last group (computed, weighted by 0): the
    kernel leaves rows past the last offset uninitialised, in forward and in
    the input gradient, so they cannot simply be skipped. They compute on zeros:
    on the token's own x, a dropped NaN, inf or 1e30 token gave 0 * NaN = NaN in
    its output (0 in the reference) and in the last expert's weight gradients.
    """
    S = d.num_rows
    x_SD = x_TD.index_select(0, d.token_S)
    if d.capped:  # (a pass over the rows: 1.05-1.13x fwd+bwd, so only where rows drop)
        kept_S1 = torch.arange(S, device=x_TD.device)[:, None] < d.offsets_E[-1]
        x_SD = torch.where(kept_S1, x_SD, 0.0)
    offsets_E = d.offsets_E.clone()
    offsets_E[-1] = S
    h_SG = grouped_mm(x_SD, w_in_EDG, offsets_E)
    if b_in_EG is not None:
        h_SG = h_SG + _group_bias(b_in_EG, offsets_E, S)
    y_SD = grouped_mm(act(h_SG).contiguous(), w_out_EFD, offsets_E)
    if b_out_ED is not None:
        y_SD = y_SD + _group_bias(b_out_ED, offsets_E, S)
    return _combine(y_SD, d, x_TD.shape[0])


def grouped_mm_supported(x_TD: Tensor, w_in_EDG: Tensor, w_out_EFD: Tensor) -> bool:
    """grouped_mm needs 16-byte aligned rows for every operand."""
    per16 = 16 // x_TD.element_size()
    dims = (w_in_EDG.shape[1], w_in_EDG.shape[2], w_out_EFD.shape[1], w_out_EFD.shape[2])
    return (hasattr(torch, "_grouped_mm") and x_TD.dtype in (torch.float32, torch.bfloat16)
            and all(n % per16 == 0 for n in dims))


def fused_cpu_experts(x_TD: Tensor, d: Dispatch, w_in_EDG: Tensor, w_out_EFD: Tensor,
                      b_in_EG: Tensor | None, b_out_ED: Tensor | None, act: ActFn) -> Tensor:
    """One autograd Function per layer (functions/moe_experts.py); reads counts on the host.

    Uses the closed-form backward when ``act`` is an Experts module's swiglu or
    geglu activation, autograd on recomputed chunks for any other callable.
    """
    spec = activation_spec(act)
    return fused_experts(x_TD, d.token_S, d.weight_S, d.offsets_E, w_in_EDG, w_out_EFD,
                         b_in_EG, b_out_ED, act, None if spec is None else spec[0])


def fused_supported(x_TD: Tensor, w_in_EDG: Tensor, w_out_EFD: Tensor) -> bool:
    """The fused path runs plain mm per expert: any shape, one floating dtype throughout."""
    return x_TD.is_floating_point() and x_TD.dtype == w_in_EDG.dtype == w_out_EFD.dtype


def activation_spec(act: ActFn) -> tuple[str, float, float] | None:
    """(kind, swiglu_limit, swiglu_alpha) when ``act`` is an Experts module's activation."""
    cfg = getattr(getattr(act, "__self__", None), "cfg", None)
    kind = getattr(cfg, "activation", None)
    if kind is None:
        return None
    return kind, cfg.swiglu_limit, cfg.swiglu_alpha


def activation_kind(act: ActFn) -> str | None:
    spec = activation_spec(act)
    return spec[0] if spec is not None else getattr(act, "kind", None)


def kernel_spec(act: ActFn) -> tuple[str, float, float] | None:
    """What the decode kernels take for ``act``: an Experts module's activation, or a
    callable naming its ``kind`` (HF GluAct, inference._Act); None runs it in Python."""
    spec = activation_spec(act)
    if spec is None and getattr(act, "kind", None) is not None:
        spec = (act.kind, getattr(act, "swiglu_limit", 0.0), getattr(act, "swiglu_alpha", 1.0))
    return spec


def _dequantizes(x_TD: Tensor, rows: int, w_in_EDG: Tensor | QuantizedTensor,
                 w_out_EFD: Tensor | QuantizedTensor, b_in_EG: Tensor | None,
                 b_out_ED: Tensor | None, act: ActFn) -> bool:
    """Whether ``decode_experts`` sends quantized weights' ``rows`` to
    ``decode.dequantized_experts``: off the CPU, no kernels, or more rows than
    ``quant_kernel_max_rows``."""
    return isinstance(w_in_EDG, QuantizedTensor) and (
        x_TD.device.type != "cpu" or not decode.available()
        or rows > quant_kernel_max_rows(x_TD.dtype, w_in_EDG, w_out_EFD,
                                        b_in_EG is not None or b_out_ED is not None,
                                        activation_kind(act), rows))


# Quantized weights run the decode backend whatever backend was asked for, so the float
# message's "use backend='fused'" led a user of a quantized hf.apply model (a forward
# with grad enabled: the norms' weights still require grad) to the same error again.
_NO_BACKWARD_QUANTIZED = (
    "quantized expert weights (moekit.quantize) have no backward: run the model under "
    "torch.no_grad() or torch.inference_mode() (generate() does); to train, train the float "
    "model and quantize it after")


def decode_experts(x_TD: Tensor, d: Dispatch, w_in_EDG: Tensor | QuantizedTensor,
                   w_out_EFD: Tensor | QuantizedTensor, b_in_EG: Tensor | None,
                   b_out_ED: Tensor | None, act: ActFn) -> Tensor:
    """The decode kernels (functions/decode_experts.py): touched experts only, no autograd.

    Quantized weights with more rows than ``quant_kernel_max_rows`` (prefill), or off
    the CPU, go to ``decode.dequantized_experts``.
    """
    # d.weight_S too: a router that trains (its gradient comes only through the combine
    # weights) got no gradient and no error where x did not require grad
    if grad_wanted(x_TD, d.weight_S, w_in_EDG, w_out_EFD, b_in_EG, b_out_ED):
        raise RuntimeError(_NO_BACKWARD_QUANTIZED if isinstance(w_in_EDG, QuantizedTensor)
                           else "backend='decode' has no backward: run it under "
                           "torch.no_grad() or torch.inference_mode(), or use backend='fused' "
                           "to train")
    if _dequantizes(x_TD, d.num_rows, w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, act):
        return decode.dequantized_experts(x_TD, d.token_S, d.weight_S, d.offsets_E, w_in_EDG,
                                          w_out_EFD, b_in_EG, b_out_ED, act, activation_kind(act))
    return decode.decode_rows(x_TD, d.token_S, d.weight_S, d.offsets_E, w_in_EDG, w_out_EFD,
                              b_in_EG, b_out_ED, act, kernel_spec(act))


def decode_topk_experts(x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor,
                        num_experts: int, w_in_EDG: Tensor | QuantizedTensor,
                        w_out_EFD: Tensor | QuantizedTensor, b_in_EG: Tensor | None,
                        b_out_ED: Tensor | None, act: ActFn) -> Tensor | None:
    """``decode_experts`` on a router's top-k choice (no capacity cut) in one C++ call
    (``decode.topk_rows``: the sort and both kernels), or None where it would not run
    ``decode.decode_rows`` with an activation the kernels know: the caller then builds
    the dispatch and runs the backend as before (which also raises what it raises)."""
    spec = kernel_spec(act)
    if (spec is None or x_TD.device.type != "cpu" or x_TD.dim() != 2
            or not decode.sort_topk_ok(experts_TK, weights_TK)
            or grad_wanted(x_TD, weights_TK, w_in_EDG, w_out_EFD, b_in_EG, b_out_ED)
            or _dequantizes(x_TD, experts_TK.numel(), w_in_EDG, w_out_EFD, b_in_EG, b_out_ED,
                            act)):
        return None
    return decode.topk_rows(x_TD, experts_TK, weights_TK, num_experts, w_in_EDG, w_out_EFD,
                            b_in_EG, b_out_ED, spec)


# Rows up to which "auto" picks the decode kernels over "fused" (CPU, no autograd).
# benchmarks/bench_decode_kernel.py --crossover, one layer D=1024 F=512 fp32, 2 threads,
# decode / fused time (medians of 5-7 A/B pairs, box loaded ~8 on 2 cores):
#   E=64 K=8: 0.33 at 64 rows, 0.42 at 256, 0.64 at 512, 0.55 at 1024, 0.79 at 2048,
#             0.89 at 4096;  E=8 K=2: 0.24 at 128, 0.41 at 256, 0.59 at 512, 0.60 at 1024.
# No crossover below 4096 rows, but the gap closes with rows per expert (the
# kernels re-read weights from cache per 4 rows where the GEMM blocks them), so
# prefill-sized batches keep the fused GEMMs: the limit sits at 1024 rows.
DECODE_MAX_ROWS = 1024
# Those were a loaded AMD AVX-512 box. On AVX2 (Zen 3, idle, 2 threads, same bench) the
# fused GEMMs win past ~24 rows per expert: E=8 K=2 F=2048: 0.90 at 128 rows, 1.14 at
# 256, 1.42 at 512, 1.77 at 1024; E=64 K=8 F=512: 0.59 at 512, 0.81 at 1024, 1.08 at
# 2048 (a Mixtral-shaped 512-token prefill spent 1.7x the dense LM's time in the
# kernels). On an idle Intel AVX-512 VM (2026-12-04, 21 pairs) the same: E=8 K=2 F=2048
# 0.94 at 128 rows, 1.16 at 256, 1.85 at 1024; E=64 K=8 F=512 0.84 at 1024, 1.11 at
# 2048, 1.34 at 4096 (a Mixtral-shaped 512-token prefill took 2.16x the dense LM's time
# with the 1024-row limit alone). So the per-expert limit holds on every CPU.
DECODE_MAX_ROWS_PER_EXPERT = 24
# Quantized weights: the kernel up to this many rows, dequantize + fused beyond. Its
# dequantization costs more than the kernel's slower GEMM: one Mixtral-shaped layer
# (E=8 K=2 F=2048, Intel AVX-512 VM, 2 threads), kernel / (dequantize + fused) at
# 1024 rows 0.62 (int8) and 0.72 (int4); at 256 rows 0.22 / 0.25.
QUANT_KERNEL_MAX_ROWS = 1024
# bf16 activations, where the one call does not run: dequantized straight to bf16, the
# fused bf16 GEMMs overtake the kernels sooner. One layer, 2 threads, this Xeon (a /tmp
# script, 7 interleaved pairs), kernel / (dequantize + fused), int8 / int4 g64: E=8 K=2
# F=2048 at 32 / 64 / 128 rows per expert 0.47 / 0.82 / 1.40 and 0.59 / 0.87 / 1.50;
# E=64 K=8 F=512 at 16 / 32 / 64 0.55 / 0.96 / 1.34 and 0.62 / 1.10 / 1.78.
BF16_QUANT_ROWS_PER_EXPERT = 64
# Where the prefill's one call (swiglu_experts_q_out: dequantization inside the GEMMs'
# packing) takes the rows instead, the float limit per expert holds again. One layer,
# D=1024, random distinct experts per token, 2 threads, int8 / int4 g64 (the same VM,
# 9 interleaved pairs, a /tmp script), kernel / one call: E=8 K=2 F=2048 at 8 / 16 / 32 /
# 64 rows per expert 0.60 / 0.93 / 1.16 / 1.38 and 0.75 / 1.10 / 1.39 / 1.57; E=64 K=8
# F=512 0.57 / 0.81 / 1.06 / 1.32 and 0.85 / 1.14 / 1.40 / 1.57.


# int8-activation weights (activations="int8") where the one call rounds the inputs too
# (igemm_a8, AVX-512 VNNI): it overtakes the decode kernels' VNNI paths sooner. One layer,
# random distinct experts per token, cold weights (a 64 MiB write between calls), 2
# threads, the Zen 4 VM, medians of 7 interleaved pairs (a /tmp script), kernel / one call
# at 4 / 8 / 12 / 16 / 24 rows per expert: int4 g64 E=64 K=8 D=1024 F=512 0.57 / 0.92 /
# 1.11 / 1.24 / 1.43, E=8 K=2 D=1024 F=2048 0.55 / 0.80 / 0.93 / 1.09 / 1.24; int8 0.84 /
# 1.15 / 1.38 / 1.56 / 1.88 and 0.77 / 1.24 / 1.49 / 1.71 / 2.00. Rows per expert, by bits:
A8_ROWS_PER_EXPERT = {8: 6, 4: 12}


def quant_kernel_max_rows(dtype: torch.dtype, w_in: QuantizedTensor, w_out: QuantizedTensor,
                          biased: bool, kind: str | None, rows: int = 1 << 30) -> int:
    """Routed rows up to which quantized experts run on the decode kernels:
    ``DECODE_MAX_ROWS_PER_EXPERT`` per expert where ``decode.dequantized_experts`` runs
    its one call for more (``A8_ROWS_PER_EXPERT`` where that call rounds the inputs to
    int8), ``BF16_QUANT_ROWS_PER_EXPERT`` per expert (at most ``QUANT_KERNEL_MAX_ROWS``)
    for bf16 activations, else ``QUANT_KERNEL_MAX_ROWS``. ``rows`` within the first limit
    skip the check (a decode step's)."""
    E, int8_bits = w_in.shape[0], w_in.bits if w_in.activations == "int8" else None
    # the lowest limit these weights can have: within it, no need to ask which applies
    # (int8_gemm_here reads the CPU and the environment)
    if rows <= quant_kernel_rows_floor(w_in):
        return QUANT_KERNEL_MAX_ROWS
    a8 = int8_bits if int8_bits is not None and decode.int8_gemm_here() else None
    one = decode.quant_one_call_applies(dtype, w_in, w_out, biased, kind)
    return quant_rows_limit(E, one, dtype, a8)


def quant_kernel_rows_floor(w_in: QuantizedTensor) -> int:
    """Rows up to which experts quantized as ``w_in`` always run on the decode kernels,
    whatever the activations' dtype, the CPU or the biases: ``quant_kernel_max_rows``' lowest
    limit for them."""
    E, int8_bits = w_in.shape[0], w_in.bits if w_in.activations == "int8" else None
    return min(quant_rows_per_expert(E), quant_rows_per_expert(E, int8_bits))


def quant_rows_per_expert(num_experts: int, a8_bits: int | None = None) -> int:
    """The float weights' limit (``DECODE_MAX_ROWS_PER_EXPERT`` per expert) for quantized
    ones; with ``a8_bits`` (int8-activation weights of those bits, rounded by the one call
    too) ``A8_ROWS_PER_EXPERT``'s."""
    per = DECODE_MAX_ROWS_PER_EXPERT if a8_bits is None else A8_ROWS_PER_EXPERT[a8_bits]
    return min(QUANT_KERNEL_MAX_ROWS, per * num_experts)


def quant_rows_limit(num_experts: int, one_call: bool,
                     dtype: torch.dtype = torch.float32, a8_bits: int | None = None) -> int:
    """``quant_kernel_max_rows`` given whether the one call applies (the expert cache
    decides with this too), the activations' dtype and, for int8-activation weights whose
    one call rounds the inputs, their bits (``a8_bits``)."""
    if one_call:
        return quant_rows_per_expert(num_experts, a8_bits)
    if dtype == torch.bfloat16:
        return min(QUANT_KERNEL_MAX_ROWS, BF16_QUANT_ROWS_PER_EXPERT * num_experts)
    return QUANT_KERNEL_MAX_ROWS


def decode_supported(x_TD: Tensor, w_in_EDG, w_out_EFD, rows: int | None) -> bool:
    """Whether "auto" should run the decode kernels: CPU, no autograd, few rows, built."""
    if isinstance(w_in_EDG, QuantizedTensor):
        return True
    return decode_fits(x_TD, rows, w_in_EDG.shape[0], w_in_EDG.dtype, w_out_EFD.dtype)


def decode_fits(x_TD: Tensor, rows: int | None, num_experts: int,
                *w_dtypes: torch.dtype) -> bool:
    """The float-weight half of ``decode_supported``, from dtypes and the expert count
    (also what the offloaded experts decide with: moekit.offload.runtime.path)."""
    floats = (torch.float32, torch.bfloat16)
    return (x_TD.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and rows is not None
            and all(dt in floats for dt in (x_TD.dtype, *w_dtypes))
            and decode.available() and rows <= decode_max_rows(num_experts))


def decode_max_rows(num_experts: int) -> int:
    """Routed rows up to which "auto" runs the decode kernels for ``num_experts`` experts
    (float weights)."""
    return min(DECODE_MAX_ROWS, DECODE_MAX_ROWS_PER_EXPERT * num_experts)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_supported(x_TD: Tensor) -> bool:
    """The fused Triton kernels serve CUDA fp32/fp16/bf16 tensors when triton is installed."""
    return (x_TD.is_cuda and x_TD.dtype in _TRITON_DTYPES
            and importlib.util.find_spec("triton") is not None)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_experts(x_TD: Tensor, d: Dispatch, w_in_EDG: Tensor, w_out_EFD: Tensor,
                   b_in_EG: Tensor | None, b_out_ED: Tensor | None, act: ActFn) -> Tensor:
    """Fused Triton kernels (moekit.kernels): gather + GLU epilogue, combine in the
    down projection's epilogue; no host synchronisation.

    Runs the CPU path (``grouped_mm`` when its layout allows, else ``loop``) for
    CPU tensors outside Triton's interpreter (TRITON_INTERPRET=1), for a dtype
    the kernels do not take, and for an activation they do not know (any
    callable that is not an Experts module's own).
    """
    spec = activation_spec(act)
    usable = (x_TD.is_cuda or _interpreting()) and x_TD.dtype in _TRITON_DTYPES
    if spec is None or not usable or importlib.util.find_spec("triton") is None:
        fallback = (grouped_mm_experts if grouped_mm_supported(x_TD, w_in_EDG, w_out_EFD)
                    else loop_experts)
        return fallback(x_TD, d, w_in_EDG, w_out_EFD, b_in_EG, b_out_ED, act)
    from moekit.functions.experts import fused_experts  # triton is an optional dependency

    return fused_experts(x_TD, d.token_S, d.weight_S, d.offsets_E, w_in_EDG, w_out_EFD,
                         b_in_EG, b_out_ED, *spec)


BACKENDS = {"loop": loop_experts, "grouped_mm": grouped_mm_experts, "triton": triton_experts,
            "fused": fused_cpu_experts, "decode": decode_experts}
