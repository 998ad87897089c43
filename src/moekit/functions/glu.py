"""Expert activations with a hand-written backward, for the fused expert Function.

The Function stores the pre-activation ``h`` and recomputes the activation in
backward, so it needs the activation's forward and its input gradient as two
separate calls. SwiGLU and GeGLU have closed forms built on aten's fused
``silu_backward`` / ``gelu_backward`` kernels; any other activation goes
through autograd on a recomputed chunk (correct for every callable, slower).

Shape letters: N rows of one expert, F expert hidden size, G = 2F for GLU
activations (gate first, then up) else F.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moekit.functions import cpu_ext

ActFn = Callable[[Tensor], Tensor]

FAST_KINDS = frozenset({"swiglu", "geglu"})


def _split(h_NG: Tensor) -> tuple[Tensor, Tensor]:
    half = h_NG.shape[1] // 2
    return h_NG[:, :half], h_NG[:, half:]


def _act_into(kind: str, gate_NF: Tensor, out_NF: Tensor) -> Tensor:
    if kind == "swiglu":
        return torch.ops.aten.silu.out(gate_NF, out=out_NF)
    return torch.ops.aten.gelu.out(gate_NF, out=out_NF)


ONE_PASS_DTYPES = (torch.float32, torch.bfloat16)


def one_pass(kind: str, *tensors: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)):
    """The C++ one-pass SwiGLU (moekit/csrc/cpu_experts.cpp) where it applies, else None:
    CPU tensors of one dtype in ``dtypes`` with contiguous rows. float32 only by default
    (what moe_experts' one-call forward needs of its rows); the activation's own calls
    also take bfloat16 (computed in fp32, rounded once per output)."""
    dtype = tensors[0].dtype
    if kind != "swiglu" or dtype not in dtypes or not all(
            t.dtype == dtype and t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1
            for t in tensors):
        return None
    return cpu_ext.get()


def glu_forward(h_NG: Tensor, kind: str, out_NF: Tensor) -> Tensor:
    """act(gate) * up for kind "swiglu" (silu) or "geglu" (exact gelu), into ``out_NF``."""
    ext = one_pass(kind, h_NG, out_NF, dtypes=ONE_PASS_DTYPES)
    if ext is not None:
        ext.swiglu_out(h_NG, out_NF)
        return out_NF
    gate_NF, up_NF = _split(h_NG)
    return _act_into(kind, gate_NF, out_NF).mul_(up_NF)


def glu_backward(h_NG: Tensor, da_NF: Tensor, kind: str, a_NF: Tensor, tmp_NF: Tensor,
                 dh_NG: Tensor) -> tuple[Tensor, Tensor]:
    """(a, dh): the recomputed activation and the gradient of h, from ``da``.

    d gate = act'(gate) * up * da, d up = act(gate) * da; ``a`` comes for free
    from the same act(gate) and is what the down-projection's weight gradient
    needs. Writes into the caller's buffers ``a_NF``, ``tmp_NF`` and ``dh_NG``:
    fresh allocations here page-fault on every call with glibc malloc.
    """
    ext = one_pass(kind, h_NG, da_NF, a_NF, dh_NG, dtypes=ONE_PASS_DTYPES)
    if ext is not None:
        ext.swiglu_backward_out(h_NG, da_NF, a_NF, dh_NG)
        return a_NF, dh_NG
    gate_NF, up_NF = _split(h_NG)
    dgate_NF, dup_NF = _split(dh_NG)
    act_NF = _act_into(kind, gate_NF, a_NF)
    torch.mul(da_NF, up_NF, out=tmp_NF)
    if kind == "swiglu":
        torch.ops.aten.silu_backward(tmp_NF, gate_NF, grad_input=dgate_NF)
    else:
        torch.ops.aten.gelu_backward(tmp_NF, gate_NF, grad_input=dgate_NF)
    torch.mul(da_NF, act_NF, out=dup_NF)
    return act_NF.mul_(up_NF), dh_NG


def generic_backward(h_NG: Tensor, da_NF: Tensor, act: ActFn) -> tuple[Tensor, Tensor]:
    """(a, dh) for any activation callable, by autograd on the recomputed chunk."""
    with torch.enable_grad():
        h = h_NG.detach().requires_grad_(True)
        a = act(h)
        (dh,) = torch.autograd.grad(a, h, da_NF)
    return a.detach(), dh


def weighted_backward(h_NG: Tensor, gu_NF: Tensor, w_N: Tensor, aw_NF: Tensor, dh_NG: Tensor,
                      dw_N: Tensor) -> bool:
    """SwiGLU rows' backward around the activation in one C++ pass, where it applies
    (float32 or bfloat16 rows, ``w_N`` / ``dw_N`` float32): from gu = dy[tok] @ w_out^T
    and the combine weights w, ``aw_NF`` = w act(h), ``dh_NG`` = d h with da = w gu, and
    ``dw_N`` = rowsum(gu act(h)), the combine weights' gradient. False (nothing written)
    where the extension lacks it or the tensors do not fit: the caller runs the passes."""
    ext = one_pass("swiglu", h_NG, gu_NF, aw_NF, dh_NG, dtypes=ONE_PASS_DTYPES)
    if ext is None or not hasattr(ext, "swiglu_backward_weighted_out"):
        return False
    ext.swiglu_backward_weighted_out(h_NG, gu_NF, w_N, aw_NF, dh_NG, dw_N)
    return True
