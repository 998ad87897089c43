"""moekit.plan's checks that no test reached (plan/spec.py lines 122-142, plan/decode.py
153, 225-243 and the decode table's scope lines 297-299 had 0 hits under coverage): each
bad value raises ValueError naming the argument, its value and what is allowed, and the
decode table says what int8 / int4 cover."""

from __future__ import annotations

import pytest

from moekit.models.config import LMConfig
from moekit.plan import ModelSpec
from moekit.plan.decode import decode_cost, decode_table, expert_shares_from_routing
from moekit.plan.hf import from_lm_config

BASE = dict(num_layers=2, dim=64, num_heads=4, vocab_size=100, num_experts=4, top_k=2,
            expert_ffn_dim=32)


@pytest.mark.parametrize("change,match", [
    (dict(num_kv_heads=3), r"num_kv_heads=3 is not allowed: it must divide num_heads=4"),
    (dict(dim=66), r"head_dim=None is not allowed: give it explicitly: dim=66 is not a "
                   r"multiple of num_heads=4"),
    (dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8),
     r"v_head_dim=0 is not allowed: multi-head latent attention \(kv_lora_rank > 0\) needs "
     r"v_head_dim > 0"),
    (dict(kv_lora_rank=16, v_head_dim=8), r"v_head_dim=8 is not allowed: multi-head latent "
                                          r"attention .* qk_nope_head_dim \+ qk_rope_head_dim"),
    (dict(expert_ffn_dim=0), r"expert_ffn_dim=0 is not allowed: MoE layers need "
                             r"expert_ffn_dim > 0"),
    (dict(num_dense_layers=1), r"dense_ffn_dim=0 is not allowed: 1 dense layers need "
                               r"dense_ffn_dim > 0"),
    (dict(moe_every=2), r"dense_ffn_dim=0 is not allowed: 1 dense layers need"),
    (dict(num_dense_layers=3, dense_ffn_dim=16),
     r"num_dense_layers=3 is not allowed: it must be <= num_layers=2"),
])
def test_model_spec_refuses_inconsistent_shapes(change, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(**{**BASE, **change})


def test_model_spec_accepts_the_edges_of_those_checks():
    ModelSpec(**{**BASE, "num_kv_heads": 2})  # divides 4
    ModelSpec(**{**BASE, "dim": 66, "head_dim": 16})  # explicit head_dim
    ModelSpec(**{**BASE, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "v_head_dim": 8})
    ModelSpec(**{**BASE, "num_dense_layers": 2, "dense_ffn_dim": 16})  # every layer dense


SPEC = from_lm_config(LMConfig(dim=64, num_layers=2, num_heads=2, ffn_dim=64, num_experts=4,
                               top_k=2, vocab_size=64, max_seq_len=16, tie_embeddings=False))


@pytest.mark.parametrize("kwargs,match", [
    (dict(weights="int8", scope="router"), r"scope='router' is not allowed: it must be one "
                                           r"of all, experts"),
    (dict(weights="fp32", scope="experts"), r"scope='experts' is not allowed: it applies to "
                                            r"int8 / int4 weights only, not weights=fp32"),
    (dict(weights="bf16", float_embeddings=True),
     r"float_embeddings=True is not allowed: it applies to int8 / int4 weights only"),
    (dict(kv_cache_dtype="fp8"), r"kv_cache_dtype='fp8' is not allowed: it must be one of"),
    (dict(weights="int4", group_size=48), r"group_size=48 is not allowed: it must be 32, 64 "
                                          r"or 128"),
    (dict(weights="int8", group_size=32), r"group_size=32 is not allowed: it applies to int4 "
                                          r"weights only, not weights=int8"),
    (dict(bandwidth=0), r"bandwidth=0 is not allowed: it must be > 0 \(bytes/s\) or None"),
    (dict(bandwidth=-5e9), r"bandwidth=-5000000000.0 is not allowed"),
    (dict(bandwidth=True), r"bandwidth=True is not allowed"),
    (dict(bandwidth=float("nan")), r"bandwidth=nan is not allowed"),
])
def test_decode_cost_refuses_bad_arguments_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode_cost(SPEC, **kwargs)


@pytest.mark.parametrize("routing", [None, [], {}, {"layers": []}, {"layers": "x"}, 7])
def test_expert_shares_need_the_routing_json_of_analyze(routing):
    with pytest.raises(ValueError, match=r"expert_load=.* is not allowed: it must be the "
                                         r"routing.json of moekit analyze"):
        expert_shares_from_routing(routing)


@pytest.mark.parametrize("kwargs,says", [
    (dict(weights="int8", scope="experts"), "int8 (a scale per row), routed experts only "
                                            "(the rest fp32)"),
    (dict(weights="int4", scope="experts"), "int4 (groups of 64), routed experts only"),
    (dict(weights="int8", float_embeddings=True), "int8 (a scale per row), the embedding "
                                                  "table fp32"),
    (dict(weights="int8"), "int8 (a scale per row)"),
])
def test_decode_table_says_what_the_quantization_covers(kwargs, says):
    """(An untied table: a tied one is the head's, quantized as the head.)"""
    text = decode_table(decode_cost(SPEC, **kwargs))
    assert says in text
    for phrase in ("routed experts only", "the embedding table fp32"):
        assert (phrase in text) == (phrase in says)


def test_a_tied_table_is_never_planned_as_float():
    tied = from_lm_config(LMConfig(dim=64, num_layers=2, num_heads=2, ffn_dim=64,
                                   num_experts=4, top_k=2, vocab_size=64, max_seq_len=16))
    cost = decode_cost(tied, weights="int8", float_embeddings=True)
    assert not cost.float_embeddings
    assert "the embedding table fp32" not in decode_table(cost)
