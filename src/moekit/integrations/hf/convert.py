"""Lossless conversion between a transformers Mixtral checkpoint and moekit's language model.

    moekit convert --to moekit HF_DIR RUN_DIR     # config.json + *.safetensors -> RUN_DIR/step_0
    moekit convert --to hf RUN_DIR HF_DIR         # and back (Mixtral layout, per-expert w1/w2/w3)

Only tensors are moved (no transformers import). Mixtral stores each expert as
``w1`` (gate) [F, D], ``w3`` (up) [F, D], ``w2`` (down) [D, F]; moekit stacks them
as ``w_in`` [E, D, 2F] = [gate | up] and ``w_out`` [E, F, D]. moekit's attention
has one fused ``qkv`` [(H + 2J) Dh, D] = [q | k | v] with the checkpoint's J
key/value heads (``LMConfig.num_kv_heads``: grouped-query attention, nothing
repeated). Checkpoints converted before moekit had grouped-query attention hold J = H
copies of the key/value heads; they still convert back (the copies regrouped). The
original config.json travels inside the moekit checkpoint, so the round trip gives
back the same files.

Shape letters: V vocabulary, D hidden, F expert hidden, E experts, H heads,
J key/value heads, Dh head size.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from moekit.config import reject
from moekit.safetensors_write import save_file

HF_PREFIX = "model.layers"




# -- reading a transformers directory -------------------------------------------------


def read_hf_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json as a dict, every tensor of every *.safetensors shard)."""
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
    tensors: dict[str, Tensor] = {}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        reject("source", str(path), "it holds no *.safetensors file")
    for shard in shards:
        try:
            tensors.update(load_file(str(shard)))
        except (SafetensorError, OSError) as e:
            reject("source", str(path), f"its shard {shard.name} is not a readable "
                   f"safetensors file (truncated or corrupt?): {e}")
    return config, tensors


# what the conversion reads from a Mixtral config.json without a default
MIXTRAL_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "intermediate_size", "num_local_experts",
                "num_experts_per_tok", "rms_norm_eps")


def check_mixtral(config: dict[str, Any], source: str | Path = ".") -> None:
    """Refuse what moekit's language model cannot represent exactly (``source``: the
    directory holding the config.json, named in errors)."""
    if config.get("model_type") != "mixtral":
        reject("model_type", config.get("model_type"), "moekit convert reads Mixtral-style "
              "checkpoints (model_type='mixtral')")
    missing = [k for k in MIXTRAL_KEYS if k not in config]
    if missing:
        reject("source", str(source), f"its {Path(source) / 'config.json'} lacks the key"
               f"{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}, which "
               "a Mixtral config.json must hold")
    D, H = config["hidden_size"], config["num_attention_heads"]
    checks = [
        ("hidden_act", config.get("hidden_act", "silu"), "silu", "moekit's experts are SwiGLU"),
        ("head_dim", config.get("head_dim") or D // H, D // H, f"it must be hidden_size / "
         f"num_attention_heads = {D // H}"),
        ("rope_type", _rope(config).get("rope_type", "default"), "default",
         "moekit's language model uses plain rotary embeddings"),
    ]
    for name, value, want, why in checks:
        if value != want:
            reject(name, value, why)
    window = config.get("sliding_window")
    if window is not None and window < config["max_position_embeddings"]:
        reject("sliding_window", window, "moekit's attention is full causal: it must be None "
              "or >= max_position_embeddings")


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 1e6)}


def lm_config(config: dict[str, Any]) -> dict[str, Any]:
    """moekit LMConfig fields for a Mixtral config.

    A config written by ``moekit_to_hf`` also keeps the LM's own config under
    "moekit_lm_config" (training-only fields such as ``z_loss_coef`` that Mixtral
    has no name for); it is used when it still describes the same model.
    """
    mapped = _mapped_lm_config(config)
    saved = config.get("moekit_lm_config")
    if isinstance(saved, dict) and all(saved.get(k) == v for k, v in mapped.items()
                                       if k not in TRAINING_ONLY):
        return dict(saved)
    return mapped


# LMConfig fields that change training, not the function the weights compute.
TRAINING_ONLY = ("aux_loss_coef", "z_loss_coef", "jitter_eps", "init_std")


def _mapped_lm_config(config: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vocab_size=config["vocab_size"], dim=config["hidden_size"],
        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        num_kv_heads=_kv_heads(config),
        max_seq_len=config["max_position_embeddings"], ffn_dim=config["intermediate_size"],
        num_experts=config["num_local_experts"], top_k=config["num_experts_per_tok"],
        moe_every=1, router="softmax", aux_loss_coef=config.get("router_aux_loss_coef", 0.0),
        z_loss_coef=0.0, capacity_factor=None, jitter_eps=0.0, dense=False,
        rope_theta=float(_rope(config)["rope_theta"]), norm_eps=config["rms_norm_eps"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=config.get("initializer_range", 0.02))


def _kv_heads(config: dict[str, Any]) -> int | None:
    """LMConfig.num_kv_heads for a Mixtral config: None where J = H (moekit's default)."""
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


def _experts_in(t: dict[str, Tensor], i: int, E: int) -> tuple[Tensor, Tensor, Tensor, str]:
    """(router [E, D], w_in [E, D, 2F], w_out [E, F, D], layout) of layer i."""
    stacked = f"{HF_PREFIX}.{i}.mlp.experts.gate_up_proj"
    if stacked in t:  # transformers v5 in-memory names
        w_in = t[stacked].transpose(1, 2)
        w_out = t[f"{HF_PREFIX}.{i}.mlp.experts.down_proj"].transpose(1, 2)
        return t[f"{HF_PREFIX}.{i}.mlp.gate.weight"], w_in, w_out, "stacked"
    p = f"{HF_PREFIX}.{i}.block_sparse_moe"
    w_in = torch.stack([torch.cat([t[f"{p}.experts.{e}.w1.weight"],
                                   t[f"{p}.experts.{e}.w3.weight"]]).t() for e in range(E)])
    w_out = torch.stack([t[f"{p}.experts.{e}.w2.weight"].t() for e in range(E)])
    return t[f"{p}.gate.weight"], w_in, w_out, "per_expert"


def _experts_out(router: Tensor, w_in: Tensor, w_out: Tensor, i: int,
                 layout: str) -> dict[str, Tensor]:
    if layout == "stacked":
        p = f"{HF_PREFIX}.{i}.mlp"
        return {f"{p}.gate.weight": router,
                f"{p}.experts.gate_up_proj": w_in.transpose(1, 2),
                f"{p}.experts.down_proj": w_out.transpose(1, 2)}
    p = f"{HF_PREFIX}.{i}.block_sparse_moe"
    out = {f"{p}.gate.weight": router}
    gate, up = w_in.chunk(2, dim=-1)
    for e in range(w_in.shape[0]):
        out[f"{p}.experts.{e}.w1.weight"] = gate[e].t()
        out[f"{p}.experts.{e}.w2.weight"] = w_out[e].t()
        out[f"{p}.experts.{e}.w3.weight"] = up[e].t()
    return out


class _Reads(dict):
    """The tensors of ``source`` by name, remembering which were read; a missing one is named."""

    def __init__(self, tensors: dict[str, Tensor], source: str) -> None:
        super().__init__(tensors)
        self.source = source
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> Tensor:
        if name not in self:
            reject("source", self.source, f"it has no tensor {name!r}, which its config.json "
                   "needs")
        self.read.add(name)
        return super().__getitem__(name)


def hf_to_moekit_tensors(config: dict[str, Any], t: dict[str, Tensor],
                         source: str = "tensors") -> tuple[dict[str, Tensor], str]:
    """moekit LM state dict (and the expert layout found) from Mixtral tensors.

    Every tensor of ``t`` must be used (a tied ``lm_head.weight`` is transformers'
    copy of the embedding, ``rotary_emb.inv_freq`` a buffer older exports saved, which
    moekit derives from the config): one the config does not account for raises
    instead of being dropped from the converted checkpoint.
    """
    t = _Reads(t, source)
    out = {"embed.weight": t["model.embed_tokens.weight"], "norm.weight": t["model.norm.weight"]}
    out["head.weight"] = out["embed.weight"] if config.get("tie_word_embeddings") \
        else t["lm_head.weight"]
    layout = "per_expert"
    for i in range(config["num_hidden_layers"]):
        a, b = f"{HF_PREFIX}.{i}", f"blocks.{i}"
        out[f"{b}.attn.qkv.weight"] = torch.cat([t[f"{a}.self_attn.{n}_proj.weight"]
                                                 for n in "qkv"])
        out[f"{b}.attn.out.weight"] = t[f"{a}.self_attn.o_proj.weight"]
        out[f"{b}.attn_norm.weight"] = t[f"{a}.input_layernorm.weight"]
        out[f"{b}.ffn_norm.weight"] = t[f"{a}.post_attention_layernorm.weight"]
        router, w_in, w_out, layout = _experts_in(t, i, config["num_local_experts"])
        out[f"{b}.ffn.router.weight"] = router
        out[f"{b}.ffn.experts.w_in"] = w_in
        out[f"{b}.ffn.experts.w_out"] = w_out
    derived = {n for n in t if n.endswith("rotary_emb.inv_freq")}  # older exports save it
    if config.get("tie_word_embeddings"):
        derived.add("lm_head.weight")
    unused = sorted(set(t) - t.read - derived)
    if unused:
        reject("source", source, f"it holds {len(unused)} tensors its config.json "
               f"(num_hidden_layers={config['num_hidden_layers']}, num_local_experts="
               f"{config['num_local_experts']}) has no place for, e.g. {unused[:5]}; "
               "converting would drop them")
    return out, layout


def moekit_to_hf_tensors(config: dict[str, Any], s: dict[str, Tensor],
                         layout: str = "per_expert") -> dict[str, Tensor]:
    """Mixtral tensors (``layout`` "per_expert" as saved by transformers, or "stacked").
    The moekit qkv holds the config's key/value heads, or one copy per query head (a
    checkpoint converted before grouped-query attention: regrouped)."""
    H = config["num_attention_heads"]
    J = _kv_heads(config) or H
    Dh = config["hidden_size"] // H
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
        out[f"{a}.self_attn.o_proj.weight"] = s[f"{b}.attn.out.weight"]
        out[f"{a}.input_layernorm.weight"] = s[f"{b}.attn_norm.weight"]
        out[f"{a}.post_attention_layernorm.weight"] = s[f"{b}.ffn_norm.weight"]
        out.update(_experts_out(s[f"{b}.ffn.router.weight"], s[f"{b}.ffn.experts.w_in"],
                                s[f"{b}.ffn.experts.w_out"], i, layout))
    return {k: v.contiguous() for k, v in out.items()}


# -- configs ----------------------------------------------------------------------------


def check_lm(lm: dict[str, Any]) -> None:
    """Refuse moekit LMs that a Mixtral config cannot describe."""
    wants = {"router": "softmax", "capacity_factor": None, "moe_every": 1, "dense": False,
             "bias_update_rate": 0.0}
    for name, want in wants.items():
        if lm.get(name, want) != want:
            reject(name, lm.get(name), f"a Mixtral checkpoint needs {name}={want!r}")


def mixtral_config(lm: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A Mixtral config.json for a moekit LMConfig."""
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": lm["vocab_size"], "hidden_size": lm["dim"],
        "num_hidden_layers": lm["num_layers"], "num_attention_heads": lm["num_heads"],
        "num_key_value_heads": lm.get("num_kv_heads") or lm["num_heads"],
        "max_position_embeddings": lm["max_seq_len"],
        "intermediate_size": lm["ffn_dim"], "num_local_experts": lm["num_experts"],
        "num_experts_per_tok": lm["top_k"], "hidden_act": "silu",
        "rms_norm_eps": lm["norm_eps"], "tie_word_embeddings": lm["tie_embeddings"],
        "rope_parameters": {"rope_theta": lm["rope_theta"], "rope_type": "default"},
        "router_aux_loss_coef": lm["aux_loss_coef"], "router_jitter_noise": 0.0,
        "initializer_range": lm["init_std"], "sliding_window": None,
        "dtype": str(dtype).removeprefix("torch."), "moekit_lm_config": dict(lm),
    }


def _same_model(hf_config: dict[str, Any], lm: dict[str, Any]) -> bool:
    # an LM without num_kv_heads converted from a grouped-query checkpoint before moekit
    # had grouped-query attention holds copies of its key/value heads (regrouped on the
    # way back, where they must still be equal)
    old = lm.get("num_kv_heads") is None
    return all(lm.get(k) == v for k, v in lm_config(hf_config).items()
               if not (old and k == "num_kv_heads"))


# -- directories ------------------------------------------------------------------------


def hf_to_moekit(src: str | Path, dst: str | Path) -> Path:
    """Write a moekit LM checkpoint (run directory ``dst``) from a Mixtral directory."""
    from moekit.models import LMConfig, MoETransformer
    from moekit.train.checkpoint import save_checkpoint

    config, tensors = read_hf_dir(src)
    check_mixtral(config, src)
    lm = LMConfig.from_dict(lm_config(config))
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = MoETransformer(lm)
    try:
        state_dict, layout = hf_to_moekit_tensors(config, tensors, str(src))
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:  # shapes that do not fit the config
        reject("source", str(src), f"its tensors do not fit its config.json: {e}")
    state = {"step": 0, "model_config": lm.to_dict(),
             "converted_from": {"hf_config": config, "expert_layout": layout}}
    return save_checkpoint(dst, model, torch.optim.SGD(model.parameters(), lr=0.0), state)


def moekit_to_hf(src: str | Path, dst: str | Path) -> Path:
    """Write a Mixtral directory (config.json + model.safetensors) from a moekit LM checkpoint."""
    from moekit.train.checkpoint import load_checkpoint
    from moekit.train.rundir import fsync

    ckpt = load_checkpoint(src)
    lm = ckpt.state["model_config"]
    check_lm(lm)
    origin = ckpt.state.get("converted_from") or {}
    config = origin.get("hf_config")
    if config is None or not _same_model(config, lm):
        config = mixtral_config(lm, ckpt.model["embed.weight"].dtype)
    tensors = moekit_to_hf_tensors(config, ckpt.model, origin.get("expert_layout", "per_expert"))
    dst = Path(dst)
    made = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    # each file is written under a temporary name and renamed into place once complete,
    # so a failed write leaves no partial file (that would also block `moekit convert`)
    files = {name: dst / f".{name}.tmp" for name in ("model.safetensors", "config.json")}
    try:
        # clone: q/k/v are views of one qkv tensor, and safetensors refuses shared storage
        save_file({k: v.clone() for k, v in tensors.items()}, str(files["model.safetensors"]),
                  metadata={"format": "pt"})
        files["config.json"].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, tmp in files.items():
            fsync(tmp)
            os.replace(tmp, dst / name)
    except BaseException:
        for tmp in files.values():
            tmp.unlink(missing_ok=True)
        if made and not any(dst.iterdir()):
            dst.rmdir()
        raise
    return dst


# -- `moekit convert` -------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("source", help="a transformers Mixtral directory (config.json + "
                   "*.safetensors) or a moekit run / step_* directory")
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
