"""Quantized dense projections and the (tied) embedding, for inference.

``QuantizedLinear`` stands where an ``nn.Linear`` stood (attention q/k/v/o, the LM
head, dense FFNs, shared experts): its weight is a ``QuantizedTensor`` of one
"expert", logical [1, K, N], stored [1, N, K] like an ``nn.Linear`` weight, so the
decode kernel reads it as it reads an expert. Few rows (decode) run on that
kernel; more rows (prefill) dequantize the weight once per call into x's dtype
and use torch's GEMM (``functions/decode.py`` has the measured crossover).

``QuantizedEmbedding`` looks up rows of a quantized [V, D] table (the LM head's
weight when embeddings are tied: the same ``QuantizedTensor`` object): it
gathers the packed rows of the ids and dequantizes only those, so a decode
step reads B rows, not the table.

Shape letters: T rows, K input width, N output width, V vocabulary, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.quant.tensor import (
    QuantizationError,
    QuantizedTensor,
    check_float_dtype,
    dequantize_NK,
    dequantize_parts,
)


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W dequantized from ``weight`` (a [1, K, N] QuantizedTensor)."""

    def __init__(self, weight: QuantizedTensor, bias: Tensor | None = None) -> None:
        if not isinstance(weight, QuantizedTensor) or weight.shape[0] != 1:
            shape = tuple(weight.shape) if isinstance(weight, QuantizedTensor | Tensor) else ""
            raise QuantizationError(f"weight={type(weight).__name__}{shape} is not allowed: it "
                                    "must be a QuantizedTensor of one expert, [1, K, N]")
        if bias is not None and (not isinstance(bias, Tensor)
                                 or tuple(bias.shape) != (weight.shape[2],)):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise QuantizationError(f"bias of shape {shape} is not allowed: it must be None or "
                                    f"[N] = [{weight.shape[2]}]")
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # plain ints, as nn.Linear's (forward checks x against in_features without
        # reading the QuantizedTensor's shape)
        _, self.in_features, self.out_features = weight.shape

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float [N, K] weight (an ``nn.Linear`` weight)."""
        return dequantize_NK(self.weight, 0, 1, dtype=dtype)[0]

    def forward(self, x: Tensor) -> Tensor:
        from moekit.functions import decode  # the kernels' layer; imported late to stay cheap

        if x.dim() == 0 or x.shape[-1] != self.in_features:  # the kernels' and GEMMs' errors
            # named w_in and x_TD, mat1 and mat2, or blamed the weight's shape
            raise ValueError(f"x of shape {tuple(x.shape)} is not allowed: its last dimension "
                             f"must be in_features={self.in_features}")
        x_TK = x.reshape(-1, x.shape[-1])
        if decode.dense_kernel_ok(x, self.weight, x_TK.shape[0]):
            y = decode.dense_rows(x_TK, self.weight)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        elif (y := decode.quant_gemm_rows(x_TK, self.weight)) is not None:
            if self.bias is not None:
                y += self.bias
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x_TK, self.dequantized(x.dtype), bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class QuantizedEmbedding(nn.Module):
    """Rows of a quantized [V, D] table (``weight``: a [1, D, V] QuantizedTensor), in
    ``out_dtype`` (the float dtype the model runs in; follows ``model.to(dtype)``)."""

    def __init__(self, weight: QuantizedTensor, out_dtype: torch.dtype = torch.float32) -> None:
        # as QuantizedLinear's: a [E > 1] stack looked rows up in expert 0 only, and
        # out_dtype="float32" failed each forward as .to's "Invalid device string"
        if not isinstance(weight, QuantizedTensor) or weight.shape[0] != 1:
            shape = tuple(weight.shape) if isinstance(weight, QuantizedTensor | Tensor) else ""
            raise QuantizationError(f"weight={type(weight).__name__}{shape} is not allowed: it "
                                    "must be a QuantizedTensor of one table, [1, D, V]")
        check_float_dtype("out_dtype", out_dtype)
        super().__init__()
        self.weight = weight
        self.out_dtype = out_dtype

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[2]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, ids: Tensor) -> Tensor:
        q = self.weight
        idx = ids.reshape(-1).to(q.device)
        # the table's rows, already checked as a QuantizedTensor: no module per lookup
        # (building one cost half of a 50 us lookup, per decode step)
        out = dequantize_parts(q.data[0].index_select(0, idx)[None],
                               q.scales[0].index_select(0, idx)[None],
                               None if q.zeros is None else q.zeros[0].index_select(0, idx)[None],
                               q.bits, q.group_size, 0, 1, dtype=self.out_dtype)[0]
        return out.view(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # moves the QuantizedTensor (its dtypes stay)
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, out_dtype={self.out_dtype}"
