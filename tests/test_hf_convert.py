"""`moekit convert`: Mixtral / Qwen3-MoE / OLMoE / Qwen2-MoE checkpoint <-> moekit language
model,
lossless both ways.

Oracles: transformers' own forward and generate() (logits and greedy tokens of the
converted moekit model must match them) and the original files (a round trip must give
back the same tensors, bit for bit, and the same config.json).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moekit.integrations.hf import convert
from moekit.integrations.hf.convert import hf_to_moekit, moekit_to_hf
from moekit.models import MoETransformer, preset
from moekit.train.checkpoint import load_checkpoint, restore, save_checkpoint
from tests import hf_models

transformers = hf_models.transformers
ATOL, RTOL = 1e-5, 1e-4


def _mixtral(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**{**hf_models.COMMON, **kw}, intermediate_size=24,
                                     num_local_experts=4, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def cli(*argv: str) -> int:
    """`moekit convert ARGV` (its own parser, as cli.py builds it)."""
    import argparse

    parser = argparse.ArgumentParser(prog="moekit convert")
    convert.add_arguments(parser)
    return convert.run(parser.parse_args(argv))


def _load_lm(path) -> MoETransformer:
    ckpt = load_checkpoint(path)
    from moekit.models import LMConfig

    model = MoETransformer(LMConfig.from_dict(ckpt.state["model_config"]))
    restore(ckpt, model, rng=False)
    return model.eval()


@pytest.mark.parametrize("kv_heads,tied", [(2, False), (4, True)],
                         ids=["gqa", "mha-tied"])
def test_mixtral_to_moekit_and_back(tmp_path, kv_heads, tied):
    hf_model = _mixtral(tmp_path, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    assert cli(str(tmp_path / "hf"), str(tmp_path / "lm")) == 0
    lm = _load_lm(tmp_path / "lm")
    # the checkpoint's key/value heads, none repeated (num_kv_heads None: one per query head)
    assert lm.config.kv_heads == kv_heads
    assert lm.config.num_kv_heads == (None if kv_heads == 4 else kv_heads)
    assert lm.blocks[0].attn.qkv.weight.shape[0] == (4 + 2 * kv_heads) * 8
    ids = torch.randint(3, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, hf_model(ids).logits, atol=ATOL, rtol=RTOL)

    assert cli(str(tmp_path / "lm"), str(tmp_path / "back")) == 0
    want, got = load_file(tmp_path / "hf" / "model.safetensors"), \
        load_file(tmp_path / "back" / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf_model(ids).logits)


def test_checkpoint_converted_with_repeated_heads_converts_back(tmp_path):
    """Before grouped-query attention moekit converted a Mixtral of J key/value heads with
    each head repeated H / J times (num_kv_heads absent from its config): such a
    checkpoint still converts back to the original files, and one whose copies have
    diverged (trained since) is refused by name."""
    from tests.test_models import _repeated_heads_twin

    _mixtral(tmp_path, num_key_value_heads=2)
    hf_to_moekit(tmp_path / "hf", tmp_path / "lm")
    ckpt = load_checkpoint(tmp_path / "lm")
    old = _repeated_heads_twin(_load_lm(tmp_path / "lm"))
    config = {k: v for k, v in ckpt.state["model_config"].items() if k != "num_kv_heads"}
    state = {**ckpt.state, "model_config": config}
    save_checkpoint(tmp_path / "old", old, torch.optim.SGD(old.parameters(), lr=0.0), state)
    moekit_to_hf(tmp_path / "old", tmp_path / "back")
    want, got = load_file(tmp_path / "hf" / "model.safetensors"), \
        load_file(tmp_path / "back" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())
    with torch.no_grad():
        old.blocks[1].attn.qkv.weight[4 * 8] += 1.0  # copy 0 of key head 0 moves
    save_checkpoint(tmp_path / "trained", old, torch.optim.SGD(old.parameters(), lr=0.0), state)
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.weight='diverged key/value heads'"):
        moekit_to_hf(tmp_path / "trained", tmp_path / "back2")
    assert not (tmp_path / "back2").exists()


def test_stacked_layout_round_trips(tmp_path):
    """A directory with transformers v5's stacked expert names comes back stacked."""
    from safetensors.torch import save_file

    hf_model = _mixtral(tmp_path)
    (tmp_path / "v5").mkdir()
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    save_file(sd, str(tmp_path / "v5" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "v5" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    hf_to_moekit(tmp_path / "v5", tmp_path / "lm")
    moekit_to_hf(tmp_path / "lm", tmp_path / "back")
    got = load_file(tmp_path / "back" / "model.safetensors")
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def _family(tmp_path, name: str, **kw):
    """A random Qwen3-MoE, OLMoE or Qwen2-MoE model saved to tmp_path / "hf", its norms
    not ones (a q / k norm applied in the wrong place would otherwise change nothing),
    its q / k / v biases not zeros."""
    torch.manual_seed(0)
    if name == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**{**hf_models.COMMON, **kw}, intermediate_size=48,
                                          moe_intermediate_size=16,
                                          shared_expert_intermediate_size=40, num_experts=8,
                                          num_experts_per_tok=3)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    elif name == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**{**hf_models.COMMON, **kw}, intermediate_size=48,
                                          moe_intermediate_size=16, num_experts=8,
                                          num_experts_per_tok=3)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.OlmoeConfig(**{**hf_models.COMMON, **kw}, intermediate_size=16,
                                       num_experts=8, num_experts_per_tok=2)
        model = transformers.OlmoeForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if n.endswith("proj.bias"):
                p.uniform_(-0.5, 0.5)
    model.eval().save_pretrained(tmp_path / "hf")
    return model


@pytest.mark.parametrize("name,kw,want", [
    ("qwen3_moe", dict(head_dim=16, norm_topk_prob=True),  # heads twice D / H
     dict(head_dim=16, qk_norm="head", renormalize=True, num_kv_heads=2)),
    ("qwen3_moe", dict(norm_topk_prob=False, num_key_value_heads=4, tie_word_embeddings=True),
     dict(head_dim=None, qk_norm="head", renormalize=False, num_kv_heads=None)),
    ("olmoe", dict(),
     dict(head_dim=None, qk_norm="full", renormalize=False, num_kv_heads=2)),
    ("qwen2_moe", dict(),  # Qwen1.5-MoE: top-k weights not renormalized
     dict(qkv_bias=True, num_shared_experts=1, shared_dim=40, shared_expert_gate=True,
          renormalize=False, qk_norm="none")),
    ("qwen2_moe", dict(norm_topk_prob=True, qkv_bias=False, head_dim=16,
                       tie_word_embeddings=True),
     dict(qkv_bias=False, shared_dim=40, renormalize=True, head_dim=16)),
], ids=["qwen3-wide-heads", "qwen3-mha-unnormalized", "olmoe", "qwen2", "qwen2-no-bias"])
def test_qwen3_moe_and_olmoe_to_moekit_and_back(tmp_path, name, kw, want):
    """Logits as transformers' own forward gives them, greedy tokens of moekit's engine
    (the decode step's C++ q / k norms) as transformers' generate(), and back to the
    same files."""
    from moekit.inference.decode_plan import DecodePlan
    from moekit.inference.engine import Engine, GenerationConfig

    hf_model = _family(tmp_path, name, **kw)
    assert cli(str(tmp_path / "hf"), str(tmp_path / "lm")) == 0
    lm = _load_lm(tmp_path / "lm")
    assert {k: getattr(lm.config, k) for k in want} == want
    ids = torch.randint(3, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, hf_model(ids).logits, atol=ATOL, rtol=RTOL)
    with torch.inference_mode():
        assert DecodePlan.build(lm) is not None  # the engine's steps run in one C++ call
    prompt = [5, 9, 17, 33, 4]
    gens, _ = Engine(lm).generate([prompt], GenerationConfig(max_new_tokens=12))
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                            do_sample=False)
    assert gens[0].tokens == out[0, len(prompt):].tolist()

    assert cli(str(tmp_path / "lm"), str(tmp_path / "back")) == 0
    want_t, got = load_file(tmp_path / "hf" / "model.safetensors"), \
        load_file(tmp_path / "back" / "model.safetensors")
    assert want_t.keys() == got.keys() and all(torch.equal(want_t[k], got[k]) for k in want_t)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())


@pytest.mark.parametrize("changes,cls", [
    (dict(qk_norm="head", head_dim=12, num_kv_heads=2), "Qwen3MoeForCausalLM"),
    (dict(qk_norm="head", renormalize=False), "Qwen3MoeForCausalLM"),
    (dict(qk_norm="full", renormalize=False, num_kv_heads=2), "OlmoeForCausalLM"),
    (dict(num_kv_heads=2), "MixtralForCausalLM"),
    (dict(head_dim=12), "MixtralForCausalLM"),
    (dict(qkv_bias=True, num_shared_experts=2, shared_expert_gate=True, renormalize=False),
     "Qwen2MoeForCausalLM"),
    (dict(num_shared_experts=1, shared_ffn_dim=24, shared_expert_gate=True, head_dim=12),
     "Qwen2MoeForCausalLM"),
], ids=["qwen3-wide-heads", "qwen3-unnormalized", "olmoe", "mixtral", "mixtral-wide-heads",
        "qwen2", "qwen2-no-bias-wide-heads"])
def test_moekit_lm_with_qk_norms_to_transformers_and_back(tmp_path, changes, cls):
    """A model trained in moekit is written as the family its q / k norms (or its shared
    experts and q / k / v biases) name, which transformers loads and runs to the same
    logits."""
    torch.manual_seed(0)
    lm = MoETransformer(preset("tiny", tie_embeddings=False, num_heads=4, **changes)).eval()
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if n.endswith("qkv.bias") or n.endswith("shared.gate"):
                p.uniform_(-1, 1)
    save_checkpoint(tmp_path / "run", lm, torch.optim.SGD(lm.parameters(), lr=0.0),
                    {"step": 3, "model_config": lm.config.to_dict()})
    moekit_to_hf(tmp_path / "run", tmp_path / "hf")
    hf_model = getattr(transformers, cls).from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, lm(ids).logits, atol=ATOL, rtol=RTOL)
    back = _load_lm(hf_to_moekit(tmp_path / "hf", tmp_path / "lm2"))
    assert back.config == lm.config
    for k, v in lm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def _as_older_config(hf_dir, rope_theta: float, rope_scaling) -> None:
    """Rewrite hf_dir's config.json the way hub checkpoints from before transformers 5
    hold it: "rope_theta" at the top, and a "rope_scaling" object (or null)."""
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=rope_theta, rope_scaling=rope_scaling)
    (hf_dir / "config.json").write_text(json.dumps(config))


def test_older_config_rope_theta_is_read(tmp_path):
    """rope_theta beside a null rope_scaling (not transformers' default base) converts
    to transformers' logits."""
    _family(tmp_path, "qwen3_moe")
    _as_older_config(tmp_path / "hf", 500.0, None)
    hf_model = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.rope_parameters["rope_theta"] == 500.0
    assert cli(str(tmp_path / "hf"), str(tmp_path / "lm")) == 0
    lm = _load_lm(tmp_path / "lm")
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, hf_model(ids).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("rope_scaling,kind", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, "yarn"),
    ({"type": "linear", "factor": 4.0}, "linear"),
])
def test_older_config_rope_scaling_is_refused(tmp_path, rope_scaling, kind):
    """Before: rope_scaling was never read, the conversion exited 0 and its logits
    differed from transformers' (which scales the rotary frequencies) by up to 0.18."""
    _family(tmp_path, "qwen3_moe")
    _as_older_config(tmp_path / "hf", 10000.0, rope_scaling)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.rope_parameters["rope_type"] == kind  # what transformers would run
    with pytest.raises(ValueError, match=f"rope_type='{kind}' is not allowed"):
        hf_to_moekit(tmp_path / "hf", tmp_path / "lm")
    assert not (tmp_path / "lm").exists()


def test_unsupported_checkpoints_are_refused(tmp_path):
    hf_models.build("deepseek_v3").save_pretrained(tmp_path / "dsv3")
    with pytest.raises(ValueError, match="model_type='deepseek_v3'"):
        hf_to_moekit(tmp_path / "dsv3", tmp_path / "out")
    _mixtral(tmp_path, sliding_window=8)
    with pytest.raises(ValueError, match="sliding_window=8"):
        hf_to_moekit(tmp_path / "hf", tmp_path / "out")
    for name, kw, match in [("qwen3_moe", dict(mlp_only_layers=[1]), r"mlp_only_layers=\[1\]"),
                            ("qwen3_moe", dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
                            ("qwen3_moe", dict(use_sliding_window=True), "use_sliding_window"),
                            ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0"),
                            ("olmoe", dict(head_dim=16), "head_dim=16"),
                            ("qwen2_moe", dict(mlp_only_layers=[0]), r"mlp_only_layers=\[0\]"),
                            ("qwen2_moe", dict(use_sliding_window=True), "use_sliding_window")]:
        _family(tmp_path / name / str(len(kw)) / match[:4], name, **kw)
        with pytest.raises(ValueError, match=match):
            hf_to_moekit(tmp_path / name / str(len(kw)) / match[:4] / "hf", tmp_path / "out")
    with pytest.raises(ValueError, match="source="):
        hf_to_moekit(tmp_path / "nowhere", tmp_path / "out")
    for changes, match in [(dict(router="sigmoid"), "router='sigmoid'"),
                           (dict(renormalize=False), "renormalize=False"),
                           (dict(qk_norm="full", head_dim=8), "head_dim=8"),
                           (dict(num_shared_experts=1), "shared_expert_gate=False"),
                           (dict(qkv_bias=True), "needs shared experts"),
                           (dict(num_shared_experts=1, shared_expert_gate=True,
                                 qk_norm="head"), "qk_norm='head'")]:
        lm = MoETransformer(preset("tiny", **changes))
        save_checkpoint(tmp_path / "run", lm, torch.optim.SGD(lm.parameters(), lr=0.0),
                        {"step": 0, "model_config": lm.config.to_dict()})
        with pytest.raises(ValueError, match=match):
            moekit_to_hf(tmp_path / "run", tmp_path / "out")
        assert not (tmp_path / "out").exists()
