"""Top-k selection with one tie rule: among equal keys the lower index goes first.

``torch.topk`` breaks ties by its algorithm (on the CPU a row of 8 zeros gave
experts [6, 5], of 64 zeros [42, 43]). The decode kernel that ``MoE.infer`` routes
with (``route_sort``), the Triton routing kernel and the tests' reference all take
the lower index, so for a zero-initialised router, or a zero (padding) token with
expert biases, ``forward`` and ``infer`` sent the same token to different experts.

Shape letters: R rows, N candidates per row (experts, or tokens for expert choice),
K chosen per row.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Ties = Literal["lower", "topk"]


def top_indices(key_RN: Tensor, k: int) -> Tensor:
    """Indices [R, K] of each row's k largest keys, largest first, equal keys in index
    order; NaN counts as the largest, as in ``torch.topk`` (NaNs among themselves in
    its order).

    Rows without two equal keys among their k + 1 largest keep ``topk``'s answer; the
    others are recomputed. On the CPU outside torch.compile only when some row ties
    (one host read: no cost on untied keys), elsewhere always (no host
    synchronisation; a few [R, N] element-wise ops and a second top-k).
    """
    # Cost on untied keys: top-(k+1) and a compare, 1.03-1.65x topk's time alone
    # (T=4096: E=256 K=8, E=8 K=2); the router's forward+backward 1.01-1.03x, the
    # layer's within noise (T=4096 D=512 F=256, E=8 K=2 and E=64 K=8, one thread,
    # 7 alternated pairs in one process, 2-core Xeon at load 5)
    if k == 0:
        return key_RN.new_zeros(key_RN.shape[0], 0, dtype=torch.long)
    values_RM, index_RM = key_RN.topk(min(k + 1, key_RN.shape[-1]), dim=-1)
    tie_R1 = (values_RM[:, 1:] == values_RM[:, :-1]).any(-1, keepdim=True)
    if (key_RN.device.type == "cpu" and not torch.compiler.is_compiling()
            and not bool(tie_R1.any())):
        return index_RM[:, :k]
    kth_R1 = values_RM[:, k - 1:k]
    return torch.where(tie_R1, _lower_index_first(key_RN, kth_R1, k), index_RM[:, :k])


def _lower_index_first(key_RN: Tensor, kth_R1: Tensor, k: int) -> Tensor:
    """The k largest keys of each row, equal keys in index order (rows whose k-th key
    is NaN come out wrong, and are never taken from here: no two of their k + 1
    largest compare equal)."""
    above_RN = ~(key_RN <= kth_R1)  # NaN is above every key, as for torch.topk
    tied_RN = key_RN == kth_R1
    free_R1 = k - above_RN.sum(-1, keepdim=True)
    take_RN = above_RN | (tied_RN & (tied_RN.cumsum(-1) <= free_R1))
    # the taken indices in index order: distinct integer keys, larger for lower indices
    lower_N = torch.arange(key_RN.shape[-1], 0, -1, device=key_RN.device)
    first_RK = torch.where(take_RN, lower_N, 0).topk(k, dim=-1).indices
    # largest first; a stable sort keeps equal keys in index order
    order_RK = key_RN.gather(-1, first_RK).sort(dim=-1, descending=True, stable=True).indices
    return first_RK.gather(-1, order_RK)


def top_choice(key_RN: Tensor, k: int, ties: Ties = "lower") -> Tensor:
    """``top_indices`` for ``ties="lower"``; ``"topk"``: ``torch.topk``'s own order, for
    the Hugging Face integration, whose routers must choose as transformers' (which
    call ``torch.topk``) on tied scores too: under bf16 autocast the router's logits
    tie often, and a Qwen3-MoE patched with the lower-index rule chose other experts
    than the original (gate_up gradients 0.18 apart on a max of 1)."""
    if ties == "topk":
        return key_RN.topk(k, dim=-1).indices
    return top_indices(key_RN, k)
