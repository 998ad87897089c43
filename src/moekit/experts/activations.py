"""Expert activations. GLU kinds take the fused [gate | up] projection (2F wide).

Shape letters: S routed rows, F expert hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.config import MoEConfig


def glu_split(h_SG: Tensor) -> tuple[Tensor, Tensor]:
    """Split the fused projection into (gate, up): gate is the first half."""
    gate_SF, up_SF = h_SG.chunk(2, dim=-1)
    return gate_SF, up_SF


def activate(h_SG: Tensor, cfg: MoEConfig) -> Tensor:
    """Apply ``cfg.activation``; GLU kinds halve the last dimension."""
    kind = cfg.activation
    if kind == "relu2":
        return F.relu(h_SG).square()
    if kind == "gelu":
        return F.gelu(h_SG)
    gate_SF, up_SF = glu_split(h_SG)
    if kind == "swiglu":
        return F.silu(gate_SF) * up_SF
    if kind == "geglu":
        return F.gelu(gate_SF) * up_SF
    return swiglu_oai(gate_SF, up_SF, cfg.swiglu_limit, cfg.swiglu_alpha)


def swiglu_oai(gate_SF: Tensor, up_SF: Tensor, limit: float, alpha: float) -> Tensor:
    """GPT-OSS SwiGLU: clamped gate and up, sigmoid slope alpha, times (up + 1)."""
    gate_SF = gate_SF.clamp(max=limit)
    up_SF = up_SF.clamp(min=-limit, max=limit)
    return gate_SF * torch.sigmoid(alpha * gate_SF) * (up_SF + 1)
