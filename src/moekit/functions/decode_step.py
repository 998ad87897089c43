"""The rest of a decode step besides its projections, one C++ call per part
(``moekit/csrc/cpu_decode.cpp``): ``route_sort`` (top-k routing and the sort by expert;
``sort_topk`` sorts a router's top-k choice), ``attend_one`` (rotary, KV cache write and
attention for one new token per row; ``qk_norm_`` the q and k norms before it) and
``add_rms_norm`` / ``rms_norm`` (the residual add and the next norm); each replaced 5-20
aten ops that ran cold right after a weight stream. The ``*_ok`` functions say where each
runs. The names stay importable from ``moekit.functions.decode``.

Shape letters: T tokens, E experts, K experts per token, S routed rows sorted by expert,
R rows, C columns, B batch, J key/value heads, M cache slots, D / Dh head size, P the slot
the new token writes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.functions import cpu_ext
from moekit.functions.decode_args import available, grad_wanted, plain, plain_f32

# Rows up to which a decode step's residual add and RMSNorm run as one call (and the
# routing below as one call): a decode step's batch; prefill keeps the torch ops.
ADD_NORM_MAX_ROWS = 256


STEP_DTYPES = (torch.float32, torch.bfloat16)  # what add_rms_norm and attend_one take


def add_norm_ok(x: Tensor, w: Tensor, y: Tensor | None = None) -> bool:
    """Whether ``add_rms_norm`` (with the residual ``y``) or ``rms_norm`` runs for x: fp32
    or bf16 (x and the norm's weight alike) on the CPU, few rows, no gradient wanted
    through x, w or y (``grad_wanted``: a frozen model with grad mode on takes them too,
    as no_grad does)."""
    return (x.dtype == w.dtype and x.dtype in STEP_DTYPES and x.device.type == "cpu"
            and x.numel() <= ADD_NORM_MAX_ROWS * x.shape[-1] and not grad_wanted(x, w, y)
            and not torch.compiler.is_compiling() and available())


def add_rms_norm(x: Tensor, y: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + y, rms_norm(x + y) * w) in one call, shaped like x, in x's dtype (fp32 or
    bf16; bf16 rounds the sum, then normalizes it in fp32 and rounds h once)."""
    D = x.shape[-1]
    s, h = cpu_ext.get_decode().add_rms_norm(plain(x.reshape(-1, D), x.dtype),
                                             plain(y.reshape(-1, y.shape[-1]), x.dtype),
                                             plain(w, x.dtype), eps)
    return s.view(x.shape), h.view(x.shape)


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """rms_norm(x) * w in one call, shaped like x, in x's dtype (fp32 or bf16: normalized
    in fp32, rounded once); ``add_norm_ok`` says where it runs."""
    D = x.shape[-1]
    h = cpu_ext.get_decode().rms_norm(plain(x.reshape(-1, D), x.dtype), plain(w, x.dtype), eps)
    return h.view(x.shape)


# Tokens up to which MoE.infer routes and sorts in one C++ call (each token's choice over
# the threads, then a counting sort) instead of the torch ops (the same decision,
# vectorized over T). Per layer, router logits included, torch ops / kernel on the Intel
# AVX-512 VM (2 threads, 2026-12-04): E=64 K=8 D=1024 0.45 / 0.17 ms at 256 tokens, 0.87 /
# 0.37 at 512, 2.60 / 1.44 at 2048, 4.13 / 2.68 at 4096; E=8 K=2 0.21 / 0.08 at 512, 1.58
# / 0.70 at 4096. So prefills of up to 4096 tokens take it too (it was 256: decode steps).
ROUTE_KERNEL_MAX_TOKENS = 4096


def route_sort(logits_TE: Tensor, top_k: int, mode: int, renormalize: bool, scale: float,
               bias_E: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k routing and the sort by expert in one call: (token_S, weight_S, counts_E,
    offsets_E), the rows ``sort_by_expert`` gives for the router's plan (dropless).
    ``mode`` 0: softmax router, 1: sigmoid (``Router.kernel_spec``)."""
    return cpu_ext.get_decode().route_sort(plain_f32(logits_TE), top_k, mode, renormalize,
                                           scale, bias_E)


def sort_topk_ok(experts_TK: Tensor, weights_TK: Tensor) -> bool:
    """Whether ``sort_topk`` takes a top-k choice: int64 ids and float weights on the CPU,
    no gradient wanted through the weights (training keeps the torch ops), kernels built."""
    return (experts_TK.device.type == "cpu" and weights_TK.device.type == "cpu"
            and experts_TK.dtype == torch.int64 and weights_TK.is_floating_point()
            and not (torch.is_grad_enabled() and weights_TK.requires_grad)
            and not torch.compiler.is_compiling() and available())


def sort_topk(experts_TK: Tensor, weights_TK: Tensor, num_experts: int
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A router's top-k choice [T, K] sorted by expert in one call, stable in token order:
    (token_S, weight_S in the weights' dtype, counts_E, offsets_E int32), the rows
    ``integrations.hf.experts.dispatch_from_topk`` makes with torch ops."""
    return cpu_ext.get_decode().sort_topk(experts_TK, weights_TK, num_experts)


def qk_norm_(qkv_RC: Tensor, q_w: Tensor, k_w: Tensor, eps: float, q_width: int,
             k_width: int) -> Tensor:
    """The q and k RMSNorms before ``attend_one``, in place on a contiguous ``qkv_RC``
    [R, C] = [q | k | v] (fp32 or bf16, the weights alike): q = the first ``q_width``
    columns normalized in pieces of q_w's size (Dh: each head; q_width: all heads), k =
    the next ``k_width`` in pieces of k_w's size; each piece as ``rms_norm`` normalizes a
    row. Returns qkv_RC."""
    cpu_ext.get_decode().qk_norm_(qkv_RC, plain(q_w, qkv_RC.dtype), plain(k_w, qkv_RC.dtype),
                                  eps, q_width, k_width)
    return qkv_RC


# KV caches besides the activations' dtype: under fp32, bf16 or int8; under bf16, int8
KV_SCALE_BYTES = 4  # an int8 cache row's float scale, after its Dh values
CACHES_UNDER = {torch.float32: (torch.bfloat16, torch.int8), torch.bfloat16: (torch.int8,)}


def cache_takes(dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Whether ``attend_one`` takes a KV cache of ``cache_dtype`` under activations of
    ``dtype``: fp32 or bf16 alike, a bf16 cache under fp32, or an int8 one under either."""
    return dtype in STEP_DTYPES and (cache_dtype == dtype
                                     or cache_dtype in CACHES_UNDER.get(dtype, ()))


def attend_one_ok(qkv: Tensor, k_cache: Tensor, *weights: Tensor | None) -> bool:
    """Whether ``attend_one`` runs this step: fp32 or bf16 activations with a cache
    ``cache_takes``, on the CPU, no gradient wanted through qkv (or the input it is
    projected from) nor the ``weights`` it is made with (``grad_wanted``: a frozen model
    with grad mode on takes it, as no_grad does), built."""
    return (cache_takes(qkv.dtype, k_cache.dtype) and qkv.device.type == "cpu"
            and not grad_wanted(qkv, *weights) and not torch.compiler.is_compiling()
            and available())


def attend_one(qkv_RC: Tensor, cos: Tensor, sin: Tensor, k_BJMD: Tensor, v_BJMD: Tensor,
               P: int, valid_BM: Tensor | None) -> Tensor:
    """One new token per row in one call: rotary on q and k, k and v written to the
    cache at slot P, attention over the row's slots [0, P] (``valid_BM``: the real
    ones). ``qkv_RC`` [R, (H + 2 J) Dh] is [q | k | v] with J key/value heads (the
    cache's; J = H, or grouped-query: query head h reads key/value head h // (H / J));
    cos / sin broadcast to [R, Dh] (``rotary_table`` rows: one for all, or per row).
    Returns [R, H Dh] in qkv's dtype (fp32 or bf16: bf16 rounds the output once; q and
    the scores stay fp32). The cache is of qkv's dtype, bf16 under fp32 qkv, or int8
    under either (``cache_takes``; int8: [B, J, M, Dh + 4], each row's values and float scale, as
    ``quantize_kv`` in moekit.models.kv_cache): the new k and v are rounded or
    quantized as the cache holds them, and slot P reads them so."""
    Dh = k_BJMD.shape[-1] - (KV_SCALE_BYTES if k_BJMD.dtype == torch.int8 else 0)
    dtype = qkv_RC.dtype if cache_takes(qkv_RC.dtype, k_BJMD.dtype) else k_BJMD.dtype
    return cpu_ext.get_decode().attend_one(plain(qkv_RC, dtype),
                                           plain_f32(cos.reshape(-1, Dh)),
                                           plain_f32(sin.reshape(-1, Dh)), k_BJMD, v_BJMD, P,
                                           valid_BM)
