"""Parameter counts per component, total and active per token.

"Active" counts the weights one token's forward pass multiplies with: the
attention, norms, router, the K routed experts it is sent to, shared experts,
dense FFNs and the output head. The input embedding is a table lookup (one row
per token), so it is reported apart: ``active`` excludes it and
``active_with_embedding`` includes the whole table, the convention some model
cards use (Mixtral's 12.9B counts it; see presets.py).

Shape letters: D hidden, F expert hidden, E experts, K experts per token,
H query heads, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.plan.spec import ModelSpec, glu_matrices


@dataclass(frozen=True)
class ParamCounts:
    total: dict[str, int] = field(default_factory=dict)  # component -> parameters
    active: dict[str, int] = field(default_factory=dict)  # component -> per token

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def active_params(self) -> int:
        """Per-token active parameters, input embedding table excluded."""
        return sum(v for k, v in self.active.items() if k != "embedding")

    @property
    def active_with_embedding(self) -> int:
        """Counting the embedding table too (once when the head shares it)."""
        untied = self.total.get("lm_head", 0) > 0
        return self.active_params + (self.total.get("embedding", 0) if untied else 0)

    @property
    def expert_params(self) -> int:
        """Routed-expert weights: the part expert parallelism shards."""
        return self.total.get("experts", 0)

    @property
    def dense_params(self) -> int:
        return self.total_params - self.expert_params


def norm_params(spec: ModelSpec) -> int:
    """One norm over D."""
    return {"rmsnorm": 1, "layernorm": 2, "layernorm_nobias": 1, "none": 0}[spec.norm] * spec.dim


def mla_params(spec: ModelSpec) -> int:
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank q and joint kv."""
    D, H = spec.dim, spec.num_heads
    qk, rope, nope = spec.qk_head_dim, spec.qk_rope_head_dim, spec.qk_nope_head_dim
    r_q, r_kv = spec.q_lora_rank, spec.kv_lora_rank
    q = D * r_q + r_q + r_q * H * qk if r_q else D * H * qk  # (+ r_q: q_a_layernorm)
    kv = D * (r_kv + rope) + r_kv + r_kv * H * (nope + spec.v_head_dim)  # (+ kv_a_layernorm)
    return q + kv + H * spec.v_head_dim * D


def attention_params(spec: ModelSpec) -> int:
    """One attention block (self- or cross-attention)."""
    if not spec.num_heads:
        return 0
    if spec.is_mla:
        return mla_params(spec)
    D, dh = spec.dim, spec.head_size
    q, kv = spec.num_heads * dh, spec.kv_heads * dh
    n = D * q + 2 * D * kv + q * D
    if spec.attention_bias or spec.qkv_bias:
        n += q + 2 * kv
    if spec.attention_bias:
        n += D
    n += {"none": 0, "head": 2 * dh, "full": q + kv}[spec.qk_norm]
    return n + (spec.num_heads if spec.attention_sinks else 0)


def ffn_params(spec: ModelSpec, hidden: int, bias: bool) -> int:
    """One FFN D -> hidden -> D (GLU: gate and up both D x hidden)."""
    m = glu_matrices(spec.ffn_kind)
    n = m * spec.dim * hidden
    if bias:
        n += (m - 1) * hidden + spec.dim
    return n


def router_params(spec: ModelSpec) -> int:
    if spec.hash_router:
        return 0
    E, D = spec.num_experts, spec.dim
    return E * D * (2 if spec.noisy_router else 1) + (E if spec.router_bias else 0)


def shared_params(spec: ModelSpec) -> int:
    if not spec.shared_dim:
        return 0
    gate = spec.dim if spec.shared_expert_gate else 0
    return ffn_params(spec, spec.shared_dim, spec.expert_bias) + gate


def stack_counts(spec: ModelSpec, num_layers: int, cross: bool) -> dict[str, tuple[int, int]]:
    """component -> (total, active) for one stack of layers (plus its final norm)."""
    n_moe = spec.moe_layers_in(num_layers)
    n_dense = num_layers - n_moe
    attn = attention_params(spec) * (2 if cross else 1) * num_layers
    norms = ((3 if cross else 2) * num_layers + 1) * norm_params(spec)
    expert = ffn_params(spec, spec.expert_ffn_dim, spec.expert_bias)
    rel = spec.relative_attention_buckets * spec.num_heads
    return {
        "attention": (attn + rel, attn + rel),
        "norms": (norms, norms),
        "router": (router_params(spec) * n_moe,) * 2,
        "experts": (expert * spec.num_experts * n_moe, expert * spec.top_k * n_moe),
        "shared_experts": (shared_params(spec) * n_moe,) * 2,
        "dense_ffn": (ffn_params(spec, spec.dense_ffn_dim, False) * n_dense,) * 2,
    }


def count_params(spec: ModelSpec) -> ParamCounts:
    """Total and per-token active parameters of ``spec``, by component."""
    total: dict[str, int] = {}
    active: dict[str, int] = {}
    stacks = [(spec.num_layers, spec.num_encoder_layers > 0)]
    if spec.num_encoder_layers:
        stacks.append((spec.num_encoder_layers, False))
    for num_layers, cross in stacks:
        for name, (t, a) in stack_counts(spec, num_layers, cross).items():
            total[name] = total.get(name, 0) + t
            active[name] = active.get(name, 0) + a
    emb = spec.vocab_size * spec.dim
    total = {"embedding": emb, **total, "lm_head": 0 if spec.tied_embeddings else emb}
    # The head multiplies every token whether or not it shares the embedding's storage.
    active = {"embedding": 0, **active, "lm_head": emb}
    return ParamCounts(total=total, active=active)
