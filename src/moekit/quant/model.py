"""``moekit.quantize``: weight-only quantization of a model for inference, in place
(optionally with int8 activations in the decode kernels: ``activations="int8"``).

``scope="all"`` (the default) quantizes every weight a decode step reads in
bulk: the routed experts, and every dense projection (attention q/k/v/o, the LM
head, dense FFN blocks, shared experts). ``scope="experts"`` quantizes the
routed experts only. Why "all" by default: with float attention and head the
bytes a step reads cannot shrink enough for int8/int4 to pay (the fine model,
D=1024, 64 experts top-8, F=512: a batch-1 step reads 272 MB in fp32, 102 MB
with int4 experts only, 44.5 MB with all weights int4), and the quality cost is small
(``benchmarks/quant_quality.py``; README). What stays in floating point:
routers (small, and their logits pick experts: a flipped choice costs more than
the bytes save), norms and biases. A tied embedding shares the head's quantized
table (``QuantizedEmbedding`` dequantizes only the rows it looks up); with scope
"all" an embedding table of its own is quantized alike (``embeddings=False`` keeps it
in floating point). A lookup reads only B rows of it, so that saves memory, not time:
Qwen's 151,936 x 2,048 table is 1.24 GB in fp32, 0.17 GB in int4 g64.

Finds moekit ``Experts`` modules (``w_in`` / ``w_out``) and transformers experts
modules patched by ``moekit.integrations.hf.apply`` (``gate_up_proj`` /
``down_proj``; ``up_proj`` / ``down_proj`` without a gate); with scope "all" also
every ``nn.Linear`` outside routed experts and routers (a transformers router is a
module named ``gate``, ``router`` or ``*_gate``, with what it holds: HunYuan's
``gate.wg``) and moekit ``SharedExperts``. Everything is checked first, then each
weight is replaced by a ``QuantizedTensor`` of the same logical shape (an ``nn.Linear``
by a ``QuantizedLinear``). Quantized weights run on the decode kernels for few rows and
dequantize for many; no backward.

Shape letters: E experts, D hidden, F expert hidden, G = 2F for GLU activations,
K input width, N output width.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

from torch import Tensor, nn

from moekit.experts.experts import Experts, SharedExperts
from moekit.quant.layout import o16_allowed
from moekit.quant.linear import QuantizedEmbedding, QuantizedLinear
from moekit.quant.tensor import (
    GROUP_SIZES,
    QuantizationError,
    QuantizedTensor,
    check_activations,
    check_bits,
    check_divides,
    quantize_tensor,
)

SCOPES = ("all", "experts")
ROUTER_NAMES = ("gate", "router")  # transformers' router modules (and names ending _gate)


@dataclass(frozen=True)
class Target:
    """One weight to quantize: module.<attr>, its logical [E, K, N] view, its name.

    ``kind``: "stack" (an expert stack or a [K, N] parameter: the attribute becomes a
    QuantizedTensor), "linear" (an nn.Linear child: it becomes a QuantizedLinear) or
    "embedding" (an nn.Embedding child's [V, D] table as [1, D, V]: it becomes a
    QuantizedEmbedding).
    """

    module: nn.Module
    attr: str
    w_EKN: Tensor
    name: str
    kind: str = "stack"
    bias: Tensor | None = None


@dataclass(frozen=True)
class _Tied:
    """An nn.Embedding whose weight is the weight of the linear target ``source``."""

    module: nn.Module
    attr: str
    source: int  # index into the targets


def _hf_view(module: nn.Module, attr: str) -> Tensor:
    w = getattr(module, attr)
    return w if getattr(module, "is_transposed", False) else w.transpose(1, 2)


def _expert_targets(model: nn.Module) -> list[Target]:
    from moekit.integrations.hf.experts import StackedExperts  # no transformers import

    out = []
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            pairs = [("w_in", m.w_in), ("w_out", m.w_out)]
        elif isinstance(m, StackedExperts):
            pairs = [(a, getattr(m, a) if isinstance(getattr(m, a), QuantizedTensor)
                      else _hf_view(m, a)) for a in m._moekit_weights]
        else:
            continue
        out += [Target(m, a, w, f"{name}.{a}" if name else a) for a, w in pairs]
    return out


def _is_router(attr: str) -> bool:
    return attr in ROUTER_NAMES or attr.endswith("_gate")


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear that computes x @ W.T + b: not a subclass from outside moekit with a
    forward of its own (DeepSeek-V4's grouped ``o_a_proj`` failed as a QuantizedLinear;
    it stays float)."""
    cls = type(m)
    return isinstance(m, nn.Linear) and (cls.forward is nn.Linear.forward
                                         or cls.__module__.startswith("moekit."))


@functools.cache
def _weights_read(cls: type) -> frozenset[str]:
    """The children whose weight ``cls``'s own code reads directly (``self.<name>.weight``
    or ``module.<name>.weight``) rather than calling them: from the source of each class
    in its MRO outside torch and moekit (one whose source cannot be read: none)."""
    names: set[str] = set()
    for c in cls.__mro__:
        if c.__module__.split(".")[0] in ("torch", "moekit", "builtins"):
            continue
        try:
            source = inspect.getsource(c)
        except (OSError, TypeError):
            continue
        names.update(re.findall(r"\b(?:self|module)\.(\w+)\.weight\b", source))
    return frozenset(names)


def _dense_targets(model: nn.Module) -> list[Target]:
    """nn.Linear children outside routed experts and routers; SharedExperts weights.

    An nn.Linear whose parent's code reads its ``.weight`` directly stays float: a
    QuantizedLinear's weight is a QuantizedTensor, which a matmul cannot take (Jamba's
    Mamba mixer computes ``self.dt_proj.weight @ time_step``; GraniteMoeHybrid's and
    NemotronH's CUDA kernel path pass ``self.out_proj.weight`` to a fused kernel). Found
    from the parent class's source (``_weights_read``): a read elsewhere is missed, a
    read in code that never runs here keeps a layer float for nothing (safe, not
    smaller). A ``.weight`` property dequantizing on each read was the alternative: a
    full-size float copy per step, and a ``weight`` that is not the stored one."""
    out: list[Target] = []

    def walk(m: nn.Module, prefix: str) -> None:
        for attr, child in m.named_children():
            name = f"{prefix}{attr}"
            if attr == "experts" or isinstance(child, Experts | QuantizedTensor):
                continue  # routed experts: _expert_targets (or a per-expert ModuleList)
            if _is_router(attr):  # a router, or a module holding one (HunYuan's gate.wg)
                continue
            if isinstance(child, SharedExperts):
                out.extend(Target(child, a, getattr(child, a)[None], f"{name}.{a}")
                           for a in ("w_in", "w_out")
                           if not isinstance(getattr(child, a), QuantizedTensor))
            elif _plain_linear(child) and attr not in _weights_read(type(m)):
                out.append(Target(m, attr, child.weight[None].transpose(1, 2), name, "linear",
                                   child.bias))
            else:
                walk(child, f"{name}.")

    walk(model, "")
    return out


def _token_embedding(model: nn.Module) -> nn.Module | None:
    """The token embedding table: a transformers model's ``get_input_embeddings()``, a
    moekit model's ``embed`` (not other tables: position or relative-bias embeddings)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else getattr(model, "embed", None)
    except NotImplementedError:
        return None


def _embedding_targets(model: nn.Module, targets: list[Target]) -> list[Target]:
    """The token embedding table where it is an nn.Embedding whose table is not a linear
    target's (not tied to a head)."""
    table = _token_embedding(model)
    if type(table) is not nn.Embedding:
        return []
    linear = _linear_weights(targets)
    return [Target(m, attr, child.weight.T[None], f"{prefix}.{attr}" if prefix else attr,
                    "embedding")
            for prefix, m in model.named_modules() for attr, child in m.named_children()
            if child is table and id(child.weight) not in linear]


def _linear_weights(targets: list[Target]) -> dict[int, int]:
    """id of each linear target's weight -> the target's index (what a tied embedding
    shares)."""
    return {id(t.module.get_submodule(t.attr).weight): i
            for i, t in enumerate(targets) if t.kind == "linear"}


def _tied(model: nn.Module, targets: list[Target]) -> list[_Tied]:
    """Embeddings sharing a linear target's weight (tied input and output embeddings)."""
    by_weight = _linear_weights(targets)
    out = []
    for m in model.modules():
        for attr, child in m.named_children():
            if isinstance(child, nn.Embedding) and id(child.weight) in by_weight:
                out.append(_Tied(m, attr, by_weight[id(child.weight)]))
    return out


def _check_model(model: object) -> None:
    """An nn.Module; a QuantizationError naming ``model`` and its type otherwise (None or a
    path string failed with AttributeError on ``named_modules``)."""
    if not isinstance(model, nn.Module):
        raise QuantizationError(f"model={type(model).__name__} is not allowed: it must be an "
                                "nn.Module (a moekit MoETransformer, or a transformers model "
                                "patched by moekit.integrations.hf.apply)")


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise QuantizationError(f"scope={scope!r} is not allowed: it must be 'all' (experts "
                                "and dense projections) or 'experts' (routed experts only)")


def _check_hf_experts(model: nn.Module) -> None:
    """Refuse transformers experts patched by moekit that ``quantize`` cannot reach: ones
    streamed from disk by ``load_offloaded`` (they have no weights in memory) and DBRX /
    Switch Transformers blocks (their experts are not stacked gate_up_proj / down_proj)."""
    from moekit.integrations.hf.blocks import DbrxBlock, SwitchSparseMLP  # no transformers

    for name, m in model.named_modules():
        if getattr(type(m), "_moekit_offloaded", False):
            raise QuantizationError(
                f"{name} holds experts streamed from disk by load_offloaded, which "
                "moekit.quantize cannot quantize: load them quantized instead, "
                "load_offloaded(path, expert_memory, quantize=8 or 4)")
        if isinstance(m, DbrxBlock | SwitchSparseMLP):
            raise QuantizationError(
                f"{name} is a {type(m)._moekit_original.__name__} block: moekit.quantize "
                "cannot quantize DBRX or Switch Transformers experts (only experts stored as "
                "stacked gate_up_proj / down_proj tensors); run this model in floating point")


def checked_targets(model: nn.Module, scope: str, group_size: int | None,
                     embeddings: bool = True) -> list[Target]:
    """``quantize``'s targets for ``scope`` (with scope "all" and ``embeddings``, the
    untied embedding tables too), after every check (nothing changed yet)."""
    experts, others = _checked_targets(model, scope, group_size, embeddings)
    return experts + others


def _checked_targets(model: nn.Module, scope: str, group_size: int | None,
                     embeddings: bool) -> tuple[list[Target], list[Target]]:
    """``checked_targets`` as (the routed experts', the others')."""
    check_scope(scope)
    done = [n for n, m in model.named_modules() if isinstance(m, QuantizedTensor)]
    if done:
        raise QuantizationError(f"{done[0]} is already quantized: quantizing twice is not "
                                "allowed; load the float model")
    _check_hf_experts(model)
    experts = _expert_targets(model)
    if not experts:
        config = getattr(model, "config", None)
        if getattr(config, "dense", False):  # scope "all" reads as if it took dense FFNs
            raise QuantizationError("the model is dense (dense=True, `moekit train --dense`): "
                                    "moekit.quantize quantizes MoE models (their experts, "
                                    "then with scope 'all' their other projections) and has "
                                    "no path for a model without experts; run it in floating "
                                    "point")
        raise QuantizationError("the model has no moekit Experts module nor a transformers "
                                "experts module patched by moekit.integrations.hf.apply: "
                                "nothing to quantize")
    if not isinstance(embeddings, bool):
        raise QuantizationError(f"embeddings={embeddings!r} is not allowed: it must be True "
                                "(quantize untied embedding tables with scope 'all') or False")
    others = _dense_targets(model) if scope == "all" else []
    if scope == "all" and embeddings:
        others += _embedding_targets(model, experts + others)
    _check_divides(experts + others, group_size)
    return experts, others


def _check_divides(targets: list[Target], group_size: int | None) -> None:
    """Every target's input dimension a multiple of ``group_size``; where one is not, the
    error says which allowed sizes tile them all (the tiny preset, D = 32, was refused at
    the default 64 with no word of 32)."""
    try:
        for t in targets:
            check_divides(group_size, t.w_EKN.shape[1], f"the input dimension of {t.name}")
    except QuantizationError as e:
        fit = [g for g in GROUP_SIZES if all(t.w_EKN.shape[1] % g == 0 for t in targets)]
        raise QuantizationError(f"{e}; " + (
            f"group_size={' or '.join(map(str, fit))} tiles every input dimension" if fit
            else "no allowed group size tiles every input dimension; use bits=8")) from None


def _replace(model: nn.Module, targets: list[Target], qs: list[QuantizedTensor]) -> None:
    tied = _tied(model, targets)
    for t, q in zip(targets, qs, strict=True):
        if t.kind == "linear":
            setattr(t.module, t.attr, QuantizedLinear(q, t.bias))
        elif t.kind == "embedding":
            setattr(t.module, t.attr, QuantizedEmbedding(q, t.w_EKN.dtype))
        else:
            delattr(t.module, t.attr)
            setattr(t.module, t.attr, q)
    for e in tied:
        dtype = getattr(e.module, e.attr).weight.dtype
        setattr(e.module, e.attr, QuantizedEmbedding(qs[e.source], dtype))


def quantize(model: nn.Module, bits: int = 8, group_size: int | None = None,
             scope: str = "all", activations: str = "float", embeddings: bool = True,
             layout: str = "auto") -> nn.Module:
    """Quantize ``model`` in place (see the module docstring for what ``scope`` covers)
    and return it.

    ``bits=8``: int8, one scale per output channel (``group_size`` must be None).
    ``bits=4``: int4 with a scale and zero point per ``group_size`` (32, 64 or 128;
    default 64) inputs. ``activations="int8"`` (W4A8 / W8A8): the decode kernels
    also round each input row to int8 per block of 32 inputs (the last block may be
    shorter; scale max|x| / 127) and multiply with integer dot products (AVX-512
    VNNI; vpmaddubsw on AVX2). int4: about 2x the weight-only kernel's speed where
    VNNI exists. int8: the same speed where the weight-only kernel reads at the
    memory bandwidth (batch 1 with VNNI), 1.1-1.4x faster batch-16 steps, 1.3x at
    batch 1 on AVX2 (docs/cpu-inference.md). Prefill past the kernels' rows stays on
    float activations. The stored weights are the same. ``embeddings``: with scope
    "all", whether an embedding table not tied to the head is quantized too (rows
    dequantized as they are looked up; a tied one always shares the head's).
    ``layout``: the in-memory order of routed experts quantized to int4 with int8
    activations (``quant/layout.py``): "auto" (the default) takes "o16" where the
    decode kernels read it with AVX-512 VNNI (batch-16 steps 0.86-0.92x the time on an
    Ice Lake VM: docs/cpu-inference.md), else "nk"; "nk" keeps the order files hold.
    Files and ``state_dict`` hold "nk" either way.
    Everything is checked before anything changes: bits=3, a group size that does
    not divide an input dimension, an unknown scope or activations, a model already
    quantized or without experts raise ``QuantizationError`` and leave the model
    untouched.
    """
    _check_model(model)
    group_size = check_bits(bits, group_size)
    check_activations(activations)
    check_layout_choice(layout)
    experts, others = _checked_targets(model, scope, group_size, embeddings)
    if layout == "o16":  # checked before anything changes, as set_expert_layout would
        for t in experts:
            N = t.w_EKN.shape[2]
            if not o16_allowed(bits, activations, N, t.w_EKN.device):
                raise QuantizationError(_o16_refused(t.name, bits, activations, N,
                                                     t.w_EKN.device))
    _quantize(model, experts + others, bits, group_size, activations)
    set_expert_layout(model, layout)
    return model


def _o16_refused(name: str, bits: int, activations: str, N: int, device) -> str:
    return (f"layout='o16' is not allowed for {name} (bits={bits}, activations="
            f"{activations!r}, N={N}, {device}): it is for int4 experts with int8 "
            "activations, N a multiple of 16, on the CPU")


LAYOUT_CHOICES = ("auto", "nk", "o16")


def check_layout_choice(layout: object) -> str:
    if layout not in LAYOUT_CHOICES:
        raise QuantizationError(f"layout={layout!r} is not allowed: it must be one of "
                                f"{', '.join(map(repr, LAYOUT_CHOICES))}")
    return layout


def set_expert_layout(model: nn.Module, layout: str = "auto") -> int:
    """Put ``model``'s routed int4 experts with int8 activations in ``layout`` order
    ("auto": "o16" where the decode kernels read it with AVX-512 VNNI, else "nk"; see
    ``quantize``), one tensor at a time; returns how many tensors take that order. Other
    QuantizedTensors stay as they are. Call it after loading a quantized model (files
    hold "nk"), not while another thread runs the model."""
    _check_model(model)
    check_layout_choice(layout)
    targets = [t for t in _expert_targets(model)
               if isinstance(getattr(t.module, t.attr), QuantizedTensor)]
    qs = [getattr(t.module, t.attr) for t in targets]
    fits = [q for q in qs if o16_allowed(q.bits, q.activations, q.data.shape[1], q.device)]
    want = ("o16" if o16_kernel_here() else "nk") if layout == "auto" else layout
    if want == "o16" and layout == "o16" and len(fits) < len(qs):
        bad = next(t for t, q in zip(targets, qs, strict=True) if q not in fits)
        q = getattr(bad.module, bad.attr)
        raise QuantizationError(_o16_refused(bad.name, q.bits, q.activations, q.data.shape[1],
                                             q.device))
    for q in fits:
        q.set_layout(want)
    return len(fits) if want == "o16" else 0


def auto_layout(bits: int, activations: str, N: int) -> str:
    """The order layout="auto" gives routed CPU experts of this format and output width N
    (the expert cache takes it too: moekit.offload)."""
    return "o16" if o16_allowed(bits, activations, N) and o16_kernel_here() else "nk"


def o16_kernel_here() -> bool:
    """Whether the decode kernels read the 16-output order with AVX-512 VNNI here."""
    from moekit.functions import cpu_ext

    ext = cpu_ext.get_decode()
    return ext is not None and ext.int4_o16_vnni()


def quantize_dense(model: nn.Module, bits: int, group_size: int | None = None) -> nn.Module:
    """``quantize``'s scope "all" without the routed experts, for a model whose experts
    are quantized elsewhere (offloaded experts, quantized as they are read)."""
    _check_model(model)
    group_size = check_bits(bits, group_size)
    targets = _dense_targets(model)
    targets += _embedding_targets(model, targets)
    _check_divides(targets, group_size)
    return _quantize(model, targets, bits, group_size)


def _quantize(model: nn.Module, targets: list[Target], bits: int,
              group_size: int | None, activations: str = "float") -> nn.Module:
    _replace(model, targets, [quantize_tensor(t.w_EKN, bits, group_size, activations)
                              .to(t.w_EKN.device) for t in targets])
    return model


def quantize_like(model: nn.Module, bits: int, group_size: int | None,
                  scope: str = "experts", activations: str = "float",
                  embeddings: bool = True) -> nn.Module:
    """Empty QuantizedTensors of the right shapes where ``quantize`` puts them (loading)."""
    _check_model(model)
    group_size = check_bits(bits, group_size)
    check_activations(activations)
    targets = checked_targets(model, scope, group_size, embeddings)
    qs = [QuantizedTensor.empty(*t.w_EKN.shape, bits, group_size, t.w_EKN.device, activations)
          for t in targets]
    _replace(model, targets, qs)
    return model


def is_quantized(model: nn.Module) -> bool:
    _check_model(model)
    return any(isinstance(m, QuantizedTensor) for m in model.modules())


def quantized_embeddings(model: nn.Module) -> bool:
    """Whether an embedding table of the model's own (not the head's) is quantized."""
    heads = {id(m.weight) for m in model.modules() if isinstance(m, QuantizedLinear)}
    return any(isinstance(m, QuantizedEmbedding) and id(m.weight) not in heads
               for m in model.modules())


def quantized_scope(model: nn.Module) -> str | None:
    """"all" when dense projections are quantized too, "experts" when only experts, else None."""
    if not is_quantized(model):
        return None
    return "all" if any(isinstance(m, QuantizedLinear) for m in model.modules()) else "experts"
