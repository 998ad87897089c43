"""Public MoE models, described by their transformers ``config.json`` values.

Each preset keeps the architecture keys of the released config.json (read by
the same code that reads user files, hf.py) and the totals its authors
published. ``published_active_counts_embedding`` records the convention each
publisher used for "active" parameters: whether the input embedding table is
counted (Mixtral, Qwen1.5 / Qwen3, OLMoE) or not (DeepSeek-V3, DBRX, GPT-OSS; their output
head is counted). tests/test_plan.py checks every total within 1%.

Each also keeps its config.json's longest context (``max_position_embeddings``; DBRX's
``max_seq_len``), which bounds ``moekit plan``'s --seq-len and --context; Switch's T5
relative positions state none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.plan.hf import from_hf_config
from moekit.plan.spec import ModelSpec, fail


@dataclass(frozen=True)
class Preset:
    hf_config: dict[str, Any]  # the architecture keys of the released config.json
    published_total: float  # parameters
    published_active: float | None  # parameters per token (None: not published)
    published_active_counts_embedding: bool
    source: str  # where the totals come from
    # Relative tolerance for the active count: 1%, or 2% where the publisher gave only two
    # significant digits and the exact count (equal to transformers') rounds differently.
    active_tolerance: float = 0.01

    @property
    def spec(self) -> ModelSpec:
        return from_hf_config(self.hf_config)

    @property
    def max_context(self) -> int | None:
        """The longest context its config.json states, None where it states none."""
        return longest_context(self.hf_config)


B = 1e9

PRESETS: dict[str, Preset] = {
    # huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json;
    # totals: mistral.ai/news/mixtral-of-experts ("46.7B total, 12.9B per token").
    "mixtral-8x7b": Preset(
        {"_name_or_path": "mixtral-8x7b", "model_type": "mixtral", "hidden_size": 4096,
         "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 8,
         "num_experts_per_tok": 2, "vocab_size": 32000, "tie_word_embeddings": False,
         "max_position_embeddings": 32768},
        46.7 * B, 12.9 * B, True, "mistral.ai/news/mixtral-of-experts"),
    # huggingface.co/mistral-community/Mixtral-8x22B-v0.1/blob/main/config.json;
    # totals: mistral.ai/news/mixtral-8x22b ("141B, 39B active").
    "mixtral-8x22b": Preset(
        {"_name_or_path": "mixtral-8x22b", "model_type": "mixtral", "hidden_size": 6144,
         "intermediate_size": 16384, "num_hidden_layers": 56, "num_attention_heads": 48,
         "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 8,
         "num_experts_per_tok": 2, "vocab_size": 32000, "tie_word_embeddings": False,
         "max_position_embeddings": 65536},
        141 * B, 39 * B, True, "mistral.ai/news/mixtral-8x22b"),
    # huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json; totals: the model card
    # and README_WEIGHTS.md ("671B main model, 36.6B activated incl. the 0.9B output head";
    # the 14B multi-token-prediction module is not counted and not modelled here).
    "deepseek-v3": Preset(
        {"_name_or_path": "deepseek-v3", "model_type": "deepseek_v3", "hidden_size": 7168,
         "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
         "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
         "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
         "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
         "first_k_dense_replace": 3, "moe_layer_freq": 1, "vocab_size": 129280,
         "tie_word_embeddings": False,
         # YaRN, factor 40 over the 4096 it was pretrained at; the card says 128K
         "max_position_embeddings": 163840},
        671 * B, 36.6 * B, False, "huggingface.co/deepseek-ai/DeepSeek-V3 (model card)"),
    # huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json; totals: its model card
    # ("30.5B in total and 3.3B activated").
    "qwen3-30b-a3b": Preset(
        {"_name_or_path": "qwen3-30b-a3b", "model_type": "qwen3_moe", "hidden_size": 2048,
         "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
         "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
         "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
         "mlp_only_layers": [], "vocab_size": 151936, "tie_word_embeddings": False,
         # 32768 native (the card) + room for output; YaRN extends it to 131072
         "max_position_embeddings": 40960},
        # Exact count: 3.353B with the embedding (3.042B without); the card's "3.3B" keeps
        # two digits (3.35 truncated), so the check allows 2% (measured +1.6%).
        30.5 * B, 3.3 * B, True, "huggingface.co/Qwen/Qwen3-30B-A3B (model card)", 0.02),
    # huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json; totals: its model card
    # ("235B in total and 22B activated").
    "qwen3-235b-a22b": Preset(
        {"_name_or_path": "qwen3-235b-a22b", "model_type": "qwen3_moe", "hidden_size": 4096,
         "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 94,
         "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
         "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
         "mlp_only_layers": [], "vocab_size": 151936, "tie_word_embeddings": False,
         "max_position_embeddings": 40960},
        235 * B, 22 * B, True, "huggingface.co/Qwen/Qwen3-235B-A22B (model card)"),
    # huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json; totals: its model card
    # ("14.3B parameters in total and 2.7B activated parameters during runtime").
    "qwen1.5-moe-a2.7b": Preset(
        {"_name_or_path": "qwen1.5-moe-a2.7b", "model_type": "qwen2_moe", "hidden_size": 2048,
         "intermediate_size": 5632, "moe_intermediate_size": 1408,
         "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
         "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
         "num_experts_per_tok": 4, "decoder_sparse_step": 1, "mlp_only_layers": [],
         "vocab_size": 151936, "tie_word_embeddings": False,
         "max_position_embeddings": 8192},  # the base model's (its -Chat: 32768)
        14.3 * B, 2.7 * B, True, "huggingface.co/Qwen/Qwen1.5-MoE-A2.7B (model card)"),
    # huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json; totals: Muennighoff et
    # al. 2024, "OLMoE" (arXiv 2409.02060), Table 1: 6.9B total, 1.3B active.
    "olmoe-1b-7b": Preset(
        {"_name_or_path": "olmoe-1b-7b", "model_type": "olmoe", "hidden_size": 2048,
         "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
         "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
         "vocab_size": 50304, "tie_word_embeddings": False, "max_position_embeddings": 4096},
        # Exact count: 1.282B with the embedding (1.179B without); "1.3B" keeps two digits,
        # so the check allows 2% (measured -1.4%).
        6.9 * B, 1.3 * B, True, "arXiv 2409.02060 (OLMoE), Table 1", 0.02),
    # huggingface.co/databricks/dbrx-base/blob/main/config.json; totals:
    # databricks.com/blog/introducing-dbrx-new-state-art-open-llm ("132B total, 36B active").
    "dbrx": Preset(
        {"_name_or_path": "dbrx", "model_type": "dbrx", "d_model": 6144, "n_layers": 40,
         "n_heads": 48, "vocab_size": 100352,
         "attn_config": {"kv_n_heads": 8, "rope_theta": 500000},
         "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4},
         "tie_word_embeddings": False, "max_seq_len": 32768},
        132 * B, 36 * B, False, "databricks.com/blog/introducing-dbrx-new-state-art-open-llm"),
    # huggingface.co/openai/gpt-oss-20b/blob/main/config.json; totals: the gpt-oss model
    # card (arXiv 2508.10925), Table 1: 20.91B total, 3.61B active.
    "gpt-oss-20b": Preset(
        {"_name_or_path": "gpt-oss-20b", "model_type": "gpt_oss", "hidden_size": 2880,
         "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
         "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
         "num_experts_per_tok": 4, "vocab_size": 201088, "attention_bias": True,
         "tie_word_embeddings": False, "max_position_embeddings": 131072},
        20.91 * B, 3.61 * B, False, "arXiv 2508.10925 (gpt-oss model card), Table 1"),
    # huggingface.co/openai/gpt-oss-120b/blob/main/config.json; same card: 116.83B, 5.13B.
    "gpt-oss-120b": Preset(
        {"_name_or_path": "gpt-oss-120b", "model_type": "gpt_oss", "hidden_size": 2880,
         "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
         "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 128,
         "num_experts_per_tok": 4, "vocab_size": 201088, "attention_bias": True,
         "tie_word_embeddings": False, "max_position_embeddings": 131072},
        116.83 * B, 5.13 * B, False, "arXiv 2508.10925 (gpt-oss model card), Table 1"),
    # huggingface.co/google/switch-base-128/blob/main/config.json (T5-base shapes, every
    # other FFN an MoE of 128 experts in encoder and decoder); total: Fedus et al. 2021,
    # "Switch Transformers" (arXiv 2101.03961) and the HF model listing, about 7.4B. Top-1
    # routing makes its per-token compute equal T5-base's; no active count is published.
    "switch-base-128": Preset(
        {"_name_or_path": "switch-base-128", "model_type": "switch_transformers",
         "d_model": 768, "d_ff": 3072, "d_kv": 64, "num_heads": 12, "num_layers": 12,
         "num_decoder_layers": 12, "num_sparse_encoder_layers": 6,
         "num_sparse_decoder_layers": 6, "num_experts": 128, "vocab_size": 32128,
         "relative_attention_num_buckets": 32, "tie_word_embeddings": True},
        7.4 * B, None, True, "arXiv 2101.03961 (Switch Transformers)"),
}


def longest_context(config: dict[str, Any]) -> int | None:
    """The longest context a config states: a moekit LMConfig's (or DBRX's) max_seq_len,
    a transformers config's max_position_embeddings; None where it states no such int."""
    value = config.get("max_seq_len", config.get("max_position_embeddings"))
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return value if ok else None


def get_preset(name: str) -> Preset:
    if not isinstance(name, str) or name.lower() not in PRESETS:
        fail("preset", name, f"known presets are {', '.join(PRESETS)}")
    return PRESETS[name.lower()]
