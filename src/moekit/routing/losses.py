"""Load-balancing and stability losses; pure functions of the routing decision.

Shape letters: T tokens, E experts, K experts per token, B sequences, L tokens
per sequence (T = B*L).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _assignment_fraction(experts_TK: Tensor, num_experts: int,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Fraction of the T*K (token, slot) assignments that went to each expert, in
    ``dtype`` (the probabilities': fp64 for an fp64 layer, whose loss fp32 fractions
    such as 1/20 rounded at ~1e-9)."""
    counts_E = torch.zeros(num_experts, device=experts_TK.device, dtype=dtype)
    counts_E.scatter_add_(0, experts_TK.reshape(-1),
                          torch.ones(experts_TK.numel(), device=experts_TK.device, dtype=dtype))
    return counts_E / max(experts_TK.numel(), 1)


def _count_dtype(probs: Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 probabilities (bf16 counts stop counting past 256)."""
    return torch.promote_types(probs.dtype, torch.float32)


def _mean_over_tokens(x_T: Tensor) -> Tensor:
    """Mean over dim 0 that is 0 (not NaN) for zero tokens, so an empty batch adds no loss."""
    return x_T.sum(0) / max(x_T.shape[0], 1)


def switch_aux_loss(probs_TE: Tensor, experts_TK: Tensor) -> Tensor:
    """Switch/GShard balance loss: E * sum_e f_e * P_e (1.0 when perfectly balanced).

    f_e (fraction of assignments, not differentiable) times P_e (mean router
    probability, differentiable).
    """
    E = probs_TE.shape[-1]
    f_E = _assignment_fraction(experts_TK, E, _count_dtype(probs_TE))
    return E * (f_E * _mean_over_tokens(probs_TE)).sum()


def seq_aux_loss(probs_BLE: Tensor, experts_BLK: Tensor) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the B sequences.

    Per sequence: sum_e (E / (K L) * count_e) * mean_l(p_le), which is the
    Switch loss computed within one sequence.
    """
    E = probs_BLE.shape[-1]
    B, L, K = experts_BLK.shape
    if B * L == 0:  # no tokens: no imbalance to penalise (and no E / (K * 0))
        return probs_BLE.sum() * 0.0
    dtype = _count_dtype(probs_BLE)
    counts_BE = torch.zeros(B, E, device=probs_BLE.device, dtype=dtype)
    counts_BE.scatter_add_(1, experts_BLK.reshape(B, L * K),
                           torch.ones(B, L * K, device=probs_BLE.device, dtype=dtype))
    f_BE = counts_BE * (E / (K * L))
    return (f_BE * probs_BLE.mean(1)).sum(-1).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return _mean_over_tokens(torch.logsumexp(logits_TE, dim=-1).square())
