"""Read a model description from a file: a transformers ``config.json``, a
``ModelSpec`` dict, or a moekit ``MoEConfig`` dict (one bare MoE layer).

Transformers key names differ per family; each reader below uses the family's
own keys and, for a missing key, the default of that family's config class in
transformers 5.x (checked against 5.23), so a trimmed config.json reads the
same as the library would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moekit.config import GLU_ACTIVATIONS, MoEConfig
from moekit.plan.spec import ModelSpec, check_int, fail

HFReader = Callable[[dict[str, Any]], ModelSpec]


def _attention(c: dict[str, Any], dim: int, heads: int = 32,
               kv: int | None = None) -> dict[str, Any]:
    """Heads and head size; ``dim``: the model width already read (the family's default
    where the config omits hidden_size: 4096 here had given OLMoE head size 256)."""
    H = c.get("num_attention_heads", heads)
    check_int("num_attention_heads", H, 1)  # checked before it divides hidden_size
    head_dim = c.get("head_dim")
    if not head_dim:
        check_int("hidden_size", dim, 1)
        head_dim = dim // H
    return {"num_heads": H, "num_kv_heads": c.get("num_key_value_heads", kv) or H,
            "head_dim": head_dim}


def _either(c: dict[str, Any], key: str, alias: str, default: Any) -> Any:
    """``key`` or, absent, its alias in the family's attribute_map: transformers 5.x
    saves Qwen3-MoE's num_experts as num_local_experts (a save_pretrained config.json
    had read as the 128-expert default), and reads either name for either."""
    return c.get(key, c.get(alias, default))


def _common(c: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    return {"name": c.get("_name_or_path") or c.get("model_type", "hf"),
            "num_layers": c.get("num_hidden_layers", d["layers"]),
            "dim": c.get("hidden_size", d["dim"]),
            "vocab_size": c.get("vocab_size", d["vocab"]),
            "tied_embeddings": bool(c.get("tie_word_embeddings", False))}


def read_mixtral(c: dict[str, Any]) -> ModelSpec:
    base = _common(c, {"layers": 32, "dim": 4096, "vocab": 32000})
    return ModelSpec(**base, **_attention(c, base["dim"], 32, 8),
                     num_experts=_either(c, "num_local_experts", "num_experts", 8),
                     top_k=c.get("num_experts_per_tok", 2),
                     expert_ffn_dim=c.get("intermediate_size", 14336))


def _sparse_layout(c: dict[str, Any], num_layers: int) -> dict[str, int]:
    """Qwen-MoE's decoder_sparse_step + mlp_only_layers as a dense prefix + step."""
    step = c.get("decoder_sparse_step", 1)
    dense = sorted(c.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        fail("mlp_only_layers", dense, "the planner supports dense layers only as a prefix "
             "[0, 1, ..., n-1]")
    if dense and step != 1:
        fail("decoder_sparse_step", step, "it must be 1 when mlp_only_layers is set")
    return {"num_dense_layers": len(dense), "moe_every": step}


def read_qwen_moe(c: dict[str, Any]) -> ModelSpec:
    qwen2 = c.get("model_type") == "qwen2_moe"
    base = _common(c, {"layers": 24 if qwen2 else 48, "dim": 2048, "vocab": 151936})
    shared = c.get("shared_expert_intermediate_size", 5632) if qwen2 else 0
    return ModelSpec(
        **base, **_attention(c, base["dim"], 16 if qwen2 else 32, 16 if qwen2 else 4),
        qkv_bias=bool(c.get("qkv_bias", True)) if qwen2 else False,
        attention_bias=False if qwen2 else bool(c.get("attention_bias", False)),
        qk_norm="none" if qwen2 else "head",
        **_sparse_layout(c, base["num_layers"]),
        dense_ffn_dim=c.get("intermediate_size", 5632 if qwen2 else 6144),
        num_experts=(c.get("num_experts", 60) if qwen2  # no alias in Qwen2-MoE's config
                     else _either(c, "num_experts", "num_local_experts", 128)),
        top_k=c.get("num_experts_per_tok", 4 if qwen2 else 8),
        expert_ffn_dim=c.get("moe_intermediate_size", 1408 if qwen2 else 768),
        num_shared_experts=1 if shared else 0, shared_ffn_dim=shared,
        shared_expert_gate=bool(shared))


def read_deepseek(c: dict[str, Any]) -> ModelSpec:
    v3 = c.get("model_type") == "deepseek_v3"
    base = _common(c, {"layers": 61 if v3 else 32, "dim": 7168 if v3 else 4096,
                       "vocab": 129280 if v3 else 102400})
    moe_every = c.get("moe_layer_freq", 1)
    return ModelSpec(
        **base, num_heads=c.get("num_attention_heads", 128 if v3 else 32),
        attention_bias=bool(c.get("attention_bias", False)),
        q_lora_rank=c.get("q_lora_rank", 1536) or 0, kv_lora_rank=c.get("kv_lora_rank", 512),
        qk_rope_head_dim=c.get("qk_rope_head_dim", 64),
        qk_nope_head_dim=c.get("qk_nope_head_dim", 128),
        v_head_dim=c.get("v_head_dim", 128),
        dense_ffn_dim=c.get("intermediate_size", 18432 if v3 else 11008),
        num_dense_layers=c.get("first_k_dense_replace", 3 if v3 else 0) or 0,
        moe_every=moe_every,
        num_experts=_either(c, "n_routed_experts", "num_local_experts" if v3 else "num_experts",
                            256 if v3 else 64),
        top_k=c.get("num_experts_per_tok", 8) or 8,
        expert_ffn_dim=c.get("moe_intermediate_size", 2048 if v3 else 1407),
        num_shared_experts=c.get("n_shared_experts", 1 if v3 else 2) or 0)


def read_olmoe(c: dict[str, Any]) -> ModelSpec:
    base = _common(c, {"layers": 16, "dim": 2048, "vocab": 50304})
    return ModelSpec(**base, **_attention(c, base["dim"], 16, None), qk_norm="full",
                     attention_bias=bool(c.get("attention_bias", False)),
                     num_experts=_either(c, "num_experts", "num_local_experts", 64),
                     top_k=c.get("num_experts_per_tok", 8),
                     expert_ffn_dim=c.get("intermediate_size", 2048))


def read_gpt_oss(c: dict[str, Any]) -> ModelSpec:
    base = _common(c, {"layers": 36, "dim": 2880, "vocab": 201088})
    attn = _attention(c, base["dim"], 64, 8)
    attn["head_dim"] = c.get("head_dim", 64)
    return ModelSpec(**base, **attn, attention_bias=bool(c.get("attention_bias", True)),
                     attention_sinks=True,
                     num_experts=_either(c, "num_local_experts", "num_experts", 128),
                     top_k=c.get("num_experts_per_tok", c.get("experts_per_token", 4)),
                     expert_ffn_dim=c.get("intermediate_size", 2880), expert_bias=True,
                     router_bias=True)


def read_dbrx(c: dict[str, Any]) -> ModelSpec:
    attn, ffn = c.get("attn_config") or {}, c.get("ffn_config") or {}
    H, D = c.get("n_heads", 16), c.get("d_model", 2048)
    check_int("n_heads", H, 1)  # checked before it divides d_model
    check_int("d_model", D, 1)
    return ModelSpec(
        name=c.get("_name_or_path") or "dbrx", num_layers=c.get("n_layers", 24), dim=D,
        vocab_size=c.get("vocab_size", 32000),
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        num_heads=H, num_kv_heads=attn.get("kv_n_heads", 1), head_dim=D // H,
        norm="layernorm_nobias", num_experts=ffn.get("moe_num_experts", 4),
        top_k=ffn.get("moe_top_k", 1), expert_ffn_dim=ffn.get("ffn_hidden_size", 3584))


def read_switch(c: dict[str, Any]) -> ModelSpec:
    enc, dec = c.get("num_layers", 12), c.get("num_decoder_layers") or c.get("num_layers", 12)
    n_enc, n_dec = c.get("num_sparse_encoder_layers", 3), c.get("num_sparse_decoder_layers", 3)
    every = enc // n_enc if n_enc else enc + 1
    if (dec // n_dec if n_dec else dec + 1) != every:
        fail("num_sparse_decoder_layers", n_dec, "the planner needs encoder and decoder to "
             f"place MoE layers alike (encoder: every {every}-th)")
    return ModelSpec(
        name=c.get("_name_or_path") or "switch_transformers", num_layers=dec,
        num_encoder_layers=enc, dim=c.get("d_model", 768), vocab_size=c.get("vocab_size", 32128),
        tied_embeddings=bool(c.get("tie_word_embeddings", True)),
        num_heads=c.get("num_heads", 12), head_dim=c.get("d_kv", 64),
        relative_attention_buckets=c.get("relative_attention_num_buckets", 32),
        ffn_kind="plain", dense_ffn_dim=c.get("d_ff", 2048), moe_every=every,
        num_experts=c.get("num_experts", 8), top_k=1, expert_ffn_dim=c.get("d_ff", 2048),
        router_bias=bool(c.get("router_bias", False)))


HF_READERS: dict[str, HFReader] = {
    "mixtral": read_mixtral, "qwen2_moe": read_qwen_moe, "qwen3_moe": read_qwen_moe,
    "deepseek_v2": read_deepseek, "deepseek_v3": read_deepseek, "olmoe": read_olmoe,
    "gpt_oss": read_gpt_oss, "dbrx": read_dbrx, "switch_transformers": read_switch,
}


def from_hf_config(config: dict[str, Any]) -> ModelSpec:
    """A ModelSpec from a transformers config dict (``config.json`` contents)."""
    if not isinstance(config, dict):
        fail("config", config, "it must be a dict (the contents of a config.json)")
    model_type = config.get("model_type")
    if model_type not in HF_READERS:
        fail("model_type", model_type, f"the planner reads {', '.join(sorted(HF_READERS))}")
    return HF_READERS[model_type](config)


def capacity_factor_of(cfg: Any) -> float | None:
    """A moekit MoEConfig's / LMConfig's capacity_factor as the spec counts it, C =
    ceil(factor * T * K / E): expert choice's C is ceil(capacity_factor * T / E)
    (MoEConfig.capacity), the factor / K here."""
    factor = cfg.capacity_factor
    if factor is None or cfg.router != "expert_choice":
        return factor
    return factor / cfg.top_k


def from_moe_config(cfg: MoEConfig, num_layers: int = 1) -> ModelSpec:
    """One bare moekit MoE layer (no attention, norms or embeddings), repeated."""
    return ModelSpec(
        name="moekit.MoE", num_layers=num_layers, dim=cfg.dim, norm="none",
        ffn_kind="glu" if cfg.activation in GLU_ACTIVATIONS else "plain",
        num_experts=cfg.num_experts, top_k=cfg.top_k, expert_ffn_dim=cfg.ffn_dim,
        expert_bias=cfg.expert_bias, num_shared_experts=cfg.num_shared_experts,
        shared_ffn_dim=cfg.shared_dim, shared_expert_gate=cfg.shared_expert_gate,
        noisy_router=cfg.router == "noisy_topk", hash_router=cfg.router == "hash",
        capacity_factor=capacity_factor_of(cfg))


def from_lm_config(cfg: Any) -> ModelSpec:
    """The moekit language model (moekit.models.LMConfig): RMSNorm pre-norm blocks,
    fused qkv (heads of ``head_size``, its biases and q / k norms where the config has
    them), SwiGLU experts and shared experts, dense layers of ``active_ffn_dim`` between
    MoE layers."""
    dense_ffn = cfg.active_ffn_dim
    return ModelSpec(
        name="moekit-lm", num_layers=cfg.num_layers, dim=cfg.dim, vocab_size=cfg.vocab_size,
        tied_embeddings=cfg.tie_embeddings, num_heads=cfg.num_heads,
        num_kv_heads=cfg.kv_heads, head_dim=cfg.head_size, qk_norm=cfg.qk_norm,
        qkv_bias=cfg.qkv_bias, dense_ffn_dim=dense_ffn,
        num_dense_layers=cfg.num_layers if cfg.dense else 0,
        moe_every=cfg.moe_every, num_experts=1 if cfg.dense else cfg.num_experts,
        top_k=1 if cfg.dense else cfg.top_k, expert_ffn_dim=cfg.ffn_dim,
        num_shared_experts=0 if cfg.dense else cfg.num_shared_experts,
        shared_ffn_dim=0 if cfg.dense else cfg.shared_dim,
        shared_expert_gate=cfg.shared_expert_gate and not cfg.dense,
        noisy_router=cfg.router == "noisy_topk", hash_router=cfg.router == "hash",
        capacity_factor=None if cfg.dense else capacity_factor_of(cfg))


def spec_from_dict(data: dict[str, Any]) -> ModelSpec:
    """Recognise a transformers config, a ModelSpec, a moekit LMConfig or MoEConfig dict."""
    if "model_type" in data:
        return from_hf_config(data)
    if "model_config" in data and isinstance(data["model_config"], dict):  # state.json
        data = data["model_config"]
    if "num_layers" in data and "ffn_dim" in data:
        from moekit.models.config import LMConfig  # the planner sits above the models
        return from_lm_config(LMConfig.from_dict(data))
    if "num_layers" in data and "dim" in data:
        return ModelSpec.from_dict(data)
    if "dim" in data and "ffn_dim" in data:
        return from_moe_config(MoEConfig.from_dict(data))
    fail("config", sorted(data)[:8], "a transformers config.json (with model_type), a "
         "ModelSpec dict (num_layers, dim, ...) or a moekit MoEConfig dict (dim, ffn_dim, ...)")


HF_CONFIG = "config.json"


def model_file(path: str | Path) -> Path:
    """The JSON file a model path names: the file itself, a moekit checkpoint / run
    directory's state.json, or a transformers model directory's config.json (what
    save_pretrained writes and a downloaded model holds; it had been refused as "no
    state.json or LATEST there")."""
    p = Path(path)
    if not p.is_dir():
        return p
    from moekit.train.checkpoint import LATEST, STATE_FILE, CheckpointError, resolve
    if (p / STATE_FILE).exists() or (p / LATEST).exists():
        return resolve(p) / STATE_FILE
    if (p / HF_CONFIG).is_file():
        return p / HF_CONFIG
    try:
        return resolve(p) / STATE_FILE  # raises, naming what the directory is instead
    except CheckpointError as e:
        raise CheckpointError(f"{e} (or a transformers model directory: no {HF_CONFIG} "
                              "there either)") from None


def read_spec_file(path: str | Path) -> ModelSpec:
    """A JSON file, a moekit checkpoint / run directory (its state.json) or a
    transformers model directory (its config.json)."""
    p = model_file(path)
    if not p.is_file():
        fail("config", str(path), "it must be a preset name or an existing JSON file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config={str(path)!r} is not allowed: it is not valid JSON "
                         f"({e})") from None
    if not isinstance(data, dict):
        fail("config", str(path), "the JSON file must hold an object")
    return spec_from_dict(data)
