"""Which transformers classes ``apply`` patches, by ``config.model_type``.

Experts: every registered experts class is a ``@use_experts_implementation`` module
whose eager forward is transformers' reference loop, ``down(gate_act(x @ gate_up))``
times the router's weight, summed over the K experts (the activation being
``act_fn(gate) * up`` or the class's own ``_apply_gate``), with the stacked layout
``StackedExperts`` reads. Scaling outside that call (a ``routed_scaling_factor`` on the
block's output, shared experts and their gates, Longcat's zero experts) stays in
transformers' block, which is not patched.

Experts without a gate (NemotronH's ``up_proj`` only, relu2) are ``UngatedExperts``:
``down(act(x @ up))``, moekit's non-GLU expert. Llama 4 has neither layout's call: its
block (``Llama4Block``) scales each token by its router score before the experts, so
the block is patched too and hands its experts (``Llama4Experts``) the routed rows.

Routers: a moekit mixin only where its routing function computes the same thing as
the model's router; elsewhere the model's own router runs and its top-k choice goes
to the patched experts (see the README for the families and why).
"""

from __future__ import annotations

from moekit.integrations.hf.blocks import DbrxBlock, Llama4Block, SwitchRouter, SwitchSparseMLP
from moekit.integrations.hf.experts import Llama4Experts, StackedExperts, UngatedExperts
from moekit.integrations.hf.routers import (
    DeepseekV2Router,
    GptOssRouter,
    GraniteRouter,
    HYV3Router,
    JambaRouter,
    MixtralRouter,
    SigmoidBiasRouter,
    SigmoidGroupRouter,
    SoftmaxTopKRouter,
)


def _experts(name: str, router: str | None = None, mixin: type | None = None
             ) -> dict[str, type]:
    """{experts class: StackedExperts} and, with a router class, {router: mixin}."""
    out: dict[str, type] = {name: StackedExperts}
    if router is not None:
        out[router] = mixin
    return out


# DeepSeek-V3's sigmoid, group-limited router, copied verbatim into these families
_V3 = SigmoidGroupRouter
# Llama 4 (the text model of Llama4ForConditionalGeneration too): the block and its experts
_LLAMA4 = {"Llama4TextMoe": Llama4Block, "Llama4TextExperts": Llama4Experts}

# model_type -> {transformers class name: moekit mixin}
ARCHITECTURES: dict[str, dict[str, type]] = {
    "mixtral": {"MixtralTopKRouter": MixtralRouter, "MixtralExperts": StackedExperts},
    "qwen2_moe": {"Qwen2MoeTopKRouter": SoftmaxTopKRouter, "Qwen2MoeExperts": StackedExperts},
    "qwen3_moe": {"Qwen3MoeTopKRouter": SoftmaxTopKRouter, "Qwen3MoeExperts": StackedExperts},
    "olmoe": {"OlmoeTopKRouter": SoftmaxTopKRouter, "OlmoeExperts": StackedExperts},
    "flex_olmo": {"FlexOlmoTopKRouter": SoftmaxTopKRouter, "FlexOlmoExperts": StackedExperts},
    "deepseek_v3": {"DeepseekV3TopkRouter": SigmoidGroupRouter,
                    "DeepseekV3Experts": StackedExperts},
    "dbrx": {"DbrxFFN": DbrxBlock},
    "gpt_oss": {"GptOssTopKRouter": GptOssRouter, "GptOssExperts": StackedExperts},
    "switch_transformers": {"SwitchTransformersTop1Router": SwitchRouter,
                            "SwitchTransformersSparseMLP": SwitchSparseMLP},
    "llama4": _LLAMA4,
    "llama4_text": _LLAMA4,
    "nemotron_h": {"NemotronHTopkRouter": _V3, "NemotronHExperts": UngatedExperts},
    # experts and router
    "aria": _experts("AriaExperts", "AriaTextTopKRouter", GptOssRouter),
    "aria_text": _experts("AriaExperts", "AriaTextTopKRouter", GptOssRouter),
    "axk1": _experts("AXK1Experts", "AXK1TopkRouter", _V3),
    "bailing_hybrid": _experts("BailingHybridExperts", "BailingHybridTopkRouter", _V3),
    "deepseek_v2": _experts("DeepseekV2Experts", "DeepseekV2TopkRouter", DeepseekV2Router),
    "deepseek_v32": _experts("DeepseekV32Experts", "DeepseekV32TopkRouter", _V3),
    "dots1": _experts("Dots1Experts", "Dots1TopkRouter", _V3),
    "dots3_note_text": _experts("Dots3NoteExperts", "Dots3NoteTextTopkRouter", _V3),
    "exaone_moe": _experts("ExaoneMoeExperts", "ExaoneMoeTopkRouter", _V3),
    "glm4_moe": _experts("Glm4MoeExperts", "Glm4MoeTopkRouter", _V3),
    "glm4_moe_lite": _experts("Glm4MoeLiteExperts", "Glm4MoeLiteTopkRouter", _V3),
    "glm4v_moe": _experts("Glm4vMoeTextExperts", "Glm4vMoeTextTopkRouter", _V3),
    "glm5_next": _experts("Glm5NextTextExperts", "Glm5NextTextTopkRouter", _V3),
    "glm_moe_dsa": _experts("GlmMoeDsaExperts", "GlmMoeDsaTopkRouter", _V3),
    "granitemoe": _experts("GraniteMoeExperts", "GraniteMoeTopKRouter", GraniteRouter),
    "granitemoe_swa": _experts("GraniteMoeSWAExperts", "GraniteMoeSWATopKRouter",
                               GraniteRouter),
    "granitemoehybrid": _experts("GraniteMoeHybridExperts", "GraniteMoeHybridTopKRouter",
                                 GraniteRouter),
    "granitemoeshared": _experts("GraniteMoeSharedExperts", "GraniteMoeSharedTopKRouter",
                                 GraniteRouter),
    "hy_v3": _experts("HYV3Experts", "HYV3TopKRouter", HYV3Router),
    "hy_v4": _experts("HYV4Experts", "HYV4TopkRouter", _V3),
    "hy_v4_vl": _experts("HYV4VLExperts", "HYV4VLTopkRouter", _V3),
    "jamba": _experts("JambaExperts", "JambaTopKRouter", JambaRouter),
    "kimi_linear": _experts("KimiLinearExperts", "KimiLinearTopkRouter", _V3),
    "mellum": _experts("MellumExperts", "MellumTopKRouter", SoftmaxTopKRouter),
    "mimo_v2_flash": _experts("MiMoV2FlashExperts", "MiMoV2FlashTopkRouter", _V3),
    "minicpm5_moe": _experts("MiniCPM5MoeExperts", "MiniCPM5MoeTopkRouter", _V3),
    "minimax": _experts("MiniMaxExperts", "MiniMaxTopKRouter", MixtralRouter),
    "minimax_m2": _experts("MiniMaxM2Experts", "MiniMaxM2TopKRouter", SigmoidBiasRouter),
    "minimax_m3_vl": _experts("MiniMaxM3VLExperts", "MiniMaxM3VLTopKRouter", SigmoidBiasRouter),
    "minimax_m3_vl_text": _experts("MiniMaxM3VLExperts", "MiniMaxM3VLTopKRouter",
                                   SigmoidBiasRouter),
    "qwen3_5_moe": _experts("Qwen3_5MoeExperts", "Qwen3_5MoeTopKRouter", SoftmaxTopKRouter),
    "qwen3_5_moe_text": _experts("Qwen3_5MoeExperts", "Qwen3_5MoeTopKRouter",
                                 SoftmaxTopKRouter),
    "qwen3_next": _experts("Qwen3NextExperts", "Qwen3NextTopKRouter", SoftmaxTopKRouter),
    "qwen3_vl_moe": _experts("Qwen3VLMoeTextExperts", "Qwen3VLMoeTextTopKRouter",
                             SoftmaxTopKRouter),
    "qwen4_exp": _experts("Qwen4ExpTextExperts", "Qwen4ExpTextTopKRouter", SoftmaxTopKRouter),
    "qwen4_exp_text": _experts("Qwen4ExpTextExperts", "Qwen4ExpTextTopKRouter",
                               SoftmaxTopKRouter),
    "solar_open": _experts("SolarOpenExperts", "SolarOpenTopkRouter", _V3),
    "step3p7": _experts("Step3p7Experts", "Step3p7TopKRouter", SigmoidBiasRouter),
    # experts only: the model's own router (see the module docstring)
    "afmoe": _experts("AfmoeExperts"),
    "axk2": _experts("AXK2Experts"),
    "beam": _experts("BeamExperts"),
    "cohere2_moe": _experts("Cohere2MoeExperts"),
    "deepseek_v4": _experts("DeepseekV4Experts"),
    "ernie4_5_moe": _experts("Ernie4_5_MoeExperts"),
    "ernie4_5_vl_moe": _experts("Ernie4_5_VLMoeMoeExperts"),
    "flint": _experts("FlintExperts"),
    "gemma4": _experts("Gemma4TextExperts"),
    "gemma4_text": _experts("Gemma4TextExperts"),
    "hunyuan_v1_moe": _experts("HunYuanMoEV1Experts"),
    "inkling_text": _experts("InklingExperts"),
    "inkling2": _experts("Inkling2Experts"),
    "inkling2_text": _experts("Inkling2Experts"),
    "inkling2_loop": _experts("Inkling2LoopExperts"),
    "inkling2_loop_text": _experts("Inkling2LoopExperts"),
    "kolibri1": _experts("Kolibri1Experts"),
    "kolibri1_1": _experts("Kolibri1_1Experts"),
    "laguna": _experts("LagunaExperts"),
    "lara_mini": _experts("LaraMiniExperts"),
    "lfm2_moe": _experts("Lfm2MoeExperts"),
    "longcat_flash": _experts("LongcatFlashExperts"),
    "mistral4": _experts("Mistral4Experts"),
    "mistral_large4": _experts("MistralLarge4TextExperts"),
    "openai_privacy_filter": _experts("OpenAIPrivacyFilterExperts"),
    "phimoe": _experts("PhimoeExperts"),
    "zaya": _experts("ZayaExperts"),
}
SUPPORTED: tuple[str, ...] = tuple(sorted(ARCHITECTURES))
# What ``load_offloaded`` reads (offload.py); here, with SUPPORTED, so that the errors
# that suggest it (a quantized model's save_pretrained) need not import the offload code.
OFFLOADABLE = ("deepseek_v3", "flex_olmo", "llama4", "llama4_text", "mixtral", "nemotron_h",
               "olmoe", "qwen2_moe", "qwen3_moe")
