"""A model described by its shapes only, independent of any torch module.

``ModelSpec`` holds what the planner needs to count parameters, FLOPs, memory
and communication of a (MoE) transformer: the attention (grouped-query or
DeepSeek's multi-head latent attention), which layers are MoE, the experts and
shared experts, embeddings, and an optional encoder stack (Switch / T5).

Shape letters: D hidden, F expert hidden, E experts, K experts per token,
H query heads, V vocabulary, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from moekit.config import FrozenConfig, check_bool, check_number

Norm = Literal["rmsnorm", "layernorm", "layernorm_nobias", "none"]
NORMS: tuple[str, ...] = Norm.__args__  # type: ignore[attr-defined]
QKNorm = Literal["none", "head", "full"]  # per head-dim (Qwen3) or over all heads (OLMoE)
QK_NORMS: tuple[str, ...] = QKNorm.__args__  # type: ignore[attr-defined]
FFNKind = Literal["glu", "plain"]  # GLU: gate+up+down (3 matrices); plain: up+down
FFN_KINDS: tuple[str, ...] = FFNKind.__args__  # type: ignore[attr-defined]


def fail(name: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(name, value, f"it must be an int >= {minimum}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        fail(name, value, f"it must be one of {', '.join(allowed)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec(FrozenConfig):
    """Shapes of a decoder-only (optionally encoder-decoder) MoE transformer."""

    name: str = "custom"
    num_layers: int  # L, decoder layers (the only stack unless num_encoder_layers > 0)
    dim: int  # D
    vocab_size: int = 0  # V; 0 = no embedding / head (a bare MoE layer)
    tied_embeddings: bool = False

    # attention (num_heads = 0: no attention, a bare MoE layer)
    num_heads: int = 0  # H
    num_kv_heads: int | None = None  # default H (multi-head)
    head_dim: int | None = None  # default D // H
    attention_bias: bool = False  # biases on q, k, v and o (GPT-OSS) projections
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    qk_norm: QKNorm = "none"
    attention_sinks: bool = False  # one learned logit per head (GPT-OSS)
    # multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank > 0 turns it on
    q_lora_rank: int = 0  # 0: q is a plain D -> H*(nope+rope) projection
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    norm: Norm = "rmsnorm"

    # feed-forward: which layers are MoE
    ffn_kind: FFNKind = "glu"
    dense_ffn_dim: int = 0  # F of the dense FFN in non-MoE layers
    num_dense_layers: int = 0  # the first layers are dense (DeepSeek first_k_dense_replace)
    moe_every: int = 1  # after those, every moe_every-th layer is MoE (Switch: 2)

    # experts
    num_experts: int = 1  # E
    top_k: int = 1  # K
    expert_ffn_dim: int = 0  # F
    expert_bias: bool = False  # biases on both expert projections (GPT-OSS)
    num_shared_experts: int = 0
    shared_ffn_dim: int = 0  # total hidden size of the shared experts; 0 = n * F
    shared_expert_gate: bool = False  # sigmoid(x @ w) scale on the shared output (Qwen2-MoE)
    router_bias: bool = False  # GPT-OSS
    noisy_router: bool = False  # a second [E, D] noise projection (noisy top-k)
    hash_router: bool = False  # no router weights at all
    # capacity mode (MoEConfig.capacity_factor): each expert takes C = ceil(capacity_factor
    # * T * K / E) rows of a rank's T tokens; None = dropless
    capacity_factor: float | None = None

    # encoder stack (Switch / T5): decoder layers then also hold cross-attention
    num_encoder_layers: int = 0
    relative_attention_buckets: int = 0  # T5 relative position bias, per stack, per head

    def __post_init__(self) -> None:
        for name in ("num_layers", "dim"):
            check_int(name, getattr(self, name), 1)
        for name in ("vocab_size", "num_heads", "q_lora_rank", "kv_lora_rank",
                     "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "dense_ffn_dim",
                     "num_dense_layers", "expert_ffn_dim", "num_shared_experts",
                     "shared_ffn_dim", "num_encoder_layers", "relative_attention_buckets"):
            check_int(name, getattr(self, name), 0)
        for name in ("moe_every", "num_experts", "top_k"):
            check_int(name, getattr(self, name), 1)
        for name in ("tied_embeddings", "attention_bias", "qkv_bias", "attention_sinks",
                     "expert_bias", "shared_expert_gate", "router_bias", "noisy_router",
                     "hash_router"):
            check_bool(name, getattr(self, name))
        check_choice("norm", self.norm, NORMS)
        check_choice("qk_norm", self.qk_norm, QK_NORMS)
        check_choice("ffn_kind", self.ffn_kind, FFN_KINDS)
        if self.top_k > self.num_experts:
            fail("top_k", self.top_k, f"it must be between 1 and num_experts={self.num_experts}")
        if self.capacity_factor is not None:  # MoEConfig's bound: E already keeps every row
            check_number("capacity_factor", self.capacity_factor, 0, self.num_experts,
                         low_open=True)
        self._check_attention()
        self._check_ffn()

    def _check_attention(self) -> None:
        if self.num_kv_heads is not None:
            check_int("num_kv_heads", self.num_kv_heads, 1)
            if self.num_heads and self.num_heads % self.num_kv_heads:
                fail("num_kv_heads", self.num_kv_heads,
                     f"it must divide num_heads={self.num_heads}")
        if self.head_dim is not None:
            check_int("head_dim", self.head_dim, 1)
        if self.num_heads and self.head_dim is None and not self.is_mla \
                and self.dim % self.num_heads:
            fail("head_dim", None, f"give it explicitly: dim={self.dim} is not a multiple "
                 f"of num_heads={self.num_heads}")
        if self.is_mla and not (self.qk_nope_head_dim + self.qk_rope_head_dim
                                and self.v_head_dim):
            fail("v_head_dim", self.v_head_dim, "multi-head latent attention (kv_lora_rank > 0)"
                 " needs v_head_dim > 0 and qk_nope_head_dim + qk_rope_head_dim > 0")

    def _check_ffn(self) -> None:
        if self.num_moe_layers and not self.expert_ffn_dim:
            fail("expert_ffn_dim", self.expert_ffn_dim, "MoE layers need expert_ffn_dim > 0")
        if self.num_layers - self.num_moe_layers and not self.dense_ffn_dim:
            fail("dense_ffn_dim", self.dense_ffn_dim,
                 f"{self.num_layers - self.num_moe_layers} dense layers need dense_ffn_dim > 0")
        if self.num_dense_layers > self.num_layers:
            fail("num_dense_layers", self.num_dense_layers,
                 f"it must be <= num_layers={self.num_layers}")

    # -- derived -----------------------------------------------------------------

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or (self.dim // self.num_heads if self.num_heads else 0)

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head (MLA: nope + rope parts)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_size

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.is_mla else self.head_size

    @property
    def shared_dim(self) -> int:
        return self.shared_ffn_dim or self.num_shared_experts * self.expert_ffn_dim

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (0-based) of a stack: MoE after the dense prefix, every moe_every-th."""
        if i < self.num_dense_layers:
            return False
        return (i - self.num_dense_layers) % self.moe_every == self.moe_every - 1

    def moe_layers_in(self, num_layers: int) -> int:
        return sum(self.is_moe_layer(i) for i in range(num_layers))

    @property
    def num_moe_layers(self) -> int:
        """MoE layers over all stacks (encoder and decoder)."""
        return self.moe_layers_in(self.num_layers) + self.moe_layers_in(self.num_encoder_layers)

    @property
    def total_layers(self) -> int:
        return self.num_layers + self.num_encoder_layers



def glu_matrices(kind: str) -> int:
    """Weight matrices of D x F in one FFN: 3 for GLU (gate, up, down), 2 otherwise."""
    return 3 if kind == "glu" else 2
