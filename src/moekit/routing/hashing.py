"""Hash routing (Roller et al. 2021; PanGu-Sigma's random routed experts).

A fixed, seeded table maps each token id to K distinct experts (a uniformly random
K-subset per id); the router has no parameters and every chosen expert gets weight
1/K. The table is a persistent buffer: a checkpoint loads its own table as saved.

Shape letters: T tokens, V token-id vocabulary, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.config import reject

# rows drawn per block: keys for 65,536 rows x 512 experts are 128 MiB of fp32
_ROWS_PER_BLOCK = 1 << 16


def hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int) -> Tensor:
    """int64 table [V, K]: each token id's K distinct experts, a uniformly random
    K-subset of the E drawn independently per id (the K smallest of E uniform keys).

    Every expert pair can co-occur, each with probability K(K-1) / (E(E-1)) per id:
    the earlier table took K consecutive entries of one permutation, so only E of the
    E(E-1)/2 pairs ever met. Deterministic in ``seed`` (a CPU generator, fixed block
    size). A model's layers pass different seeds so they route differently.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for start in range(0, vocab_size, _ROWS_PER_BLOCK):
        n = min(_ROWS_PER_BLOCK, vocab_size - start)
        keys_VE = torch.rand(n, num_experts, generator=gen)
        rows.append(keys_VE.topk(top_k, dim=1, largest=False).indices)
    return torch.cat(rows)


def is_integer(t: Tensor) -> bool:
    """Whether ``t`` holds integers: an integer dtype, not bool, float or complex."""
    return not (t.dtype == torch.bool or t.is_floating_point() or t.is_complex())


def check_integer_tensor(name: str, value: Any) -> None:
    """ValueError unless ``value`` is a tensor of an integer dtype (not bool)."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}={type(value).__name__} is not allowed: it must be an "
                         "integer torch.Tensor")
    if not is_integer(value):
        # a bool tensor used as an index is a mask; a float table loads truncated
        reject(f"{name}.dtype", value.dtype,
               "it must be an integer dtype (int64, int32, int16, int8, uint8)")


def check_id_range(name: str, values: Tensor, high: int, what: str) -> None:
    """ValueError unless every value lies in [0, high): reads them on the host."""
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= high):
        raise ValueError(f"{name} has values in [{int(values.min())}, {int(values.max())}], "
                         f"which is not allowed: they must lie in [0, {what}={high})")


def check_hash_table(table: Any, shape_VK: tuple[int, int], num_experts: int,
                     name: str = "hash_table") -> None:
    """ValueError unless ``table`` is an integer [V, K] tensor of expert ids in [0, E).

    Reads every entry (a host sync on CUDA): for load time, not for every step.
    """
    check_integer_tensor(name, table)
    if tuple(table.shape) != shape_VK:
        reject(f"{name}.shape", tuple(table.shape),
               f"it must be [hash_vocab_size, top_k] = {shape_VK}")
    check_id_range(name, table, num_experts, "num_experts")


def check_token_ids(token_ids_T: Any, num_tokens: int, vocab_size: int) -> None:
    """ValueError unless ``token_ids_T`` is an integer [T] tensor of ids in [0, V).

    The value range is read only from CPU tensors outside torch.compile: on CUDA it
    would cost a host sync every step (the MoE layer has checked the ids already).
    """
    if token_ids_T is None:
        raise ValueError("token_ids=None is not allowed: router='hash' needs the token ids "
                         "(an integer tensor shaped like x without its last dimension)")
    check_integer_tensor("token_ids_T", token_ids_T)
    if tuple(token_ids_T.shape) != (num_tokens,):
        reject("token_ids_T.shape", tuple(token_ids_T.shape),
               f"it must be (T,) = ({num_tokens},), one id per row of x_TD")
    if token_ids_T.device.type == "cpu" and not torch.compiler.is_compiling():
        check_id_range("token_ids_T", token_ids_T, vocab_size, "hash_vocab_size")


def check_table_rows(table_VK: Tensor, experts_TK: Tensor, num_experts: int) -> None:
    """The table rows of this batch, for a table changed after loading (an in-place edit,
    an assigned buffer): its dtype always, its values on the CPU only (see
    ``check_token_ids``)."""
    check_integer_tensor("hash_table", table_VK)
    if experts_TK.device.type == "cpu" and not torch.compiler.is_compiling():
        check_id_range("hash_table", experts_TK, num_experts, "num_experts")
