"""Tiny random transformers MoE models built from configs (no downloads), for the hf tests.

Dimensions are multiples of 4 so moekit's grouped_mm backend (16-byte rows in
fp32) is the one exercised. Dropout and jitter are 0, the capacity of Switch is
small enough that tokens get dropped.
"""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)


def _causal(config_cls, model_cls, **kw):
    return model_cls(config_cls(**{**COMMON, **kw}))


def mixtral():
    return _causal(transformers.MixtralConfig, transformers.MixtralForCausalLM,
                   intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                   output_router_logits=True, router_aux_loss_coef=0.02)


def qwen2_moe():
    return _causal(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                   intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                   num_experts_per_tok=3, shared_expert_intermediate_size=40,
                   norm_topk_prob=False, output_router_logits=True, router_aux_loss_coef=0.02)


def qwen3_moe():
    return _causal(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                   intermediate_size=48, moe_intermediate_size=16, num_experts=16,
                   num_experts_per_tok=4, norm_topk_prob=True, head_dim=8,
                   output_router_logits=True, router_aux_loss_coef=0.02)


def olmoe():
    return _causal(transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
                   intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                   output_router_logits=True, router_aux_loss_coef=0.02)


def flex_olmo():
    return _causal(transformers.FlexOlmoConfig, transformers.FlexOlmoForCausalLM,
                   intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                   norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.02)


def deepseek_v3():
    model = _causal(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    intermediate_size=48, moe_intermediate_size=16, n_routed_experts=16,
                    n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                    routed_scaling_factor=2.5, first_k_dense_replace=1, kv_lora_rank=16,
                    q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                    head_dim=8, norm_topk_prob=True, num_key_value_heads=4)
    with torch.no_grad():  # a non-zero correction bias, so selection differs from weighting
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    return model


def dbrx():
    cfg = transformers.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=64, pad_token_id=0,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        output_router_logits=True,
        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 8, "moe_top_k": 2,
                    "moe_normalize_expert_weights": 1.0})
    return transformers.DbrxForCausalLM(cfg)


def gpt_oss():
    model = _causal(transformers.GptOssConfig, transformers.GptOssForCausalLM,
                    intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                    head_dim=8, sliding_window=8, layer_types=["sliding_attention",
                                                               "full_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    output_router_logits=True, router_aux_loss_coef=0.02,
                    swiglu_limit=0.3)  # a low clamp, so the clamp is exercised
    with torch.no_grad():  # random biases (they start at zero)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def switch_transformers():
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=32, d_kv=8, d_ff=16, num_layers=2, num_decoder_layers=2,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_heads=4,
        num_experts=4, expert_capacity=3, router_jitter_noise=0.0, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.SwitchTransformersForConditionalGeneration(cfg)


BUILDERS = {f.__name__: f for f in (mixtral, qwen2_moe, qwen3_moe, olmoe, flex_olmo, deepseek_v3,
                                     dbrx, gpt_oss, switch_transformers)}


def build(name: str, seed: int = 0):
    """The model in fp32 with transformers' eager experts loop: the obvious oracle."""
    torch.manual_seed(seed)
    model = BUILDERS[name]().float()
    if model.config._experts_implementation != "eager":
        model.set_experts_implementation("eager")
    return model
