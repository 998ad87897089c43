"""The MoE language model: config validation, attention against a naive oracle,
causality, parameter accounting, KV-cache generation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.models import KVCache, LMConfig, MoETransformer, generate, preset, sample_next
from moekit.models.transformer import Attention, StaticKVCache, apply_rotary, rotary_table

TINY = dict(dim=32, num_layers=2, num_heads=2, max_seq_len=48, ffn_dim=16, num_experts=4,
            top_k=2)


def tiny(**changes) -> LMConfig:
    return LMConfig(**{**TINY, **changes})


@pytest.mark.parametrize("field,value", [
    ("dim", 0), ("num_layers", -1), ("num_heads", 3), ("top_k", 5), ("num_experts", 0),
    ("moe_every", 0), ("moe_every", 3), ("router", "bogus"), ("aux_loss_coef", -1.0),
    ("rope_theta", 0.0),
    ("capacity_factor", -2.0), ("max_seq_len", 1.5), ("dense", "yes"),
    ("num_kv_heads", 0), ("num_kv_heads", 3), ("num_kv_heads", True),
    ("head_dim", 0), ("head_dim", 7), ("head_dim", 8.0), ("qk_norm", "layer"),
    ("qk_norm", None), ("renormalize", "no"), ("qkv_bias", 1), ("num_shared_experts", -1),
    ("shared_ffn_dim", 24), ("shared_expert_gate", True), ("shared_expert_gate", "yes"),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})


def test_unknown_preset_and_keys_are_named():
    with pytest.raises(ValueError, match="preset"):
        preset("huge")
    with pytest.raises(ValueError, match="bogus"):
        LMConfig.from_dict({**tiny().to_dict(), "bogus": 1})
    assert LMConfig.from_dict(tiny().to_dict()) == tiny()


def _rms(x, w, eps):
    x = x.double()
    return (x / (x.square().mean(-1, keepdim=True) + eps).sqrt() * w.double()).float()


def naive_attention(x_BLD, attn: Attention, cos, sin):
    """Per-head softmax(q k^T / sqrt(d) + causal mask) v with explicit loops; query head h
    reads key/value head h // (H / J); q / k RMSNorms (per head, or over all heads) in
    float64 before rotary."""
    B, L, D = x_BLD.shape
    H, J, Dh = attn.num_heads, attn.kv_heads, attn.head_dim
    qkv = x_BLD @ attn.qkv.weight.T
    if attn.qkv.bias is not None:
        qkv = qkv + attn.qkv.bias
    q, k, v = qkv.split([H * Dh, J * Dh, J * Dh], dim=-1)
    if attn.qk_norm == "full":
        q, k = _rms(q, attn.q_norm.weight, attn.q_norm.eps), _rms(k, attn.k_norm.weight,
                                                                 attn.k_norm.eps)
    out = torch.zeros(B, L, H * Dh, dtype=torch.float64)
    for h in range(H):
        sl, kv = slice(h * Dh, (h + 1) * Dh), slice(h // (H // J) * Dh, (h // (H // J) + 1) * Dh)
        qh, kh = q[..., sl], k[..., kv]
        if attn.qk_norm == "head":
            qh, kh = _rms(qh, attn.q_norm.weight, attn.q_norm.eps), _rms(kh, attn.k_norm.weight,
                                                                        attn.k_norm.eps)
        qh, kh = apply_rotary(qh, cos, sin), apply_rotary(kh, cos, sin)
        scores = (qh.double() @ kh.double().transpose(-1, -2)) / math.sqrt(Dh)
        mask = torch.ones(L, L, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        out[..., sl] = scores.softmax(-1) @ v[..., kv].double()
    return out.float() @ attn.out.weight.T


def test_rotary_rotates_pairs_by_position_angle():
    cos, sin = rotary_table(8, 4, 10000.0)
    x = torch.randn(1, 1, 8, 4)
    y = apply_rotary(x, cos, sin)
    # position p, pair 0 (dims 0 and 2) rotates by angle p * theta^0 = p
    p = 5
    c, s = math.cos(p), math.sin(p)
    expect = torch.tensor([c * x[0, 0, p, 0] - s * x[0, 0, p, 2],
                           s * x[0, 0, p, 0] + c * x[0, 0, p, 2]])
    torch.testing.assert_close(y[0, 0, p, [0, 2]], expect, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("changes", [
    {}, dict(num_heads=4, num_kv_heads=2, head_dim=12, qk_norm="head"),
    dict(num_heads=4, num_kv_heads=1, qk_norm="full"), dict(head_dim=6),
    dict(num_heads=4, num_kv_heads=2, qkv_bias=True)],
    ids=["mha", "qwen3-like", "olmoe-like", "narrow-heads", "qwen2-like"])
def test_attention_matches_naive_oracle(changes):
    torch.manual_seed(0)
    cfg = tiny(**changes)
    attn = Attention(cfg, 0)
    if attn.qkv.bias is not None:
        with torch.no_grad():
            attn.qkv.bias.uniform_(-1, 1)
    if attn.q_norm is not None:
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 11, cfg.dim)
    cos, sin = rotary_table(11, cfg.head_size, cfg.rope_theta)
    torch.testing.assert_close(attn(x, cos, sin, None, 0), naive_attention(x, attn, cos, sin),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("changes", [dict(num_heads=4, num_kv_heads=2, head_dim=12,
                                          qk_norm="head"),
                                     dict(num_heads=4, qk_norm="full", renormalize=False),
                                     dict(num_heads=4, num_kv_heads=2, qkv_bias=True,
                                          num_shared_experts=1, shared_ffn_dim=24,
                                          shared_expert_gate=True)],
                         ids=["qwen3-like", "olmoe-like", "qwen2-like"])
def test_decode_steps_with_qk_norms_match_the_full_forward(changes, dtype):
    """The decode step's q / k norms (a C++ call on the qkv rows, before attend_one), and
    its qkv biases and shared experts (kernel calls), give the logits of the full forward
    (torch's ops), a row at a time."""
    torch.manual_seed(0)
    model = MoETransformer(tiny(**changes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if name.endswith("qkv.bias") or name.endswith("shared.gate"):
                p.uniform_(-1, 1)
    model = model.to(dtype)
    ids = torch.randint(256, (2, 12))
    with torch.inference_mode():
        full = model(ids).logits
        cache = StaticKVCache.for_model(model, 2, 16)
        steps = [model.infer(ids[:, :5], cache)]
        steps += [model.infer(ids[:, i:i + 1], cache) for i in range(5, 12)]
    # bf16: measured 0.002 against logits up to 0.87 (without the norms: 0.075)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.01, rtol=0.01)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], **tol)


def test_qk_norms_learn():
    """The q / k norms are parameters the loss reaches (training updates them)."""
    torch.manual_seed(0)
    model = MoETransformer(tiny(num_heads=4, qk_norm="head", head_dim=12))
    ids = torch.randint(256, (2, 12))
    out = model(ids, ids)
    out.loss.backward()
    for block in model.blocks:
        assert block.attn.q_norm.weight.grad.abs().sum() > 0
        assert block.attn.k_norm.weight.grad.abs().sum() > 0
    assert block.attn.out.weight.shape == (32, 4 * 12)


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "switch", "hash", "expert_choice"])
def test_forward_shapes_and_loss(router):
    torch.manual_seed(0)
    cfg = tiny(router=router, top_k=1 if router == "switch" else 2)
    model = MoETransformer(cfg)
    ids = torch.randint(256, (2, 9))
    out = model(ids, ids)
    assert out.logits.shape == (2, 9, 256)
    assert len(out.stats) == cfg.num_layers
    expected = F.cross_entropy(out.logits.reshape(-1, 256), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_causal_earlier_logits_ignore_later_tokens():
    torch.manual_seed(0)
    model = MoETransformer(tiny()).eval()
    ids = torch.randint(256, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_moe_every_and_dense_variant_params():
    cfg = tiny(num_layers=4, moe_every=2)
    model = MoETransformer(cfg)
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    moe, dense = MoETransformer(tiny()), MoETransformer(tiny(dense=True))
    D, E, F_, K, L = 32, 4, 16, 2, 2
    expert = 3 * D * F_  # SwiGLU: [gate | up] then down
    assert moe.num_params() - dense.num_params() == L * ((E - K) * expert + E * D)
    # equal active FFN arithmetic; the router's D x E weight is the only difference
    assert moe.active_params_per_token() - dense.active_params_per_token() == L * E * D
    assert dense.num_params() == dense.active_params_per_token()


def _repeated_heads_twin(model: MoETransformer) -> MoETransformer:
    """The model with one key/value head per query head: each of its J heads repeated
    H / J times (query head h reads head h // (H / J)), the function unchanged."""
    cfg = model.config
    H, J, Dh = cfg.num_heads, cfg.kv_heads, cfg.head_size
    twin = MoETransformer(cfg.replace(num_kv_heads=None))
    sd = model.state_dict()
    for i in range(cfg.num_layers):
        name = f"blocks.{i}.attn.qkv.weight"
        q, k, v = sd[name].split([H * Dh, J * Dh, J * Dh])
        sd[name] = torch.cat([q] + [w.view(J, Dh, -1).repeat_interleave(H // J, 0)
                                    .reshape(H * Dh, -1) for w in (k, v)])
    twin.load_state_dict(sd)
    return twin.train(model.training)


@pytest.mark.parametrize("H,J", [(4, 2), (4, 1), (8, 2)])
def test_grouped_query_attention_is_attention_with_repeated_heads(H, J):
    """A model of J key/value heads computes what its twin with each head repeated
    computes; the gradient of a key/value head is the sum of its copies' gradients."""
    torch.manual_seed(H + J)
    model = MoETransformer(tiny(num_heads=H, num_kv_heads=J))
    twin = _repeated_heads_twin(model)
    assert model.blocks[0].attn.qkv.weight.shape == ((H + 2 * J) * (32 // H), 32)
    ids = torch.randint(256, (2, 12))
    out, ref = model(ids, ids), twin(ids, ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
    (out.loss + out.aux_loss).backward()
    (ref.loss + ref.aux_loss).backward()
    Dh = 32 // H
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if name.endswith("attn.qkv.weight"):
            gq, gk, gv = p.grad.split([H * Dh, J * Dh, J * Dh])
            tq, tk, tv = q.grad.split([H * Dh] * 3)
            copies = [t.view(J, H // J, Dh, -1).sum(1).reshape(J * Dh, -1) for t in (tk, tv)]
            for got, want in zip((gq, gk, gv), (tq, *copies), strict=True):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


def test_kv_cache_logits_match_full_forward():
    torch.manual_seed(0)
    model = MoETransformer(tiny()).eval()
    ids = torch.randint(256, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config.num_layers)
        parts = [model(ids[:, :4], cache=cache).logits,  # prefill
                 model(ids[:, 4:7], cache=cache).logits,  # a chunk after a prefix
                 model(ids[:, 7:8], cache=cache).logits,  # one token
                 model(ids[:, 8:], cache=cache).logits]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, 5, 0.9)])
def test_generate_with_cache_equals_without(temperature, top_k, top_p):
    torch.manual_seed(0)
    model = MoETransformer(tiny())
    prompt = torch.randint(256, (2, 3))
    outs = [generate(model, prompt, 12, temperature, top_k, top_p, use_cache=c,
                     generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert outs[0].shape == (2, 15)
    assert torch.equal(outs[0][:, :3], prompt)
    assert torch.equal(outs[0], outs[1])


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    greedy = sample_next(logits, 0.0, None, None, None)
    assert greedy.item() == 1
    gen = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, 1, None, gen).item() == 1 for _ in range(20))
    assert all(sample_next(logits, 1.0, None, 1e-3, gen).item() == 1 for _ in range(20))
    picks = {sample_next(logits, 1.0, 2, None, gen).item() for _ in range(200)}
    assert picks == {1, 3}


def test_tiny_temperature_is_greedy():
    # logits / 1e-30 overflowed to inf and softmax gave NaN (multinomial raised)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.999, 0.0]])
    gen = torch.Generator().manual_seed(0)
    for t in (1e-30, 1e-40, 1e-300, 5e-324):
        assert sample_next(logits, t, None, None, gen).tolist() == [1, 0]
    torch.manual_seed(0)
    model = MoETransformer(tiny())
    prompt = torch.randint(256, (2, 3))
    assert torch.equal(generate(model, prompt, 8, 1e-30, generator=gen),
                       generate(model, prompt, 8, 0.0))


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=100), "max_seq_len"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="0.5"), "temperature"),
    (dict(temperature=True), "temperature"), (dict(top_p="0.9"), "top_p"),
    (dict(top_p=True), "top_p"),
])
def test_generate_bad_arguments(kwargs, name):
    model = MoETransformer(tiny())
    args = dict(max_new_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match=name):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **{**args, **kwargs})


def test_train_flags_set_head_size_and_qk_norms():
    import argparse

    from moekit.train import cli as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    lm, _ = train_cli.configs_from_args(parser.parse_args(
        ["--heads", "4", "--kv-heads", "2", "--head-dim", "48", "--qk-norm", "head"]))
    assert (lm.num_heads, lm.kv_heads, lm.head_dim, lm.head_size, lm.qk_norm) == \
        (4, 2, 48, 48, "head")
    with pytest.raises(ValueError, match="head_dim=7"):
        train_cli.configs_from_args(parser.parse_args(["--head-dim", "7"]))
    with pytest.raises(SystemExit):  # argparse names the choices
        parser.parse_args(["--qk-norm", "layer"])
    lm, _ = train_cli.configs_from_args(parser.parse_args(
        ["--qkv-bias", "--shared-experts", "2", "--shared-ffn-dim", "96",
         "--shared-expert-gate"]))
    assert (lm.qkv_bias, lm.num_shared_experts, lm.shared_dim, lm.shared_expert_gate) == \
        (True, 2, 96, True)
    assert (lm.top_k * lm.ffn_dim + 96) == lm.active_ffn_dim
    model = MoETransformer(lm)
    assert model.blocks[0].attn.qkv.bias is not None
    assert model.blocks[0].ffn.shared.w_out.shape == (96, lm.dim)
    plain, _ = train_cli.configs_from_args(parser.parse_args([]))
    assert (plain.qkv_bias, plain.num_shared_experts, plain.shared_expert_gate) == \
        (False, 0, False)
    untied, _ = train_cli.configs_from_args(parser.parse_args(["--untied-embeddings"]))
    assert plain.tie_embeddings and not untied.tie_embeddings
    model = MoETransformer(untied)
    assert model.head.weight is not model.embed.weight
    with pytest.raises(ValueError, match="--untied-embeddings is not allowed with --resume"):
        train_cli.check_resume_flags(parser.parse_args(["--untied-embeddings"]))
