"""Decoding on one machine: the memory a model and its KV cache take, and the bytes a
decode step reads, with the step time those bytes take at a memory bandwidth (the
roofline: decoding a few tokens is memory-bound, so bytes / bandwidth is the limit).

Weights as moekit stores them (``moekit.quantize`` for int8 / int4; scope "all": every
projection matrix [N, K] (attention, routed and shared experts, dense FFNs, the LM head
and, unless ``float_embeddings``, an embedding table of its own; scope "experts": the
routed experts' alone, the rest fp32) in the chosen dtype, int8 with an fp32 scale per
output row (N K + 4 N bytes), int4 with an fp32 scale and zero point per group of 64
along K (N K / 2 + 8 N K / 64); norms, routers, biases and the rest in fp32 (bf16 for
bf16 weights). MLA attention's matrices are counted as if each had D inputs. The KV
cache as ``StaticKVCache`` holds it: per layer and token 2 J Dh values (MLA: the
latent, kv_lora_rank + qk_rope_head_dim), in fp32, bf16, or int8 with an fp32 scale
per row of Dh. A step of B sequences reads every weight but the routed experts and
the embedding table, B embedding rows, the distinct experts its B K routed rows
touch in each MoE layer (expected E (1 - (1 - K / E)^B) for routing spread uniformly;
with measured ``expert_shares``, the fraction p_e of tokens each expert takes in each
layer, sum over e of 1 - (1 - p_e)^B, averaged over the layers: a model's own routing is
rarely uniform, and its skew touches fewer experts) and the whole cache of ``context``
positions.

Shape letters: D hidden, F expert hidden, S shared hidden, E experts, K experts per
token, H query heads, J key/value heads, Dh head size, V vocabulary, B batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moekit.config import check_bool
from moekit.plan.params import count_params, mla_params
from moekit.plan.spec import ModelSpec, check_int, fail, glu_matrices

WEIGHTS = ("fp32", "bf16", "int8", "int4")
SCOPES = ("all", "experts")  # moekit.quantize's: every projection, or the routed experts'
# components whose matrices moekit.quantize's scope "all" quantizes (the embedding table
# unless it is kept float; the routed experts under either scope)
DENSE_MATRICES = ("attention", "shared_experts", "dense_ffn", "lm_head")
QUANTIZED = ("int8", "int4")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8")
INT4_GROUP = 64


def matrix_bytes(n: int, k: int, weights: str, group_size: int = INT4_GROUP) -> float:
    """Bytes of one [n, k] projection matrix stored as ``weights`` (int4: a scale and a
    zero point per ``group_size`` inputs)."""
    if weights == "int8":
        return n * k + 4 * n
    if weights == "int4":
        return n * k / 2 + 8 * n * k / group_size
    return n * k * (4 if weights == "fp32" else 2)


def _matrices(spec: ModelSpec) -> dict[str, list[tuple[int, int, int]]]:
    """component -> [(count, N, K)] of its projection matrices (one stack of decoder
    layers; the routed experts' for one expert of one layer)."""
    D, L = spec.dim, spec.num_layers
    n_moe = spec.moe_layers_in(L)
    m = glu_matrices(spec.ffn_kind)  # 2 for GLU (gate and up), 1 plain

    def ffn(hidden: int) -> list[tuple[int, int, int]]:
        return [(1, (m - 1) * hidden, D), (1, D, hidden)]

    if spec.is_mla:  # counted as [params / D, D]
        attn = [(L, mla_params(spec) // D, D)] if spec.num_heads else []
    elif spec.num_heads:
        H, J, dh = spec.num_heads, spec.kv_heads, spec.head_size
        attn = [(L, (H + 2 * J) * dh, D), (L, D, H * dh)]
    else:
        attn = []
    out = {"attention": attn, "experts": ffn(spec.expert_ffn_dim),
           "shared_experts": [(n_moe * c, n, k) for c, n, k in ffn(spec.shared_dim)]
           if spec.shared_dim else [],
           "dense_ffn": [((L - n_moe) * c, n, k) for c, n, k in ffn(spec.dense_ffn_dim)]
           if spec.dense_ffn_dim and L > n_moe else [],
           "lm_head": [(1, spec.vocab_size, D)] if spec.vocab_size else []}
    out["embedding"] = [] if spec.tied_embeddings else list(out["lm_head"])
    return out


@dataclass(frozen=True)
class DecodeCost:
    """What decoding ``batch`` sequences of ``context`` positions costs (bytes; seconds
    where a bandwidth is given)."""

    name: str
    weights: str
    kv_cache_dtype: str
    batch: int
    context: int
    weight_bytes: dict[str, float]  # component -> bytes held
    kv_bytes_per_token: float  # one position of one sequence, every layer
    distinct_experts: float  # expected per MoE layer at this batch
    num_experts: int
    moe_layers: int  # 0: a dense model (moekit train --dense), no routed experts
    step_bytes: dict[str, float]  # component -> bytes one decode step reads
    bandwidth: float | None  # bytes/s
    routing: str = "uniform"  # what distinct_experts assumes: "uniform" or "measured"
    group_size: int = INT4_GROUP  # int4's inputs per scale and zero point
    scope: str = "all"  # int8 / int4: every projection, or the routed experts only
    float_embeddings: bool = False  # scope "all": an untied embedding table kept fp32

    @property
    def total_weight_bytes(self) -> float:
        return sum(self.weight_bytes.values())

    @property
    def kv_cache_bytes(self) -> float:
        return self.batch * self.context * self.kv_bytes_per_token

    @property
    def memory_bytes(self) -> float:
        return self.total_weight_bytes + self.kv_cache_bytes

    @property
    def total_step_bytes(self) -> float:
        return sum(self.step_bytes.values())

    @property
    def step_seconds(self) -> float | None:
        return None if self.bandwidth is None else self.total_step_bytes / self.bandwidth

    @property
    def tokens_per_s(self) -> float | None:
        t = self.step_seconds
        return None if t is None else self.batch / t

    def to_dict(self) -> dict:
        return {"name": self.name, "weights": self.weights,
                "kv_cache_dtype": self.kv_cache_dtype, "batch": self.batch,
                "context": self.context, "weight_bytes": self.weight_bytes,
                "total_weight_bytes": self.total_weight_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_cache_bytes": self.kv_cache_bytes, "memory_bytes": self.memory_bytes,
                "distinct_experts_per_layer": self.distinct_experts, "routing": self.routing,
                "step_bytes": self.step_bytes, "total_step_bytes": self.total_step_bytes,
                "bandwidth_Bps": self.bandwidth, "step_seconds": self.step_seconds,
                "tokens_per_s": self.tokens_per_s,
                **({"group_size": self.group_size} if self.weights == "int4" else {}),
                **({"scope": self.scope, "float_embeddings": self.float_embeddings}
                   if self.weights in QUANTIZED else {})}


def expert_shares_from_routing(routing: Any) -> list[list[float]]:
    """Each MoE layer's expert shares (the fraction of tokens each expert takes) from the
    routing statistics ``moekit analyze`` writes (its routing.json: {"meta": ..., "layers":
    [{"load": [E counts], "tokens": n, ...}, ...]})."""
    layers = routing.get("layers") if isinstance(routing, dict) else None
    if not isinstance(layers, list) or not layers:
        fail("expert_load", _short(routing), 'it must be the routing.json of moekit analyze: '
             '{"layers": [{"load": [...], "tokens": n}, ...]}')
    shares = []
    for i, layer in enumerate(layers):
        load = layer.get("load") if isinstance(layer, dict) else None
        tokens = layer.get("tokens") if isinstance(layer, dict) else None
        if (not isinstance(load, list) or isinstance(tokens, bool)
                or not isinstance(tokens, int) or tokens < 1):
            fail("expert_load", _short(layer), f'layer {i} must hold "load" (a list of '
                 'counts per expert) and "tokens" (an int >= 1)')
        shares.append([_number(c) / tokens for c in load])
    return shares


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def distinct_experts(E: int, K: int, batch: int, n_moe: int,
                     shares: Sequence[Sequence[float]] | None = None) -> float:
    """Expected distinct experts the B K routed rows of a step touch per MoE layer: E (1 -
    (1 - K / E)^B) for uniform routing, else the mean over layers of sum over e of 1 - (1 -
    p_e)^B for ``shares`` p (per layer, per expert: the fraction of tokens it takes; each
    token independent of the batch's others)."""
    if not n_moe:
        return 0.0
    if shares is None:
        return E * (1 - (1 - K / E) ** batch)
    if len(shares) != n_moe:
        fail("expert_load", f"{len(shares)} layers", f"the model has {n_moe} MoE layers")
    for i, layer in enumerate(shares):
        p = list(layer)
        if len(p) != E or not all(math.isfinite(v) and 0 <= v <= 1 for v in p):
            fail("expert_load", _short(p), f"layer {i} must give {E} shares in [0, 1], one "
                 "per expert")
        if sum(p) > K * (1 + 1e-6):
            fail("expert_load", f"layer {i}: shares summing to {sum(p):.4g}", f"a token "
                 f"takes at most K={K} experts, so the shares sum to at most {K}")
    return sum(sum(1 - (1 - v) ** batch for v in layer) for layer in shares) / n_moe


def _check_groups(mats: dict[str, list[tuple[int, int, int]]], stored: dict[str, str],
                  group_size: int) -> None:
    """int4 groups tile each matrix's input dimension K, or moekit.quantize refuses it (a
    D=32 model had been planned in groups of 64 that no quantized model can have)."""
    for comp, ms in mats.items():
        bad = sorted({k for _, _, k in ms if k % group_size})
        if stored.get(comp) == "int4" and bad:
            fail("group_size", group_size, f"it must divide the input dimension of every "
                 f"int4 matrix, as moekit.quantize requires ({comp}: {bad[0]}); one of 32, "
                 "64, 128 that does")


def decode_cost(spec: ModelSpec, weights: str = "fp32", kv_cache_dtype: str = "auto",
                batch: int = 1, context: int = 4096, bandwidth: float | None = None,
                expert_shares: Sequence[Sequence[float]] | None = None,
                group_size: int = INT4_GROUP, scope: str = "all",
                float_embeddings: bool = False) -> DecodeCost:
    """The memory and the decode step's bytes of ``spec`` (module docstring); with
    ``bandwidth`` (bytes/s) the step time at it; with ``expert_shares`` (per MoE layer, per
    expert, the fraction of tokens it takes: ``expert_shares_from_routing``) the distinct
    experts of that routing instead of a uniform one; ``group_size``: int4's (a quantized
    checkpoint's own); ``scope`` and ``float_embeddings``: what int8 / int4 cover, as
    ``moekit.quantize`` takes them."""
    if weights not in WEIGHTS:
        fail("weights", weights, f"it must be one of {', '.join(WEIGHTS)}")
    if scope not in SCOPES:
        fail("scope", scope, f"it must be one of {', '.join(SCOPES)}")
    check_bool("float_embeddings", float_embeddings)
    if weights not in QUANTIZED and (scope != "all" or float_embeddings):
        fail("scope" if scope != "all" else "float_embeddings",
             scope if scope != "all" else float_embeddings,
             f"it applies to int8 / int4 weights only, not weights={weights}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        fail("kv_cache_dtype", kv_cache_dtype, f"it must be one of {', '.join(KV_CACHE_DTYPES)}")
    if weights == "bf16" and kv_cache_dtype == "float32":
        fail("kv_cache_dtype", kv_cache_dtype, "bf16 weights (bf16 activations) keep a bf16 "
             "or int8 cache: it must be auto, bfloat16 or int8")
    check_int("batch", batch, 1)
    check_int("context", context, 1)
    if group_size not in (32, 64, 128):  # moekit.quantize's int4 group sizes
        fail("group_size", group_size, "it must be 32, 64 or 128")
    if group_size != INT4_GROUP and weights != "int4":
        fail("group_size", group_size, f"it applies to int4 weights only, not weights={weights}")
    if bandwidth is not None and (isinstance(bandwidth, bool) or not bandwidth > 0):
        fail("bandwidth", bandwidth, "it must be > 0 (bytes/s) or None")
    if spec.num_encoder_layers:
        fail("model", spec.name, "an encoder-decoder model: the decode planner covers "
             "decoder-only models")
    # a tied table is the head's (quantized as the head), as moekit.quantize has it
    float_embeddings = float_embeddings and not spec.tied_embeddings and scope == "all"
    E, K, V = spec.num_experts, spec.top_k, spec.vocab_size
    n_moe = spec.moe_layers_in(spec.num_layers)
    float_bytes = 2 if weights == "bf16" else 4
    mats = _matrices(spec)
    dense_w = weights if scope == "all" else "fp32"  # what the dense matrices are stored as
    stored = {"experts": weights, **dict.fromkeys(DENSE_MATRICES, dense_w),
              "embedding": "fp32" if float_embeddings else dense_w}
    _check_groups(mats, stored, group_size)
    held: dict[str, float] = {}
    for comp, params in count_params(spec).total.items():
        times = E * n_moe if comp == "experts" else 1  # _matrices: one expert of one layer
        in_mats = times * sum(c * n * k for c, n, k in mats.get(comp, []))
        as_mats = times * sum(c * matrix_bytes(n, k, stored.get(comp, weights), group_size)
                              for c, n, k in mats.get(comp, []))
        held[comp] = as_mats + (params - in_mats) * float_bytes
    if spec.tied_embeddings:  # the table is the head's, stored as the head: held once
        table = matrix_bytes(V, spec.dim, stored["lm_head"], group_size) if V else 0.0
        held["embedding"], held["lm_head"] = table, 0.0
    distinct = distinct_experts(E, K, batch, n_moe, expert_shares)
    kv = kv_cache_dtype if kv_cache_dtype != "auto" else (
        "bfloat16" if weights == "bf16" else "float32")
    if spec.is_mla:
        row, rows = spec.kv_lora_rank + spec.qk_rope_head_dim, 1
    else:
        row, rows = spec.head_size, 2 * spec.kv_heads
    row_bytes = {"float32": 4 * row, "bfloat16": 2 * row, "int8": row + 4}[kv]
    kv_per_token = spec.num_layers * rows * row_bytes if spec.num_heads else 0.0
    step = {"attention": held["attention"], "norms": held["norms"], "router": held["router"],
            "experts": held["experts"] * distinct / E,
            "shared_experts": held["shared_experts"], "dense_ffn": held["dense_ffn"],
            "lm_head": held["lm_head"] or held["embedding"],  # tied: the table
            "embedding": batch * held["embedding"] / V if V else 0.0,
            "kv_cache": batch * context * kv_per_token}
    return DecodeCost(name=spec.name, weights=weights, kv_cache_dtype=kv, batch=batch,
                      context=context, weight_bytes=held, kv_bytes_per_token=kv_per_token,
                      distinct_experts=distinct, num_experts=E, moe_layers=n_moe,
                      step_bytes=step,
                      bandwidth=bandwidth,
                      routing="uniform" if expert_shares is None else "measured",
                      group_size=group_size, scope=scope, float_embeddings=float_embeddings)


def decode_table(c: DecodeCost) -> str:
    """The plan as text."""
    gb = 1e9
    w = {"fp32": "fp32", "bf16": "bf16", "int8": "int8 (a scale per row)",
         "int4": f"int4 (groups of {c.group_size})"}[c.weights]
    if c.scope == "experts":
        w += ", routed experts only (the rest fp32)"
    elif c.float_embeddings:
        w += ", the embedding table fp32"
    held = ", ".join(f"{k} {v / gb:.2f}" for k, v in c.weight_bytes.items() if v)
    reads = ", ".join(f"{k} {v / gb:.3f}" for k, v in c.step_bytes.items() if v)
    # a dense model had read "experts: 0.0 of 1 per MoE layer"
    experts = (f"{c.distinct_experts:.1f} of {c.num_experts} per MoE layer, {c.routing} "
               "routing" if c.moe_layers else "none (dense model)")
    lines = [f"decode plan: {c.name}, weights {w}, KV cache {c.kv_cache_dtype}, batch "
             f"{c.batch}, context {c.context:,} positions",
             f"  weights held     {c.total_weight_bytes / gb:9.2f} GB  ({held})",
             f"  KV cache         {c.kv_cache_bytes / gb:9.2f} GB  "
             f"({c.kv_bytes_per_token / 1e3:.1f} kB per position of a sequence)",
             f"  memory           {c.memory_bytes / gb:9.2f} GB",
             f"  a step reads     {c.total_step_bytes / gb:9.3f} GB  ({reads}; experts: "
             f"{experts})"]
    if c.bandwidth is not None:
        lines.append(f"  at {c.bandwidth / gb:.1f} GB/s: {1e3 * c.step_seconds:.2f} ms a step, "
                     f"{c.tokens_per_s:.1f} tokens/s (the roofline: bytes / bandwidth)")
    return "\n".join(lines)
