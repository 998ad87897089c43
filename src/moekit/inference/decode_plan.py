"""A decode step as a short list of kernel calls, its arguments prepared once.

``MoETransformer.infer`` runs a decode step through the modules: per layer some 40
Python calls (module dispatch, the checks that pick each kernel, argument
conversions) around 8 kernel calls. At batch 1 with int8 weights that was ~0.9 ms of
a 3.3 ms step (fine model of bench_decode, 2 threads). ``DecodePlan.build(model)``
resolves those choices once, for a model whose every part takes the kernel path
(fp32 or bf16 activations; moekit's own MoE blocks and resident experts with a kernel
router, no shared experts, backend "auto" and a kernel activation; bias-free float or
quantized projections), and
``plan.step(ids, cache)`` then makes the same kernel calls with the same arguments:
the logits are bitwise those of ``model.infer``. A step outside the limits the
modules would check (rows per kernel, autograd, autocast, the cache's dtype) returns
None and the caller runs ``model.infer``. The plan holds the weights' tensors, so it
is for one generation: build it again after changing the model (quantize, ``.to``).

Shape letters: R rows (one new token each), D hidden, V vocabulary, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.experts import backends
from moekit.functions import cpu_ext, decode
from moekit.models.transformer import first_norm
from moekit.quant.linear import QuantizedLinear
from moekit.quant.tensor import QuantizedTensor


@dataclass(frozen=True)
class _Layer:
    qkv: tuple  # the kernels' weight arguments (decode._wargs)
    out: tuple
    ffn_norm: tuple[Tensor, float]
    next_norm: tuple[Tensor, float]
    router: tuple  # the routers' [D -> E] fp32 projection, kernel arguments
    route: tuple  # (top_k, mode, renormalize, scale, bias_E)
    w_in: tuple
    w_out: tuple
    b_in: Tensor | None
    b_out: Tensor | None
    act: tuple[int, float, float]  # (code, swiglu limit, swiglu alpha)


def _projection(module, dtype: torch.dtype) -> tuple | None:
    """Kernel arguments of a bias-free [K -> N] projection, or None (not plannable)."""
    from moekit.models.transformer import Linear

    if isinstance(module, QuantizedLinear) and module.bias is None:
        return ("quant", decode._wargs(module.weight))
    if type(module) is Linear and module.bias is None and module.weight.dtype == dtype:
        return ("float", decode._wargs(module.weight[None].transpose(1, 2)))
    return None


def _experts(moe, dtype: torch.dtype) -> tuple | None:
    from moekit.experts.experts import Experts
    from moekit.layer import MoE

    # exactly moekit's own layer and experts: expert-parallel and offloaded experts
    # (other classes) move or fetch weights in their forward
    if type(moe) is not MoE or type(moe.experts) is not Experts:
        return None
    ex = moe.experts
    if ex.backend != "auto" or moe.shared is not None or moe.config.capacity_factor is not None:
        return None
    spec = moe.router.kernel_spec()
    act = backends._kernel_spec(ex._act)
    code = decode.ACT_CODES.get(act[0], 0) if act is not None else 0
    router = moe.router.weight
    if spec is None or code == 0 or router is None or not router.is_floating_point():
        return None
    weights = (ex.w_in, ex.w_out)
    quantized = all(isinstance(w, QuantizedTensor) for w in weights)
    if not quantized and not all(isinstance(w, Tensor) and w.dtype == dtype for w in weights):
        return None
    mode, renormalize, bias_E = spec
    # MoE._router_logits: fp32 logits from fp32 copies of x and the weight, on the kernel
    route = (moe.config.top_k, mode, renormalize, moe.config.routed_scaling_factor, bias_E)
    return (quantized, decode._wargs(router.float()[None].transpose(1, 2)), route,
            decode._wargs(ex.w_in), decode._wargs(ex.w_out), decode._f32(ex.b_in),
            decode._f32(ex.b_out), (code, *act[1:]))


class DecodePlan:
    """The kernel calls of one decode step of ``model`` (see the module docstring)."""

    def __init__(self, model, layers: list[_Layer], head: tuple, float_rows: int,
                 quant_rows: int, expert_rows: int) -> None:
        self.model, self.layers, self.head = model, layers, head
        self.dtype = model.norm.weight.dtype  # the activations' (and the KV cache's)
        self.ext = cpu_ext.get_decode()
        # routers: fp32 projections on the kernel (MoE._router_logits)
        self.max_rows = min(float_rows, quant_rows, decode.ROUTE_KERNEL_MAX_TOKENS,
                            decode.ADD_NORM_MAX_ROWS, decode.float_kernel_max_rows(torch.float32))
        self.expert_rows = expert_rows  # routed rows per layer up to which experts decode
        self.top_k = max(layer.route[0] for layer in layers)

    @classmethod
    def build(cls, model) -> DecodePlan | None:
        """The plan for ``model``, or None where some part would not take the kernels."""
        from moekit.models.transformer import MoETransformer

        dtype = model.norm.weight.dtype
        if (type(model) is not MoETransformer or not decode.available()
                or dtype not in decode.STEP_DTYPES or model.norm.weight.device.type != "cpu"):
            return None
        head = _projection(model.head, dtype)
        if head is None:
            return None
        norms = [b.attn_norm for b in model.blocks[1:]] + [model.norm]
        layers, kinds, experts_rows = [], {head[0]}, []
        for block, nxt in zip(model.blocks, norms, strict=True):
            qkv, out = _projection(block.attn.qkv, dtype), _projection(block.attn.out, dtype)
            ex = _experts(block.ffn, dtype) if block.is_moe else None
            if qkv is None or out is None or ex is None:
                return None
            quantized, router, route, w_in, w_out, b_in, b_out, act = ex
            kinds |= {qkv[0], out[0]}
            fx = block.ffn.experts
            experts_rows.append(
                backends.quant_kernel_max_rows(
                    dtype, fx.w_in, fx.w_out, fx.b_in is not None or fx.b_out is not None,
                    backends._kind(fx._act))
                if quantized else backends.decode_max_rows(block.ffn.config.num_experts))
            layers.append(_Layer(qkv[1], out[1], (block.ffn_norm.weight, block.ffn_norm.eps),
                                 (nxt.weight, nxt.eps), router, route, w_in, w_out, b_in,
                                 b_out, act))
        expert_rows = min(experts_rows)
        float_rows = decode.float_kernel_max_rows(dtype) if "float" in kinds else 1 << 30
        quant_rows = decode.QUANT_LINEAR_MAX_ROWS if "quant" in kinds else 1 << 30
        return cls(model, layers, head[1], float_rows, quant_rows, expert_rows)

    def step(self, ids_R1: Tensor, cache) -> Tensor | None:
        """Logits [R, V] of one new token per row, appending it to ``cache``; None (and
        nothing done) where the modules would leave the kernels this step."""
        R, L = ids_R1.shape
        k0 = cache.k[0]
        if (L != 1 or R != cache.rows or R > self.max_rows or R * self.top_k > self.expert_rows
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
                or k0.dtype != self.dtype or k0.device.type != "cpu"):
            return None
        model, ext, dt = self.model, self.ext, self.dtype
        rows_R, ends_1 = decode._all_rows(R)  # as decode.dense_rows passes them
        cos, sin = cache.begin(1, model.rope_cos, model.rope_sin)
        Dh = k0.shape[-1]
        cos, sin = decode._plain_f32(cos.reshape(-1, Dh)), decode._plain_f32(sin.reshape(-1, Dh))
        valid = cache.valid_BM if cache.padded else None
        P = cache.length
        x = model.embed(ids_R1)
        h = first_norm(x, model.blocks[0].attn_norm).view(R, -1)
        x = x.view(R, -1)
        # bf16: the weight kernels read fp32 rows and the modules round their outputs
        # to bf16 (decode.dense_rows, decode_rows); _in / _out do the same here
        def _in(t: Tensor) -> Tensor:
            return t if dt == torch.float32 else t.float()

        def _out(t: Tensor) -> Tensor:
            return t if dt == torch.float32 else t.to(dt)

        for i, ly in enumerate(self.layers):
            qkv = _out(ext.gate_up(_in(h), rows_R, ends_1, *ly.qkv, None, 0, 0.0, 1.0))
            y = ext.attend_one(qkv, cos, sin, cache.k[i], cache.v[i], P, valid)
            a = _out(ext.gate_up(_in(y), rows_R, ends_1, *ly.out, None, 0, 0.0, 1.0))
            x, h = ext.add_rms_norm(x, a, *ly.ffn_norm)
            h32 = _in(h)
            logits = ext.gate_up(h32, rows_R, ends_1, *ly.router, None, 0, 0.0, 1.0)
            token_S, weight_S, _, offsets_E = ext.route_sort(logits, *ly.route)
            g = ext.gate_up(h32, token_S, offsets_E, *ly.w_in, ly.b_in, *ly.act)
            o = torch.empty_like(h32)
            ext.down_combine(g, token_S, weight_S, offsets_E, *ly.w_out, ly.b_out, o)
            x, h = ext.add_rms_norm(x, _out(o), *ly.next_norm)
        cache.advance(1)
        return _out(ext.gate_up(_in(h), rows_R, ends_1, *self.head, None, 0, 0.0, 1.0))
