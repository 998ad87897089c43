"""`moekit convert`'s tensors: a transformers directory's safetensors shards read a
tensor at a time (``read_hf_dir``, ``ShardTensors``) and each family's tensor names
and layouts mapped to moekit's and back (``hf_to_moekit_tensors``,
``moekit_to_hf_tensors``).

Shape letters: D hidden, F expert hidden, E experts, H heads, J key/value heads,
R = H / J query heads per key/value head, Dh head size.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from moekit.config import reject
from moekit.integrations.hf.convert_config import (
    Family,
    family,
    head_dim,
    kv_heads,
    num_experts,
    qkv_bias,
)
from moekit.safetensors_write import DTYPE_CODES

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


def _experts_in(t: Reads, i: int, E: int, fam: Family) -> tuple[Tensor, Tensor, Tensor]:
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


class Reads:
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
    reads = Reads(t, source)
    out = dict(converted(config, reads))
    if config.get("tie_word_embeddings"):
        out["head.weight"] = out["embed.weight"]
    _check_all_read(config, reads)
    return out, _layout(reads)


def _layout(t: Reads) -> str:
    """The expert layout of the tensors (transformers v5's stacked names, or per expert)."""
    return "stacked" if f"{HF_PREFIX}.0.mlp.experts.gate_up_proj" in t else "per_expert"


def converted(config: dict[str, Any], t: Reads) -> Iterator[tuple[str, Tensor]]:
    """moekit's tensors one at a time, layer by layer (a tied head is not given: it is the
    embedding)."""
    fam, bias = family(config), qkv_bias(config)
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
        router, w_in, w_out = _experts_in(t, i, num_experts(config, fam), fam)
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



def _check_all_read(config: dict[str, Any], t: Reads) -> None:
    derived = {n for n in t if n.endswith("rotary_emb.inv_freq")}  # older exports save it
    if config.get("tie_word_embeddings"):
        derived.add("lm_head.weight")
    unused = sorted(set(t) - t.read - derived)
    if unused:
        reject("source", t.source, f"it holds {len(unused)} tensors its config.json "
               f"(num_hidden_layers={config['num_hidden_layers']}, experts="
               f"{num_experts(config, family(config))}) has no place for, e.g. "
               f"{unused[:5]}; converting would drop them")


def moekit_to_hf_tensors(config: dict[str, Any], s: dict[str, Tensor],
                         layout: str = "per_expert") -> dict[str, Tensor]:
    """A family's tensors (``layout`` "per_expert" as saved by transformers, or
    "stacked"). The moekit qkv holds the config's key/value heads, or one copy per query
    head (a checkpoint converted before grouped-query attention: regrouped)."""
    fam, bias = family(config), qkv_bias(config)
    H = config["num_attention_heads"]
    J = kv_heads(config) or H
    Dh = head_dim(config)
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
