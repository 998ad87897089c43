"""`moekit convert`'s configs: the transformers MoE families it reads (``FAMILIES``),
what a config.json must say for moekit's language model to represent it exactly
(``check_hf``), its LMConfig fields (``lm_config``), and back: the family and
config.json of a moekit LM (``check_lm``, ``hf_config``).

Shape letters: D hidden, F expert hidden, E experts, K experts per token, H heads,
J key/value heads, Dh head size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.config import reject

# -- config.json -> LMConfig ---------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What differs between the transformers MoE checkpoints moekit converts."""

    model_type: str
    architecture: str
    experts: tuple[str, ...]  # config keys naming E (the first present)
    ffn: str  # the config key of F, one expert's hidden size
    qk_norm: str  # LMConfig.qk_norm: the family's q / k norms
    rope_theta: float  # transformers' default where the config names none
    # per-expert tensors: layer.{moe}.experts.{e}.{gate | up | down}.weight
    moe: str
    gate_up_down: tuple[str, str, str]
    # a gated shared expert (layer.mlp.shared_expert.*, mlp.shared_expert_gate) and the
    # config key of its hidden size; q / k / v biases where the config's qkv_bias says
    shared: str | None = None


FAMILIES = {f.model_type: f for f in (
    Family("mixtral", "MixtralForCausalLM", ("num_local_experts",), "intermediate_size",
           "none", 1e6, "block_sparse_moe", ("w1", "w3", "w2")),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", ("num_experts", "num_local_experts"),
           "moe_intermediate_size", "head", 1e4, "mlp", ("gate_proj", "up_proj", "down_proj")),
    Family("olmoe", "OlmoeForCausalLM", ("num_experts", "num_local_experts"),
           "intermediate_size", "full", 1e4, "mlp", ("gate_proj", "up_proj", "down_proj")),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", ("num_experts",), "moe_intermediate_size",
           "none", 1e4, "mlp", ("gate_proj", "up_proj", "down_proj"),
           "shared_expert_intermediate_size"),
)}

# what the conversion reads from every config.json without a default (and each family's
# experts / FFN keys)
COMMON_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "num_experts_per_tok", "rms_norm_eps")


def family(config: dict[str, Any]) -> Family:
    kind = config.get("model_type")
    if kind not in FAMILIES:
        reject("model_type", kind, "moekit convert reads Mixtral, Qwen3-MoE, OLMoE and "
               "Qwen2-MoE checkpoints (model_type one of "
               f"{', '.join(map(repr, FAMILIES))})")
    return FAMILIES[kind]


def num_experts(config: dict[str, Any], fam: Family) -> int:
    return next(config[k] for k in fam.experts if k in config)


def check_hf(config: dict[str, Any], source: str | Path = ".") -> None:
    """Refuse what moekit's language model cannot represent exactly (``source``: the
    directory holding the config.json, named in errors)."""
    fam = family(config)
    missing = [k for k in (*COMMON_KEYS, fam.ffn, *filter(None, [fam.shared]))
               if k not in config]
    if not any(k in config for k in fam.experts):
        missing.append(fam.experts[0])
    if missing:
        reject("source", str(source), f"its {Path(source) / 'config.json'} lacks the key"
               f"{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}, which "
               f"a {fam.model_type} config.json must hold")
    D, H = config["hidden_size"], config["num_attention_heads"]
    Dh = head_dim(config)
    checks = [
        ("hidden_act", config.get("hidden_act", "silu"), "silu", "moekit's experts are SwiGLU"),
        ("rope_type", _rope(config, fam)["rope_type"], "default",
         "moekit's language model uses plain rotary embeddings (no rope_scaling)"),
        ("attention_bias", config.get("attention_bias", False), False,
         "moekit's attention projections have no bias"),
        ("use_sliding_window", config.get("use_sliding_window", False), False,
         "moekit's attention is full causal"),
        ("clip_qkv", config.get("clip_qkv"), None, "moekit does not clamp q / k / v"),
        ("decoder_sparse_step", config.get("decoder_sparse_step", 1), 1,
         "every moekit layer of a converted model is an MoE layer"),
        ("mlp_only_layers", config.get("mlp_only_layers") or [], [],
         "every moekit layer of a converted model is an MoE layer"),
    ]
    if fam.qk_norm == "full":  # OLMoE's q norm is over hidden_size: H Dh must be D
        checks.append(("head_dim", Dh, D // H, f"an OLMoE head must be hidden_size / "
                       f"num_attention_heads = {D // H}"))
    for name, value, want, why in checks:
        if value != want:
            reject(name, value, why)
    if not isinstance(Dh, int) or Dh <= 0 or Dh % 2:
        reject("head_dim", Dh, "it must be a positive even integer (rotary rotates pairs)")
    window = config.get("sliding_window")
    if fam.model_type == "mixtral" and window is not None \
            and window < config["max_position_embeddings"]:
        reject("sliding_window", window, "moekit's attention is full causal: it must be None "
              "or >= max_position_embeddings")


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope(config: dict[str, Any], fam: Family) -> dict[str, Any]:
    """The rotary settings transformers reads from ``config``: an older config.json's
    ``rope_scaling`` (its type under "type" or "rope_type") wins over ``rope_parameters``,
    and ``rope_theta`` beside it fills in the base, as transformers'
    ``convert_rope_params_to_dict`` does."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        reject("rope_scaling", rope, "it must be a JSON object (or null)")
    rope = dict(rope)
    rope.setdefault("rope_theta", config.get("rope_theta", fam.rope_theta))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def lm_config(config: dict[str, Any]) -> dict[str, Any]:
    """moekit LMConfig fields for a Mixtral / Qwen3-MoE / OLMoE / Qwen2-MoE config.

    A config written by ``moekit_to_hf`` also keeps the LM's own config under
    "moekit_lm_config" (training-only fields such as ``z_loss_coef`` that transformers
    has no name for); it is used when it still describes the same model.
    """
    mapped = _mapped_lm_config(config)
    saved = config.get("moekit_lm_config")
    if isinstance(saved, dict) and _describes(saved, mapped, TRAINING_ONLY):
        return dict(saved)
    return mapped


def _describes(lm: dict[str, Any], mapped: dict[str, Any], skip: tuple[str, ...] = ()) -> bool:
    """Whether LMConfig fields ``lm`` describe the model of ``mapped`` (the fields a
    config.json maps to): equal fields (missing ones at their DEFAULTS), but for the shared
    experts, whose hidden size counts (2 shared experts of F are the one of 2F that a
    Qwen2-MoE config holds)."""
    a, b = (_shared_as_one({**DEFAULTS, **d}) for d in (lm, mapped))
    return all(a.get(k) == v for k, v in b.items() if k not in skip)


def _shared_as_one(lm: dict[str, Any]) -> dict[str, Any]:
    """``lm`` (changed in place) with its shared experts as one size, "shared_dim" (0: none)."""
    n, f = lm.pop("num_shared_experts", 0) or 0, lm.pop("shared_ffn_dim", None)
    lm["shared_dim"] = (f or n * lm.get("ffn_dim", 0)) if n else 0
    return lm


# LMConfig fields that change training, not the function the weights compute.
TRAINING_ONLY = ("aux_loss_coef", "z_loss_coef", "jitter_eps", "init_std")
# LMConfig fields newer than some saved moekit_lm_config dicts, at their defaults
DEFAULTS: dict[str, Any] = {"head_dim": None, "qk_norm": "none", "renormalize": True,
                            "qkv_bias": False, "num_shared_experts": 0,
                            "shared_ffn_dim": None, "shared_expert_gate": False}


def _mapped_lm_config(config: dict[str, Any]) -> dict[str, Any]:
    fam = family(config)
    D, H = config["hidden_size"], config["num_attention_heads"]
    return dict(
        vocab_size=config["vocab_size"], dim=D,
        num_layers=config["num_hidden_layers"], num_heads=H,
        num_kv_heads=kv_heads(config),
        head_dim=None if head_dim(config) == D // H else head_dim(config),
        qk_norm=fam.qk_norm,
        max_seq_len=config["max_position_embeddings"], ffn_dim=config[fam.ffn],
        num_experts=num_experts(config, fam), top_k=config["num_experts_per_tok"],
        moe_every=1, router="softmax",
        # Mixtral's softmax over the chosen logits is the renormalized top-k
        renormalize=fam.model_type == "mixtral" or bool(config.get("norm_topk_prob", False)),
        aux_loss_coef=config.get("router_aux_loss_coef", 0.0),
        z_loss_coef=0.0, capacity_factor=None, jitter_eps=0.0, dense=False,
        rope_theta=float(_rope(config, fam)["rope_theta"]), norm_eps=config["rms_norm_eps"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=config.get("initializer_range", 0.02),
        # Qwen2-MoE: one gated shared expert, q / k / v biases (older configs: always)
        qkv_bias=qkv_bias(config),
        num_shared_experts=1 if fam.shared else 0,
        shared_ffn_dim=config[fam.shared] if fam.shared else None,
        shared_expert_gate=fam.shared is not None)


def kv_heads(config: dict[str, Any]) -> int | None:
    """LMConfig.num_kv_heads for a config: None where J = H (moekit's default)."""
    H = config["num_attention_heads"]
    J = config.get("num_key_value_heads") or H
    return None if J == H else J


def qkv_bias(config: dict[str, Any]) -> bool:
    """Whether the checkpoint's q / k / v projections have biases (Qwen2-MoE's do, unless
    its config says qkv_bias false; configs older than the key have them)."""
    return family(config).shared is not None and bool(config.get("qkv_bias", True))


# -- LMConfig -> config.json ---------------------------------------------------------


def check_lm(lm: dict[str, Any]) -> Family:
    """The family whose config describes a moekit LM (shared experts or q / k / v biases:
    Qwen2-MoE; else by its q / k norms: none Mixtral, per head Qwen3-MoE, over all heads
    OLMoE); refuse LMs that none can describe."""
    qwen2 = bool(lm.get("num_shared_experts") or lm.get("qkv_bias"))
    fam = FAMILIES["qwen2_moe"] if qwen2 else \
        next(f for f in FAMILIES.values() if f.qk_norm == lm.get("qk_norm", "none"))
    wants = {"router": "softmax", "capacity_factor": None, "moe_every": 1, "dense": False,
             "bias_update_rate": 0.0}
    if fam.model_type == "mixtral":  # Mixtral's softmax over the chosen logits
        wants["renormalize"] = True
    if fam.model_type == "olmoe":  # its q norm is over hidden_size
        wants["head_dim"] = None
    if qwen2:  # one shared expert, always gated; no q / k norms
        wants.update(qk_norm="none", shared_expert_gate=True)
        if not lm.get("num_shared_experts"):
            reject("qkv_bias", lm.get("qkv_bias"), "a moekit model with q / k / v biases is "
                   "written as Qwen2-MoE, which needs shared experts (num_shared_experts "
                   f"= {lm.get('num_shared_experts', 0)})")
    for name, want in wants.items():
        if lm.get(name, want) != want:
            reject(name, lm.get(name), f"a {fam.model_type} checkpoint (qk_norm="
                   f"{fam.qk_norm!r}) needs {name}={want!r}")
    return fam


def hf_config(lm: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A config.json for a moekit LMConfig, of the family ``check_lm`` names."""
    fam = check_lm(lm)
    H, E, F, K = lm["num_heads"], lm["num_experts"], lm["ffn_dim"], lm["top_k"]
    config = {
        "architectures": [fam.architecture], "model_type": fam.model_type,
        "vocab_size": lm["vocab_size"], "hidden_size": lm["dim"],
        "num_hidden_layers": lm["num_layers"], "num_attention_heads": H,
        "num_key_value_heads": lm.get("num_kv_heads") or H,
        "head_dim": lm.get("head_dim") or lm["dim"] // H,
        "max_position_embeddings": lm["max_seq_len"], "num_experts_per_tok": K,
        "hidden_act": "silu", "rms_norm_eps": lm["norm_eps"],
        "tie_word_embeddings": lm["tie_embeddings"],
        "rope_parameters": {"rope_theta": lm["rope_theta"], "rope_type": "default"},
        "router_aux_loss_coef": lm["aux_loss_coef"], "initializer_range": lm["init_std"],
        "dtype": str(dtype).removeprefix("torch."), "moekit_lm_config": dict(lm),
    }
    if fam.model_type == "mixtral":
        config.update(intermediate_size=F, num_local_experts=E, router_jitter_noise=0.0,
                      sliding_window=None)
    elif fam.shared:
        config.update(num_experts=E, norm_topk_prob=lm.get("renormalize", True),
                      moe_intermediate_size=F, intermediate_size=K * F,
                      shared_expert_intermediate_size=_shared_as_one(dict(lm))["shared_dim"],
                      qkv_bias=bool(lm.get("qkv_bias")),
                      decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
                      sliding_window=None)
    else:
        config.update(num_experts=E, norm_topk_prob=lm.get("renormalize", True),
                      attention_bias=False)
        # Qwen3-MoE: dense layers (none here) would be of intermediate_size
        config.update({fam.ffn: F} if fam.model_type == "olmoe" else
                      {"moe_intermediate_size": F, "intermediate_size": K * F,
                       "decoder_sparse_step": 1, "mlp_only_layers": [],
                       "use_sliding_window": False, "sliding_window": None})
    return config


def mixtral_config(lm: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A Mixtral config.json for a moekit LMConfig without q / k norms."""
    if lm.get("qk_norm", "none") != "none":
        reject("qk_norm", lm["qk_norm"], "a Mixtral checkpoint has no q / k norms")
    return hf_config(lm, dtype)


def same_model(hf_config: dict[str, Any], lm: dict[str, Any]) -> bool:
    # an LM without num_kv_heads converted from a grouped-query checkpoint before moekit
    # had grouped-query attention holds copies of its key/value heads (regrouped on the
    # way back, where they must still be equal)
    old = lm.get("num_kv_heads") is None
    return _describes(lm, lm_config(hf_config), ("num_kv_heads",) if old else ())
