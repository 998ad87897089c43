"""The decode expert path: few routed rows, only the touched experts, no autograd.

Two C++ calls per layer (``moekit/csrc/cpu_decode.cpp``), each one parallel
region: gate+up with the activation fused, then the down projection with the
weighted combine fused. Weights are plain fp32 / bf16 stacks in either layout
(moekit's [E, D, G] or transformers' transposed views) or ``QuantizedTensor``
(int8 / int4, dequantized inside the kernel). Activations without a kernel
epilogue (any callable that is not one of moekit's five kinds) run in Python
between the two calls.

For many rows with quantized weights (prefill), ``dequantized_experts`` turns
blocks of experts back into float and runs the fused training path on them.

``linear`` runs a dense ``nn.Linear`` weight through the same kernel (one
"expert", every row routed to it) for the few rows of a decode step, where it
reads the weight faster than aten's mm (``DENSE_MAX_ROWS``).

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU activations
else F, E experts, S routed rows sorted by expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moekit.functions import cpu_ext
from moekit.functions.moe_experts import fused_experts
from moekit.quant.tensor import QuantizedTensor

ActFn = Callable[[Tensor], Tensor]
ACT_CODES = {"swiglu": 1, "geglu": 2, "swiglu_oai": 3, "relu2": 4, "gelu": 5}
DEQUANT_BLOCK_EXPERTS = 8  # experts dequantized at a time for prefill: bounded float copy
# Rows up to which ``linear`` runs instead of F.linear (MKL). One decode step's dense
# weights (4 x (qkv 3072x1024 + out 1024x1024) + head 256x1024 fp32, 65 MB), 1 thread
# CPU time, loaded box (load avg ~8.5), kernel / F.linear: 0.94-0.98 at 1 row, 0.69
# at 2, 0.73 at 4, 0.76 at 8, 0.80-0.83 at 16, 0.90 at 32, 0.92 at 64 (the fp32 NK
# kernel blocks 4 rows x 4 columns in registers). Prefill keeps aten's GEMM.
DENSE_MAX_ROWS = 32


def available() -> bool:
    """Whether the decode kernels are built (or buildable) here."""
    return cpu_ext.get_decode() is not None


def _wargs(w: Tensor | QuantizedTensor) -> tuple:
    if isinstance(w, QuantizedTensor):
        return w.data, w.scales, w.zeros, w.bits, w.group_size or 0
    if w.stride(2) != 1 and w.stride(1) != 1:  # neither layout the kernel reads
        w = w.contiguous()
    return w, None, None, 0, 0


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float().contiguous()


_ROUTES: dict[int, tuple[Tensor, Tensor]] = {}  # rows -> (token_S, offsets_E) of one expert


def dense_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether ``linear`` should run: CPU, no autograd, few rows, fp32/bf16, built."""
    return (x.device.type == "cpu" and weight.device.type == "cpu"
            and not torch.is_grad_enabled() and x.dim() >= 1 and weight.dim() == 2
            and x.shape[-1] == weight.shape[1] and 0 < x.numel() // max(x.shape[-1], 1)
            <= DENSE_MAX_ROWS and x.dtype == weight.dtype
            and weight.dtype in (torch.float32, torch.bfloat16) and weight.stride(1) == 1
            and available())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for a few rows: weight [N, K] as one expert's
    [1, K, N] view (unit stride along K), fp32 accumulation, output in x's dtype."""
    ext = cpu_ext.get_decode()
    K, N = weight.shape[1], weight.shape[0]
    x_TK = x.reshape(-1, K)
    T = x_TK.shape[0]
    route = _ROUTES.get(T)
    if route is None:
        route = _ROUTES[T] = (torch.arange(T), torch.tensor([T], dtype=torch.int32))
    b = None if bias is None else _plain_f32(bias).view(1, N)
    w_1KN = weight.as_strided((1, K, N), (N * K, 1, weight.stride(0)))
    y = ext.gate_up(_plain_f32(x_TK), route[0], route[1], w_1KN, None, None, 0, 0, b, 0, 0.0,
                    1.0)
    y = y.view(*x.shape[:-1], N)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def decode_rows(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                w_in: Tensor | QuantizedTensor, w_out: Tensor | QuantizedTensor,
                b_in_EG: Tensor | None, b_out_ED: Tensor | None, act: ActFn,
                spec: tuple[str, float, float] | None) -> Tensor:
    """y_TD = sum over the kept rows r (sorted by expert, ``offsets_E`` their ends) of
    weight_S[r] * expert_e(x_TD[token_S[r]]); output in x's dtype.

    ``spec`` = (activation kind, swiglu_limit, swiglu_alpha) when ``act`` is one the
    kernel knows; None runs ``act`` in Python on the fp32 gate+up output.
    """
    ext = cpu_ext.get_decode()
    if ext is None:
        raise RuntimeError("the decode kernels are not built (MOEKIT_CPU_EXT=0 or the build "
                           "failed); use backend='fused'")
    kind, limit, alpha = spec if spec is not None else (None, 0.0, 1.0)
    code = ACT_CODES.get(kind, 0)
    # conversions only where needed: every Python-side op of a decode step runs right
    # after a weight stream has evicted its code and data (~0.1 ms for the first one)
    x = _plain_f32(x_TD)
    h = ext.gate_up(x, token_S, offsets_E, *_wargs(w_in), _f32(b_in_EG), code, limit, alpha)
    if code == 0:
        h = act(h).float().contiguous()
    out = torch.empty_like(x)
    ext.down_combine(h, token_S, _plain_f32(weight_S), offsets_E, *_wargs(w_out),
                     _f32(b_out_ED), out)
    return out if x_TD.dtype == torch.float32 else out.to(x_TD.dtype)


def _plain_f32(t: Tensor) -> Tensor:
    """t as a contiguous float32 tensor the kernels read (the C++ side takes no autograd)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.detach().float().contiguous()


def dequantized_experts(x_TD: Tensor, token_S: Tensor, weight_S: Tensor, offsets_E: Tensor,
                        w_in: QuantizedTensor, w_out: QuantizedTensor, b_in_EG: Tensor | None,
                        b_out_ED: Tensor | None, act: ActFn, kind: str | None) -> Tensor:
    """Prefill with quantized weights: per block of experts, dequantize to x's dtype and
    run the fused path on that block's rows. Reads the offsets on the host."""
    ends = offsets_E.tolist()
    E = len(ends)
    y_TD = torch.zeros_like(x_TD)
    for e0 in range(0, E, DEQUANT_BLOCK_EXPERTS):
        e1 = min(E, e0 + DEQUANT_BLOCK_EXPERTS)
        r0, r1 = (ends[e0 - 1] if e0 else 0), ends[e1 - 1]
        if r1 == r0:
            continue
        wi, wo = w_in.dequantize(e0, e1, x_TD.dtype), w_out.dequantize(e0, e1, x_TD.dtype)
        bi = None if b_in_EG is None else b_in_EG[e0:e1]
        bo = None if b_out_ED is None else b_out_ED[e0:e1]
        y_TD += fused_experts(x_TD, token_S[r0:r1], weight_S[r0:r1], offsets_E[e0:e1] - r0,
                              wi, wo, bi, bo, act, kind)
    return y_TD
