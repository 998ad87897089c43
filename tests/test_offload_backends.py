"""load_offloaded(..., backend=...) with a backend other than "auto" / "decode": the
offloaded experts stack the cached experts and make the resident module's own call
(OffloadedExperts._stacked, the transformers experts' _moekit_stacked). No test chose a
backend there (those lines had 0 hits under coverage).

Oracle: the resident model with the same backend on the same weights, bitwise (as in
tests/test_offload.py); the budget of one layer's top-k experts makes a step touch more
experts than the cache holds.
"""

from __future__ import annotations

import pytest
import torch

from moekit.models import MoETransformer
from moekit.models.config import LMConfig
from moekit.offload import load_offloaded
from moekit.offload.lm import OffloadedExperts
from moekit.quant.io import load_model
from moekit.train.checkpoint import save_checkpoint

CFG = LMConfig(dim=32, num_layers=3, num_heads=2, ffn_dim=24, num_experts=8, top_k=2,
               max_seq_len=64)
EXPERT_BYTES = (32 * 48 + 24 * 32) * 4  # w_in [D, 2F] + w_out [F, D], fp32
BACKENDS = ["loop", "fused", "grouped_mm"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = MoETransformer(CFG).eval()
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(path, model, torch.optim.AdamW(model.parameters()),
                    {"step": 1, "model_config": CFG.to_dict()})
    return path


def _counting(monkeypatch, cls, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(cls, name)

    def spy(self, x_TD, d, parts):
        calls.append(len(parts))
        return original(self, x_TD, d, parts)

    monkeypatch.setattr(cls, name, spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("experts", [2, 24])  # one layer's top-k; every expert
def test_moekit_offloaded_backend_equals_resident(run, backend, experts, monkeypatch):
    resident = load_model(run)
    for moe in resident.moe_layers():
        moe.experts.backend = backend
    ids = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = resident(ids).logits
    calls = _counting(monkeypatch, OffloadedExperts, "_stacked")
    model = load_offloaded(run, experts * EXPERT_BYTES, backend=backend, prefetch=False,
                           threaded=False)
    try:
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
        assert len(calls) == CFG.num_layers and max(calls) > 2  # more than the budget of 2
        assert model.expert_offload.cache.used <= experts * EXPERT_BYTES
    finally:
        assert model.expert_offload.close(timeout=5.0)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_hf_offloaded_backend_equals_resident(arch, backend, tmp_path, monkeypatch):
    """transformers keeps gate_up_proj as [E, 2F, D]: the stacked copies are transposed
    views (expert_blocks.stack_experts' other layout)."""
    hf_models = pytest.importorskip("tests.hf_models")
    transformers = pytest.importorskip("transformers")
    from moekit.integrations import hf
    from moekit.integrations.hf.offload import OffloadedStackedExperts

    hf_models.build(arch).save_pretrained(tmp_path, max_shard_size="40KB")
    resident = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                                 dtype=torch.float32)
    hf.apply(resident, backend).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = resident(ids).logits
    experts = next(m for m in resident.modules() if hasattr(m, "gate_up_proj"))
    per_expert = sum(p[0].numel() * 4 for p in (experts.gate_up_proj, experts.down_proj))
    top_k = resident.config.num_experts_per_tok
    calls = _counting(monkeypatch, OffloadedStackedExperts, "_moekit_stacked")
    model = hf.load_offloaded(tmp_path, expert_memory=top_k * per_expert, backend=backend)
    try:
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
        assert calls and max(calls) > top_k
    finally:
        assert model.expert_offload.close(timeout=5.0)
