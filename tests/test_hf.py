"""moekit.integrations.hf: a patched transformers MoE model computes what the original does.

The oracle is the unpatched transformers model itself (its eager experts loop and
its own routers), on a deep copy with identical weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.integrations import hf
from tests import hf_models  # skips this module when transformers is missing

ARCHS = list(hf_models.BUILDERS)
# fp32 throughout: the two paths differ only in GEMM blocking and summation order.
ATOL, RTOL = 1e-5, 1e-4


def _inputs(name: str, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 11), generator=gen)
    kw = {"input_ids": ids, "labels": ids}
    if name == "switch_transformers":
        kw.update(decoder_input_ids=ids, output_router_logits=True)
    return kw


def _run(model, name: str, train: bool):
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(**_inputs(name))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out, grads


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    """(name, original, patched): same weights, the second patched."""
    name = request.param
    original = hf_models.build(name)
    patched = hf.apply(copy.deepcopy(original))
    return name, original, patched


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_logits_loss_and_grads_match(pair, train):
    name, original, patched = pair
    assert any(hf.is_patched(m) for m in patched.modules())
    a, grads_a = _run(original, name, train)
    b, grads_b = _run(patched, name, train)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(b.loss, a.loss, atol=ATOL, rtol=RTOL)
    for key in ("aux_loss", "encoder_aux_loss", "decoder_z_loss"):
        if getattr(a, key, None) is not None:
            torch.testing.assert_close(getattr(b, key), getattr(a, key), atol=ATOL, rtol=RTOL)
    assert grads_a.keys() == grads_b.keys()
    for n, g in grads_a.items():
        if g is None:
            assert grads_b[n] is None, n
            continue
        torch.testing.assert_close(grads_b[n], g, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_router_outputs_match(pair):
    """What transformers records for its own balance / z losses is the same tensors."""
    name, original, patched = pair
    kw = _inputs(name)
    kw["output_router_logits"] = True
    original.eval()
    patched.eval()
    with torch.no_grad():
        a, b = original(**kw), patched(**kw)
    keys = ["encoder_router_logits", "decoder_router_logits"] if name == "switch_transformers" \
        else ["router_logits"]
    for key in keys:
        ra, rb = getattr(a, key), getattr(b, key)
        assert len(ra) == len(rb) > 0
        for x, y in zip(ra, rb, strict=True):
            torch.testing.assert_close(y, x, atol=ATOL, rtol=RTOL)


def test_generate_same_tokens(pair):
    name, original, patched = pair
    ids = _inputs(name)["input_ids"][:1, :6]
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    original.eval()
    patched.eval()
    a = original.generate(ids, **kw)
    b = patched.generate(ids, **kw)
    assert torch.equal(a, b)


def test_weights_shared_and_keys_unchanged():
    model = hf_models.build("mixtral")
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    hf.apply(model)
    after = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert after == before  # same keys, same storage: nothing copied


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss", "switch_transformers"])
def test_save_load_round_trips(name, tmp_path):
    """Saved patched, loaded plain (and the reverse): bitwise the same outputs."""
    original = hf_models.build(name).eval()
    cls = type(original)
    with torch.no_grad():
        want_plain = original(**_inputs(name)).logits
        want_patched = hf.apply(original)(**_inputs(name)).logits
    original.save_pretrained(tmp_path / "patched")
    loaded = cls.from_pretrained(tmp_path / "patched").eval()
    loaded.set_experts_implementation("eager")
    assert not any(hf.is_patched(m) for m in loaded.modules())
    hf.revert(original).save_pretrained(tmp_path / "plain")
    repatched = hf.apply(cls.from_pretrained(tmp_path / "plain")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(name)).logits, want_plain)
        assert torch.equal(repatched(**_inputs(name)).logits, want_patched)
    sd_a, sd_b = loaded.state_dict(), repatched.state_dict()
    assert sd_a.keys() == sd_b.keys() == original.state_dict().keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_revert_restores_original_modules():
    model = hf_models.build("deepseek_v3")
    classes = {n: type(m) for n, m in model.named_modules()}
    hf.apply(model)
    assert any(type(m) is not classes[n] for n, m in model.named_modules())
    hf.revert(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(k.startswith("_moekit") for m in model.modules() for k in vars(m))


def test_apply_twice_keeps_classes_and_switches_backend():
    model = hf_models.build("olmoe")
    hf.apply(model)
    classes = [type(m) for m in model.modules()]
    hf.apply(model, backend="loop")
    assert [type(m) for m in model.modules()] == classes
    experts = [m for m in model.modules() if type(m).__name__.endswith("OlmoeExperts")]
    assert experts and all(m._moekit_backend == "loop" for m in experts)


def test_unsupported_model_lists_supported():
    transformers = hf_models.transformers
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_models.COMMON.items()},
                                   intermediate_size=16)
    with pytest.raises(ValueError, match="model_type='llama'.*mixtral"):
        hf.apply(transformers.LlamaForCausalLM(cfg))
    with pytest.raises(ValueError, match="model=NoneType"):
        hf.apply(None)  # type: ignore[arg-type]


def test_bad_backend_rejected_before_any_change():
    model = hf_models.build("mixtral")
    with pytest.raises(ValueError, match="backend='fast'"):
        hf.apply(model, backend="fast")
    assert not any(hf.is_patched(m) for m in model.modules())


def test_loop_backend_matches_too():
    original = hf_models.build("qwen3_moe").eval()
    patched = hf.apply(copy.deepcopy(original), backend="loop")
    with torch.no_grad():
        torch.testing.assert_close(patched(**_inputs("qwen3_moe")).logits,
                                   original(**_inputs("qwen3_moe")).logits, atol=ATOL, rtol=RTOL)


def test_switch_capacity_drops_tokens():
    """The test model's capacity is small enough that the capacity path is exercised."""
    model = hf.apply(hf_models.build("switch_transformers"))
    router = next(m for m in model.modules() if type(m).__name__.endswith("Top1Router"))
    mask_BLE, _, _ = router(torch.randn(2, 11, 32))
    assert (mask_BLE.sum(-1) == 0).any()  # some tokens got no expert
    assert (mask_BLE.sum(1) <= 3).all()  # no expert took more than capacity per sequence


def test_swiglu_oai_matches_gpt_oss():
    from moekit.integrations.hf.experts import interleaved_swiglu_oai

    experts = next(m for m in hf_models.build("gpt_oss").modules()
                   if type(m).__name__ == "GptOssExperts")
    h = torch.randn(40, 32) * 3  # beyond the clamp limit on both sides
    want = experts._apply_gate(h)
    assert torch.equal(interleaved_swiglu_oai(experts.limit, experts.alpha)(h), want)


def test_top_level_helpers_are_lazy():
    import subprocess
    import sys

    code = ("import sys, moekit; assert 'transformers' not in sys.modules; "
            "assert moekit.apply_hf is moekit.integrations.hf.apply")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["mixtral", "switch_transformers"])
def test_jitter_matches_when_seeded_identically(name):
    """Router jitter draws from torch's RNG in the same order with and without moekit."""
    original = hf_models.build(name)
    for m in original.modules():
        if hasattr(m, "jitter_noise"):
            m.jitter_noise = 0.1
    patched = hf.apply(copy.deepcopy(original))
    torch.manual_seed(5)
    a, grads_a = _run(original, name, train=True)
    torch.manual_seed(5)
    b, grads_b = _run(patched, name, train=True)
    torch.manual_seed(6)
    c, _ = _run(patched, name, train=True)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(c.logits, a.logits, atol=ATOL, rtol=RTOL)  # jitter is on
    for n, g in grads_a.items():
        if g is not None:
            torch.testing.assert_close(grads_b[n], g, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_bf16_matches(name):
    """bf16 weights: same routing and outputs within bf16 rounding."""
    original = hf_models.build(name).to(torch.bfloat16).eval()
    patched = hf.apply(copy.deepcopy(original))
    with torch.no_grad():
        a = original(**_inputs(name)).logits.float()
        b = patched(**_inputs(name)).logits.float()
    torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)


def test_revert_refuses_quantized_experts_and_changes_nothing():
    from moekit import quantize

    model = quantize(hf.apply(hf_models.build("olmoe")), bits=8)
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="int8 weights from moekit.quantize"):
        hf.revert(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_save_pretrained_refuses_quantized_experts_and_writes_nothing(tmp_path):
    """Before: the experts were written as ``...experts.0.down_proj.weight.data`` /
    ``.scales``, which from_pretrained ignored (random experts, no error)."""
    from moekit import quantize

    model = quantize(hf.apply(hf_models.build("qwen3_moe")), bits=8, scope="experts")
    for m in (model, copy.deepcopy(model)):  # a copy keeps the guard, bound to the copy
        with pytest.raises(ValueError, match="int8 weights from moekit.quantize.*"
                                             r"load_offloaded\(path, expert_memory, quantize=8"):
            m.save_pretrained(tmp_path / "q")
        assert not (tmp_path / "q").exists()
    assert copy.deepcopy(model).save_pretrained.model is not model


def test_save_pretrained_refusal_suggests_load_offloaded_only_where_it_reads_the_model(
        tmp_path):
    """Before: a quantized GPT-OSS's refusal also said "load the float checkpoint with
    load_offloaded(path, expert_memory, quantize=8)", which refuses GPT-OSS ("not
    supported for offloading")."""
    from moekit import quantize

    model = quantize(hf.apply(hf_models.build("gpt_oss")), bits=8)
    with pytest.raises(ValueError, match="quantize it again after loading$"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_quantized_forward_with_grad_says_quantized_weights_have_no_backward():
    """A quantized model's forward with grad enabled (its norms still require grad) said
    "backend='decode' has no backward ... or use backend='fused' to train"; after
    hf.apply(model, backend="fused") it said the same (quantized weights always run the
    decode kernels). Under no_grad it runs."""
    from moekit import quantize

    model = quantize(hf.apply(hf_models.build("qwen3_moe")), bits=8, scope="experts").eval()
    ids = _inputs("qwen3_moe")["input_ids"]
    for backend in ("auto", "fused"):
        hf.apply(model, backend=backend)
        with pytest.raises(RuntimeError, match=r"^quantized expert weights \(moekit.quantize\) "
                                               "have no backward.*train the float model"):
            model(input_ids=ids)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_save_pretrained_of_a_reverted_model_is_transformers_own(tmp_path):
    model = hf.apply(hf_models.build("olmoe"))
    assert "save_pretrained" in vars(model)
    hf.revert(model)
    assert "save_pretrained" not in vars(model)
    assert model.save_pretrained.__func__ is type(model).save_pretrained


def test_dbrx_bf16_routes_like_transformers_where_probabilities_tie(monkeypatch):
    """DBRX takes the top K of a bf16 softmax, where distinct logits often round to one
    probability. Before: moekit ranked the logits and gave such tokens another expert."""
    from moekit.integrations.hf import blocks

    torch.manual_seed(0)
    model = hf_models.dbrx().to(torch.bfloat16).eval()
    ffn = model.transformer.blocks[0].ffn
    x = torch.randn(1, 400, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ffn.router(x.clone())
        want_w, want_idx = ffn.route_tokens_to_experts(logits)
        by_logits = logits.topk(2, dim=-1).indices
        assert (by_logits.sort(-1).values != want_idx.sort(-1).values).any(-1).sum() > 0  # ties
        want = ffn(x.clone())
    seen = []

    def spy(x_TD, experts_TK, weights_TK, *args):
        seen.append((experts_TK, weights_TK))
        return run(x_TD, experts_TK, weights_TK, *args)

    run = blocks.run_experts_topk
    monkeypatch.setattr(blocks, "run_experts_topk", spy)
    patched = hf.apply(copy.deepcopy(model)).transformer.blocks[0].ffn
    with torch.no_grad():
        got = patched(x.clone())
    assert torch.equal(seen[0][0], want_idx) and torch.equal(seen[0][1], want_w)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name,block", [("dbrx", "DbrxFFN"),
                                        ("switch_transformers", "SwitchTransformersSparseMLP")])
def test_quantize_refuses_dbrx_and_switch_experts_and_changes_nothing(name, block):
    """Before: "the model has no ... experts module patched ...: nothing to quantize",
    though hf.apply had patched it."""
    from moekit import quantize
    from moekit.quant import QuantizationError

    model = hf.apply(hf_models.build(name))
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with pytest.raises(QuantizationError, match=f"is a {block} block: moekit.quantize cannot "
                       "quantize DBRX or Switch Transformers experts"):
        quantize(model, bits=8)
    assert dict(model.named_modules()) == modules
    assert dict(model.named_parameters()) == params


@pytest.mark.parametrize("name", ARCHS)
def test_torch_save_and_load_of_a_patched_model(name):
    """Before: PicklingError "Can't pickle <class '...MoekitQwen3MoeExperts'>: attribute
    lookup failed" (the patched classes are built at run time)."""
    import io

    original = hf_models.build(name).eval()
    patched = hf.apply(copy.deepcopy(original))
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in patched.modules()]
    assert any(hf.is_patched(m) for m in loaded.modules())
    assert loaded.save_pretrained.model is loaded  # the guard is the loaded model's
    with torch.no_grad():
        want = original(**_inputs(name)).logits
        got = loaded(**_inputs(name)).logits
        assert torch.equal(got, patched(**_inputs(name)).logits)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    hf.revert(loaded)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in original.modules()]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "switch_transformers"])
def test_cpu_autocast_runs_the_experts_in_bf16_like_transformers(name, monkeypatch):
    """Under ``torch.autocast("cpu", bfloat16)`` transformers' experts (``F.linear``) compute in
    bf16; the patched ones had stayed fp32 (another result, bf16 kernels unused). Loss and
    every gradient as the unpatched model's under the same autocast, within bf16 rounding
    (DBRX left out: its transformers loop fails under autocast, index_add_ of bf16 into fp32).
    Switch, with its combine in bf16, had a gradient 36% of its max away (decoder expert_0.wi)."""
    from moekit.integrations.hf import experts as hf_experts

    seen = []
    backend = hf_experts.experts_backend

    def spy(x_TD, rows, w_in_EDG, w_out_EFD, act, name):
        seen.append((x_TD.dtype, w_in_EDG.dtype, w_out_EFD.dtype))
        return backend(x_TD, rows, w_in_EDG, w_out_EFD, act, name)

    monkeypatch.setattr(hf_experts, "experts_backend", spy)
    original = hf_models.build(name)
    patched = hf.apply(copy.deepcopy(original))
    results = []
    for model in (original, patched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**_inputs(name))
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters()}))
    assert seen and set(seen) == {(torch.bfloat16,) * 3}, seen
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=2e-2, rtol=2e-2)
    for n, g in grads_a.items():
        if g is not None:
            assert grads_b[n].dtype == g.dtype, n
            scale = g.abs().max().item() + 1e-6
            torch.testing.assert_close(grads_b[n] / scale, g / scale, atol=5e-2, rtol=0,
                                       msg=lambda m, n=n: f"{n}: {m}")


def test_switch_combines_in_the_probability_dtype_under_autocast():
    """transformers' Switch multiplies the bf16 expert output by the fp32 router probability,
    in fp32; moekit had weighted the rows in bf16 (the probability and the product rounded:
    0.0065 of 1.86 away in the output). Same ops now, so fp32 tolerances: the output and the
    gradients of the input and every parameter of one sparse MLP, tokens dropped included."""
    original = hf_models.build("switch_transformers")
    patched = hf.apply(copy.deepcopy(original))
    name = "encoder.block.1.layer.1.mlp"
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 32, generator=gen)
    g = torch.randn(2, 11, 32, generator=gen)
    results = []
    for model in (original, patched):
        mlp = model.get_submodule(name)
        x_ = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mask = mlp.router(x_)[0]
            y = mlp(x_)
        (y * g).sum().backward()
        grads = [x_.grad] + [p.grad for p in mlp.parameters()]
        results.append((mask, y, grads))
    (mask_a, y_a, grads_a), (mask_b, y_b, grads_b) = results
    assert torch.equal(mask_b, mask_a) and mask_a.sum() < 22  # some tokens over capacity
    assert y_b.dtype == y_a.dtype == torch.float32
    torch.testing.assert_close(y_b, y_a, atol=ATOL, rtol=RTOL)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, atol=ATOL, rtol=RTOL)
