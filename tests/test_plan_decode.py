"""`moekit plan --decode` (moekit.plan.decode) against what moekit holds and reads: the
bytes of a language model's state dict (fp32, bf16, and int8 / int4 through
``moekit.quantize``), the bytes of its ``StaticKVCache`` (fp32, bf16, int8), and the
distinct experts of uniformly routed tokens, drawn."""

from __future__ import annotations

import math

import pytest
import torch

import moekit
from moekit.cli import main as cli_main
from moekit.models import LMConfig, MoETransformer
from moekit.models.transformer import StaticKVCache
from moekit.plan.decode import decode_cost
from moekit.plan.hf import from_lm_config
from moekit.plan.presets import get_preset


def _config(tied: bool, shared: int = 1) -> LMConfig:
    # 3 layers, MoE every 2nd (a dense FFN between), grouped-query, a shared expert
    return LMConfig(dim=128, num_layers=3, num_heads=4, num_kv_heads=2, ffn_dim=64,
                    num_experts=8, top_k=2, vocab_size=256, max_seq_len=64, moe_every=2,
                    num_shared_experts=shared, tie_embeddings=tied)


def _held_bytes(model) -> int:
    """Bytes of the model's state dict, a storage shared by two names once."""
    return sum({t.data_ptr(): t.numel() * t.element_size()
                for t in model.state_dict().values()}.values())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8", "int4"])
def test_weight_bytes_are_the_models_state_dict(weights, tied):
    cfg = _config(tied, shared=0 if weights == "int8" else 1)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    if weights == "bf16":
        model = model.to(torch.bfloat16)
    elif weights != "fp32":
        moekit.quantize(model, bits=int(weights[3]),
                        **({"group_size": 64} if weights == "int4" else {}))
    cost = decode_cost(from_lm_config(cfg), weights)
    assert cost.total_weight_bytes == _held_bytes(model)


@pytest.mark.parametrize("kv", ["auto", "float32", "bfloat16", "int8"])
def test_kv_cache_bytes_are_the_static_caches(kv):
    cfg = _config(tied=True)
    model = MoETransformer(cfg)
    cache = StaticKVCache.for_model(model, 3, 40, kv)
    want = sum(t.nbytes for t in (*cache.k, *cache.v))
    cost = decode_cost(from_lm_config(cfg), "fp32", kv, batch=3, context=40)
    assert cost.kv_cache_bytes == want
    assert cost.memory_bytes == cost.total_weight_bytes + want


def _spec(E, K, layers=1):
    return from_lm_config(LMConfig(dim=64, num_layers=layers, num_heads=2, ffn_dim=64,
                                   num_experts=E, top_k=K, vocab_size=64, max_seq_len=16))


@pytest.mark.parametrize("E,K,B", [(8, 2, 1), (8, 2, 4), (64, 8, 16), (128, 8, 8)])
def test_distinct_experts_are_uniform_routings(E, K, B):
    """E (1 - (1 - K / E)^B) against 4,000 draws of B tokens, each routed to K distinct
    experts uniformly (the draws' standard error is < 0.7% of the mean here)."""
    cost = decode_cost(_spec(E, K), batch=B)
    g = torch.Generator().manual_seed(E + B)
    scores = torch.rand(4000, B, E, generator=g)
    chosen = torch.zeros(4000, E, dtype=torch.bool)
    chosen.scatter_(1, scores.topk(K, dim=-1).indices.flatten(1), True)
    drawn = chosen.sum(1).double().mean().item()
    assert cost.distinct_experts == pytest.approx(drawn, rel=0.02)
    if B == 1:
        assert cost.distinct_experts == K


@pytest.mark.parametrize("B", [1, 3, 8])
def test_distinct_experts_of_measured_routing_match_draws(B):
    """With measured expert shares: tokens whose K experts are drawn skewed (Gumbel top-K
    of fixed log-weights; 40,000 tokens give the shares, other tokens make 4,000 batches
    of B): the planner's expected distinct experts against the batches' mean. Uniform
    shares give the uniform formula; K experts taking every token give K at any batch."""
    E, K = 16, 2
    g = torch.Generator().manual_seed(B)
    logw = -0.4 * torch.arange(E, dtype=torch.float64)

    def draw(n):
        gumbel = -torch.log(-torch.log(torch.rand(n, E, generator=g, dtype=torch.float64)))
        return (logw + gumbel).topk(K, dim=-1).indices  # [n, K]

    shares = torch.bincount(draw(40000).flatten(), minlength=E).double() / 40000
    chosen = torch.zeros(4000, E, dtype=torch.bool)
    chosen.scatter_(1, draw(4000 * B).view(4000, B * K), True)
    drawn = chosen.sum(1).double().mean().item()
    two_layers = [shares.tolist()] * 2
    cost = decode_cost(_spec(E, K, layers=2), batch=B, expert_shares=two_layers)
    assert cost.routing == "measured"
    assert cost.distinct_experts == pytest.approx(drawn, rel=0.02)
    uniform = decode_cost(_spec(E, K, layers=2), batch=B)
    assert uniform.routing == "uniform" and cost.distinct_experts < uniform.distinct_experts
    flat = decode_cost(_spec(E, K), batch=B, expert_shares=[[K / E] * E])
    assert flat.distinct_experts == pytest.approx(uniform.distinct_experts, rel=1e-12)
    fixed = decode_cost(_spec(E, K), batch=B, expert_shares=[[1.0] * K + [0.0] * (E - K)])
    assert fixed.distinct_experts == pytest.approx(K)


@pytest.mark.parametrize("shares,words", [
    ([[0.25] * 8], "the model has 2 MoE layers"),
    ([[0.25] * 8, [0.25] * 7], "layer 1 must give 8 shares in [0, 1]"),
    ([[0.25] * 8, [0.25] * 7 + [float("nan")]], "layer 1 must give 8 shares"),
    ([[0.25] * 8, [0.25] * 7 + [-0.1]], "layer 1 must give 8 shares"),
    ([[0.5] * 8, [0.25] * 8], "shares summing to 4' is not allowed: a token takes at most K=2"),
])
def test_bad_expert_shares_are_named(shares, words):
    with pytest.raises(ValueError, match="expert_load") as e:
        decode_cost(_spec(8, 2, layers=2), batch=2, expert_shares=shares)
    assert words in str(e.value)


def test_a_step_reads_its_parts_and_the_roofline_divides_them():
    """Mixtral-8x7B, int4 weights, int8 cache, batch 1: a step reads attention, norms,
    routers, head, one embedding row, K of E experts per layer and the cache; the time is
    the bytes over the bandwidth."""
    spec = get_preset("mixtral-8x7b").spec
    cost = decode_cost(spec, "int4", "int8", batch=1, context=8192, bandwidth=30e9)
    per_expert = cost.weight_bytes["experts"] / (spec.num_experts * spec.num_layers)
    assert cost.step_bytes["experts"] == pytest.approx(2 * per_expert * spec.num_layers)
    kv_row = spec.head_size + 4  # int8 values and their float scale
    assert cost.kv_bytes_per_token == spec.num_layers * 2 * spec.kv_heads * kv_row
    assert cost.step_bytes["kv_cache"] == 8192 * cost.kv_bytes_per_token
    assert cost.step_bytes["embedding"] == pytest.approx(cost.weight_bytes["embedding"]
                                                         / spec.vocab_size)
    assert cost.step_seconds == pytest.approx(cost.total_step_bytes / 30e9)
    assert cost.tokens_per_s == pytest.approx(1 / cost.step_seconds)
    # 46.7B parameters (Mixtral's model card), int4 groups of 64: 0.625 bytes each
    assert cost.total_weight_bytes / 1e9 == pytest.approx(46.7 * 0.625, rel=0.01)
    assert math.isclose(decode_cost(spec, "int4", "int8", batch=2, context=8192,
                                    bandwidth=30e9).kv_cache_bytes, 2 * cost.kv_cache_bytes)


def test_decode_flag_prints_the_plan_and_names_bad_flags(capsys):
    assert cli_main(["plan", "mixtral-8x7b", "--decode", "--weights", "int4",
                     "--kv-cache-dtype", "int8", "--context", "8192",
                     "--bandwidth-gbs", "30"]) == 0
    out = capsys.readouterr().out
    assert "weights int4" in out and "KV cache int8" in out and "tokens/s" in out
    for flags, words in ((["--weights", "int3"], "--weights: weights='int3' is not allowed"),
                         (["--batch", "0"], "--batch: batch=0 is not allowed"),
                         (["--context", "-1"], "--context: context=-1 is not allowed"),
                         (["--bandwidth-gbs", "0"], "--bandwidth-gbs='0' is not allowed"),
                         (["--bandwidth-gbs", "fast"], "a number of GB/s > 0 or 'measure'"),
                         (["--weights", "bf16", "--kv-cache-dtype", "float32"],
                          "--kv-cache-dtype: kv_cache_dtype='float32' is not allowed")):
        assert cli_main(["plan", "mixtral-8x7b", "--decode", *flags]) == 2
        assert words in capsys.readouterr().err
    assert cli_main(["plan", "switch-base-128", "--decode"]) == 2
    assert "encoder-decoder" in capsys.readouterr().err


def test_expert_load_flag_names_a_bad_file(tmp_path, capsys):
    """--expert-load: a missing file, a file that is not JSON, JSON without the layers'
    loads, and layers that do not fit the model are each named, exit 2."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"layers": [{"load": [1, 2]}]}')
    short = tmp_path / "short.json"
    short.write_text('{"layers": [{"load": [3, 1], "tokens": 2}]}')
    for path, words in ((tmp_path / "none.json", "FileNotFoundError"),
                        (bad, "JSONDecodeError"), (wrong, '"tokens" (an int >= 1)'),
                        (short, "layers' is not allowed: the model has 32 MoE layers")):
        assert cli_main(["plan", "mixtral-8x7b", "--decode", "--expert-load", str(path)]) == 2
        err = capsys.readouterr().err
        assert "--expert-load" in err and words in err, err


def test_bandwidth_measure_uses_this_machines_reading(capsys, monkeypatch):
    """--bandwidth-gbs measure divides by moekit.bandwidth.read_bandwidth (here replaced:
    its own test is below); the reading itself is a positive rate from 4 KiB pages."""
    import moekit.bandwidth

    monkeypatch.setattr(moekit.bandwidth, "read_bandwidth", lambda reps=5: 25e9)
    assert cli_main(["plan", "mixtral-8x7b", "--decode", "--bandwidth-gbs", "measure"]) == 0
    out = capsys.readouterr().out
    assert "at 25.0 GB/s" in out and "measured now" in out


def test_read_bandwidths_reads_a_gib():
    from moekit.bandwidth import read_bandwidths

    got = read_bandwidths(reps=1)
    assert set(got) == {"4k", "huge"} and got["4k"] > 1e8
    assert got["huge"] is None or got["huge"] > 1e8


def _plan(capsys, *argv) -> tuple[int, str, str]:
    rc = cli_main(["plan", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_a_quantized_checkpoint_is_planned_with_its_own_bits_and_group_size(
        tmp_path, capsys, bits, group):
    """`plan q4 --decode` said "no state.json or LATEST there": now it reads
    quantized.json, and the weights it holds are the quantized model's state dict, with
    its group size (not the planner's default 64). Another --weights is refused."""
    import json

    from moekit.quant import io as qio

    cfg = _config(tied=False)
    torch.manual_seed(0)
    model = moekit.quantize(MoETransformer(cfg), bits=bits,
                            **({} if group is None else {"group_size": group}))
    qio.save_quantized(model, tmp_path / "q")
    rc, out, err = _plan(capsys, tmp_path / "q", "--decode", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["weights"] == f"int{bits}" and got.get("group_size") == group
    assert got["total_weight_bytes"] == _held_bytes(model)
    assert got["context"] == cfg.max_seq_len  # the default 4096 is past its 64
    rc, _, err = _plan(capsys, tmp_path / "q", "--decode", "--weights", "fp32")
    assert rc == 2 and "--weights='fp32' is not allowed" in err and "already quantized" in err
    # the training plan reads it too (it said "no state.json or LATEST there"): the float
    # model's parameter count, at its max_seq_len
    rc, out, err = _plan(capsys, tmp_path / "q", "--gpus", "1", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["params"]["total_params"] == sum(
        p.numel() for p in MoETransformer(cfg).parameters())
    assert got["setup"]["seq_len"] == cfg.max_seq_len


@pytest.mark.parametrize("bits,group,scope,embeddings", [
    (8, None, "experts", True), (4, 32, "experts", True),  # routed experts only
    (8, None, "all", False), (4, 64, "all", False),  # --float-embeddings
])
def test_quantize_scope_and_float_embeddings_are_planned(tmp_path, capsys, bits, group,
                                                         scope, embeddings):
    """A scope "experts" directory was refused (with advice whose plan counted every
    projection quantized), and a --float-embeddings one planned as if its embedding table
    were quantized: the weights held are now the quantized model's state dict, and the
    float run planned with the same --scope / --float-embeddings gives the same bytes."""
    import json

    from moekit.quant import io as qio
    from moekit.train.checkpoint import save_checkpoint

    cfg = _config(tied=False)
    torch.manual_seed(0)
    float_model = MoETransformer(cfg)
    save_checkpoint(tmp_path / "run", float_model,
                    torch.optim.SGD(float_model.parameters(), lr=0.0),
                    {"step": 0, "model_config": cfg.to_dict()})
    model = moekit.quantize(float_model, bits=bits, scope=scope, embeddings=embeddings,
                            **({} if group is None else {"group_size": group}))
    qio.save_quantized(model, tmp_path / "q")
    rc, out, err = _plan(capsys, tmp_path / "q", "--decode", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["total_weight_bytes"] == _held_bytes(model)
    assert (got["scope"], got["float_embeddings"]) == (scope, not embeddings and scope == "all")
    flags = ["--weights", f"int{bits}", "--scope", scope] + ([] if embeddings else
                                                             ["--float-embeddings"])
    flags += [] if group is None else ["--group-size", str(group)]
    rc, out, err = _plan(capsys, tmp_path / "run", "--decode", "--json", *flags)
    assert rc == 0, err
    assert json.loads(out)["total_weight_bytes"] == _held_bytes(model)
    other = "all" if scope == "experts" else "experts"
    rc, _, err = _plan(capsys, tmp_path / "q", "--decode", "--scope", other)
    assert rc == 2 and f"--scope='{other}' is not allowed" in err and "already quantized" in err


def test_int4_groups_must_tile_the_inputs(tmp_path, capsys):
    """moekit.quantize refuses int4 groups that do not divide an input dimension: the
    planner planned a D=32 model in groups of 64 all the same; --group-size picks another,
    and its bytes are the quantized model's."""
    import json

    from moekit.quant import io as qio
    from moekit.train.checkpoint import save_checkpoint

    cfg = LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=32, num_experts=4, top_k=2,
                   max_seq_len=16)
    model = MoETransformer(cfg)
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": cfg.to_dict()})
    with pytest.raises(ValueError, match="group_size=64 does not divide"):
        moekit.quantize(MoETransformer(cfg), bits=4)
    rc, _, err = _plan(capsys, tmp_path / "run", "--decode", "--weights", "int4")
    assert rc == 2 and "--group-size: group_size=64 is not allowed" in err, err
    rc, out, err = _plan(capsys, tmp_path / "run", "--decode", "--weights", "int4",
                         "--group-size", "32", "--json")
    assert rc == 0, err
    qio.save_quantized(moekit.quantize(model, bits=4, group_size=32), tmp_path / "q")
    assert json.loads(out)["total_weight_bytes"] == _held_bytes(qio.load_quantized(
        tmp_path / "q"))
    rc, _, err = _plan(capsys, tmp_path / "run", "--decode", "--weights", "int8",
                       "--group-size", "32")
    assert rc == 2 and "--group-size=32 is not allowed" in err, err


def test_a_context_past_the_models_longest_is_refused(tmp_path, capsys):
    """--context over the checkpoint's max_seq_len (64) was planned as if it fit."""
    from moekit.train.checkpoint import save_checkpoint

    cfg = _config(tied=True)
    model = MoETransformer(cfg)
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": cfg.to_dict()})
    rc, out, err = _plan(capsys, tmp_path / "run", "--decode", "--context", "64", "--json")
    assert rc == 0 and '"context": 64' in out, err
    rc, out, err = _plan(capsys, tmp_path / "run", "--decode", "--context", "65")
    assert rc == 2 and out == "" and len(err.splitlines()) == 1
    assert "--context=65 is not allowed" in err and "at most 64" in err
    # a transformers config.json's max_position_embeddings too
    hf = {**get_preset("mixtral-8x7b").hf_config, "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(__import__("json").dumps(hf))
    rc, _, err = _plan(capsys, tmp_path / "config.json", "--decode", "--context", "32769")
    assert rc == 2 and "at most 32768" in err
    assert _plan(capsys, tmp_path / "config.json", "--decode", "--context", "32768")[0] == 0


def test_a_dense_checkpoint_has_no_experts_line(tmp_path, capsys):
    """A dense checkpoint (moekit train --dense) had read "experts: 0.0 of 1 per MoE
    layer"; an MoE one keeps its count."""
    from moekit.train.checkpoint import save_checkpoint

    for name, cfg in (("dense", _config(tied=True).replace(dense=True)),
                      ("moe", _config(tied=True))):
        model = MoETransformer(cfg)
        save_checkpoint(tmp_path / name, model, torch.optim.SGD(model.parameters(), lr=0.0),
                        {"step": 0, "model_config": cfg.to_dict()})
    rc, out, err = _plan(capsys, tmp_path / "dense", "--decode")
    assert rc == 0 and "; experts: none (dense model))" in out, err
    assert "per MoE layer" not in out, out
    rc, out, err = _plan(capsys, tmp_path / "moe", "--decode", "--batch", "2")
    assert rc == 0, err
    uniform = 8 * (1 - (1 - 2 / 8) ** 2)  # E (1 - (1 - K / E)^B): 3.5
    assert f"; experts: {uniform:.1f} of 8 per MoE layer, uniform routing)" in out, out


# each preset's config.json max_position_embeddings (DBRX: max_seq_len), from its
# Hugging Face repository (the name in presets.py); Switch's relative positions state none
PRESET_CONTEXTS = {"mixtral-8x7b": 32768, "mixtral-8x22b": 65536, "deepseek-v3": 163840,
                   "qwen3-30b-a3b": 40960, "qwen3-235b-a22b": 40960,
                   "qwen1.5-moe-a2.7b": 8192, "olmoe-1b-7b": 4096, "dbrx": 32768,
                   "gpt-oss-20b": 131072, "gpt-oss-120b": 131072, "switch-base-128": None}


@pytest.mark.parametrize("name", list(PRESET_CONTEXTS))
def test_a_presets_context_is_bounded_by_its_published_longest(name, capsys):
    """Presets carried no longest context: `plan mixtral-8x7b --decode --context 10000000`
    was planned. Now --context and --seq-len past the config's are refused."""
    from moekit.plan.presets import PRESETS

    longest = PRESET_CONTEXTS[name]
    assert set(PRESET_CONTEXTS) == set(PRESETS) and PRESETS[name].max_context == longest
    if longest is None:  # (an encoder-decoder: no decode plan)
        assert _plan(capsys, name, "--seq-len", 8192, "--json")[0] == 0
        return
    rc, out, err = _plan(capsys, name, "--decode", "--context", longest, "--json")
    assert rc == 0 and f'"context": {longest}' in out, err
    rc, out, err = _plan(capsys, name, "--decode", "--context", longest + 1)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1
    assert f"--context={longest + 1} is not allowed: it must be at most {longest}" in err
    rc, out, err = _plan(capsys, name, "--seq-len", longest + 1)
    assert rc == 2 and f"--seq-len={longest + 1} is not allowed" in err
    rc, out, err = _plan(capsys, name, "--decode", "--json")  # the default: 4096 or less
    assert rc == 0 and f'"context": {min(4096, longest)}' in out, err


@pytest.mark.parametrize("argv,flag", [
    (["--decode", "--tp", "4"], "--tp=4 is not allowed"),  # was silently ignored
    (["--decode", "--gpus", "16"], "--gpus=16 is not allowed"),
    (["--decode", "--search"], "--search is not allowed"),
    (["--weights", "int4"], "--weights='int4' is not allowed"),  # without --decode
    (["--batch", "8"], "--batch=8 is not allowed"),
])
def test_flags_the_plan_would_ignore_are_refused(capsys, argv, flag):
    rc, out, err = _plan(capsys, "mixtral-8x7b", *argv)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, err
    assert flag in err and ("--decode" in err)
