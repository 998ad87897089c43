"""``DecodePlan``: a decode step as prepared kernel calls must give exactly what
``MoETransformer.infer`` gives (the same kernels with the same arguments, so bitwise
the same logits), fall back wherever the modules would leave the kernels, and the
generation engine must produce the same tokens with and without it."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.functions import decode
from moekit.inference import decode_plan as dp
from moekit.inference.decode_plan import DecodePlan
from moekit.inference.engine import Engine, GenerationConfig
from moekit.models.config import LMConfig
from moekit.models.generate import sample_next
from moekit.models.transformer import MoETransformer, StaticKVCache
from moekit.quant.linear import QuantizedEmbedding

pytestmark = pytest.mark.skipif(not decode.available(), reason="decode kernels not built")


def _lm(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, dim=64, num_layers=2, num_heads=4, max_seq_len=64,
               num_experts=8, top_k=2, ffn_dim=32)
    model = MoETransformer(LMConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # norms of ones would hide a norm applied in the wrong place
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _variant(name: str):
    if name == "sigmoid":
        return _lm(router="sigmoid")
    if name == "gpt-oss experts":  # every per-layer argument DecodeStep reads, not defaults
        return _other_experts()
    if name == "gqa":  # 2 key/value heads for 4 query heads
        return _lm(num_kv_heads=2)
    if name == "gqa int4 bf16":
        return moekit.quantize(_lm(num_kv_heads=1), bits=4, group_size=32).to(torch.bfloat16)
    if name == "qwen3":  # heads wider than D / H, per-head q / k norms, grouped-query
        return _lm(num_kv_heads=2, head_dim=24, qk_norm="head")
    if name == "olmoe":  # q / k norms over all heads, no renormalization of the top-k
        return _lm(qk_norm="full", renormalize=False)
    if name == "qwen3 int4 bf16":
        return moekit.quantize(_lm(num_kv_heads=2, head_dim=24, qk_norm="head"), bits=4,
                               group_size=32).to(torch.bfloat16)
    if name.startswith("qwen2"):  # shared experts (gated), q / k / v biases, grouped-query
        model = _qwen2(gate="ungated" not in name)
        if "int4" in name:
            model = moekit.quantize(model, bits=4, group_size=32)
        if "int8a8" in name:
            model = moekit.quantize(model, bits=8, activations="int8")
        return model.to(torch.bfloat16) if "bf16" in name else model
    if name == "int8 untied":  # a float nn.Embedding beside a quantized head
        return moekit.quantize(_lm(tie_embeddings=False), bits=8, embeddings=False)
    if name == "int4 untied bf16":  # a quantized table of its own beside the head's
        return moekit.quantize(_lm(tie_embeddings=False), bits=4,
                               group_size=32).to(torch.bfloat16)
    model = _lm()
    if name == "bf16":
        return model.to(torch.bfloat16)
    if name == "int8":
        return moekit.quantize(model, bits=8)
    if name == "int4":
        return moekit.quantize(model, bits=4, group_size=32)
    if name == "int8a8":
        return moekit.quantize(model, bits=8, activations="int8")
    if name == "int4a8":
        return moekit.quantize(model, bits=4, group_size=32, activations="int8")
    if name == "int4 bf16":  # the quantized tied table looked up into bf16 rows
        return moekit.quantize(model, bits=4, group_size=32).to(torch.bfloat16)
    return model


def _qwen2(gate: bool = True):
    model = _lm(num_kv_heads=2, num_shared_experts=1, shared_ffn_dim=96,
                shared_expert_gate=gate, qkv_bias=True)
    with torch.no_grad():  # zero biases (their init) would hide a bias left out
        for block in model.blocks:
            block.attn.qkv.bias.uniform_(-0.5, 0.5)
            if gate:  # a gate far from 0 (sigmoid 0.5 everywhere would hide its scale)
                block.ffn.shared.gate.normal_(0, 0.5)
    return model


def _other_experts():
    """MoE blocks with GPT-OSS's clamped SwiGLU (limit and alpha not the defaults), expert
    biases, a sigmoid router with a selection bias, no renormalization and a routed
    scaling factor: the activation, biases and routing arguments the plan passes on."""
    model = _lm()
    cfg = moekit.MoEConfig(dim=64, ffn_dim=32, num_experts=8, top_k=2, router="sigmoid",
                           activation="swiglu_oai", swiglu_limit=1.5, swiglu_alpha=1.3,
                           expert_bias=True, renormalize=False, routed_scaling_factor=2.5,
                           bias_update_rate=1e-3)
    g = torch.Generator().manual_seed(1)
    for block in model.blocks:
        block.ffn = moekit.MoE(cfg).eval()
        with torch.no_grad():
            for p in block.ffn.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            block.ffn.router.expert_bias.copy_(torch.randn(8, generator=g))
    return model


def _steps(model, step, prompts, n=6, kv=None):
    """Logits of a prefill and n decode steps (greedy), each step run by ``step``; ``kv``:
    the cache's dtype."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    cache = StaticKVCache.for_model(model, len(prompts), L + n + 1, kv)
    cache.reset(torch.tensor([L - len(p) for p in prompts]))
    out = []
    with torch.inference_mode():
        logits = model.infer(ids, cache)
        for _ in range(n):
            nxt = logits.argmax(-1)[:, None]
            logits = step(nxt, cache)
            assert logits is not None
            out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("variant", ["fp32", "sigmoid", "bf16", "int8", "int4", "int8a8",
                                     "int4a8", "int8 untied", "int4 untied bf16", "int4 bf16",
                                     "gpt-oss experts", "gqa", "gqa int4 bf16", "qwen3",
                                     "olmoe", "qwen3 int4 bf16", "qwen2", "qwen2 bf16",
                                     "qwen2 ungated bf16", "qwen2 int4 bf16", "qwen2 int8a8"])
@pytest.mark.parametrize("prompts", [[[1, 2, 3]], [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]],
                         ids=["one", "padded"])
def test_plan_step_is_bitwise_the_modules_step(variant, prompts):
    model = _variant(variant)
    with torch.inference_mode():
        plan = DecodePlan.build(model)
    assert plan is not None
    quantized_table = isinstance(model.embed, QuantizedEmbedding)
    assert quantized_table == (variant not in ("fp32", "sigmoid", "bf16", "int8 untied",
                                               "gpt-oss experts", "gqa", "qwen3",
                                               "olmoe", "qwen2", "qwen2 bf16",
                                               "qwen2 ungated bf16"))
    fast = _steps(model, plan.step, prompts)
    slow = _steps(model, model.infer, prompts)
    assert fast.dtype == slow.dtype == model.norm.weight.dtype
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("variant,kv", [
    *((v, kv) for v in ("fp32", "gqa", "int4", "qwen3", "int8a8") for kv in ("bfloat16", "int8")),
    ("bf16", "int8"), ("gqa int4 bf16", "int8"), ("qwen2 bf16", "int8")])
def test_plan_step_over_a_small_cache_is_bitwise_the_modules_step(variant, kv):
    """fp32 activations over a bf16 or int8 KV cache, bf16 ones over an int8 cache: the
    plan's one call per step gives the modules' logits bitwise (both run attend_one's
    kernel for that cache)."""
    model = _variant(variant)
    with torch.inference_mode():
        plan = DecodePlan.build(model)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    fast = _steps(model, plan.step, prompts, kv=kv)
    slow = _steps(model, model.infer, prompts, kv=kv)
    assert fast.dtype == model.norm.weight.dtype
    assert torch.equal(fast, slow)
    assert not torch.equal(slow, _steps(model, model.infer, prompts))  # the cache rounds


@pytest.mark.parametrize("variant", ["fp32", "bf16", "int4"])
def test_picking_steps_pick_from_the_logits_step(variant):
    """step(greedy=True) returns logits.argmax(-1) of the same step, step(sample=...)
    what sample_next draws from those logits with the same generator. Three caches fed
    the same tokens take turns, so the plan binds a cache again at every step."""
    model = _variant(variant)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    pad = torch.tensor([L - len(p) for p in prompts])
    caches = [StaticKVCache.for_model(model, 3, L + 8) for _ in range(3)]
    g_ref, g_plan = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.inference_mode():
        plan = DecodePlan.build(model)
        for c in caches:
            c.reset(pad)
            nxt = model.infer(ids, c).argmax(-1)
        for _ in range(6):
            logits = plan.step(nxt[:, None], caches[0])
            greedy = plan.step(nxt[:, None], caches[1], greedy=True)
            assert greedy.dtype == torch.long and torch.equal(greedy, logits.argmax(-1))
            drawn = plan.step(nxt[:, None], caches[2], sample=(1.5, 20, 0.9, g_plan))
            assert torch.equal(drawn, sample_next(logits, 1.5, 20, 0.9, g_ref))
            nxt = greedy
    assert caches[0].length == caches[1].length == caches[2].length == L + 6


def test_greedy_step_breaks_ties_and_nans_as_torch_argmax():
    """Tokens with equal logits: the first one; NaN logits: the first NaN (torch's
    argmax), in fp32 and bf16. Head rows 3, 5, 9 are v and the others -v, so the largest
    logit is shared either by 3, 5, 9 or by all the others."""
    for dtype in (torch.float32, torch.bfloat16):
        model = _lm(tie_embeddings=False)
        v = torch.randn(model.head.weight.shape[1], generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            model.head.weight.copy_(-v)
            model.head.weight[[3, 5, 9]] = v
        model = model.to(dtype)
        caches = [StaticKVCache.for_model(model, 1, 8) for _ in range(2)]
        with torch.inference_mode():
            plan = DecodePlan.build(model)
            for c in caches:
                c.reset()
                model.infer(torch.tensor([[1, 2]]), c)
            logits = plan.step(torch.tensor([[4]]), caches[0])[0]
            assert (logits == logits.max()).sum() >= 3  # a tie at the top
            top = plan.step(torch.tensor([[4]]), caches[1], greedy=True).item()
            assert top == logits.argmax().item() and top in (0, 3), dtype
            with torch.no_grad():
                model.head.weight[[7, 11]] = float("nan")
            plan = DecodePlan.build(model)  # the plan holds the weights: build it again
            assert plan.step(torch.tensor([[4]]), caches[1], greedy=True).item() == 7, dtype


@pytest.mark.parametrize("variant,cfg", [
    ("int8", GenerationConfig(max_new_tokens=10, stop_ids=(5,))),
    ("int8", GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=12, top_p=0.95,
                              seed=3)),
    ("bf16", GenerationConfig(max_new_tokens=10, temperature=1.2, seed=4))],
    ids=["greedy", "sampled", "sampled bf16"])
def test_engine_generates_the_same_tokens_with_and_without_the_plan(monkeypatch, variant, cfg):
    model = _variant(variant)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    calls = []
    step = DecodePlan.step
    monkeypatch.setattr(DecodePlan, "step", lambda self, *a: calls.append(1) or step(self, *a))
    with_plan, _ = Engine(model).generate(prompts, cfg)
    assert calls  # the plan ran the decode steps
    monkeypatch.setattr(dp.DecodePlan, "build", classmethod(lambda cls, m: None))
    without, _ = Engine(model).generate(prompts, cfg)
    assert [g.tokens for g in with_plan] == [g.tokens for g in without]


@pytest.mark.parametrize("what", ["dense layer", "hash router", "fused backend",
                                  "fp64 shared experts", "softmax with bias",
                                  "other experts"])
def test_no_plan_where_a_part_leaves_the_kernels(what):
    if what == "dense layer":
        model = _lm(moe_every=2)
    elif what == "hash router":
        model = _lm(router="hash")
    elif what == "softmax with bias":
        model = _lm(bias_update_rate=1e-3)
    else:
        model = _lm()
        moe = model.blocks[0].ffn
        if what == "fused backend":
            moe.experts.backend = "fused"
        elif what == "other experts":  # e.g. offloaded or expert-parallel ones
            moe.experts.__class__ = type("Other", (type(moe.experts),), {})
        else:
            moe.shared = moekit.experts.SharedExperts(moekit.MoEConfig(
                dim=64, ffn_dim=32, num_experts=8, top_k=2, num_shared_experts=1)).double()
    with torch.inference_mode():
        assert DecodePlan.build(model) is None


def test_step_declines_and_leaves_the_cache_alone_outside_the_kernels(monkeypatch):
    model = _lm()
    with torch.inference_mode():
        plan = DecodePlan.build(model)
    cache = StaticKVCache.for_model(model, 2, 16)
    cache.reset()
    with torch.inference_mode():
        model.infer(torch.tensor([[1, 2], [3, 4]]), cache)
    before = cache.length
    nxt = torch.tensor([[5], [6]])
    with torch.no_grad():
        assert plan.step(torch.tensor([[5, 6], [7, 8]]), cache) is None  # two tokens a row
        assert plan.step(nxt[:1], cache) is None  # rows != the cache's
    assert plan.step(nxt, cache) is None  # autograd on
    monkeypatch.setattr(plan, "max_rows", 1)
    with torch.no_grad():
        assert plan.step(nxt, cache) is None  # more rows than a kernel takes
    assert cache.length == before
    cache.length = cache.max_len  # full: the step says so, as cache.begin does
    k_before = [k.clone() for k in cache.k]
    monkeypatch.setattr(plan, "max_rows", 2)
    with torch.no_grad(), pytest.raises(ValueError, match="sequence length 17 is not allowed"):
        plan.step(nxt, cache)
    assert cache.length == 16
    assert all(torch.equal(a, b) for a, b in zip(k_before, cache.k, strict=True))


def test_native_step_names_an_id_past_a_quantized_table():
    model = _variant("int4")
    with torch.inference_mode():
        plan = DecodePlan.build(model)
        cache = StaticKVCache.for_model(model, 1, 16)
        cache.reset()
        model.infer(torch.tensor([[1, 2]]), cache)
        with pytest.raises(RuntimeError, match="ids_R\\[0\\]=64 is not allowed: the "
                                               "embedding table holds 64 rows"):
            plan.step(torch.tensor([[64]]), cache)
        assert cache.length == 2  # nothing written


def test_native_step_names_bad_arguments():
    """The one C++ call checks what it is given (the plan passes it right; a caller of
    the extension gets the argument named, not a crash)."""
    model = _lm()
    with torch.inference_mode():
        plan = DecodePlan.build(model)
        cache = StaticKVCache.for_model(model, 1, 16)
        cache.reset()
        model.infer(torch.tensor([[1, 2]]), cache)
        rows_R, ends_1 = torch.arange(1), torch.tensor([1], dtype=torch.int32)  # one expert
        cos, sin = (t[2:3].float().contiguous() for t in (model.rope_cos, model.rope_sin))
        args = (rows_R, ends_1, cos, sin)
        with pytest.raises(RuntimeError, match="k_L / v_L must hold one tensor per layer"):
            plan.native.run(torch.tensor([3]), *args, cache.k[:1], cache.v[:1], 2, None)
        with pytest.raises(RuntimeError, match="ids_R must be int64"):
            plan.native.run(torch.tensor([3], dtype=torch.int32), *args, cache.k, cache.v, 2,
                            None)
        with pytest.raises(RuntimeError, match="P=16 is not allowed"):
            plan.native.run(torch.tensor([3]), *args, cache.k, cache.v, 16, None)
        with pytest.raises(RuntimeError, match="step needs a bound cache"):
            plan.native.step(torch.tensor([3]), 2, False, True)
        tables = (model.rope_cos.float().contiguous(), model.rope_sin.float().contiguous())
        with pytest.raises(RuntimeError, match="k_L / v_L must hold one tensor per layer"):
            plan.native.bind(cache.k[:1], cache.v, *tables, cache.pad_B, cache.valid_BM)
        with pytest.raises(RuntimeError, match="pad_B must be a contiguous int64"):
            plan.native.bind(cache.k, cache.v, *tables, cache.pad_B.int(), cache.valid_BM)
        plan.native.bind(cache.k, cache.v, *tables, cache.pad_B, cache.valid_BM)
        with pytest.raises(RuntimeError, match="ids_R must be \\[R\\] with 1 <= R <= 1"):
            plan.native.step(torch.tensor([3, 4]), 2, False, True)
        M = model.rope_cos.shape[0]
        with pytest.raises(RuntimeError, match=f"P={M} is not allowed: the rotary tables"):
            plan.native.step(torch.tensor([3]), M, False, True)


@pytest.mark.parametrize("variant", ["int8a8", "int4a8"])
def test_plan_runs_int8_activation_projections_of_many_rows_on_the_gemm(variant):
    """From decode.A8_LINEAR_MIN_ROWS rows the int8-activation projections run the prefill
    GEMM (where the CPU has AVX-512 VNNI), in QuantizedLinear and in the plan's one call
    alike: the steps of that many sequences stay bitwise the modules'; with the plan's GEMM off
    (the decode kernel, another order of the same sums) they are not."""
    from moekit.functions import cpu_ext, decode

    if not decode.int8_gemm_here():
        pytest.skip("the int8-activation GEMM needs AVX-512 VNNI (and moekit's GEMM on)")
    B = max(decode.A8_LINEAR_MIN_ROWS.values())
    assert B <= decode.QUANT_LINEAR_MAX_ROWS
    _gemm_steps_match_modules(_variant(variant), B, lambda native: native.set_a8_gemm(
        cpu_ext.get().q_linear_a8_address(), 1 << 30, 1 << 30))


def _moekit_gemm_runs() -> bool:
    """Whether moekit's GEMM (q_linear_out) runs on this CPU: built, AVX-512F, MOEKIT_SGEMM
    not 0 (the extension says so itself)."""
    from moekit.functions import cpu_ext

    ext = cpu_ext.get()
    return ext is not None and ext.sgemm_max_rows() > 0


def _gemm_steps_match_modules(model, B, gemm_off):
    """The plan's steps of B sequences bitwise the modules'; not so once gemm_off(native)
    has turned the plan's GEMM off (the decode kernel: the same sums in another order)."""
    prompts = [[1 + i, 2, 3 + 2 * i][: 1 + i % 3] for i in range(B)]
    with torch.inference_mode():
        plan = DecodePlan.build(model)
    slow = _steps(model, model.infer, prompts)
    assert torch.equal(_steps(model, plan.step, prompts), slow)
    gemm_off(plan.native)
    assert not torch.equal(_steps(model, plan.step, prompts), slow)


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_plan_runs_weight_only_projections_of_many_rows_on_the_gemm(variant, monkeypatch):
    """From decode.weight_gemm_min_rows rows (Intel CPUs without AMX-INT8; 4 here, so that
    any CPU where moekit's GEMM runs takes it) the weight-only int8 / int4 projections run
    the prefill GEMM, in QuantizedLinear and in the plan's one call alike: the steps stay
    bitwise the modules'; with the plan's GEMM off (the decode kernel) they are not."""
    from moekit.functions import cpu_ext, decode

    if not _moekit_gemm_runs():
        pytest.skip("moekit's GEMM does not run on this CPU (AVX-512F, MOEKIT_SGEMM)")
    monkeypatch.setattr(decode, "weight_gemm_min_rows", lambda bits: 4)
    _gemm_steps_match_modules(_variant(variant), 5, lambda native: native.set_q_gemm(
        cpu_ext.get().q_linear_address(), 1 << 30, 1 << 30))


def test_weight_only_projections_take_the_gemm_from_rows_by_cpu():
    """weight_gemm_min_rows: WEIGHT_GEMM_MIN_ROWS on an Intel CPU (/proc/cpuinfo's
    vendor) without AMX-INT8 where moekit's GEMM runs, else None (the decode kernel)."""
    from moekit.functions import cpu_ext, decode
    from tests.test_decode import _cpu_vendor

    ext = cpu_ext.get_decode()
    if ext is None:
        pytest.skip("no decode kernels")
    on = _cpu_vendor() == "GenuineIntel" and not ext.amx_int8() and _moekit_gemm_runs()
    want = decode.WEIGHT_GEMM_MIN_ROWS if on else {8: None, 4: None}
    assert {b: decode.weight_gemm_min_rows(b) for b in (8, 4)} == want


@pytest.mark.skipif(not decode.amx(), reason="no AMX-BF16 on this CPU (or MOEKIT_AMX=0)")
@pytest.mark.parametrize("variant", ["bf16", "qwen2 bf16"])
def test_plan_runs_bf16_batches_of_up_to_16_rows_on_amx(variant):
    """Where bf16 projections run on AMX tiles, a bf16 model's batches of 9-16 rows take
    the plan too (8 without AMX: past that aten's GEMM was faster), bitwise the modules'
    steps, with the projections on AMX."""
    from moekit.functions import cpu_ext

    model = _variant(variant)
    with torch.inference_mode():
        plan = DecodePlan.build(model)
    assert plan is not None and plan.max_rows >= 16
    prompts = [[1 + i % 7, 2 + i % 5, 3] for i in range(12)]
    before = cpu_ext.get_decode().amx_runs()
    fast = _steps(model, plan.step, prompts)
    assert cpu_ext.get_decode().amx_runs() > before
    assert torch.equal(fast, _steps(model, model.infer, prompts))


@pytest.mark.parametrize("variant,B", [("int8", 12), ("qwen2 int8", 12), ("int4 g64", 12),
                                       ("int8", 24), ("int4 g64", 27)])
def test_plan_runs_quantized_projections_of_many_rows_on_amx_int8(variant, B):
    """Where int8 / int4 weight-only projections of 8 / 12 to 32 rows run on AMX-INT8
    tiles (two chunks of rows past 16), a quantized model's steps of B rows run them there,
    in the plan's one call and in the modules alike (bitwise the same steps), and stay near
    the FMA kernel's steps (another rounding of the same products)."""
    from moekit.functions import cpu_ext

    ext = cpu_ext.get_decode()
    if not (ext is not None and ext.amx_int8()):
        pytest.skip("no AMX-INT8 on this CPU (or MOEKIT_AMX=0)")
    if variant == "int4 g64":
        model = moekit.quantize(_lm(ffn_dim=64), bits=4, group_size=64)
    else:
        model = moekit.quantize(_qwen2() if variant.startswith("qwen2") else _lm(), bits=8)
    with torch.inference_mode():
        plan = DecodePlan.build(model)
    assert plan is not None and plan.max_rows >= B
    prompts = [[1 + i % 7, 2 + i % 5, 3] for i in range(B)]
    before = ext.amx_runs()
    fast = _steps(model, plan.step, prompts)
    assert ext.amx_runs() > before
    assert torch.equal(fast, _steps(model, model.infer, prompts))
    ext.set_amx(False)
    try:
        fma = _steps(model, plan.step, prompts)
    finally:
        ext.set_amx(True)
    torch.testing.assert_close(fast, fma, atol=1e-4, rtol=1e-4)
