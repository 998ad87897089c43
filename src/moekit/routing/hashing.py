"""Hash routing (Roller et al. 2021; PanGu-Sigma's random routed experts).

A fixed, seeded table maps each token id to K distinct experts; the router has
no parameters and every chosen expert gets weight 1/K.
"""

from __future__ import annotations

import torch
from torch import Tensor


def hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int) -> Tensor:
    """int64 table [V, K]: token v goes to perm[(base_v + k) % E] for k < K."""
    gen = torch.Generator().manual_seed(seed)
    perm_E = torch.randperm(num_experts, generator=gen)
    base_V = torch.randint(num_experts, (vocab_size,), generator=gen)
    slots_VK = (base_V[:, None] + torch.arange(top_k)) % num_experts
    return perm_E[slots_VK]
