"""The expert cache's prefetch prediction for transformers models (``hf.load_offloaded``):
layer l+1's gate applied to layer l's expert input must choose as the gate itself does,
or the cache fetches experts the step then does not use. DeepSeek-V3's router (and
NemotronH's copy of it) selects by sigmoid score + correction bias within each token's
best ``topk_group`` of ``n_group`` groups; Mixtral / Qwen3-MoE / OLMoE by the softmax's
top K. The oracle is the unpatched transformers router's own ``topk_indices``.

Shape letters: T tokens, D hidden, K experts per token.
"""

from __future__ import annotations

import pytest
import torch

from moekit.integrations.hf.offload import _gate, _next_gate_predictor
from tests import hf_models, hf_models_more  # skip this module without transformers


def _model(name: str):
    if name == "nemotron_h":
        return hf_models_more.build("nemotron_h", topk_group=1)  # 2 groups, 1 kept
    return hf_models.BUILDERS[name]()


@pytest.mark.parametrize("name", ["deepseek_v3", "nemotron_h", "mixtral", "qwen3_moe",
                                  "olmoe"])
def test_prediction_is_the_gates_own_choice(name):
    model = _model(name)
    blocks = [m for m in model.modules()
              if any(type(c).__name__.endswith("Experts") for c in m.children())]
    gate = _gate(blocks[-1])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # (DeepSeek-V3's gate starts at zeros) a bias that moves the choice
        gate.weight.normal_(0, 0.5, generator=g)
        if getattr(gate, "e_score_correction_bias", None) is not None:
            gate.e_score_correction_bias.normal_(0, 0.5, generator=g)
    x_TD = torch.randn(64, gate.weight.shape[1], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want_TK = gate(x_TD)[-1]  # (logits, weights, indices) in transformers 5
        got_TK = _next_gate_predictor(gate)(x_TD)
    assert got_TK.shape == want_TK.shape
    assert torch.equal(got_TK.sort(dim=1).values, want_TK.sort(dim=1).values)
