"""A patched experts module's decode call, with what depends on the module alone resolved
once.

``StackedExperts.forward`` on a decode step ran ~40 Python calls around its one C++ call
(``decode.topk_rows``): the two transposed weight views (aten ops), a new activation
object, the autocast check, the backend choice ("auto" asked ``decode_fits``, "decode"
``check_backend``), the kernels' checks (``decode_topk_experts``: the activation's spec,
``sort_topk_ok``, ``grad_wanted``, ``_dequantizes``) and the weights' kernel arguments.
``ExpertsPlan.build(module)`` resolves those that depend on the module (its weights, their
layout and dtypes, the biases, the activation, the backend); a call then checks those
that depend on the call (autograd, autocast, the inputs' dtypes and device, the rows)
and makes ``topk_rows``' C++ call with the same arguments, so the same bits, or returns
None and ``forward`` takes the general path, which raises what it raised.

The plan holds views of the weights (detached: ``torch.utils.swap_tensors`` still works
on the Parameters). ``current_plan`` builds it again when a weight, bias or the
activation module is no longer the object it read, or a tensor's storage moved (``.to``,
``param.data = ...``, ``swap_tensors``); ``StackedExperts`` also drops it on ``_apply``,
``load_state_dict`` and any attribute set or deleted (``moekit.quantize``,
``hf.apply(backend=...)``), so that weights replaced there are freed at once rather than
at the next call. Pickling and ``copy.deepcopy`` leave it behind (rebuilt at first use).

Shape letters: T tokens, D hidden, K experts per token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.experts.backends import decode_max_rows, kernel_spec, quant_kernel_rows_floor
from moekit.functions import decode
from moekit.quant.tensor import QuantizedTensor

PLAN_ATTR = "_moekit_plan"  # where a module keeps its plan (in its __dict__)
_FLOATS = (torch.float32, torch.bfloat16)  # the activations the decode kernels take


def _no_plan() -> None:
    return None


def plan_may_run() -> bool:
    """Whether a decode call may take a plan at all: autograd off (its C++ call has no
    backward) and not under torch.compile (which traces the general path). The one check
    ``StackedExperts.forward`` (before building a plan) and ``ExpertsPlan.__call__`` make."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling())


class ExpertsPlan:
    """What one experts module's decode call passes its C++ call, and when it may."""

    __slots__ = ("sources", "call", "tail", "num_experts", "max_rows")

    def __init__(self, sources: tuple, call: Callable | None = None, tail: tuple = (),
                 num_experts: int = 0, max_rows: int = 0) -> None:
        self.sources = sources  # (container, name, object, data_ptr or None) it was built on
        self.call, self.tail = call, tail  # None: the module never takes this path
        self.num_experts, self.max_rows = num_experts, max_rows

    def __reduce__(self) -> tuple:
        return (_no_plan, ())  # it holds the kernels' module: pickle and deepcopy drop it

    @classmethod
    def build(cls, module: nn.Module) -> ExpertsPlan:
        # detached first: a view of the Parameter itself would hold it (swap_tensors, as
        # load_state_dict and .to run it under swap_module_params_on_conversion, refuses)
        w_in, w_out = (_detached(getattr(module, a)) for a in module._moekit_weights)
        b_in = _detached(module.gate_up_proj_bias) if module.has_bias else None
        b_out = _detached(module.down_proj_bias) if module.has_bias else None
        names = (*module._moekit_weights, *(("gate_up_proj_bias", "down_proj_bias")
                                            if module.has_bias else ()), "act_fn")
        sources = _sources(module, names)
        quantized = isinstance(w_in, QuantizedTensor)
        max_rows = _max_rows(w_in, w_out, module._moekit_backend)
        spec = kernel_spec(module._moekit_act())
        if max_rows == 0 or spec is None or not decode.available():
            return cls(sources)
        if not quantized and not module.is_transposed:
            w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
        prepared = decode.topk_rows_call(w_in, w_out, b_in, b_out, spec)
        if prepared is None:
            return cls(sources)
        return cls(sources, *prepared, module.num_experts, max_rows)

    def fresh(self) -> bool:
        """Whether every object the plan read is still in its place, on the same storage."""
        for container, name, obj, ptr in self.sources:
            if container.get(name) is not obj or (ptr is not None and obj.data_ptr() != ptr):
                return False
        return True

    def __call__(self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor) -> Tensor | None:
        """The experts' output [T, D] in x's dtype, or None where the general path would
        not make this call (the conditions of ``run_experts_topk`` that depend on it)."""
        if (self.call is None or not plan_may_run() or x_TD.dim() != 2
                or x_TD.dtype not in _FLOATS or x_TD.device.type != "cpu"
                or experts_TK.dtype != torch.int64 or experts_TK.device.type != "cpu"
                or weights_TK.device.type != "cpu" or not weights_TK.is_floating_point()
                or experts_TK.numel() > self.max_rows or torch.is_autocast_enabled("cpu")):
            return None
        return self.call(x_TD, experts_TK, weights_TK, self.num_experts, *self.tail)


def current_plan(module: nn.Module) -> ExpertsPlan:
    """``module``'s plan, built again where what it read has changed."""
    plan = module.__dict__.get(PLAN_ATTR)
    if plan is None or not plan.fresh():
        plan = module.__dict__[PLAN_ATTR] = ExpertsPlan.build(module)  # not via __setattr__
    return plan


def _max_rows(w_in: Tensor | QuantizedTensor, w_out: Tensor | QuantizedTensor,
              backend: str) -> int:
    """Routed rows up to which the general path runs ``decode.topk_rows`` for these
    weights and backend; 0 where it never does. Quantized weights take the decode backend
    whatever the name, within the rows they always run the kernels for; float ones under
    "auto" in ``decode_fits``' limit (fp32 / bf16 weights), under "decode" at any count."""
    if isinstance(w_in, QuantizedTensor) and isinstance(w_out, QuantizedTensor):
        return quant_kernel_rows_floor(w_in)
    if isinstance(w_in, QuantizedTensor) or isinstance(w_out, QuantizedTensor):
        return 0
    if backend == "decode":
        return sys.maxsize
    if backend == "auto" and w_in.dtype in _FLOATS and w_out.dtype in _FLOATS:
        return decode_max_rows(w_in.shape[0])
    return 0


def _sources(module: nn.Module, names: tuple[str, ...]) -> tuple:
    """(container, name, object, data_ptr or None) for each of ``names`` the module holds,
    and for a QuantizedTensor's buffers."""
    out = []
    for name in names:
        container = next((d for d in (module._parameters, module._buffers, module._modules,
                                      module.__dict__) if name in d), None)
        if container is None:
            continue
        obj = container[name]
        out.append((container, name, obj, _data_ptr(obj)))
        if isinstance(obj, QuantizedTensor):
            out += [(obj._buffers, b, t, _data_ptr(t)) for b, t in obj._buffers.items()]
    return tuple(out)


def _data_ptr(obj: object) -> int | None:
    return obj.data_ptr() if isinstance(obj, Tensor) else None


def _detached(t: Tensor | QuantizedTensor | None) -> Tensor | QuantizedTensor | None:
    return t.detach() if isinstance(t, Tensor) else t
