"""Lossless conversion between transformers MoE checkpoints and moekit's language model.

    moekit convert --to moekit HF_DIR RUN_DIR     # config.json + *.safetensors -> RUN_DIR/step_0
    moekit convert --to hf RUN_DIR HF_DIR         # and back (the same files)

Four families (``FAMILIES``): Mixtral, Qwen3-MoE (q / k RMSNorms per head, heads of
``head_dim`` wider than D / H, ``norm_topk_prob``), OLMoE (q / k RMSNorms over all
heads, top-k weights not renormalized) and Qwen2-MoE (q / k / v biases, and a shared
expert every token goes through, scaled by sigmoid(h @ shared_expert_gate)); all of them
dropless top-k softmax routers over SwiGLU experts, every layer MoE. Only tensors are
moved (no transformers import). Mixtral stores each expert as ``w1`` (gate) [F, D],
``w3`` (up) [F, D], ``w2`` (down) [D, F], the others as ``gate_proj`` / ``up_proj`` /
``down_proj`` (Qwen2-MoE's shared expert too, beside its [1, D] gate); moekit
stacks them as ``w_in`` [E, D, 2F] = [gate | up] and ``w_out`` [E, F, D]. moekit's
attention has one fused ``qkv`` [(H + 2J) Dh, D] = [q | k | v] with the checkpoint's J
key/value heads (``LMConfig.num_kv_heads``: grouped-query attention, nothing
repeated). Checkpoints converted before moekit had grouped-query attention hold J = H
copies of the key/value heads; they still convert back (the copies regrouped). The
original config.json travels inside the moekit checkpoint, so the round trip gives
back the same files. A model trained in moekit is written as the family its q / k
norms, or its shared experts and q / k / v biases, name (``check_lm``).

Shape letters: V vocabulary, D hidden, F expert hidden, E experts, H heads,
J key/value heads, Dh head size.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from moekit.config import reject
from moekit.inference.text import TOKENIZER_FILES, copy_tokenizer, find_tokenizer
from moekit.safetensors_write import DTYPE_CODES, save_file

HF_PREFIX = "model.layers"
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}  # safetensors -> torch




# -- reading a transformers directory -------------------------------------------------


def read_hf_dir(path: str | Path) -> tuple[dict[str, Any], ShardTensors]:
    """(config.json as a dict, every tensor of every *.safetensors shard by name, each
    read when it is looked up)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        reject("source", str(path), "it must be a transformers checkpoint directory holding "
              "config.json and *.safetensors")
    file = path / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reject("source", str(path), f"its {file} is unreadable or not valid JSON: {e}")
    if not isinstance(config, dict):
        reject("source", str(path), f"its {file} must hold a JSON object, not "
               f"{type(config).__name__}")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        reject("source", str(path), "it holds no *.safetensors file")
    return config, ShardTensors(shards, str(path))


class ShardTensors(Mapping):
    """The tensors of safetensors shards by name, each read from its shard when looked
    up; every shard's header is read up front. ``meta=True``: meta tensors of each
    tensor's dtype and shape, nothing read (a conversion's layout, worked out before the
    first byte is written)."""

    def __init__(self, shards: list[Path], source: str, meta: bool = False) -> None:
        self.shards, self.source, self.meta = shards, source, meta
        self.handles, self.where = [], {}
        for shard in shards:
            try:
                handle = safe_open(str(shard), framework="pt")
            except (SafetensorError, OSError) as e:
                reject("source", source, f"its shard {shard.name} is not a readable "
                       f"safetensors file (truncated or corrupt?): {e}")
            self.handles.append(handle)
            self.where.update(dict.fromkeys(handle.keys(), len(self.handles) - 1))

    def as_meta(self) -> ShardTensors:
        """The same shards (their handles, headers read once) giving meta tensors."""
        view = copy.copy(self)
        view.meta = True
        return view

    def __getitem__(self, name: str) -> Tensor:
        i = self.where[name]
        try:
            if not self.meta:
                return self.handles[i].get_tensor(name)
            part = self.handles[i].get_slice(name)
            code = part.get_dtype()
            if code not in CODE_DTYPES:
                reject("source", self.source, f"its tensor {name!r} is {code}, which is not "
                       f"allowed: moekit reads {', '.join(sorted(CODE_DTYPES))}")
            return torch.empty(part.get_shape(), dtype=CODE_DTYPES[code], device="meta")
        except (SafetensorError, OSError) as e:
            reject("source", self.source, f"its shard {self.shards[i].name} could not give "
                   f"the tensor {name!r} (truncated or corrupt?): {e}")

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


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


def _num_experts(config: dict[str, Any], fam: Family) -> int:
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
    Dh = _head_dim(config)
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


def _head_dim(config: dict[str, Any]) -> int:
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
        num_kv_heads=_kv_heads(config),
        head_dim=None if _head_dim(config) == D // H else _head_dim(config),
        qk_norm=fam.qk_norm,
        max_seq_len=config["max_position_embeddings"], ffn_dim=config[fam.ffn],
        num_experts=_num_experts(config, fam), top_k=config["num_experts_per_tok"],
        moe_every=1, router="softmax",
        # Mixtral's softmax over the chosen logits is the renormalized top-k
        renormalize=fam.model_type == "mixtral" or bool(config.get("norm_topk_prob", False)),
        aux_loss_coef=config.get("router_aux_loss_coef", 0.0),
        z_loss_coef=0.0, capacity_factor=None, jitter_eps=0.0, dense=False,
        rope_theta=float(_rope(config, fam)["rope_theta"]), norm_eps=config["rms_norm_eps"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=config.get("initializer_range", 0.02),
        # Qwen2-MoE: one gated shared expert, q / k / v biases (older configs: always)
        qkv_bias=_qkv_bias(config),
        num_shared_experts=1 if fam.shared else 0,
        shared_ffn_dim=config[fam.shared] if fam.shared else None,
        shared_expert_gate=fam.shared is not None)


def _kv_heads(config: dict[str, Any]) -> int | None:
    """LMConfig.num_kv_heads for a config: None where J = H (moekit's default)."""
    H = config["num_attention_heads"]
    J = config.get("num_key_value_heads") or H
    return None if J == H else J


# -- tensors: transformers names <-> moekit names ---------------------------------------


def _group_heads(w_HDhD: Tensor, J: int, H: int, name: str) -> Tensor:
    """Key/value heads repeated to one per query head [H*Dh, D] (moekit checkpoints
    converted before grouped-query attention: query head h read copy h of head
    h // (H / J), as transformers' repeat_kv) -> [J*Dh, D]; the copies must still be
    equal (untrained since conversion)."""
    w_JRDhD = w_HDhD.view(J, H // J, -1, w_HDhD.shape[-1])
    if not bool((w_JRDhD == w_JRDhD[:, :1]).all()):
        reject(name, "diverged key/value heads", f"num_key_value_heads={J} needs the {H // J} "
              "copies of each key/value head to be equal; convert with num_key_value_heads="
              f"{H} instead (drop it from the saved config)")
    return w_JRDhD[:, 0].reshape(-1, w_HDhD.shape[-1])


def _experts_in(t: _Reads, i: int, E: int, fam: Family) -> tuple[Tensor, Tensor, Tensor]:
    """(router [E, D], w_in [E, D, 2F], w_out [E, F, D]) of layer i (the layout is
    ``_layout``'s)."""
    stacked = f"{HF_PREFIX}.{i}.mlp.experts.gate_up_proj"
    if stacked in t:  # transformers v5 in-memory names
        w_in = t[stacked].transpose(1, 2)
        w_out = t[f"{HF_PREFIX}.{i}.mlp.experts.down_proj"].transpose(1, 2)
        return t[f"{HF_PREFIX}.{i}.mlp.gate.weight"], w_in, w_out
    p = f"{HF_PREFIX}.{i}.{fam.moe}"
    gate, up, down = fam.gate_up_down
    w_in = torch.stack([torch.cat([t[f"{p}.experts.{e}.{gate}.weight"],
                                   t[f"{p}.experts.{e}.{up}.weight"]]).t() for e in range(E)])
    w_out = torch.stack([t[f"{p}.experts.{e}.{down}.weight"].t() for e in range(E)])
    return t[f"{p}.gate.weight"], w_in, w_out


def _experts_out(router: Tensor, w_in: Tensor, w_out: Tensor, i: int,
                 layout: str, fam: Family) -> dict[str, Tensor]:
    if layout == "stacked":
        p = f"{HF_PREFIX}.{i}.mlp"
        return {f"{p}.gate.weight": router,
                f"{p}.experts.gate_up_proj": w_in.transpose(1, 2),
                f"{p}.experts.down_proj": w_out.transpose(1, 2)}
    p = f"{HF_PREFIX}.{i}.{fam.moe}"
    out = {f"{p}.gate.weight": router}
    gate_w, up_w = w_in.chunk(2, dim=-1)
    gate, up, down = fam.gate_up_down
    for e in range(w_in.shape[0]):
        out[f"{p}.experts.{e}.{gate}.weight"] = gate_w[e].t()
        out[f"{p}.experts.{e}.{down}.weight"] = w_out[e].t()
        out[f"{p}.experts.{e}.{up}.weight"] = up_w[e].t()
    return out


class _Reads:
    """The tensors of ``source`` by name, remembering which were read; a missing one is named."""

    def __init__(self, tensors: Mapping[str, Tensor], source: str) -> None:
        self.tensors, self.source = tensors, source
        self.read: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.tensors:
            reject("source", self.source, f"it has no tensor {name!r}, which its config.json "
                   "needs")
        self.read.add(name)
        return self.tensors[name]


def hf_to_moekit_tensors(config: dict[str, Any], t: Mapping[str, Tensor],
                         source: str = "tensors") -> tuple[dict[str, Tensor], str]:
    """moekit LM state dict (and the expert layout found) from a family's tensors.

    Every tensor of ``t`` must be used (a tied ``lm_head.weight`` is transformers'
    copy of the embedding, ``rotary_emb.inv_freq`` a buffer older exports saved, which
    moekit derives from the config): one the config does not account for raises
    instead of being dropped from the converted checkpoint.
    """
    reads = _Reads(t, source)
    out = dict(_converted(config, reads))
    if config.get("tie_word_embeddings"):
        out["head.weight"] = out["embed.weight"]
    _check_all_read(config, reads)
    return out, _layout(reads)


def _layout(t: _Reads) -> str:
    """The expert layout of the tensors (transformers v5's stacked names, or per expert)."""
    return "stacked" if f"{HF_PREFIX}.0.mlp.experts.gate_up_proj" in t else "per_expert"


def _converted(config: dict[str, Any], t: _Reads) -> Iterator[tuple[str, Tensor]]:
    """moekit's tensors one at a time, layer by layer (a tied head is not given: it is the
    embedding)."""
    fam, bias = family(config), _qkv_bias(config)
    yield "embed.weight", t["model.embed_tokens.weight"]
    for i in range(config["num_hidden_layers"]):
        a, b = f"{HF_PREFIX}.{i}", f"blocks.{i}"
        yield f"{b}.attn_norm.weight", t[f"{a}.input_layernorm.weight"]
        yield f"{b}.attn.qkv.weight", torch.cat([t[f"{a}.self_attn.{n}_proj.weight"]
                                                  for n in "qkv"])
        if bias:
            yield f"{b}.attn.qkv.bias", torch.cat([t[f"{a}.self_attn.{n}_proj.bias"]
                                                    for n in "qkv"])
        if fam.qk_norm != "none":
            for n in "qk":
                yield f"{b}.attn.{n}_norm.weight", t[f"{a}.self_attn.{n}_norm.weight"]
        yield f"{b}.attn.out.weight", t[f"{a}.self_attn.o_proj.weight"]
        yield f"{b}.ffn_norm.weight", t[f"{a}.post_attention_layernorm.weight"]
        router, w_in, w_out = _experts_in(t, i, _num_experts(config, fam), fam)
        yield f"{b}.ffn.router.weight", router
        yield f"{b}.ffn.experts.w_in", w_in
        yield f"{b}.ffn.experts.w_out", w_out
        if fam.shared:  # moekit's SharedExperts: w_in [D, 2F] = [gate | up], w_out [F, D]
            p = f"{a}.mlp.shared_expert"
            yield f"{b}.ffn.shared.w_in", torch.cat([t[f"{p}.gate_proj.weight"],
                                                     t[f"{p}.up_proj.weight"]]).t()
            yield f"{b}.ffn.shared.w_out", t[f"{p}.down_proj.weight"].t()
            yield f"{b}.ffn.shared.gate", t[f"{a}.mlp.shared_expert_gate.weight"]
    yield "norm.weight", t["model.norm.weight"]
    if not config.get("tie_word_embeddings"):
        yield "head.weight", t["lm_head.weight"]


def _qkv_bias(config: dict[str, Any]) -> bool:
    """Whether the checkpoint's q / k / v projections have biases (Qwen2-MoE's do, unless
    its config says qkv_bias false; configs older than the key have them)."""
    return family(config).shared is not None and bool(config.get("qkv_bias", True))


def _check_all_read(config: dict[str, Any], t: _Reads) -> None:
    derived = {n for n in t if n.endswith("rotary_emb.inv_freq")}  # older exports save it
    if config.get("tie_word_embeddings"):
        derived.add("lm_head.weight")
    unused = sorted(set(t) - t.read - derived)
    if unused:
        reject("source", t.source, f"it holds {len(unused)} tensors its config.json "
               f"(num_hidden_layers={config['num_hidden_layers']}, experts="
               f"{_num_experts(config, family(config))}) has no place for, e.g. "
               f"{unused[:5]}; converting would drop them")


def moekit_to_hf_tensors(config: dict[str, Any], s: dict[str, Tensor],
                         layout: str = "per_expert") -> dict[str, Tensor]:
    """A family's tensors (``layout`` "per_expert" as saved by transformers, or
    "stacked"). The moekit qkv holds the config's key/value heads, or one copy per query
    head (a checkpoint converted before grouped-query attention: regrouped)."""
    fam, bias = family(config), _qkv_bias(config)
    H = config["num_attention_heads"]
    J = _kv_heads(config) or H
    Dh = _head_dim(config)
    out = {"model.embed_tokens.weight": s["embed.weight"], "model.norm.weight": s["norm.weight"]}
    if not config.get("tie_word_embeddings"):
        out["lm_head.weight"] = s["head.weight"]
    for i in range(config["num_hidden_layers"]):
        a, b = f"{HF_PREFIX}.{i}", f"blocks.{i}"
        qkv = s[f"{b}.attn.qkv.weight"]
        kv = (qkv.shape[0] // Dh - H) // 2  # the checkpoint's key/value heads: J, or H
        q, k, v = qkv.split([H * Dh, kv * Dh, kv * Dh])
        if kv != J:
            k, v = (_group_heads(w, J, H, f"{b}.attn.qkv.weight") for w in (k, v))
        out[f"{a}.self_attn.q_proj.weight"] = q
        out[f"{a}.self_attn.k_proj.weight"] = k
        out[f"{a}.self_attn.v_proj.weight"] = v
        if bias:
            q, k, v = s[f"{b}.attn.qkv.bias"].split([H * Dh, J * Dh, J * Dh])
            out.update({f"{a}.self_attn.{n}_proj.bias": w for n, w in zip("qkv", (q, k, v),
                                                                          strict=True)})
        out[f"{a}.self_attn.o_proj.weight"] = s[f"{b}.attn.out.weight"]
        out[f"{a}.input_layernorm.weight"] = s[f"{b}.attn_norm.weight"]
        out[f"{a}.post_attention_layernorm.weight"] = s[f"{b}.ffn_norm.weight"]
        if fam.qk_norm != "none":
            for n in "qk":
                out[f"{a}.self_attn.{n}_norm.weight"] = s[f"{b}.attn.{n}_norm.weight"]
        out.update(_experts_out(s[f"{b}.ffn.router.weight"], s[f"{b}.ffn.experts.w_in"],
                                s[f"{b}.ffn.experts.w_out"], i, layout, fam))
        if fam.shared:
            p = f"{a}.mlp.shared_expert"
            gate_w, up_w = s[f"{b}.ffn.shared.w_in"].chunk(2, dim=-1)
            out[f"{p}.gate_proj.weight"] = gate_w.t()
            out[f"{p}.up_proj.weight"] = up_w.t()
            out[f"{p}.down_proj.weight"] = s[f"{b}.ffn.shared.w_out"].t()
            out[f"{a}.mlp.shared_expert_gate.weight"] = s[f"{b}.ffn.shared.gate"]
    return {k: v.contiguous() for k, v in out.items()}


# -- configs ----------------------------------------------------------------------------


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


def _same_model(hf_config: dict[str, Any], lm: dict[str, Any]) -> bool:
    # an LM without num_kv_heads converted from a grouped-query checkpoint before moekit
    # had grouped-query attention holds copies of its key/value heads (regrouped on the
    # way back, where they must still be equal)
    old = lm.get("num_kv_heads") is None
    return _describes(lm, lm_config(hf_config), ("num_kv_heads",) if old else ())


# -- directories ------------------------------------------------------------------------


class WriteError(OSError):
    """A write into a conversion's destination failed (a full disk, a read-only
    directory): it names the path, as the other commands' write errors do (`moekit
    convert` had printed "[Errno 28] No space left on device", no path)."""

    def __str__(self) -> str:
        return f"could not write to {self.filename}: {self.strerror}"


@contextmanager
def _writing(dst: str | Path, *sources: str | Path | None) -> Iterator[None]:
    """An OSError in the block as a WriteError naming its file, else ``dst``; one naming a
    file of ``sources`` (a tokenizer file that could not be read) is left as it is."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if e.filename is not None:
            where = Path(os.fsdecode(e.filename)).resolve()
            if any(Path(s).resolve() in (where, *where.parents) for s in sources if s):
                raise
        raise WriteError(e.errno, e.strerror or str(e), str(e.filename or dst)) from e


def hf_to_moekit(src: str | Path, dst: str | Path) -> Path:
    """Write a moekit LM checkpoint (run directory ``dst``) from a Mixtral, Qwen3-MoE,
    OLMoE or Qwen2-MoE directory, a tensor at a time: the layout is worked out from the shards'
    headers first (meta tensors: names, shapes and dtypes checked against the config,
    nothing read), then each tensor is read, converted and written, so the conversion
    holds about one layer's experts, not the model."""
    from moekit.models import LMConfig, MoETransformer
    from moekit.train.checkpoint import StreamedWeights, save_checkpoint

    config, shards = read_hf_dir(src)
    check_hf(config, src)
    lm = LMConfig.from_dict(lm_config(config))
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = MoETransformer(lm)
    meta, layout = hf_to_moekit_tensors(config, shards.as_meta(), str(src))
    try:
        model.load_state_dict(meta, strict=True, assign=True)
    except RuntimeError as e:  # shapes that do not fit the config
        reject("source", str(src), f"its tensors do not fit its config.json: {e}")
    aliases = {"head.weight": "embed.weight"} if lm.tie_embeddings else {}
    weights = StreamedWeights({k: v for k, v in meta.items() if k not in aliases},
                              lambda: _converted(config, _Reads(shards, str(src))), aliases)
    state = {"step": 0, "model_config": lm.to_dict(),
             "converted_from": {"hf_config": config, "expert_layout": layout}}
    # the tokenizer first (for `moekit generate`: dst/tokenizer, where src has one): copied
    # after the checkpoint, a failed copy had left a run without it (generate decoded its
    # ids as bytes: a ValueError) that a second `moekit convert` into dst refused to replace
    from moekit.train.rundir import clean_run_dir
    with _writing(dst, src):
        clean_run_dir(Path(dst))  # killed conversions' .step_*.tmp* (a model each) piled up
        tokenizer = copy_tokenizer(src, dst)
        try:
            return save_checkpoint(dst, model, torch.optim.SGD(model.parameters(), lr=0.0),
                                   state, weights=weights)
        except BaseException:  # no checkpoint: no tokenizer a later run in dst would take up
            if tokenizer is not None:
                shutil.rmtree(tokenizer, ignore_errors=True)
            raise


def moekit_to_hf(src: str | Path, dst: str | Path) -> Path:
    """Write a transformers directory (config.json + model.safetensors) from a moekit LM
    checkpoint: the family it was converted from, else the one ``check_lm`` names."""
    from moekit.train.checkpoint import load_checkpoint
    from moekit.train.rundir import write_files

    ckpt = load_checkpoint(src)
    lm = ckpt.state["model_config"]
    check_lm(lm)
    origin = ckpt.state.get("converted_from") or {}
    config = origin.get("hf_config")
    if config is None or not _same_model(config, lm):
        config = hf_config(lm, ckpt.model["embed.weight"].dtype)
    tensors = moekit_to_hf_tensors(config, ckpt.model, origin.get("expert_layout", "per_expert"))
    dst = Path(dst)
    tokenizer = find_tokenizer(src)  # the run's tokenizer files go back beside the model
    with _writing(dst, src, tokenizer):  # a full disk or a read-only dst: named
        made = not dst.exists()
        dst.mkdir(parents=True, exist_ok=True)
        # each file is written under a temporary name and renamed into place once all are
        # complete, so a failed write leaves no partial file (that would also block
        # `moekit convert`)
        names = [n for n in TOKENIZER_FILES if tokenizer and (tokenizer / n).is_file()]
        writers = {name: (lambda tmp, name=name: shutil.copyfile(tokenizer / name, tmp))
                   for name in names}
        # clone: q/k/v are views of one qkv tensor, and safetensors refuses shared storage
        writers["model.safetensors"] = lambda tmp: save_file(
            {k: v.clone() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        writers["config.json"] = lambda tmp: tmp.write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n")
        try:
            write_files(dst, writers, durable=True)
        except BaseException:
            if made and not any(dst.iterdir()):
                dst.rmdir()
            raise
    return dst


# -- `moekit convert` -------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("source", help="a transformers Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE "
                   "directory (config.json + *.safetensors) or a moekit run / step_* "
                   "directory")
    p.add_argument("dest", help="directory to write")
    p.add_argument("--to", choices=("moekit", "hf"), default=None,
                   help="direction (default: moekit when source has config.json, else hf)")


RUN_MARKERS = ("LATEST", "state.json", "config.json", "model.safetensors")


def check_dest(source: str | Path, dest: str | Path) -> None:
    """The output must be a new place: not the input, not inside it, not a checkpoint."""
    src, dst = Path(source).resolve(), Path(dest).resolve()
    if dst == src or src in dst.parents:
        reject("dest", str(dest), f"it must not be the source {str(source)!r} or a directory "
               "inside it")
    held = [m for m in RUN_MARKERS if (dst / m).exists()] + \
        [p.name for p in sorted(dst.glob("step_*"))[:1]]
    if held:
        reject("dest", str(dest), f"it already holds a checkpoint ({', '.join(held)}); pick a "
               "new directory")


def run(args) -> int:
    to = args.to or ("moekit" if (Path(args.source) / "config.json").is_file() else "hf")
    try:
        check_dest(args.source, args.dest)
        out = hf_to_moekit(args.source, args.dest) if to == "moekit" \
            else moekit_to_hf(args.source, args.dest)
    except (ValueError, OSError, KeyError) as e:
        print(f"moekit convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
