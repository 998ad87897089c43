"""The per-step hook: before a MoE layer's experts run, fetch the ones it routed to,
queue the next layer's predicted experts, and run the touched experts with the
kernels the resident model uses, on the cached tensors themselves.

Touched experts are renumbered 0..E'-1 in increasing id order, so the sorted
rows, each expert's GEMM and the combine's summation order are those of the
resident model: the output is bitwise equal, not merely close.

No step stacks its experts into new [E', ...] tensors (that copy, outside the
budget, was most of the peak RSS over budget + non-expert weights): the decode
kernels take the list of cached tensors, and a step touching more experts than
the cache holds runs in chunks of experts, in id order, adding into one output
(the kernels' ``accumulate`` / ``fused_experts_into``), which sums every token's
rows in the same order as one call. Prefill past the decode kernels' row limit runs
the GEMMs on the cached tensors as well, a chunk of what the cache holds at a time
(bf16: at most ``FUSED_CHUNK`` experts, as the AVX-512 BF16 kernels, which take their
own layout, stack a chunk's copy: stacking every chunk was 0.2 s of a 0.49 s
Mixtral-shaped 512-token prefill with every expert cached, against 0.28 s resident).

Shape letters: T tokens, D hidden, E experts, E' experts this step touches,
K experts per token, G = 2F for GLU activations, N / K output / input width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.config import check_bool, check_choice, check_positive_int
from moekit.dispatch.plan import Dispatch
from moekit.experts.backends import (
    activation_kind,
    activation_spec,
    decode_fits,
    fused_supported,
    kernel_spec,
    quant_rows_limit,
)
from moekit.experts.experts import BACKEND_NAMES
from moekit.functions import cpu_ext, decode
from moekit.functions.moe_experts import fused_experts, fused_experts_into
from moekit.offload.cache import ExpertCache, check_budget
from moekit.offload.policy import POLICIES
from moekit.quant.tensor import QuantizedTensor, dequantize_NK

FUSED_CHUNK = 8  # experts per bf16 prefill GEMM call (a stack: 8 x 3 MiB at the OLMoE shape)

Predictor = Callable[[Tensor], Tensor]  # x_TD -> expert ids [T, K] of the next MoE layer


def compact(d: Dispatch, touched_E: Tensor) -> Dispatch:
    """The same rows with experts renumbered to their position in ``touched_E`` (sorted)."""
    counts = d.counts_E.index_select(0, touched_E)
    return Dispatch(token_S=d.token_S, weight_S=d.weight_S, counts_E=counts,
                    offsets_E=torch.cumsum(counts, 0).to(torch.int32),
                    assigned_E=d.assigned_E.index_select(0, touched_E), capped=d.capped)


def rank_predictions(experts_TK: Tensor, limit: int) -> list[int]:
    """The ``limit`` experts most tokens are predicted to use (ties: lower id first)."""
    ids, counts = torch.unique(experts_TK.reshape(-1), return_counts=True)
    order = sorted(zip(counts.tolist(), ids.tolist(), strict=True),
                   key=lambda ci: (-ci[0], ci[1]))
    return sorted(e for _, e in order[:limit])


@dataclass(frozen=True)
class ExpertWeights:
    """A chunk of cached experts as the kernels take them, in expert order."""

    w_in: list[Tensor | QuantizedTensor]  # per expert [D, G] (any unit-stride layout)
    w_out: list[Tensor | QuantizedTensor]  # per expert [F, D]
    b_in_EG: Tensor | None = None  # stacked biases (a few KiB)
    b_out_ED: Tensor | None = None


@dataclass(frozen=True)
class ExpertsCall:
    """How a model's experts compute: ``unpack`` turns cached values into ExpertWeights;
    ``stacked(x_TD, d, parts)`` is the resident module's own call on stacked copies,
    for backends the offloaded path does not run itself."""

    act: Callable[[Tensor], Tensor]
    backend: str
    dtype: torch.dtype  # the experts' float dtype (of what dequantized ones run in)
    quantized: bool
    num_experts: int  # the layer's (all of them, not only the cached): the resident row limit
    unpack: Callable[[list[Any]], ExpertWeights]
    stacked: Callable[[Tensor, Dispatch, list[Any]], Tensor]
    # quantized experts' (bits, group_size, D, F, biased, activations): whether the resident
    # model's prefill would run its one call (decode.quant_one_call_format), and from how
    # many rows (backends.quant_rows_limit); None: it never does
    quant_format: tuple[int, int | None, int, int, bool, str] | None = None
    layout: str = "nk"  # the cached quantized experts' order ("o16": quant/layout.py)


def path(call: ExpertsCall, x_TD: Tensor, rows: int) -> str:
    """Which compute the resident model's "auto" / "decode" choice amounts to here:
    "list" (decode kernels), "fused", "dequant" (quantized prefill) or "stacked"."""
    cpu = x_TD.device.type == "cpu" and decode.available()
    if call.quantized:
        if cpu and rows <= quant_rows_limit(call.num_experts, _one_call_format(call, x_TD),
                                            x_TD.dtype, _a8_bits(call)):
            return "list"
        return "dequant"  # (_run_gemm runs the one call where it applies)
    if call.backend not in ("auto", "decode"):
        return "stacked"
    if call.backend == "decode" or decode_fits(x_TD, rows, call.num_experts, call.dtype):
        return "list"
    like = torch.empty(0, dtype=call.dtype, device="meta")
    if (x_TD.device.type == "cpu" and not torch.compiler.is_compiling()
            and activation_kind(call.act) is not None and fused_supported(x_TD, like, like)):
        return "fused"
    return "stacked"


def _one_call_format(call: ExpertsCall, x_TD: Tensor) -> bool:
    """Whether the resident model's quantized prefill would run its one call on these
    experts (the format half of it: decode.quant_one_call_format)."""
    # (o16: only the int8-activation GEMM reads it, as decode.quant_one_call_applies says)
    return (call.quant_format is not None and (call.layout == "nk" or decode.int8_gemm_here())
            and decode.quant_one_call_format(x_TD.dtype, *call.quant_format[:5],
                                             activation_kind(call.act)))


def _a8_bits(call: ExpertsCall) -> int | None:
    """The bits of int8-activation experts whose one call rounds their inputs here (the
    resident model's limit then: backends.quant_kernel_max_rows), else None."""
    fmt = call.quant_format
    return fmt[0] if fmt is not None and fmt[5] == "int8" and decode.int8_gemm_here() else None


def _chunks(ids: list[int], size: int) -> list[tuple[int, int]]:
    """[c0, c1) index ranges of ``ids`` of at most ``size``."""
    return [(c0, min(len(ids), c0 + size)) for c0 in range(0, len(ids), size)]


def _dequantize_into(bufs: dict[str, Tensor], name: str, ws: list[QuantizedTensor],
                     most: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-expert quantized weights as [len(ws), N, K] in ``dtype`` (float32, or bfloat16
    rounded in the kernel), in a buffer of ``most`` experts kept in ``bufs`` under
    ``name`` for the next chunk (a fresh tensor per expert and their concatenation spent
    most of a dequantization in page faults)."""
    _, K, N = ws[0].shape
    buf = bufs.get(name)
    if buf is None:
        buf = bufs[name] = torch.empty(most, N, K, dtype=dtype, device=ws[0].data.device)
    for j, q in enumerate(ws):
        dequantize_NK(q, 0, 1, buf[j:j + 1])
    return buf[:len(ws)]


def _dequant_chunks(ids: list[int]) -> list[tuple[int, int]]:
    """Touched experts grouped by the resident path's blocks of DEQUANT_BLOCK_EXPERTS ids."""
    out, c0 = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] // decode.DEQUANT_BLOCK_EXPERTS != ids[c0] // \
                decode.DEQUANT_BLOCK_EXPERTS:
            out.append((c0, i))
            c0 = i
    return out


def _rows(ends: list[int], c0: int, c1: int) -> tuple[int, int]:
    return (ends[c0 - 1] if c0 else 0), ends[c1 - 1]


class ExpertOffload:
    """Ties an ExpertCache to a model's MoE layers (numbered 0..L-1 in forward order).

    ``predictors[l]`` maps layer l's expert input to layer l+1's expert choice; the
    prefetch of layer l+1 is queued after layer l's (first chunk of) experts are in
    hand and before they run, so the reads overlap this layer's compute and the
    next attention block. At most ``prefetch_limit`` experts are queued per step (a
    long prompt would otherwise ask for every expert of the next layer).

    Threads: one layer step (``run``) at a time, whatever thread calls it (see ``run``).
    """

    def __init__(self, cache: ExpertCache, predictors: list[Predictor | None],
                 prefetch: bool, prefetch_limit: int) -> None:
        self.prefetch, self.prefetch_limit = prefetch, prefetch_limit  # (both checked)
        self.cache, self.predictors = cache, predictors

    @classmethod
    def within(cls, store: Any, budget: int, given: int | str, top_ks: list[int],
               predictors: list[Predictor | None], policy: str, prefetch: bool,
               threaded: bool, num_layers: int) -> ExpertOffload:
        """The cache of ``store``'s experts within ``budget`` bytes (``given``: as the
        caller wrote it, for the error when one layer's top-k experts do not fit) and its
        runtime for MoE layers routing ``top_ks[l]`` experts each, at most a layer's
        share of the budget prefetched a step (moekit's and transformers' offloaded
        models alike)."""
        per_expert = max(store.nbytes(k) for k in store.experts)
        check_budget(budget, {i: k * per_expert for i, k in enumerate(top_ks)}, given)
        cache = ExpertCache(store, budget, policy, prefetch, num_layers, threaded)
        limit = max(max(top_ks), budget // per_expert // len(top_ks))
        return cls(cache, predictors, prefetch, limit)

    @property
    def prefetch(self) -> bool:
        """Whether steps queue the next layer's predicted experts; switchable between steps
        (only True or False: a truthy string such as "False" switched it on)."""
        return self._prefetch

    @prefetch.setter
    def prefetch(self, value: bool) -> None:
        check_bool("prefetch", value)
        self._prefetch = value

    @property
    def prefetch_limit(self) -> int:
        """At most this many experts queued per step (a positive int)."""
        return self._prefetch_limit

    @prefetch_limit.setter
    def prefetch_limit(self, value: int) -> None:
        check_positive_int("prefetch_limit", value)  # 0 turned prefetch off; -1 dropped one
        self._prefetch_limit = value

    @property
    def stats(self):
        return self.cache.stats

    def run(self, layer: int, x_TD: Tensor, dispatch: Dispatch, call: ExpertsCall,
            out_dim: int) -> Tensor:
        """The layer's combined expert output [T, out_dim] from the cached experts.

        One step at a time per model: two threads running the same offloaded model (two
        requests of a threaded web app) wait for each other here, for the experts' part
        of each MoE layer only (attention, norms and routing run side by side). A step
        computes on the cache's slots themselves and the cache keeps only its latest
        step's experts from eviction, so another thread's step evicted them and read
        other experts into those slots mid-computation: wrong outputs, no error (3
        threads, a budget of 2 experts: 11 of 30 forwards differed). Letting two steps
        run at once would need room for both steps' experts in the budget. Once ``close``
        is called (on any thread) a step raises RuntimeError "the expert cache is closed";
        close waits for the step in progress (``ExpertCache.close``).

        The cached weights want no gradient: with none wanted through x or the combine
        weights (a frozen model, grad mode on) the step takes the path no_grad takes."""
        with decode.no_grad_unless_wanted(x_TD, dispatch.weight_S):
            return self.cache.run_step(self._run, layer, x_TD, dispatch, call, out_dim)

    def _run(self, layer: int, x_TD: Tensor, dispatch: Dispatch, call: ExpertsCall,
             out_dim: int) -> Tensor:
        touched_E = torch.nonzero(dispatch.counts_E).flatten()
        ids = touched_E.tolist()
        if not ids:  # every row dropped: nothing to compute
            self._prefetch_next(layer, x_TD)
            return x_TD.new_zeros(x_TD.shape[0], out_dim)
        d = compact(dispatch, touched_E)
        how = path(call, x_TD, d.num_rows)
        if how != "stacked" and decode.grad_wanted(x_TD, d.weight_S):
            # the decode kernels, fused_experts_into and the quantized prefill (its one
            # call, or dequantized buffers reused chunk by chunk) keep no graph: the experts'
            # part of x's (or the router's) gradient was silently missing
            raise RuntimeError(
                f"offloaded experts (layer {layer}) have no backward on the path they take "
                f"here ({how!r}), and a gradient is wanted through their input or combine "
                "weights: run the model under torch.no_grad() or torch.inference_mode(), or "
                "freeze what feeds the experts (requires_grad_(False)); to train, use the "
                "resident model")
        if how == "stacked":
            parts = self._get(layer, ids, x_TD)
            return call.stacked(x_TD, d, parts)
        if how == "list":
            return self._run_list(layer, x_TD, d, ids, call, out_dim)
        return self._run_gemm(layer, x_TD, d, ids, call, how == "dequant")

    def _get(self, layer: int, ids: list[int], predict_from: Tensor | None) -> list[Any]:
        """The cached experts ``ids``; then, on a step's first chunk, the next layer's
        prefetch from this layer's input ``predict_from``."""
        parts = self.cache.get(layer, ids, first=predict_from is not None)
        if predict_from is not None:
            self._prefetch_next(layer, predict_from)
        return parts

    def _run_list(self, layer: int, x_TD: Tensor, d: Dispatch, ids: list[int],
                  call: ExpertsCall, out_dim: int) -> Tensor:
        """Decode kernels on the cached tensors; chunks of what the cache holds."""
        spec, ends = kernel_spec(call.act), d.offsets_E.tolist()
        chunks = _chunks(ids, self.cache.capacity)
        out = None if len(chunks) == 1 else x_TD.new_zeros(x_TD.shape[0], out_dim,
                                                            dtype=torch.float32)
        for i, (c0, c1) in enumerate(chunks):
            w = call.unpack(self._get(layer, ids[c0:c1], x_TD if i == 0 else None))
            r0, r1 = _rows(ends, c0, c1)
            y = decode.decode_rows_list(
                x_TD, d.token_S[r0:r1], d.weight_S[r0:r1], d.offsets_E[c0:c1] - r0, w.w_in,
                w.w_out, w.b_in_EG, w.b_out_ED, call.act, spec, out, len(ids))
        return y if out is None else out.to(x_TD.dtype)

    def _run_gemm(self, layer: int, x_TD: Tensor, d: Dispatch, ids: list[int],
                  call: ExpertsCall, dequant: bool) -> Tensor:
        """Prefill GEMMs a few experts at a time, as the resident path runs them: plain
        weights (the cached tensors, not stacked) into one output (fused_experts_into);
        quantized ones in the one call that dequantizes inside its GEMMs, or dequantized per
        block of ids and summed block by block (decode.dequantized_experts)."""
        ends = d.offsets_E.tolist()
        # the resident model's one call (decode.dequantized_experts), chunks of what the
        # cache holds added into y_TD: a token's rows summed in row order, as in one call
        one = (dequant and x_TD.device.type == "cpu" and x_TD.dim() == 2
               and x_TD.stride(1) == 1 and _one_call_format(call, x_TD))
        # fp32 lists go to the kernels as they are (no copy): a chunk of every cached
        # expert lets the tasks balance over the threads (the fine benchmark model, every
        # expert cached, one 512-token forward: 303.4 ms in chunks of 8, 286.1 in one,
        # resident 287.7; a /tmp script, medians of 9); the bf16 kernels stack a copy
        whole = one or (not dequant and x_TD.dtype == call.dtype == torch.float32)
        chunks = (_chunks(ids, self.cache.capacity) if whole else _dequant_chunks(ids) if dequant
                  else _chunks(ids, min(FUSED_CHUNK, self.cache.capacity)))
        y_TD = torch.zeros_like(x_TD)
        bufs: dict[str, Tensor] = {}  # dequantized weights, reused by every chunk
        dt = decode.dequantized_dtype(x_TD.dtype)  # as the resident prefill's
        most = max((b - a for a, b in chunks), default=0)
        for i, (c0, c1) in enumerate(chunks):
            w = call.unpack(self._get(layer, ids[c0:c1], x_TD if i == 0 else None))
            r0, r1 = _rows(ends, c0, c1)
            args = (x_TD, d.token_S[r0:r1], d.weight_S[r0:r1], d.offsets_E[c0:c1] - r0)
            if one:
                decode.quantized_experts_into(cpu_ext.get(), y_TD, *args, w.w_in, w.w_out)
            elif dequant:
                wi, wo = (_dequantize_into(bufs, name, ws, most, dt).to(x_TD.dtype)
                          .transpose(1, 2)
                          for name, ws in (("in", w.w_in), ("out", w.w_out)))
                y_TD += fused_experts(*args, wi, wo, w.b_in_EG, w.b_out_ED, call.act,
                                      activation_kind(call.act))
            else:
                spec = activation_spec(call.act)
                fused_experts_into(y_TD, *args, w.w_in, w.w_out, w.b_in_EG, w.b_out_ED,
                                   call.act, None if spec is None else spec[0])
        return y_TD

    @torch.no_grad()
    def _prefetch_next(self, layer: int, x_TD: Tensor) -> None:
        predict = self.predictors[layer] if layer < len(self.predictors) else None
        if not self.prefetch or predict is None:
            return
        self.cache.prefetch(layer + 1, rank_predictions(predict(x_TD), self.prefetch_limit))

    def close(self, timeout: float | None = 10.0) -> bool:
        """``ExpertCache.close``: waits for a layer step running on another thread (at
        most ``timeout`` seconds), then stops the prefetch thread and closes the files;
        inside a layer step on its own thread (a hook during the step) it raises."""
        return self.cache.close(timeout)


def check_options(policy: str, prefetch: bool, backend: str, threaded: bool) -> None:
    """The offloaded loaders' options (used only once the shards are read: the cache, its
    thread, the experts' backend), checked before anything is read, opened or started."""
    check_choice("policy", policy, tuple(POLICIES))
    check_choice("backend", backend, BACKEND_NAMES)
    check_bool("prefetch", prefetch)
    check_bool("threaded", threaded)
