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
import torch.nn.functional as F
from torch import Tensor

ActFn = Callable[[Tensor], Tensor]

FAST_KINDS = frozenset({"swiglu", "geglu"})


def glu_forward(h_NG: Tensor, kind: str) -> Tensor:
    """act(gate) * up for kind "swiglu" (silu) or "geglu" (exact gelu), [N, F]."""
    half = h_NG.shape[1] // 2
    gate_NF, up_NF = h_NG[:, :half], h_NG[:, half:]
    a_NF = F.silu(gate_NF) if kind == "swiglu" else F.gelu(gate_NF)
    return a_NF.mul_(up_NF)


def glu_backward(h_NG: Tensor, da_NF: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(a_NF, dh_NG): the recomputed activation and the gradient of h, from ``da``.

    d gate = act'(gate) * up * da, d up = act(gate) * da; ``a`` comes for free
    from the same act(gate) and is what the down-projection's weight gradient needs.
    """
    half = h_NG.shape[1] // 2
    gate_NF, up_NF = h_NG[:, :half], h_NG[:, half:]
    dh_NG = torch.empty_like(h_NG)
    if kind == "swiglu":
        act_NF = F.silu(gate_NF)
        torch.ops.aten.silu_backward(da_NF * up_NF, gate_NF, grad_input=dh_NG[:, :half])
    else:
        act_NF = F.gelu(gate_NF)
        torch.ops.aten.gelu_backward(da_NF * up_NF, gate_NF, grad_input=dh_NG[:, :half])
    torch.mul(da_NF, act_NF, out=dh_NG[:, half:])
    return act_NF.mul_(up_NF), dh_NG


def generic_backward(h_NG: Tensor, da_NF: Tensor, act: ActFn) -> tuple[Tensor, Tensor]:
    """(a, dh) for any activation callable, by autograd on the recomputed chunk."""
    with torch.enable_grad():
        h = h_NG.detach().requires_grad_(True)
        a = act(h)
        (dh,) = torch.autograd.grad(a, h, da_NF)
    return a.detach(), dh
