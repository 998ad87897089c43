"""Frozen, validated configuration for the MoE language model.

Shape letters: V vocabulary, D model size, H attention heads, J key/value heads, Dh head
size, L layers, F expert hidden size, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.config import (
    MAX_HASH_VOCAB,
    MAX_LOSS_COEF,
    MAX_SEED,
    ROUTERS,
    FrozenConfig,
    MoEConfig,
    check_bool,
    check_choice,
    check_int_range,
    check_number,
    check_positive_int,
    reject,
)

QK_NORMS = ("none", "head", "full")  # LMConfig.qk_norm


@dataclass(frozen=True, kw_only=True, slots=True)
class LMConfig(FrozenConfig):
    """A decoder-only transformer whose FFN blocks are MoE layers.

    ``dense=True`` builds the baseline with the same active parameters per
    token: each FFN is one SwiGLU of hidden size ``top_k * ffn_dim``.
    """

    vocab_size: int = 256  # V, bytes
    dim: int = 128  # D
    num_layers: int = 4  # L
    num_heads: int = 4  # H
    # J key/value heads (grouped-query attention: query head h reads key/value head
    # h // (H / J)); None: one per query head
    num_kv_heads: int | None = None
    # Dh, the size of one head (even: rotary pairs); None: D / H. Qwen3-MoE's heads are
    # wider than D / H: q is [H Dh], the out projection [H Dh -> D].
    head_dim: int | None = None
    # RMSNorm on q and k before rotary: "head" over each head's Dh (Qwen3-MoE), "full"
    # over all H Dh of q and all J Dh of k (OLMoE), "none"
    qk_norm: str = "none"
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2-MoE)
    max_seq_len: int = 256  # longest context (rotary table size)
    ffn_dim: int = 256  # F, hidden size of one expert
    num_experts: int = 8  # E
    top_k: int = 2  # K
    moe_every: int = 1  # an MoE FFN on every N-th layer (others dense with hidden K*F)
    router: str = "softmax"
    # the K chosen weights renormalized to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob);
    # False: the router's probabilities as they are (OLMoE)
    renormalize: bool = True
    # group-limited routing (DeepSeek-V3): the E experts split into num_groups groups of
    # E / G; each token picks its K experts from its best topk_groups groups only (group
    # score: softmax its best expert, sigmoid its best two). router softmax or sigmoid;
    # 1 = no groups (and the value of checkpoints saved before these fields)
    num_groups: int = 1  # G
    topk_groups: int = 1
    # router="hash": the model's base seed; MoE layer l draws its token-id table with
    # seed hash_seed + l, so the layers route differently (a checkpoint keeps its tables)
    hash_seed: int = 0
    # shared experts in every MoE layer: a dense SwiGLU every token goes through, of hidden
    # size shared_ffn_dim (None: num_shared_experts * F), its output scaled by
    # sigmoid(h @ w) with shared_expert_gate (Qwen2-MoE), added to the routed experts'
    num_shared_experts: int = 0
    shared_ffn_dim: int | None = None
    shared_expert_gate: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    bias_update_rate: float = 0.0  # aux-loss-free balancing (driven by the trainer)
    capacity_factor: float | None = None  # None = dropless
    jitter_eps: float = 0.0
    dense: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len",
                     "ffn_dim", "num_experts", "top_k", "moe_every", "num_groups",
                     "topk_groups"):
            check_positive_int(name, getattr(self, name))
        if not self.dense and self.moe_every > self.num_layers:
            reject("moe_every", self.moe_every, f"it must be <= num_layers={self.num_layers}: "
                   "otherwise no layer is an MoE layer (dense=True builds a dense model)")
        if self.head_dim is not None:
            check_positive_int("head_dim", self.head_dim)
            if self.head_dim % 2:
                reject("head_dim", self.head_dim, "it must be even (rotary rotates pairs)")
        elif self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            reject("num_heads", self.num_heads,
                  f"dim={self.dim} must split into num_heads heads of even size (or give "
                  "head_dim)")
        check_choice("qk_norm", self.qk_norm, QK_NORMS)
        if self.num_kv_heads is not None:
            check_positive_int("num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                reject("num_kv_heads", self.num_kv_heads,
                       f"it must divide num_heads={self.num_heads}")
        if self.router not in ROUTERS:
            reject("router", self.router, f"it must be one of {', '.join(ROUTERS)}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            check_number(name, getattr(self, name), 0, MAX_LOSS_COEF)
        check_number("bias_update_rate", self.bias_update_rate, 0, 1)
        check_int_range("hash_seed", self.hash_seed, 0, MAX_SEED)
        check_number("jitter_eps", self.jitter_eps, 0, 1, high_open=True)
        check_number("init_std", self.init_std, 0, 1)
        check_number("rope_theta", self.rope_theta, 0, 1e12, low_open=True)
        check_number("norm_eps", self.norm_eps, 0, 1, low_open=True)
        for name in ("dense", "tie_embeddings", "renormalize", "qkv_bias"):
            check_bool(name, getattr(self, name))
        if self.capacity_factor is not None:
            check_number("capacity_factor", self.capacity_factor, 0, self.num_experts,
                         low_open=True)
        if self.router == "hash" and not self.dense and self.vocab_size > MAX_HASH_VOCAB:
            # the hash table has a row per token id: was blamed on hash_vocab_size, which
            # LMConfig has no field for
            reject("vocab_size", self.vocab_size,
                   f"it must be <= {MAX_HASH_VOCAB} with router='hash' (one table row per id)")
        if not self.dense:
            self.moe_config(0)  # MoEConfig validates top_k, router, capacity, ...
        else:  # the shared experts' fields, which the dense FFN's size counts
            MoEConfig(dim=self.dim, ffn_dim=self.ffn_dim,
                      num_shared_experts=self.num_shared_experts,
                      shared_ffn_dim=self.shared_ffn_dim,
                      shared_expert_gate=self.shared_expert_gate)

    def is_moe_layer(self, layer: int) -> bool:
        """Layers moe_every-1, 2*moe_every-1, ... are MoE (all layers when moe_every=1)."""
        return not self.dense and (layer + 1) % self.moe_every == 0

    @property
    def kv_heads(self) -> int:
        """J: key/value heads (``num_kv_heads``, or one per query head)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        """Dh: ``head_dim``, or D / H."""
        return self.dim // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def shared_dim(self) -> int:
        """Hidden size of one MoE layer's shared experts (0: none)."""
        return self.shared_ffn_dim or self.num_shared_experts * self.ffn_dim

    @property
    def active_ffn_dim(self) -> int:
        """Hidden size of the dense FFN with the same active parameters per token (the K
        routed experts and the shared ones)."""
        return self.top_k * self.ffn_dim + self.shared_dim

    def moe_config(self, layer: int) -> MoEConfig:
        """Layer ``layer``'s MoE: every layer alike but for its hash seed (router='hash'
        draws each layer's table from hash_seed + layer, wrapped into [0, 2^63))."""
        return MoEConfig(
            dim=self.dim, ffn_dim=self.ffn_dim, num_experts=self.num_experts,
            top_k=self.top_k, router=self.router, renormalize=self.renormalize,
            num_groups=self.num_groups, topk_groups=self.topk_groups,
            aux_loss_coef=self.aux_loss_coef,
            z_loss_coef=self.z_loss_coef, bias_update_rate=self.bias_update_rate,
            capacity_factor=self.capacity_factor, jitter_eps=self.jitter_eps,
            num_shared_experts=self.num_shared_experts, shared_ffn_dim=self.shared_ffn_dim,
            shared_expert_gate=self.shared_expert_gate,
            hash_vocab_size=self.vocab_size if self.router == "hash" else None,
            hash_seed=(self.hash_seed + layer) % (MAX_SEED + 1))



PRESETS: dict[str, LMConfig] = {
    # seconds per test on 2 CPU cores
    "tiny": LMConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=64, ffn_dim=32,
                     num_experts=4, top_k=2),
    # the default `moekit train` run; sized so ~10 minutes on 2 CPU cores learns visibly
    "small": LMConfig(dim=128, num_layers=4, num_heads=4, max_seq_len=256, ffn_dim=256,
                      num_experts=8, top_k=2),
}


def preset(name: str, **changes: Any) -> LMConfig:
    check_choice("preset", name, tuple(PRESETS))  # a list name: no unhashable TypeError
    return PRESETS[name].replace(**changes)
