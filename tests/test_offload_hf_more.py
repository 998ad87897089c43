"""hf.load_offloaded on Llama 4 (``llama4_text``; ``llama4``'s text model) and NemotronH:
experts read from the safetensors shards within a budget smaller than all experts.

Llama 4 stores its experts stacked in the transposed layout (``gate_up_proj`` [E, D, 2F],
``down_proj`` [E, F, D]; each expert one contiguous row of each); NemotronH per expert,
``up_proj`` [F, D] only (no gate). ``llama4`` is Llama4ForConditionalGeneration's
checkpoint: its text model is loaded (a Llama4ForCausalLM), the vision tower's tensors
left unread. The oracle is the resident patched model, bitwise (its greedy tokens equal
the unpatched model's too), and ``moekit.quantize`` of it for quantize=8 / 4. Tiny random
models from tests/hf_models_more.py, fp32.

Shape letters: D hidden, F expert hidden, E experts.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moekit import quantize
from moekit.integrations import hf
from tests import hf_models_more  # skips this module when transformers is missing

transformers = hf_models_more.transformers
NAMES = ["llama4_text", "llama4", "nemotron_h"]
NEW_TOKENS = 8
# int4: groups of 32 tile D=64 and F=32 (NemotronH's F made 32 for it)
BITS = [(None, None), (8, None), (4, 32)]
CHANGES = {"nemotron_h": dict(moe_intermediate_size=32)}


def _ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))


def _experts(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


@pytest.fixture(scope="module", params=NAMES)
def ckpt(request, tmp_path_factory):
    """(name, checkpoint path, unpatched model, per-expert fp32 bytes, top_k, MoE layers)."""
    original = hf_models_more.build(request.param, **CHANGES.get(request.param, {}))
    path = tmp_path_factory.mktemp(request.param)
    original.save_pretrained(path, max_shard_size="40KB")  # several shards
    if request.param == "llama4":  # the oracle: the text model (quantize skips the vision)
        original = original.language_model
    experts = _experts(original)
    w_in = getattr(experts[0], "gate_up_proj", None)
    w_in = experts[0].up_proj if w_in is None else w_in
    per_expert = (w_in[0].numel() + experts[0].down_proj[0].numel()) * 4
    top_k = original.config.get_text_config().num_experts_per_tok
    return request.param, path, original, per_expert, top_k, len(experts)


def _generate(model) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = model.generate(_ids(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                            do_sample=False)
    with torch.no_grad():
        return tokens, model(tokens).logits


@pytest.mark.parametrize("bits,group", BITS)
def test_offloaded_equals_resident(ckpt, bits, group):
    _, path, original, per_expert, top_k, layers = ckpt
    resident = hf.apply(copy.deepcopy(original))
    if bits is not None:
        quantize(resident, bits, group)
    tokens, logits = _generate(resident)
    if bits is None:  # the patched model is transformers' own, token for token
        assert torch.equal(_generate(original)[0], tokens)
    budget = top_k * per_expert  # one layer's top-k in fp32: far below all experts
    assert budget < layers * len(_experts(original)[0].down_proj) * per_expert
    model = hf.load_offloaded(path, expert_memory=budget, quantize=bits, group_size=group)
    try:
        assert type(model) is type(original)  # llama4: the text model only
        assert not any(p.is_meta for p in model.parameters())
        got_tokens, got_logits = _generate(model)
        assert torch.equal(got_tokens, tokens)
        assert torch.equal(got_logits, logits)  # bitwise
        stats = model.expert_offload.stats
        loads, nbytes = stats.total("loads"), stats.total("bytes_loaded")
        assert loads > 0 and stats.total("requests") >= loads - stats.total("prefetched")
        assert nbytes == loads * per_expert  # read from disk: the stored fp32 expert
        # cached: the fp32 expert, or its quantized data plus scales (and int4's zeros)
        (cached,) = set(stats.expert_bytes.values())
        if bits is None:
            assert cached == per_expert
        else:
            assert per_expert * bits // 32 < cached < per_expert // 2
        # no bound by Belady's: his optimum is for reads on demand, and prefetch reads ahead
        assert 0 <= stats.hit_rate <= 1 and 0 <= stats.belady_hit_rate() <= 1
    finally:
        assert model.expert_offload.close(timeout=5.0)


def test_offloaded_experts_are_the_families_patched_classes(ckpt):
    """The experts keep the family's mixin (Llama 4's ``up * act(gate)``, NemotronH's relu2
    without a gate) and hold no parameters; hf.revert refuses."""
    from moekit.integrations.hf.experts import Llama4Experts, UngatedExperts

    name, path, *_ = ckpt
    model = hf.load_offloaded(path, expert_memory="1MiB")
    try:
        experts = [m for m in model.modules() if hf.is_patched(m)
                   and getattr(type(m), "_moekit_offloaded", False)]
        want = UngatedExperts if name == "nemotron_h" else Llama4Experts
        assert experts and all(isinstance(m, want) for m in experts)
        assert all(not list(m.parameters()) for m in experts)
        with pytest.raises(ValueError, match="streamed from disk by load_offloaded"):
            hf.revert(model)
    finally:
        assert model.expert_offload.close(timeout=5.0)


def test_a_family_not_offloadable_is_refused_in_one_line(tmp_path):
    """dbrx's experts are two [E*F, D] matrices, not stacks the store reads per expert."""
    transformers.DbrxConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^model_type='dbrx' is not supported for "
                                         r"offloading: it must be one of .*llama4") as e:
        hf.load_offloaded(tmp_path, expert_memory="1MiB")
    assert "\n" not in str(e.value)
