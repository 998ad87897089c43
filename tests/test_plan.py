"""`moekit plan`: parameter counts against published totals, transformers modules and
moekit modules; FLOPs against torch's FLOP counter; memory against the bytes of real
parameter, gradient and Adam tensors; communication against a simulated routing."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moekit
from moekit.plan.cli import add_arguments, plans_from_args, run
from moekit.plan.cluster import GPUS, PRECISIONS, Cluster, Layout, TrainSetup, get_gpu
from moekit.plan.cost import capacity_rows, communication, flops, make_plan, memory
from moekit.plan.hf import from_hf_config, from_moe_config, read_spec_file
from moekit.plan.params import count_params
from moekit.plan.presets import PRESETS, get_preset
from moekit.plan.search import search
from moekit.plan.spec import ModelSpec


def parse(*argv: str):
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


# -- presets -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_totals_match_published(name):
    preset = PRESETS[name]
    counts = count_params(preset.spec)
    assert counts.total_params == pytest.approx(preset.published_total, rel=0.01)
    if preset.published_active is not None:
        active = (counts.active_with_embedding if preset.published_active_counts_embedding
                  else counts.active_params)
        assert active == pytest.approx(preset.published_active, rel=preset.active_tolerance)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_total_equals_transformers_module(name):
    """The full-size transformers model, built on the meta device, has exactly our count."""
    transformers = pytest.importorskip("transformers")
    hf = {k: v for k, v in PRESETS[name].hf_config.items() if k != "_name_or_path"}
    cfg = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        if hf["model_type"] == "switch_transformers":
            model = transformers.SwitchTransformersForConditionalGeneration(cfg)
        else:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert count_params(PRESETS[name].spec).total_params == sum(
        p.numel() for p in model.parameters())


# -- transformers config.json --------------------------------------------------------

TINY_HF = {
    "mixtral": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 5,
                "num_experts_per_tok": 2, "vocab_size": 101},
    "qwen2_moe": {"hidden_size": 64, "intermediate_size": 80, "moe_intermediate_size": 24,
                  "shared_expert_intermediate_size": 48, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 6,
                  "num_experts_per_tok": 2, "decoder_sparse_step": 2, "vocab_size": 97},
    "qwen3_moe": {"hidden_size": 64, "intermediate_size": 80, "moe_intermediate_size": 24,
                  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "head_dim": 8, "num_experts": 6, "num_experts_per_tok": 2,
                  "mlp_only_layers": [0], "vocab_size": 97, "tie_word_embeddings": True},
    "deepseek_v3": {"hidden_size": 64, "intermediate_size": 80, "moe_intermediate_size": 16,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "q_lora_rank": 24,
                    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 12, "n_routed_experts": 8, "n_shared_experts": 2,
                    "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                    "first_k_dense_replace": 1, "vocab_size": 99},
    "deepseek_v2": {"hidden_size": 64, "intermediate_size": 80, "moe_intermediate_size": 16,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "q_lora_rank": None,
                    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 12, "n_routed_experts": 8, "n_shared_experts": 1,
                    "num_experts_per_tok": 2, "vocab_size": 99},
    "olmoe": {"hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
              "vocab_size": 103},
    "gpt_oss": {"hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 103,
                "layer_types": ["sliding_attention", "full_attention"]},
    "dbrx": {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 103,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}},
    "switch_transformers": {"d_model": 32, "d_ff": 48, "d_kv": 8, "num_heads": 4,
                            "num_layers": 4, "num_decoder_layers": 4,
                            "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 2,
                            "num_experts": 4, "vocab_size": 50},
}


@pytest.mark.parametrize("model_type", list(TINY_HF))
def test_config_json_reads_like_transformers(model_type, tmp_path):
    """A config.json on disk gives the parameter count of the transformers model built
    from it (a real CPU instantiation, which also exercises the family's defaults)."""
    transformers = pytest.importorskip("transformers")
    data = {"model_type": model_type, **TINY_HF[model_type]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    spec = read_spec_file(path)
    cfg = transformers.AutoConfig.for_model(**data)
    torch.manual_seed(0)
    if model_type == "switch_transformers":
        model = transformers.SwitchTransformersForConditionalGeneration(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert count_params(spec).total_params == sum(p.numel() for p in model.parameters())
    assert spec.top_k == data.get("num_experts_per_tok", data.get("ffn_config", {}).get(
        "moe_top_k", 1))


@pytest.mark.parametrize("model_type", list(TINY_HF))
def test_save_pretrained_directory_plans_like_transformers(model_type, tmp_path, capsys):
    """`moekit plan DIR` of what save_pretrained writes: the directory was refused ("no
    state.json or LATEST there"), and Qwen3-MoE's config.json, which transformers 5.x
    writes with num_local_experts, read as 128 experts (51.8M parameters for a 7.6M
    model)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(model_type, **TINY_HF[model_type])
    cfg.save_pretrained(tmp_path)
    with torch.device("meta"):
        if model_type == "switch_transformers":
            model = transformers.SwitchTransformersForConditionalGeneration(cfg)
        else:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert run(parse(str(tmp_path), "--gpus", "1", "--seq-len", "64", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["total_params"] == sum(p.numel() for p in model.parameters())
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) \
        or getattr(cfg, "n_routed_experts", None) or cfg.ffn_config.moe_num_experts
    assert data["model"]["num_experts"] == experts


def test_a_directory_with_no_model_is_refused_naming_both_kinds(tmp_path, capsys):
    assert run(parse(str(tmp_path), "--gpus", "1")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"checkpoint={str(tmp_path)!r}: no state.json or LATEST there" in err
    assert "(or a transformers model directory: no config.json there either)" in err


def test_config_json_fields_mixtral(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mixtral", **TINY_HF["mixtral"]}))
    spec = read_spec_file(path)
    assert (spec.dim, spec.num_layers, spec.num_experts, spec.top_k, spec.expert_ffn_dim,
            spec.num_heads, spec.kv_heads, spec.head_size, spec.vocab_size) == (
        64, 2, 5, 2, 96, 4, 2, 16, 101)


# -- formulas against moekit modules -------------------------------------------------

MOE_CASES = [
    dict(),
    dict(activation="gelu"),
    dict(activation="relu2", num_experts=7, top_k=3),
    dict(num_shared_experts=2, shared_expert_gate=True),
    dict(num_shared_experts=1, shared_ffn_dim=40, expert_bias=True, activation="swiglu_oai"),
    dict(router="noisy_topk"),
    dict(router="hash", hash_vocab_size=50),
    dict(router="sigmoid", num_groups=2, topk_groups=1),
    dict(num_experts=1, top_k=1),
]


@pytest.mark.parametrize("kw", MOE_CASES)
def test_params_match_moekit_moe(kw):
    cfg = moekit.MoEConfig(dim=32, ffn_dim=24, **{"num_experts": 6, "top_k": 2, **kw})
    moe = moekit.MoE(cfg)
    counts = count_params(from_moe_config(cfg))
    assert counts.total_params == sum(p.numel() for p in moe.parameters())


@pytest.mark.parametrize("kw", [k for k in MOE_CASES if not k.get("expert_bias")
                                and k.get("router") not in ("hash", "noisy_topk")])
def test_active_params_match_flop_counter(kw):
    """Forward FLOPs counted by torch (per-expert loop backend) = 2 x tokens x active."""
    cfg = moekit.MoEConfig(dim=32, ffn_dim=24, **{"num_experts": 6, "top_k": 2, **kw})
    moe = moekit.MoE(cfg, backend="loop")
    T = 50
    with FlopCounterMode(display=False) as counter:
        moe(torch.randn(T, 32))
    assert counter.get_total_flops() == 2 * T * count_params(from_moe_config(cfg)).active_params


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def moe_stack():
    cfg = moekit.MoEConfig(dim=32, ffn_dim=24, num_experts=6, top_k=2, num_shared_experts=1)
    layers = torch.nn.ModuleList(moekit.MoE(cfg) for _ in range(3))

    def loss() -> torch.Tensor:
        x = torch.randn(16, 32)
        for moe in layers:
            x = x + moe(x).output
        return x.square().mean()
    return layers, loss, from_moe_config(cfg, num_layers=3)


def tiny_lm():
    from moekit.models import MoETransformer, preset
    from moekit.plan.hf import from_lm_config
    cfg = preset("tiny", moe_every=2, num_layers=3)
    model = MoETransformer(cfg)
    ids = torch.randint(0, 256, (2, 16))
    return model, lambda: model(ids, ids).loss, from_lm_config(cfg)


@pytest.mark.parametrize("build", [moe_stack, tiny_lm])
def test_memory_matches_real_tensors(build):
    """fp32 Adam on moekit models: weights, grads and optimizer states counted from the
    real tensors equal the formula (one GPU, no sharding; a tied weight counts once)."""
    model, loss, spec = build()
    opt = torch.optim.AdamW(model.parameters())
    loss().backward()
    opt.step()
    states = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    setup = TrainSetup(seq_len=16, global_batch=1, precision=PRECISIONS["fp32"])
    mem = memory(spec, count_params(spec), setup, Layout())
    params = list(model.parameters())
    assert mem.weights == tensor_bytes(params)
    assert mem.grads == tensor_bytes(p.grad for p in params)
    assert mem.optimizer == tensor_bytes(states)


def test_zero_and_expert_sharding_by_hand():
    """A hand-worked layout: 1000 dense + 8 experts x 100 parameters, dp 4, ep 2."""
    spec = ModelSpec(num_layers=1, dim=10, norm="none", ffn_kind="plain", num_experts=8,
                     top_k=1, expert_ffn_dim=5, hash_router=True)
    counts = count_params(spec)
    assert counts.expert_params == 8 * 100 and counts.dense_params == 0
    setup = TrainSetup(seq_len=4, global_batch=4)  # bf16-mixed: 2 + 2 + 12 bytes
    for zero, w, g, o in [(0, 800, 800, 4800), (1, 800, 800, 2400), (2, 800, 400, 2400),
                          (3, 400, 400, 2400)]:
        # 4 experts per GPU (ep 2) = 400 params, each shard replicated dp/ep = 2 times.
        mem = memory(spec, counts, setup, Layout(dp=4, ep=2, zero=zero))
        assert (mem.weights, mem.grads, mem.optimizer) == (w, g, o)


def test_zero3_buffer_shards_only_the_experts_over_ep():
    """The gathered layer by hand: attention, norms, router and shared expert are split
    over tp alone, the routed experts over tp * ep (the whole layer / ep had been used)."""
    spec = ModelSpec(num_layers=1, dim=10, num_heads=2, norm="rmsnorm", ffn_kind="plain",
                     num_experts=8, top_k=1, expert_ffn_dim=5, num_shared_experts=1,
                     shared_ffn_dim=5)
    counts = count_params(spec)
    attention = 4 * 10 * 10  # q, k, v, o: D x (H * head_size) each, H * head_size = D
    norms = 3 * 10  # two per layer and the final one
    router = 8 * 10
    shared = 2 * 10 * 5
    experts = 8 * 2 * 10 * 5
    assert counts.expert_params == experts
    assert counts.dense_params == attention + norms + router + shared
    setup = TrainSetup(seq_len=4, global_batch=4, precision=PRECISIONS["fp32"])
    for dp, tp, ep, want in [(4, 1, 2, attention + norms + router + shared + experts / 2),
                             (2, 2, 2, (attention + norms + router + shared) / 2
                              + experts / 4),
                             (4, 1, 4, attention + norms + router + shared + experts / 4)]:
        mem = memory(spec, counts, setup, Layout(dp=dp, tp=tp, ep=ep, zero=3))
        assert mem.zero3_buffer == pytest.approx(want * 4), (dp, tp, ep)
    assert memory(spec, counts, setup, Layout(dp=4, ep=2, zero=2)).zero3_buffer == 0


def test_all_to_all_bytes_match_simulated_routing():
    """Uniform random routing of T tokens x K slots to E experts on ep GPUs: the rows
    leaving their GPU, x D x 2 bytes x 4 (dispatch + combine, forward + backward)."""
    E, K, D, ep, T = 16, 4, 64, 4, 20000
    spec = ModelSpec(num_layers=1, dim=D, norm="none", num_experts=E, top_k=K,
                     expert_ffn_dim=32)
    g = torch.Generator().manual_seed(0)
    experts_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    sent = (experts_TK // (E // ep) != 0).sum().item()  # this GPU is rank 0
    simulated = 4 * sent * D * 2
    setup = TrainSetup(seq_len=T, global_batch=ep)
    cluster = Cluster(gpu=get_gpu("h100"), num_gpus=ep)
    comm = communication(spec, count_params(spec), setup, Layout(dp=ep, ep=ep), cluster)
    assert comm.all_to_all_bytes == pytest.approx(simulated, rel=0.01)


@pytest.mark.parametrize("E, K, ep", [(16, 4, 4), (64, 8, 8), (8, 2, 2), (6, 6, 3)])
def test_dedup_all_to_all_bytes_match_simulated_routing(E, K, ep):
    """all_to_all_dedup: one row per (token, other GPU holding any of its K experts),
    counted over uniformly random routings; K = E sends to every other GPU exactly once."""
    D, T = 64, 20000
    spec = ModelSpec(num_layers=1, dim=D, norm="none", num_experts=E, top_k=K,
                     expert_ffn_dim=32)
    g = torch.Generator().manual_seed(1)
    experts_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    owner_TK = experts_TK // (E // ep)
    sent = sum(len(set(row.tolist()) - {0}) for row in owner_TK)  # this GPU is rank 0
    setup = TrainSetup(seq_len=T, global_batch=ep, dispatcher="all_to_all_dedup")
    cluster = Cluster(gpu=get_gpu("h100"), num_gpus=ep)
    comm = communication(spec, count_params(spec), setup, Layout(dp=ep, ep=ep), cluster)
    assert comm.all_to_all_bytes == pytest.approx(4 * sent * D * 2, rel=0.01)
    if K == E:
        assert sent == T * (ep - 1)


# (E, K, ep, T, factor): C = ceil(factor * T * K / E) rows per expert on each rank
CAPACITY_CASES = [
    (16, 4, 4, 20000, 1.25),  # the ratio to dropless is the factor: 1.25x
    (8, 2, 2, 10, 1.25),  # ceil(3.125) = 4: 1.6x the routed rows, not 1.25x
    (6, 6, 3, 7, 0.5),  # a factor < 1 still sends whole buffers (K = E, prime T)
]


@pytest.mark.parametrize("E, K, ep, T, factor", CAPACITY_CASES)
def test_capacity_all_to_all_bytes_match_padded_buffers(E, K, ep, T, factor):
    """Capacity mode (padded_all_to_all) sends the [E, C, D] buffer of this rank's T
    tokens, padding and all, less the E / ep experts it keeps: routed rows fill it (the
    rows past C dropped), and its size does not depend on which rows they are."""
    D = 64
    spec = ModelSpec(num_layers=1, dim=D, norm="none", num_experts=E, top_k=K,
                     expert_ffn_dim=32, capacity_factor=factor)
    C = moekit.MoEConfig(dim=D, ffn_dim=32, num_experts=E, top_k=K,
                         capacity_factor=factor).capacity(T)  # what the layer uses
    g = torch.Generator().manual_seed(2)
    experts_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    buf_ECD = torch.zeros(E, C, D, dtype=torch.bfloat16)
    filled_E = [0] * E
    for e in experts_TK.flatten().tolist():  # position policy: first come, first kept
        if filled_E[e] < C:
            buf_ECD[e, filled_E[e]] = 1.0
            filled_E[e] += 1
    sent = buf_ECD[E // ep:].nbytes  # this GPU is rank 0: it keeps experts 0 .. E/ep - 1
    setup = TrainSetup(seq_len=T, global_batch=ep)
    cluster = Cluster(gpu=get_gpu("h100"), num_gpus=ep)
    lay = Layout(dp=ep, ep=ep)
    comm = communication(spec, count_params(spec), setup, lay, cluster)
    assert comm.all_to_all_bytes == pytest.approx(4 * sent, rel=1e-12)  # fwd+bwd, out+back
    dropless = replace(spec, capacity_factor=None)
    ratio = comm.all_to_all_bytes / communication(dropless, count_params(dropless), setup,
                                                  lay, cluster).all_to_all_bytes
    assert ratio == pytest.approx(E * C / (T * K), rel=1e-12)


def test_capacity_rows_cost_as_that_many_routed_rows():
    """Expert compute and saved activations go by routed row: E=8, K=2, T=16 at factor
    1.5 fills E * C = 8 * 6 = 48 rows = 3 per token, so with expert parallelism its plan
    costs what a dropless top-3 plan does (its model FLOPs stay top-2's); without, only
    rows past C are dropped: factor 1.5 costs top-2's, factor 0.5 (C = 2, 16 rows) top-1's."""
    base = ModelSpec(num_layers=2, dim=64, num_heads=4, vocab_size=100, num_experts=8,
                     top_k=2, expert_ffn_dim=32)
    cluster = Cluster(gpu=get_gpu("h100"), num_gpus=4)
    setup = TrainSetup(seq_len=16, global_batch=8)

    def costs(spec, lay):
        p = make_plan(spec, cluster, setup, lay)
        return p.memory.activations, p.time.compute_s, p.comm.all_to_all_bytes, p.flops

    for lay, factor, k in ((Layout(dp=4, ep=4), 1.5, 3), (Layout(dp=4, ep=1), 1.5, 2),
                           (Layout(dp=4, ep=1), 0.5, 1)):
        act, compute, a2a, fl = costs(replace(base, capacity_factor=factor), lay)
        act_k, compute_k, a2a_k, _ = costs(replace(base, top_k=k), lay)
        assert (act, compute, a2a) == pytest.approx((act_k, compute_k, a2a_k), rel=1e-12), lay
        assert fl == costs(base, lay)[3]  # model FLOPs: the useful work, top-2


def test_capacity_refuses_the_dedup_dispatcher(capsys):
    """Capacity mode's fixed buffers go with all_to_all only (DistributedMoE refuses
    all_to_all_dedup with a capacity factor): the plan and the search refuse it too."""
    spec = replace(get_preset("olmoe-1b-7b").spec, capacity_factor=1.25)
    cluster = Cluster(gpu=get_gpu("h100"), num_gpus=8)
    setup = TrainSetup(seq_len=1024, global_batch=64, dispatcher="all_to_all_dedup")
    for call in (lambda: make_plan(spec, cluster, setup, Layout(dp=8, ep=8)),
                 lambda: search(spec, cluster, setup)):
        with pytest.raises(ValueError, match=r"dispatcher='all_to_all_dedup' is not allowed: "
                           r"capacity_factor=1.25 \(capacity mode\)"):
            call()
    for extra in ([], ["--search"]):
        assert run(parse("olmoe-1b-7b", "--capacity-factor", "1.25", "--dispatcher",
                         "all_to_all_dedup", *extra)) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith("moekit plan: error: --dispatcher: ")


def test_capacity_factor_flag_and_model_sources(tmp_path, capsys):
    """--capacity-factor sets or overrides (none: dropless) the factor a moekit config
    carries; expert choice's C = ceil(factor * T / E) reads as factor / K; the table says
    what the all-to-all line counts; bad values are refused by the flag's name."""
    from moekit.models import LMConfig

    path = tmp_path / "moe.json"
    path.write_text(json.dumps(moekit.MoEConfig(dim=64, ffn_dim=128, num_experts=8,
                                                capacity_factor=2.0).to_dict()))
    assert read_spec_file(path).capacity_factor == 2.0
    lm = LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=16, num_experts=4, top_k=2,
                  vocab_size=256, router="expert_choice", capacity_factor=1.5)
    (tmp_path / "lm.json").write_text(json.dumps(lm.to_dict()))
    spec = read_spec_file(tmp_path / "lm.json")
    for T in (64, 37):
        assert capacity_rows(spec, T) == 4 * lm.moe_config(0).capacity(T)
    for flag, want in ((None, 2.0), ("1.25", 1.25), ("none", None)):
        argv = [str(path), "--gpus", "8", "--seq-len", "128", "--json"]
        assert run(parse(*argv, *(["--capacity-factor", flag] if flag else []))) == 0
        assert json.loads(capsys.readouterr().out)["model"]["capacity_factor"] == want
    assert run(parse(str(path), "--gpus", "8", "--seq-len", "100")) == 0
    # C = ceil(2 * 100 * 2 / 8) = 50 rows per expert, 400 rows for 200 routed: 2.00x
    assert "capacity factor 2: [E, C, D] buffers of C = 50 rows per expert, padding " \
           "included, 2.00x the routed rows" in capsys.readouterr().out
    for bad in ("0", "-1", "9", "nan", "inf", "abc"):
        assert run(parse(str(path), "--capacity-factor", bad)) == 2
        err = capsys.readouterr().err
        assert f"--capacity-factor={bad!r} is not allowed: it must be a number in (0, 8]" in err
    with pytest.raises(ValueError, match=r"capacity_factor=0 is not allowed"):
        ModelSpec(num_layers=1, dim=8, expert_ffn_dim=8, capacity_factor=0)
    assert run(parse("olmoe-1b-7b", "--decode", "--capacity-factor", "1.25")) == 2
    assert "--capacity-factor='1.25' is not allowed: it plans training" in \
        capsys.readouterr().err


def test_plan_end_to_end_numbers():
    spec = get_preset("mixtral-8x7b").spec
    cluster = Cluster(gpu=get_gpu("h100"), num_gpus=64)
    setup = TrainSetup(seq_len=4096, global_batch=256)
    plan = make_plan(spec, cluster, setup, Layout(dp=8, tp=8, ep=8, zero=1))
    fl = plan.flops
    assert fl.train_per_token == pytest.approx(
        3 * (2 * plan.params.active_params + 32 * 2 * 2048 * 32 * 256), rel=1e-12)
    assert fl.dense_equal_total_train / fl.train_per_token == pytest.approx(3.5, abs=0.1)
    rc = make_plan(spec, cluster, setup, Layout(dp=8, tp=8, ep=8, zero=1, recompute="full"))
    assert rc.memory.activations < plan.memory.activations / 10
    assert rc.memory_recompute == plan.memory  # the other column is the same layout
    tokens = 256 * 4096
    assert plan.time.tokens_per_s == pytest.approx(tokens / plan.time.step_s)
    assert plan.energy_per_token_wall_j == pytest.approx(
        64 * 700 * plan.time.step_s / tokens)
    assert 0 < plan.time.mfu <= 1
    hidden = make_plan(spec, cluster, TrainSetup(seq_len=4096, global_batch=256,
                                                 a2a_overlap=1.0), plan.layout)
    assert plan.time.step_s - hidden.time.step_s == pytest.approx(plan.comm.all_to_all_s)


def test_search_ranks_fitting_layouts():
    args = parse("olmoe-1b-7b", "--gpus", "8", "--global-batch", "64", "--seq-len", "2048",
                 "--search", "--top", "5")
    plans = plans_from_args(args)
    assert 1 <= len(plans) <= 5 and all(p.fits for p in plans)
    speeds = [p.time.tokens_per_s for p in plans]
    assert speeds == sorted(speeds, reverse=True)


# -- CLI and bad input ---------------------------------------------------------------


def test_cli_table_and_json(capsys):
    assert run(parse("gpt-oss-20b", "--gpus", "8")) == 0
    out = capsys.readouterr().out
    assert "all-to-all" in out and "tokens/s" in out and "20.91B" in out
    # the dispatcher sends one row per routed expert (tests/dist_workers.py check_comm:
    # dropless bytes = 2 x remote routed rows), and the table says so
    assert "K rows per token: one per routed expert, no per-rank dedup" in out
    assert run(parse("gpt-oss-20b", "--gpus", "8", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["total_params"] == count_params(get_preset("gpt-oss-20b").spec
                                                          ).total_params
    assert set(data["memory"]) >= {"weights", "grads", "optimizer", "activations", "total"}


def test_cli_moe_config_file(tmp_path, capsys):
    path = tmp_path / "moe.json"
    path.write_text(json.dumps(moekit.MoEConfig(dim=64, ffn_dim=128).to_dict()))
    assert run(parse(str(path), "--gpus", "1", "--seq-len", "128", "--json")) == 0
    total = json.loads(capsys.readouterr().out)["params"]["total_params"]
    assert total == sum(p.numel() for p in moekit.MoE(moekit.MoEConfig(dim=64, ffn_dim=128))
                        .parameters())


def test_a_checkpoints_max_seq_len_bounds_the_training_plan(tmp_path, capsys):
    """`plan RUN` planned sequences of 4096 for a checkpoint whose model holds 64
    positions (its rotary table): the default is now its max_seq_len, and a --seq-len past
    it is refused by name, as --context is for a decode plan."""
    from moekit.models import LMConfig, MoETransformer
    from moekit.train.checkpoint import save_checkpoint

    cfg = LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=16, num_experts=4, top_k=2,
                   vocab_size=256, max_seq_len=64)
    model = MoETransformer(cfg)
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": cfg.to_dict()})
    run_dir = str(tmp_path / "run")
    assert run(parse(run_dir, "--json")) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["seq_len"] == 64
    assert run(parse(run_dir, "--seq-len", "32", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["seq_len"] == 32
    for argv in ([run_dir, "--seq-len", "65"], [run_dir, "--seq-len", "65", "--search"]):
        assert run(parse(*argv)) == 2
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1
        assert "--seq-len=65 is not allowed: it must be at most 64" in out.err
    # a source that states no longest context keeps the default
    path = tmp_path / "moe.json"
    path.write_text(json.dumps(moekit.MoEConfig(dim=64, ffn_dim=128).to_dict()))
    assert run(parse(str(path), "--gpus", "1", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["seq_len"] == 4096


@pytest.mark.parametrize("tied", [True, False])
def test_dense_model_equals_its_dense_equivalent(tied):
    """For a dense model the "dense model of the same total parameters" is itself: x1.0
    whether its head is tied to the embedding or not (tied, the head was left out: 0.8x)."""
    from moekit.models import MoETransformer, preset
    from moekit.plan.hf import from_lm_config
    cfg = preset("tiny", dense=True, tie_embeddings=tied)
    spec = from_lm_config(cfg)
    counts = count_params(spec)
    model = MoETransformer(cfg)
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    fl = flops(spec, counts, TrainSetup(seq_len=64, global_batch=1))
    assert fl.dense_equal_total_train == pytest.approx(fl.train_per_token, rel=1e-12)


@pytest.mark.parametrize("argv,words", [
    (("mixtral-8x7b", "--gpu", "x100"), ("gpu", "'x100'", "h100")),
    (("mixtral-8x7b", "--gpus", "0"), ("num_gpus", "0")),
    (("mixtral-8x7b", "--gpus", "12"), ("num_gpus", "12", "gpus_per_node")),
    (("mixtral-8x7b", "--zero", "4"), ("zero", "4", "0, 1, 2 or 3")),
    (("mixtral-8x7b", "--ep", "3"), ("ep", "3", "dp=8")),
    (("mixtral-8x7b", "--tp", "3"), ("tp", "3", "num_heads=32")),
    (("mixtral-8x7b", "--dp", "4"), ("layout", "num_gpus=8")),
    (("mixtral-8x7b", "--recompute", "some"), ("recompute", "'some'", "full")),
    (("mixtral-8x7b", "--precision", "fp8"), ("precision", "'fp8'", "bf16-mixed")),
    (("mixtral-8x7b", "--global-batch", "12"), ("global_batch", "12", "multiple")),
    (("mixtral-8x7b", "--peak-tflops", "-1"), ("--peak-tflops", "-1", "finite number > 0")),
    (("mixtral-8x7b", "--memory-gb", "inf"), ("--memory-gb", "inf", "finite number > 0")),
    (("mixtral-8x7b", "--hbm-tbps", "nan"), ("--hbm-tbps", "nan", "finite number > 0")),
    (("mixtral-8x7b", "--joules-per-flop", "inf"), ("joules_per_flop", "inf", "finite")),
    (("mixtral-8x7b", "--search", "--top", "0"), ("top", "0", ">= 1")),
    (("mixtral-8x7b", "--efficiency", "2"), ("compute_efficiency", "2")),
    (("mixtral-8x7b", "--a2a-overlap", "1.5"), ("a2a_overlap", "1.5", "[0, 1]")),
    (("llama-moe",), ("model", "'llama-moe'", "mixtral-8x7b")),
    (("missing.json",), ("config", "missing.json", "existing JSON file")),
])
def test_bad_input_names_argument(argv, words, capsys):
    with pytest.raises(ValueError) as e:
        plans_from_args(parse(*argv))
    for w in words:
        assert w in str(e.value)
    assert run(parse(*argv)) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("content,words", [
    ("{not json", ("config", "not valid JSON")),
    ('{"model_type": "llama"}', ("model_type", "'llama'", "mixtral")),
    ('{"foo": 1}', ("config", "transformers config.json")),
    ('{"model_type": "mixtral", "num_experts_per_tok": 9}', ("top_k", "9", "num_experts=8")),
    ('{"model_type": "qwen3_moe", "mlp_only_layers": [2]}', ("mlp_only_layers", "prefix")),
    ('[1, 2]', ("config", "object")),
])
def test_bad_config_file_names_problem(content, words, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        read_spec_file(path)
    for w in words:
        assert w in str(e.value)


def test_gpu_presets_are_consistent():
    for gpu in GPUS.values():
        # joules per FLOP at peak: between 0.1 and 2 pJ for every listed accelerator
        assert 1e-13 < gpu.power_watts / gpu.peak_flops < 2e-12
        assert gpu.inter_node_bandwidth <= gpu.intra_node_bandwidth
    assert math.isclose(GPUS["h100"].peak_flops, 989e12)


# -- the moekit language model -------------------------------------------------------

LM_CASES = [
    dict(),
    dict(moe_every=2, num_layers=4),
    dict(dense=True),
    dict(tie_embeddings=False, router="noisy_topk"),
    dict(router="hash"),
    dict(num_heads=4, num_kv_heads=2, head_dim=12, qk_norm="head"),  # Qwen3-MoE's layout
    dict(num_heads=4, num_kv_heads=1, qk_norm="full"),  # OLMoE's
]


@pytest.mark.parametrize("kw", LM_CASES)
def test_params_match_moekit_lm(kw):
    from moekit.models import MoETransformer, preset
    from moekit.plan.hf import from_lm_config
    cfg = preset("tiny", **kw)
    model = MoETransformer(cfg)
    counts = count_params(from_lm_config(cfg))
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    # the LM's own count: every parameter but the experts a token is not routed to
    unused = sum((m.config.num_experts - m.config.top_k) * sum(
        p[0].numel() for p in m.experts.parameters()) for m in model.moe_layers())
    assert counts.active_with_embedding == counts.total_params - unused


def test_plan_reads_lm_config_and_checkpoint(tmp_path):
    from moekit.models import MoETransformer, preset
    from moekit.train import save_checkpoint
    cfg = preset("tiny", moe_every=2, num_layers=4)
    model = MoETransformer(cfg)
    expected = sum(p.numel() for p in model.parameters())
    path = tmp_path / "lm.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert count_params(read_spec_file(path)).total_params == expected
    save_checkpoint(tmp_path / "run", model, torch.optim.AdamW(model.parameters()),
                    {"step": 3, "model_config": cfg.to_dict()})
    assert count_params(read_spec_file(tmp_path / "run")).total_params == expected


def test_gradient_traffic_and_bubble_by_hand():
    """dp 4, no experts sharded: ring all-reduce moves 2 (n-1)/n of the gradient bytes
    (ZeRO 0/1), reduce-scatter half that (ZeRO-2), ZeRO-3 adds two weight all-gathers."""
    spec = ModelSpec(num_layers=4, dim=16, vocab_size=32, num_heads=2, num_experts=4,
                     top_k=1, expert_ffn_dim=8)
    counts = count_params(spec)
    cluster = Cluster(gpu=get_gpu("a100-80gb"), num_gpus=4)
    setup = TrainSetup(seq_len=8, global_batch=16)
    grad_bytes = counts.total_params * 2  # bf16
    for zero, factor in [(0, 2.0), (1, 2.0), (2, 1.0), (3, 3.0)]:
        lay = Layout(dp=4, zero=zero)
        comm = communication(spec, counts, setup, lay, cluster)
        assert comm.data_parallel_bytes == pytest.approx(factor * 3 / 4 * grad_bytes)
        assert comm.data_parallel_s == pytest.approx(comm.data_parallel_bytes / 300e9)
        assert comm.all_to_all_bytes == 0  # ep = 1: experts replicated, nothing sent
    plan = make_plan(spec, Cluster(gpu=get_gpu("a100-80gb"), num_gpus=4), setup,
                     Layout(pp=4, micro_batch=2))  # 8 micro-batches through 4 stages
    busy = plan.time.compute_s + plan.comm.pipeline_s
    assert plan.time.bubble_s == pytest.approx(busy * 3 / 8)


@pytest.mark.parametrize("kw", [dict(), dict(moe_every=2, num_layers=4),
                                dict(tie_embeddings=False, top_k=3)])
def test_lm_forward_flops_match_flop_counter(kw):
    """torch's FLOP counter on the moekit LM (math attention, per-expert loop backend)
    equals tokens x the planner's forward FLOPs per token, attention scores included
    (non-causal: the math kernel computes the whole T x T), norm weights aside."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from moekit.models import MoETransformer, preset
    from moekit.plan.cost import flops
    from moekit.plan.hf import from_lm_config
    cfg = preset("tiny", **kw)
    model = MoETransformer(cfg)
    for moe in model.moe_layers():
        moe.experts.backend = "loop"  # the grouped_mm op has no FLOP formula
    B, L = 2, 64
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (B, L)))
    spec = from_lm_config(cfg)
    counts = count_params(spec)
    fl = flops(spec, counts, TrainSetup(seq_len=L, global_batch=B, causal=False))
    per_token = fl.forward_per_token - 2 * counts.active["norms"]
    assert counter.get_total_flops() == per_token * B * L


def test_moekit_command_runs_plan(capsys):
    from moekit.cli import main
    assert main(["plan", "olmoe-1b-7b", "--gpus", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["total_params"] == 6_919_161_856


@pytest.mark.parametrize("model_type,dim,heads", [("olmoe", 2048, 16), ("qwen2_moe", 2048, 16)])
def test_hf_config_without_hidden_size_uses_the_family_width(model_type, dim, heads):
    # the head size came from a default width of 4096 while dim took the family's 2048
    trimmed = from_hf_config({"model_type": model_type})
    full = from_hf_config({"model_type": model_type, "hidden_size": dim,
                           "num_attention_heads": heads})
    assert (trimmed.dim, trimmed.head_dim) == (full.dim, full.head_dim) == (dim, dim // heads)
