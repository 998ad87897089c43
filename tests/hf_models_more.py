"""Tiny random transformers MoE models (no downloads) for the families beyond
``tests/hf_models.py``: hidden 64, 2 layers (at least one MoE), 8 experts top 2 (Llama 4's
text model top 1 as released, NemotronH 4 layers: Mamba, MoE, attention, MoE).

Each entry names the config and model classes and what differs from ``SMALL`` (only the
``SMALL`` keys a config's ``__init__`` takes are passed). A multimodal model gets a tiny
text config the same way, under ``text_config``, and the vision config given; its test
prompt is text only, so the vision tower only has to build. ``build`` skips (pytest)
where the installed transformers lacks the classes.
"""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=32, moe_intermediate_size=16,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             num_experts=8, num_local_experts=8, n_routed_experts=8, num_experts_per_tok=2,
             shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
             n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, sliding_window=8, tie_word_embeddings=False)
MLA = dict(head_dim=8, num_key_value_heads=4)  # multi-head latent attention: rope dim, MHA
LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
QWEN4 = dict(LINEAR, layer_types=["linear_attention", "indexed_attention"], hc_lowrank=8,
             indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
             indexer_compress_ratio=2)
GEMMA4 = dict(enable_moe_block=True, top_k_experts=2, hidden_size_per_layer_input=0,
              vocab_size_per_layer_input=64, layer_types=["sliding_attention", "full_attention"])
INKLING2 = dict(unpadded_vocab_size=64, layer_types=["hybrid_sliding", "hybrid"],
                swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                sliding_window_size=8, n_layers_per_attn_res_block=1)
DOTS3 = dict(MLA, head_dim=16, layer_types=["indexed_attention"] * 2, per_layer_config={},
             mlp_layer_types=["dense", "sparse"], index_head_dim=16, index_n_heads=2,
             index_topk=4, shared_experts_intermediate_size=32)
LLAMA4 = dict(num_experts_per_tok=1, interleave_moe_layer_step=2, intermediate_size_mlp=32)
MINIMAX_M3 = dict(dense_intermediate_size=32, shared_intermediate_size=32)
MROPE = {"rope_type": "default", "rope_theta": 10000.0}
QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                   out_hidden_size=64, patch_size=4, num_position_embeddings=16)
VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              patch_size=4)

# model_type: (config class, model class, config overrides); a multimodal entry's
# overrides hold "text" (a text config class and its overrides) and "vision_config"
MODELS: dict[str, tuple[str, str, dict]] = {
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM", {}),
    "aria_text": ("AriaTextConfig", "AriaTextForCausalLM", {}),
    "axk1": ("AXK1Config", "AXK1ForCausalLM", MLA),
    "axk2": ("AXK2Config", "AXK2ForCausalLM", MLA),
    "bailing_hybrid": ("BailingHybridConfig", "BailingHybridForCausalLM",
                       dict(MLA, layer_types=LINEAR["layer_types"], layer_group_size=2,
                            mlp_layer_types=["sparse"] * 2, linear_num_heads=4,
                            linear_head_dim=16)),
    "beam": ("BeamConfig", "BeamForCausalLM", dict(mlp_layer_types=["dense", "sparse"])),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM", {}),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(topk_method="group_limited_greedy", routed_scaling_factor=1.5)),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", MLA),
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", {}),
    "dots1": ("Dots1Config", "Dots1ForCausalLM", {}),
    "dots3_note_text": ("Dots3NoteTextConfig", "Dots3NoteForCausalLM", DOTS3),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", {}),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM", {}),
    "flint": ("FlintConfig", "FlintForCausalLM", dict(mlp_only_layers=[0])),
    "gemma4_text": ("Gemma4TextConfig", "Gemma4ForCausalLM", GEMMA4),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", {}),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", MLA),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", MLA),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {}),
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", {}),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                         dict(layer_types=["mamba", "attention"], mamba_n_heads=4,
                              mamba_d_head=32, mamba_expand=2, mamba_n_groups=1,
                              mamba_d_state=16)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", {}),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", {}),
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM", dict(router_scaling_factor=2.0)),
    "hy_v4": ("HYV4Config", "HYV4ForCausalLM", {}),
    "inkling_text": ("InklingTextConfig", "InklingForCausalLM", {}),
    "inkling2_text": ("Inkling2TextConfig", "Inkling2ForCausalLM", INKLING2),
    "inkling2_loop_text": ("Inkling2LoopTextConfig", "Inkling2LoopForCausalLM", INKLING2),
    "jamba": ("JambaConfig", "JambaForCausalLM",
              dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                   expert_layer_offset=0)),
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM",
                    dict(MLA, layer_types=LINEAR["layer_types"], mlp_layer_types=["sparse"] * 2,
                         linear_num_heads=4, linear_head_dim=16)),
    "kolibri1": ("Kolibri1Config", "Kolibri1ForCausalLM", {}),
    "kolibri1_1": ("Kolibri1_1Config", "Kolibri1_1ForCausalLM",
                   dict(layer_types=["indexed_attention", "sliding_attention"], index_layers=[0],
                        kv_source_layers=[0, 1], mlp_only_layers=[], index_num_heads=2)),
    "laguna": ("LagunaConfig", "LagunaForCausalLM", {}),
    "lara_mini": ("LaraMiniConfig", "LaraMiniForCausalLM", {}),
    # Llama 4: layer 0 a dense MLP (interleave_moe_layer_step=2), layer 1 MoE
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", LLAMA4),
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM",
                 dict(layer_types=["conv", "full_attention"], num_dense_layers=1)),
    "longcat_flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM",  # 2 zero experts
                      dict(MLA, num_layers=1, moe_topk=2, expert_ffn_hidden_size=16,
                           ffn_hidden_size=32, zero_expert_num=2)),
    "mellum": ("MellumConfig", "MellumForCausalLM", {}),
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", {}),
    "minicpm5_moe": ("MiniCPM5MoeConfig", "MiniCPM5MoeForCausalLM", {}),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", {}),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", {}),
    "minimax_m3_vl_text": ("MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM", MINIMAX_M3),
    "mistral4": ("Mistral4Config", "Mistral4ForCausalLM", {}),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM",
                   dict(layers_block_type=["mamba", "moe", "attention", "moe"],
                        mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16,
                        chunk_size=8, moe_shared_expert_intermediate_size=32)),
    "openai_privacy_filter": ("OpenAIPrivacyFilterConfig",
                              "OpenAIPrivacyFilterForTokenClassification", {}),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {}),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", LINEAR),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", LINEAR),
    "qwen4_exp_text": ("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", QWEN4),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM", {}),
    "zaya": ("ZayaConfig", "ZayaForCausalLM",  # ZAYA routes each token to one expert
             dict(num_experts_per_tok=1, layer_types=["hybrid", "hybrid"])),
    # multimodal: the language model's MoE layers, driven by a text-only prompt
    "aria": ("AriaConfig", "AriaForConditionalGeneration",
             dict(text=("AriaTextConfig", {}), vision_config=dict(VISION, image_size=16),
                  projector_patch_to_query_dict={16: 4})),
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeConfig", "Ernie4_5_VLMoeForConditionalGeneration",
                        dict(text=("Ernie4_5_VLMoeTextConfig",
                                   dict(moe_intermediate_size=[16, 16], moe_num_experts=8,
                                        moe_k=2, rope_parameters=dict(MROPE,
                                                                      mrope_section=[3, 3, 2]))),
                             vision_config=dict(depth=1, hidden_size=32, intermediate_size=32,
                                                num_heads=2, patch_size=4))),
    "gemma4": ("Gemma4Config", "Gemma4ForConditionalGeneration",
               dict(text=("Gemma4TextConfig", GEMMA4))),
    "glm4v_moe": ("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration",
                  dict(text=("Glm4vMoeTextConfig",
                             dict(rope_parameters=dict(MROPE, partial_rotary_factor=0.5,
                                                       mrope_section=[2, 1, 1]))),
                       vision_config=dict(QWEN_VISION, image_size=16))),
    "glm5_next": ("Glm5NextConfig", "Glm5NextForConditionalGeneration",
                  dict(text=("Glm5NextTextConfig",
                             dict(num_key_value_heads=4, qk_rope_head_dim=0, qk_nope_head_dim=16,
                                  mlp_layer_types=["dense", "sparse"],
                                  layer_types=["linear_attention", "indexed_attention"],
                                  index_topk=16, index_kpool=4, index_head_dim=16,
                                  index_n_heads=2, linear_head_dim=16, linear_num_heads=4,
                                  hc_mult=2)),
                       vision_config=dict(QWEN_VISION, image_size=16,
                                          projection_intermediate_size=32))),
    "hy_v4_vl": ("HYV4VLConfig", "HYV4VLForConditionalGeneration",
                 dict(text=("HYV4VLTextConfig",
                            dict(rope_parameters=dict(MROPE, mrope_section=[2, 1, 1]))),
                      vision_config=dict(VISION, num_key_value_heads=2, out_hidden_size=64,
                                         max_image_size=16))),
    "inkling2": ("Inkling2Config", "Inkling2ForConditionalGeneration",
                 dict(text=("Inkling2TextConfig", INKLING2),
                      vision_config=dict(VISION, text_hidden_size=64, projection_hidden_dim=32,
                                         posemb_grid_size=4))),
    "inkling2_loop": ("Inkling2LoopConfig", "Inkling2LoopForConditionalGeneration",
                      dict(text=("Inkling2LoopTextConfig", INKLING2),
                           vision_config=dict(VISION, text_hidden_size=64,
                                              projection_hidden_dim=32, posemb_grid_size=4))),
    "llama4": ("Llama4Config", "Llama4ForConditionalGeneration",  # top 2, both layers MoE
               dict(text=("Llama4TextConfig", dict(LLAMA4, num_experts_per_tok=2,
                                                   interleave_moe_layer_step=1)),
                    vision_config=dict(VISION, image_size=16, vision_output_dim=32,
                                       projector_input_dim=32, projector_output_dim=64))),
    "minimax_m3_vl": ("MiniMaxM3VLConfig", "MiniMaxM3SparseForConditionalGeneration",
                      dict(text=("MiniMaxM3VLTextConfig", MINIMAX_M3),
                           vision_config=dict(VISION, image_size=16))),
    "mistral_large4": ("MistralLarge4Config", "MistralLarge4ForConditionalGeneration",
                       dict(text=("MistralLarge4TextConfig", MLA),
                            vision_config=dict(VISION, head_dim=16, image_size=16))),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration",
                    dict(text=("Qwen3_5MoeTextConfig", LINEAR), vision_config=QWEN_VISION)),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration",
                     dict(text=("Qwen3VLMoeTextConfig", {}),
                          vision_config=dict(QWEN_VISION, deepstack_visual_indexes=[0]))),
    "qwen4_exp": ("Qwen4ExpConfig", "Qwen4ExpForConditionalGeneration",
                  dict(text=("Qwen4ExpTextConfig", QWEN4), vision_config=QWEN_VISION)),
    "step3p7": ("Step3p7Config", "Step3p7ForConditionalGeneration",
                dict(text=("Step3p7TextConfig", dict(mlp_layer_types=["dense", "sparse"])),
                     vision_config=dict(VISION, image_size=16))),
}
NAMES = list(MODELS)
GENERATES = [n for n in NAMES if "ForTokenClassification" not in MODELS[n][1]]
# router state that starts at zero in transformers' init: random, so that selection and
# weighting differ (sigmoid routers' correction bias) and biases matter
RANDOMISED = ("e_score_correction_bias", "expert_bias", "gate_up_proj_bias", "down_proj_bias")


def _config(class_name: str, overrides: dict):
    cls = getattr(transformers, class_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    params = inspect.signature(cls.__init__).parameters
    kw = {k: v for k, v in SMALL.items() if k in params}
    kw.update({k: v for k, v in overrides.items() if k != "text"})
    if "text" in overrides:  # multimodal: the top level takes sub-configs only
        kw = {k: v for k, v in kw.items() if k in overrides or k == "tie_word_embeddings"}
        kw["text_config"] = _config(*overrides["text"])
    return cls(**kw)


def build(name: str, seed: int = 0, **changes):
    """The model in fp32, eval mode, with transformers' eager experts loop (the oracle);
    ``changes`` override the config's entries."""
    config_name, model_name, overrides = MODELS[name]
    overrides = {**overrides, **changes}
    model_cls = getattr(transformers, model_name, None)
    if model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    torch.manual_seed(seed)
    model = model_cls(_config(config_name, overrides)).float().eval()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        for key, t in [*model.named_parameters(), *model.named_buffers()]:
            if key.rsplit(".", 1)[-1] in RANDOMISED:
                t.normal_(0, 0.05)
    return model


def assert_same_loss_and_grads(original, patched, ids: torch.Tensor, nonzero: tuple[str, ...],
                               atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """The patched model's LM loss on ``ids`` and every parameter's gradient match the
    original's (gradients to rtol 1e-4); the parameters named in ``nonzero`` get a gradient
    that is not all zeros (each model in the mode its caller set)."""
    losses, grads = [], []
    for model in (original, patched):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], atol=atol, rtol=rtol)
    assert grads[0].keys() == grads[1].keys()
    for key in nonzero:
        assert grads[0][key] is not None and grads[0][key].abs().sum() > 0, key
    for n, g in grads[0].items():
        assert (g is None) == (grads[1][n] is None), n
        if g is not None:
            torch.testing.assert_close(grads[1][n], g, atol=atol, rtol=1e-4,
                                       msg=lambda m, n=n: f"{n}: {m}")
