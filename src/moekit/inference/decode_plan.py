"""A decode step as one C++ call, its arguments prepared once.

``MoETransformer.infer`` runs a decode step through the modules: per layer some 40
Python calls (module dispatch, the checks that pick each kernel, argument
conversions) around 8 kernel calls. At batch 1 with int8 weights that was ~0.9 ms of
a 3.3 ms step (fine model of bench_decode, 2 threads). ``DecodePlan.build(model)``
resolves those choices once, for a model whose every part takes the kernel path
(fp32 or bf16 activations; moekit's own MoE blocks and resident experts with a kernel
router, backend "auto" and a kernel activation, shared experts or none; float or
quantized projections, biases on qkv only; an ``nn.Embedding`` or a
``QuantizedEmbedding``), and
``plan.step(ids, cache)`` then makes the same kernel calls with the same arguments,
all of them (the embedding, the norms, every layer, the LM head) inside one C++ call
(``DecodeStep`` in ``moekit/csrc/cpu_decode.cpp``): the logits are bitwise those of
``model.infer``. (The same calls from a Python loop, each line run with cold caches
after a weight stream, took 5-10% longer per quantized or bf16 step at batch 1:
docs/cpu-inference.md, "A decode step in one C++ call".) The call also takes the rotary
rows from the model's tables (the cache's tensors are bound to it on the first step)
and, for greedy decoding, the argmax: the engine's Python per step is its own loop.
A step outside the limits the
modules would check (rows per kernel, autograd, autocast, the cache's dtype) returns
None and the caller runs ``model.infer``. The plan holds the weights' tensors, so it is
for one generation: build it again after changing the model (quantize, ``.to``). One
thread at a time: ``step`` binds the cache it is given and runs without the GIL on
per-plan state (an Engine builds one per call, a Batcher its own).

Shape letters: R rows (one new token each), D hidden, V vocabulary, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from moekit.experts import backends
from moekit.functions import cpu_ext, decode
from moekit.quant.linear import QuantizedEmbedding, QuantizedLinear
from moekit.quant.tensor import QuantizedTensor


@dataclass(frozen=True)
class _Layer:
    # DecodeStep's constructor (csrc/cpu_decode.cpp) reads these fields by name
    qkv: tuple  # the kernels' weight arguments (decode.wargs)
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
    qk_norm: tuple | None  # (q_w, k_w, eps, q_width, k_width) of decode.qk_norm_, or None
    qkv_bias: Tensor | None  # added to the qkv projection's output (Linear.forward)
    # decode.shared_rows' arguments: (w_in, w_out, b_in [1, G], b_out [1, D], gate [D, 1]
    # fp32 or None); None: no shared experts
    shared: tuple | None


def _projection(module, dtype: torch.dtype) -> tuple | None:
    """(kind, kernel arguments, bias in ``dtype`` or None) of a [K -> N] projection, or
    None (not plannable). The bias is added to the kernel's output in ``dtype``, as
    ``Linear`` and ``QuantizedLinear`` add it."""
    from moekit.models.transformer import Linear

    bias = None if module.bias is None else module.bias.detach().to(dtype)
    if isinstance(module, QuantizedLinear):
        return ("quant", decode.wargs(module.weight), bias)
    if type(module) is Linear and module.weight.dtype == dtype:
        return ("float", decode.wargs(module.weight[None].transpose(1, 2)), bias)
    return None


def _embedding(module, dtype: torch.dtype) -> tuple | None:
    """The lookup's arguments (a float table, or a quantized one's parts) where it gives
    ``dtype`` rows as the module does, or None (not plannable)."""
    if isinstance(module, QuantizedEmbedding) and module.out_dtype == dtype:
        q = module.weight
        return ("quant", q.data[0], q.scales[0], None if q.zeros is None else q.zeros[0],
                q.bits, q.group_size or 0)
    if type(module) is nn.Embedding and module.max_norm is None and module.weight.dtype == dtype:
        return ("float", module.weight)
    return None


def _qk_norm(attn, dtype: torch.dtype) -> tuple | None | bool:
    """qk_norm_'s arguments for the attention's q / k norms, None where it has none, False
    where they are not of the activations' dtype (not plannable: the modules take torch's)."""
    if attn.q_norm is None:
        return None
    q, k = attn.q_norm, attn.k_norm
    if q.weight.dtype != dtype or k.weight.dtype != dtype:
        return False
    H, J, Dh = attn.num_heads, attn.kv_heads, attn.head_dim
    return (q.weight, k.weight, q.eps, H * Dh, J * Dh)


def _experts(moe, dtype: torch.dtype) -> tuple | None:
    from moekit.experts.experts import Experts
    from moekit.layer import MoE

    # exactly moekit's own layer and experts: expert-parallel and offloaded experts
    # (other classes) move or fetch weights in their forward
    if type(moe) is not MoE or type(moe.experts) is not Experts:
        return None
    ex = moe.experts
    if ex.backend != "auto":  # (a capacity factor: MoE.infer routes token choice dropless)
        return None
    spec = moe.router.kernel_spec()
    act = backends.kernel_spec(ex._act)
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
    return (quantized, decode.wargs(router.float()[None].transpose(1, 2)), route,
            decode.wargs(ex.w_in), decode.wargs(ex.w_out), decode.f32(ex.b_in),
            decode.f32(ex.b_out), (code, *act[1:]))


def _shared(moe, dtype: torch.dtype) -> tuple | None | bool:
    """decode.shared_rows' arguments for the layer's shared experts, None where it has
    none, False where they would not take the kernel (SharedExperts.kernel_takes)."""
    sh = moe.shared
    if sh is None:
        return None
    if not sh.kernel_takes(dtype):
        return False
    return decode.shared_args(sh.w_in, sh.w_out, sh.b_in, sh.b_out, sh.gate)


def _shared_max_rows(moe) -> int:
    """Rows up to which the shared experts take the kernel (``decode.dense_kernel_ok``):
    int8-activation weights go to the GEMM from A8_LINEAR_MIN_ROWS on."""
    w = moe.shared.w_in if moe.shared is not None else None
    if isinstance(w, QuantizedTensor) and w.activations == "int8" and decode.int8_gemm_here():
        return decode.A8_LINEAR_MIN_ROWS[w.bits] - 1
    return 1 << 30


class DecodePlan:
    """The kernel calls of one decode step of ``model`` (see the module docstring)."""

    def __init__(self, model, layers: list[_Layer], head: tuple, embed: tuple,
                 float_rows: int, quant_rows: int, expert_rows: int) -> None:
        self.model = model  # (the layers' arguments live in self.native)
        self.dtype = model.norm.weight.dtype  # the activations' (the KV cache: decode.cache_takes)
        # the step's calls, made by one C++ call (DecodeStep in csrc/cpu_decode.cpp)
        norm = model.blocks[0].attn_norm
        self.native = cpu_ext.get_decode().DecodeStep(
            [{f.name: getattr(ly, f.name) for f in fields(ly)} for ly in layers], head, embed,
            (norm.weight, norm.eps))
        if self.dtype == torch.float32 and decode.int8_gemm_here():  # as QuantizedLinear's
            self.native.set_a8_gemm(cpu_ext.get().q_linear_a8_address(),
                                    decode.A8_LINEAR_MIN_ROWS[8], decode.A8_LINEAR_MIN_ROWS[4])
        least = [decode.weight_gemm_min_rows(b) for b in (8, 4)]
        if self.dtype == torch.float32 and None not in least:  # as QuantizedLinear's too
            self.native.set_q_gemm(cpu_ext.get().q_linear_address(), *least)
        # routers: fp32 projections on the kernel (MoE._router_logits)
        self.max_rows = min(float_rows, quant_rows, decode.ROUTE_KERNEL_MAX_TOKENS,
                            decode.ADD_NORM_MAX_ROWS, decode.float_kernel_max_rows(torch.float32))
        self.expert_rows = expert_rows  # routed rows per layer up to which experts decode
        self.top_k = max(layer.route[0] for layer in layers)
        self._bound = None  # the StaticKVCache bound to self.native (step binds it)

    @classmethod
    def build(cls, model) -> DecodePlan | None:
        """The plan for ``model``, or None where some part would not take the kernels."""
        from moekit.models.transformer import MoETransformer

        dtype = model.norm.weight.dtype
        if (type(model) is not MoETransformer or not decode.available()
                or dtype not in decode.STEP_DTYPES or model.norm.weight.device.type != "cpu"):
            return None
        head, embed = _projection(model.head, dtype), _embedding(model.embed, dtype)
        if head is None or embed is None:
            return None
        norms = [b.attn_norm for b in model.blocks[1:]] + [model.norm]
        if head[2] is not None:
            return None
        layers, kinds, experts_rows, shared_rows = [], {head[0]}, [], 1 << 30
        for block, nxt in zip(model.blocks, norms, strict=True):
            qkv, out = _projection(block.attn.qkv, dtype), _projection(block.attn.out, dtype)
            ex = _experts(block.ffn, dtype) if block.is_moe else None
            qk_norm = _qk_norm(block.attn, dtype)
            shared = _shared(block.ffn, dtype) if block.is_moe else False
            if (qkv is None or out is None or out[2] is not None or ex is None
                    or qk_norm is False or shared is False):
                return None
            quantized, router, route, w_in, w_out, b_in, b_out, act = ex
            kinds |= {qkv[0], out[0]}
            fx = block.ffn.experts
            experts_rows.append(
                backends.quant_kernel_max_rows(
                    dtype, fx.w_in, fx.w_out, fx.b_in is not None or fx.b_out is not None,
                    backends.activation_kind(fx._act))
                if quantized else backends.decode_max_rows(block.ffn.config.num_experts))
            if shared is not None:  # the projection kernels' row limits apply to it too
                kinds.add("quant" if isinstance(block.ffn.shared.w_in, QuantizedTensor)
                          else "float")
                shared_rows = min(shared_rows, _shared_max_rows(block.ffn))
            layers.append(_Layer(qkv[1], out[1], (block.ffn_norm.weight, block.ffn_norm.eps),
                                 (nxt.weight, nxt.eps), router, route, w_in, w_out, b_in,
                                 b_out, act, qk_norm, qkv[2], shared))
        expert_rows = min(experts_rows)
        float_rows = decode.float_kernel_max_rows(dtype) if "float" in kinds else 1 << 30
        quant_rows = decode.QUANT_LINEAR_MAX_ROWS if "quant" in kinds else 1 << 30
        quant_rows = min(quant_rows, shared_rows)
        return cls(model, layers, head[1], embed, float_rows, quant_rows, expert_rows)

    def step(self, ids_R1: Tensor, cache, greedy: bool = False,
             sample: tuple | None = None) -> Tensor | None:
        """Logits [R, V] of one new token per row, appending it to ``cache``; with
        ``greedy`` each row's argmax instead ([R] int64, as ``logits.argmax(-1)``), with
        ``sample`` = (temperature > 0, top_k or 0, top_p or 1.0, generator) the tokens
        ``sample_next`` draws from those logits. None (and nothing done) where the modules
        would leave the kernels this step. A second forward on ``cache`` while this runs
        raises ``ConcurrentUseError`` (``StaticKVCache.writing``)."""
        with cache.writing():
            return self._step(ids_R1, cache, greedy, sample)

    def _step(self, ids_R1: Tensor, cache, greedy: bool, sample: tuple | None
              ) -> Tensor | None:
        R, L = ids_R1.shape
        k0 = cache.k[0]
        if (L != 1 or R != cache.rows or R > self.max_rows or R * self.top_k > self.expert_rows
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
                or not decode.cache_takes(self.dtype, k0.dtype) or k0.device.type != "cpu"):
            return None
        P = cache.length
        if P + 1 > cache.max_len:  # as cache.begin says it
            raise ValueError(f"sequence length {P + 1} is not allowed: this cache holds "
                             f"max_len={cache.max_len} positions")
        if cache is not self._bound:  # the cache's tensors change in place, not identity
            model, Dh = self.model, self.model.config.head_size
            self.native.bind(cache.k, cache.v, decode.plain_f32(model.rope_cos.reshape(-1, Dh)),
                             decode.plain_f32(model.rope_sin.reshape(-1, Dh)), cache.pad_B,
                             cache.valid_BM)
            self._bound = cache
        out = self.native.step(ids_R1.reshape(R).long(), P, cache.padded, greedy, sample)
        cache.advance(1)
        return out
