"""The generation engine (moekit.inference.engine) and the static KV cache.

Oracles: the model's full forward with no cache (every position recomputed),
the old concatenating KVCache, and each prompt generated alone. Greedy tokens
must be identical; logits close at a tolerance tied to the dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.inference.engine import (
    ContextLengthError,
    EmptyPromptError,
    Engine,
    GenerationConfig,
)
from moekit.models import KVCache, MoETransformer, generate, preset
from moekit.models.generate import _sampler, sample_next, sample_torch
from moekit.models.transformer import StaticKVCache

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40], [100, 101, 102, 103], [7, 7]]


def _model(dtype=torch.float32, seed=0, **changes) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(preset("tiny", **changes)).eval().to(dtype)


def _greedy_alone(model, prompt, n):
    """Reference: the whole sequence recomputed for every token (no cache at all)."""
    out = generate(model, torch.tensor([prompt]), n, temperature=0.0, use_cache=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("dtype,atol,rtol", [
    (torch.float32, 1e-5, 1e-4),
    (torch.bfloat16, 3e-2, 3e-2),
])
def test_static_cache_matches_concat_cache_and_full_forward(dtype, atol, rtol, kv_heads):
    model = _model(dtype, num_kv_heads=kv_heads)
    ids = torch.randint(256, (2, 11), generator=torch.Generator().manual_seed(1))
    chunks = [(0, 4), (4, 7), (7, 8), (8, 11)]  # prefill, a chunk after a prefix, 1, rest
    with torch.inference_mode():
        full = model(ids).logits.float()
        static, old = StaticKVCache.for_model(model, 2, 16), KVCache(model.config.num_layers)
        static.reset()
        a = torch.cat([model(ids[:, i:j], cache=static).logits for i, j in chunks], 1).float()
        b = torch.cat([model(ids[:, i:j], cache=old).logits for i, j in chunks], 1).float()
    torch.testing.assert_close(a, full, atol=atol, rtol=rtol)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert static.length == 11 and static.k[0].shape == (2, kv_heads or 2, 16, 16)  # no growth


def test_left_padded_rows_compute_what_they_compute_alone():
    """Per-row rotary positions and the padding mask: a padded row's logits == its own."""
    model = _model()
    short, long = [3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9]
    ids = torch.tensor([[0] * 3 + short, long])
    cache = StaticKVCache.for_model(model, 2, 12)
    cache.reset(torch.tensor([3, 0]))
    with torch.inference_mode():
        got = torch.stack([model.infer(ids, cache), model.infer(torch.tensor([[7], [8]]), cache)])
        want = [model(torch.tensor([short + [7], long + [8]][r])[None]).logits[0, -2:]
                for r in range(2)]
    for r in range(2):
        torch.testing.assert_close(got[:, r], want[r], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_generation_is_its_repeated_heads_twins(dtype):
    """A model of 2 key/value heads for 4 query heads, generating prompts of different
    lengths (left padding, the decode kernels' one call per step): the same tokens as
    the twin whose key/value heads are repeated (tests/test_models.py), each step's
    logits within the dtype's tolerance (the twin's decode steps run attend_one's
    one-head items, the model's its group passes: other summation orders), and a cache
    of 2 heads."""
    from tests.test_models import _repeated_heads_twin

    model = _model(num_heads=4, num_kv_heads=2)
    twin = _repeated_heads_twin(model).eval().to(dtype)
    model = model.to(dtype)
    cfg = GenerationConfig(max_new_tokens=12)
    got, _ = Engine(model).generate(PROMPTS, cfg)
    want, _ = Engine(twin).generate(PROMPTS, cfg)
    assert [g.tokens for g in got] == [g.tokens for g in want]
    L = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in PROMPTS])
    steps = []
    for m in (model, twin):
        cache = StaticKVCache.for_model(m, len(PROMPTS), L + 8)
        cache.reset(torch.tensor([L - len(p) for p in PROMPTS]))
        with torch.inference_mode():
            logits = [m.infer(ids, cache)]
            for _ in range(6):
                logits.append(m.infer(logits[-1].argmax(-1)[:, None], cache))
        steps.append(torch.stack(logits))
    assert cache.k[0].shape[1] == 4 and StaticKVCache.for_model(model, 1).k[0].shape[1] == 2
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(steps[0].float(), steps[1].float(), **tol)


def test_engine_greedy_equals_no_cache_reference():
    model = _model()
    gens, stats = Engine(model).generate([PROMPTS[0]], GenerationConfig(max_new_tokens=20))
    assert gens[0].tokens == _greedy_alone(model, PROMPTS[0], 20)
    assert gens[0].finish_reason == "length"
    assert stats.new_tokens == 20 and stats.decode_steps == 19


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_the_full_forwards_log_softmax(temperature):
    """generate(logprobs=N): each token's log-probability and the N most likely tokens
    are the float64 log-softmax of the whole sequence's forward (no cache) at that
    position, before temperature; the tokens are those generate gives without them (the
    plan's step picks greedy and sampled tokens as the modules' step does)."""
    model = _model()
    cfg = GenerationConfig(max_new_tokens=10, temperature=temperature, seed=4)
    want, _ = Engine(model).generate(PROMPTS[:3], cfg)
    gens, _ = Engine(model).generate(PROMPTS[:3], cfg, logprobs=3)
    for g, w in zip(gens, want, strict=True):
        assert g.tokens == w.tokens and len(g.logprobs) == len(g.top_logprobs) == 10
        seq = torch.tensor([g.prompt + g.tokens])
        with torch.no_grad():
            logp = model(seq).logits[0].double().log_softmax(-1)
        for j, tok in enumerate(g.tokens):
            row = logp[len(g.prompt) + j - 1]
            assert g.logprobs[j] == pytest.approx(float(row[tok]), abs=1e-4)
            ids = [t for t, _ in g.top_logprobs[j]]
            assert ids == row.topk(3).indices.tolist()
            assert [v for _, v in g.top_logprobs[j]] == pytest.approx(
                row.topk(3).values.tolist(), abs=1e-4)
    plain, _ = Engine(model).generate(PROMPTS[:1], cfg)
    assert plain[0].logprobs is None
    with pytest.raises(ValueError, match="logprobs=21"):
        Engine(model).generate(PROMPTS[:1], cfg, logprobs=21)


def test_batched_prompts_of_different_lengths_equal_each_alone():
    model = _model()
    cfg = GenerationConfig(max_new_tokens=16)
    engine = Engine(model)
    batched, _ = engine.generate(PROMPTS, cfg)
    for prompt, g in zip(PROMPTS, batched, strict=True):
        assert g.prompt == prompt
        assert g.tokens == _greedy_alone(model, prompt, 16), prompt


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_a_capacity_model_generates_dropless_whatever_shares_its_batch(router):
    """A capacity is shared by the rows of a call: generation had dropped a sequence's
    tokens by what else was in its batch (another client's request in `moekit serve`), and
    a prompt's prefill dropped what decoding token by token kept. Oracle: the same weights
    with no capacity factor, each prompt alone, every position recomputed."""
    shape = dict(router=router, num_experts=8, top_k=2, tie_embeddings=False)
    model = _model(capacity_factor=0.25, **shape)
    with torch.no_grad():  # sharper routing and logits than at init: drops change tokens
        for p in model.parameters():
            p.mul_(3)
    dropless = _model(**shape)
    dropless.load_state_dict(model.state_dict())
    batched, _ = Engine(model).generate(PROMPTS, GenerationConfig(max_new_tokens=16))
    for prompt, g in zip(PROMPTS, batched, strict=True):
        assert g.tokens == _greedy_alone(dropless, prompt, 16), prompt


def test_batched_stopping_drops_rows_and_keeps_the_others_exact():
    """One sequence stops early (its cache row leaves); the rest still match alone."""
    model = _model()
    ref = [_greedy_alone(model, p, 16) for p in PROMPTS]
    stop = ref[1][2]  # sequence 1 stops at its 3rd token (or earlier, if the id repeats)
    cfg = GenerationConfig(max_new_tokens=16, stop_ids=(stop,))
    gens, _ = Engine(model).generate(PROMPTS, cfg)
    for r, g in zip(ref, gens, strict=True):
        end = r.index(stop) + 1 if stop in r else len(r)
        assert g.tokens == r[:end]
        assert g.finish_reason == ("stop" if stop in r else "length")
    assert len(gens[1].tokens) <= 3


def test_stop_sequence_ends_at_its_first_occurrence():
    model = _model()
    ref = _greedy_alone(model, PROMPTS[2], 24)
    seq = tuple(ref[5:7])
    first = next(i for i in range(1, len(ref)) if tuple(ref[i - 1:i + 1]) == seq)
    gens, _ = Engine(model).generate([PROMPTS[2]], GenerationConfig(
        max_new_tokens=24, stop_sequences=(seq,)))
    assert gens[0].tokens == ref[:first + 1] and gens[0].finish_reason == "stop"


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = _model()
    engine = Engine(model)
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    a, _ = engine.generate(PROMPTS, cfg)
    b, _ = engine.generate(PROMPTS, cfg)
    c, _ = engine.generate(PROMPTS, cfg.replace(seed=4))
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    one, _ = engine.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=12, temperature=1.0,
                                                           top_k=1))
    assert one[0].tokens == _greedy_alone(model, PROMPTS[0], 12)


SAMPLING = [(0.8, None, None), (1.3, 40, None), (0.7, None, 0.9), (0.5, 20, 0.8),
            (2.0, 1, None), (1.0, None, 0.3), (1e-3, None, None), (50.0, 5, 0.99)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: many ties
def test_sampler_draws_what_the_torch_ops_draw(dtype):
    """sample_next's C++ sampler against sample_torch (torch.multinomial's draw over the
    same masked softmax): the same token for every row, seed and setting, and the
    generator left in the same state."""
    if _sampler(torch.zeros(1, 1)) is None:
        pytest.skip("decode kernels not built")
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        logits = (torch.randn(3, 256, generator=g) * (1 + seed % 5)).to(dtype)
        for args in SAMPLING:
            ga, gb = (torch.Generator().manual_seed(seed + 1) for _ in range(2))
            ref = sample_torch(logits.float(), *args, ga)
            got = sample_next(logits, *args, gb)
            assert torch.equal(got, ref), (seed, args)
            assert torch.equal(torch.rand(2, generator=ga), torch.rand(2, generator=gb))
    for seed in range(20):  # many equal logits across top-p's boundary: kept in token order
        ties = torch.randint(0, 4, (2, 256), generator=torch.Generator().manual_seed(seed))
        for top_p in (0.3, 0.6, 0.9):
            ga, gb = (torch.Generator().manual_seed(seed) for _ in range(2))
            ref = sample_torch(ties.float(), 1.0, None, top_p, ga)
            assert torch.equal(sample_next(ties.to(dtype), 1.0, None, top_p, gb), ref)
    torch.manual_seed(7)  # no generator: torch's global one, as torch.multinomial
    ref = sample_torch(logits.float(), 1.0, None, 0.9, None)
    torch.manual_seed(7)
    assert torch.equal(sample_next(logits, 1.0, None, 0.9, None), ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_sampling_names_logits_without_a_finite_largest_one(bad):
    logits = torch.randn(2, 16)
    logits[1, 3] = bad
    if bad == float("-inf"):
        logits[1] = bad  # every token masked
    for fn in (sample_next, sample_torch):
        with pytest.raises(ValueError, match="largest logit must be finite"):
            fn(logits, 1.0, None, None, torch.Generator())


def test_cache_is_preallocated_and_reused():
    model = _model()
    engine = Engine(model)
    engine.generate(PROMPTS, GenerationConfig(max_new_tokens=8))
    cache = engine.cache
    ptrs = [t.data_ptr() for t in cache.k]
    engine.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=5))
    assert engine.cache is cache and [t.data_ptr() for t in cache.k] == ptrs


def test_stop_when_ends_its_sequence_and_leaves_the_others_exact():
    """stop_when(i, tokens): sequence 1 stops after its third token (asked with its own
    tokens so far each time), the others run to max_new_tokens as each alone."""
    model = _model()
    asked = []

    def stop_when(i, tokens):
        asked.append((i, list(tokens)))
        return i == 1 and len(tokens) == 3

    gens, _ = Engine(model).generate(PROMPTS, GenerationConfig(max_new_tokens=8),
                                     stop_when=stop_when)
    assert len(gens[1].tokens) == 3 and gens[1].finish_reason == "stop"
    assert gens[1].tokens == _greedy_alone(model, PROMPTS[1], 3)
    for i in (0, 2):
        assert gens[i].tokens == _greedy_alone(model, PROMPTS[i], 8)
        assert gens[i].finish_reason == "length"
    assert (1, gens[1].tokens[:2]) in asked and (0, gens[0].tokens) in asked
    with pytest.raises(ValueError, match="stop_when"):
        Engine(model).generate(PROMPTS, GenerationConfig(max_new_tokens=2), stop_when=3)


def test_a_conversation_prefills_only_what_the_cache_does_not_hold(monkeypatch):
    """reuse_prefix: a prompt extending the last call's prompt and reply prefills only
    its new ids (the model's infer sees them alone) and generates the tokens a fresh
    engine generates from the whole prompt; a batch, a prompt that shares nothing, or
    one the cache holds whole (one id is prefilled again for its logits) still give the
    fresh engine's tokens. The cache was allocated for 3 rows: the held row is row 0."""
    model = _model()
    cfg = GenerationConfig(max_new_tokens=10)
    engine = Engine(model, reuse_prefix=True)
    engine.generate(PROMPTS, cfg)  # a batch first: nothing held after it
    seen = []
    infer = MoETransformer.infer
    monkeypatch.setattr(MoETransformer, "infer",
                        lambda self, ids, cache: seen.append(ids.shape[1]) or
                        infer(self, ids, cache))
    first, s1 = engine.generate([PROMPTS[0]], cfg)
    assert s1.reused_tokens == 0 and seen[0] == len(PROMPTS[0])
    turn = PROMPTS[0] + first[0].tokens + [7, 8, 9]
    seen.clear()
    gens, stats = engine.generate([turn], cfg)
    held = len(PROMPTS[0]) + len(first[0].tokens) - 1  # the last token was never fed
    assert stats.reused_tokens == held and seen[0] == len(turn) - held
    assert gens[0].tokens == _greedy_alone(model, turn, 10)
    again, stats = engine.generate([turn[:held]], cfg)  # all held: one id prefilled again
    assert stats.reused_tokens == held - 1 and again[0].tokens == _greedy_alone(
        model, turn[:held], 10)
    other, stats = engine.generate([PROMPTS[1]], cfg)
    assert stats.reused_tokens == 0 and other[0].tokens == _greedy_alone(model, PROMPTS[1], 10)
    with pytest.raises(ValueError, match="reuse_prefix"):
        Engine(model, reuse_prefix=1)


@pytest.mark.parametrize("cap,want", [(None, 60), (40, 40)])
def test_a_growing_conversation_cache_doubles_up_to_its_cap(cap, want):
    """A conversation that outgrows the held cache gets one twice as long, at most
    max_cache_len positions (the model's max_seq_len, 64, by default), and the same
    tokens as a fresh engine."""
    model = _model()
    engine = Engine(model, reuse_prefix=True, max_cache_len=cap)
    first, _ = engine.generate([list(range(1, 21))], GenerationConfig(max_new_tokens=10))
    assert engine.cache.max_len == 30
    turn = list(range(1, 21)) + first[0].tokens + [5, 6, 7]
    gens, stats = engine.generate([turn], GenerationConfig(max_new_tokens=2))
    assert engine.cache.max_len == want and stats.reused_tokens == 29
    assert gens[0].tokens == _greedy_alone(model, turn, 2)
    for bad in (0, 65, 2.0):
        with pytest.raises(ValueError, match=f"max_cache_len={bad}"):
            Engine(model, reuse_prefix=True, max_cache_len=bad)


def test_past_context_and_empty_prompt_are_named_errors():
    model = _model()  # tiny: max_seq_len=64
    engine = Engine(model)
    with pytest.raises(ContextLengthError, match="max_seq_len=64") as e:
        engine.generate([[1] * 60, [2]], GenerationConfig(max_new_tokens=5))
    assert "use at most 4 new tokens" in str(e.value)
    # a prompt that fills the context: no count of new tokens helps (was "use at most 0
    # new tokens", a value max_new_tokens refuses): the prompt is too long
    for n in (64, 300):
        with pytest.raises(ContextLengthError) as e:
            engine.generate([[1] * n], GenerationConfig(max_new_tokens=1))
        msg = str(e.value)
        assert f"prompt of {n} tokens is too long" in msg and "at most 63" in msg, msg
        assert "new tokens" not in msg
    with pytest.raises(EmptyPromptError, match=r"prompts\[1\]"):
        engine.generate([[1], []])
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([[1, 999]])  # outside the vocabulary
    assert engine.cache is None  # nothing was allocated or run
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="stop_sequences"):
        GenerationConfig(stop_sequences=((),))


# -- a bf16 or int8 KV cache under fp32 activations, an int8 one under bf16 (kv_cache_dtype)


def _steps_and_prefills(model, ids, kv):
    """Decode steps 6..11 of ``ids`` after a 6-token prefill, over a cache of ``kv`` and one
    of the activations' dtype, and prefills of ids[:, :t] over fresh ``kv`` caches (the
    logits each step should give). Returns (steps over kv, its cache, steps over the
    default cache, its cache, prefills), the logits stacked."""
    with torch.inference_mode():
        small, plain = (StaticKVCache.for_model(model, 2, 16, dt) for dt in (kv, None))
        got, base = [], []
        for cache, out in ((small, got), (plain, base)):
            cache.reset()
            out.append(model.infer(ids[:, :6], cache))
            out.extend(model.infer(ids[:, t:t + 1], cache) for t in range(6, 12))
        want = []
        for t in range(6, 13):
            fresh = StaticKVCache.for_model(model, 2, 16, kv)
            fresh.reset()
            want.append(model.infer(ids[:, :t], fresh))
    return torch.stack(got), small, torch.stack(base), plain, torch.stack(want)


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "mqa"])
def test_small_cache_decode_steps_equal_prefills_over_the_same_cache(kv_heads, kv):
    """An fp32 model over a bf16 / int8 cache: each decode step (attend_one's kernel for
    that cache) gives the logits a prefill of the whole sequence over a fresh cache of the
    same dtype gives (torch's SDPA over the keys and values the cache rounded or
    quantized), at fp32's tolerance. The cache holds half the bytes (bf16) or a quarter
    plus a scale per row (int8), and the logits are not the fp32 cache's (the keys and
    values were rounded) but within bf16's tolerance of them."""
    model = _model(num_kv_heads=kv_heads)
    ids = torch.randint(256, (2, 12), generator=torch.Generator().manual_seed(3))
    got, c16, fp32, c32, want = _steps_and_prefills(model, ids, kv)
    Dh = model.config.head_size
    if kv == "bfloat16":
        assert c16.k[0].dtype == c16.v[0].dtype == torch.bfloat16
        assert 2 * c16.k[0].nbytes == c32.k[0].nbytes
    else:
        assert c16.k[0].dtype == c16.v[0].dtype == torch.int8
        assert c16.k[0].nbytes * 4 * Dh == c32.k[0].nbytes * (Dh + 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.equal(got, fp32)
    torch.testing.assert_close(got, fp32, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "mqa"])
def test_bf16_model_over_an_int8_cache(kv_heads):
    """A bf16 model over an int8 cache (half a bf16 cache's bytes plus a scale per row):
    each decode step (attend_one's kernel: fp32 scores over the int8 values, the output
    rounded to bf16 once) gives the logits a prefill over a fresh int8 cache gives
    (torch's SDPA in fp32 over the dequantized keys and values, q widened), to bf16's
    tolerance (the new key is quantized from the fp32 rotation in the step, from the bf16
    one in the prefill); not the bf16 cache's logits, but near them; batched as alone."""
    model = _model(torch.bfloat16, num_kv_heads=kv_heads)
    ids = torch.randint(256, (2, 12), generator=torch.Generator().manual_seed(5))
    got, c8, bf16, c16, want = _steps_and_prefills(model, ids, "int8")
    Dh = model.config.head_size
    assert c8.k[0].dtype == torch.int8 and c16.k[0].dtype == torch.bfloat16
    assert c8.k[0].nbytes * 2 * Dh == c16.k[0].nbytes * (Dh + 4)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert not torch.equal(got, bf16)
    torch.testing.assert_close(got.float(), bf16.float(), atol=6e-2, rtol=6e-2)
    cfg = GenerationConfig(max_new_tokens=5)
    batched, _ = Engine(model, kv_cache_dtype="int8").generate(PROMPTS, cfg)
    for prompt, g in zip(PROMPTS, batched, strict=True):
        alone, _ = Engine(model, kv_cache_dtype="int8").generate([prompt], cfg)
        assert g.tokens == alone[0].tokens, prompt


@pytest.mark.parametrize("kv", [torch.bfloat16, torch.int8])
def test_small_cache_batched_prompts_equal_each_alone(kv):
    model = _model()
    cfg = GenerationConfig(max_new_tokens=16)
    engine = Engine(model, kv_cache_dtype=kv)
    batched, _ = engine.generate(PROMPTS, cfg)
    assert engine.cache.k[0].dtype == kv
    for prompt, g in zip(PROMPTS, batched, strict=True):
        alone, _ = Engine(model, kv_cache_dtype=kv).generate([prompt], cfg)
        assert g.tokens == alone[0].tokens, prompt


def test_kv_cache_dtype_is_checked_by_name_before_anything_runs():
    model = _model()
    for bad in ("int4", torch.float16, 3):
        with pytest.raises(ValueError, match="kv_cache_dtype="):
            Engine(model, kv_cache_dtype=bad)
        with pytest.raises(ValueError, match="kv_cache_dtype="):
            StaticKVCache.for_model(model, 1, 8, bad)
    bf16 = _model(torch.bfloat16)
    for bad in ("float32", torch.float32):
        with pytest.raises(ValueError, match=r"activations are torch.bfloat16: it must be one "
                                             r'of "auto", "bfloat16", "bf16", "int8"'):
            Engine(bf16, kv_cache_dtype=bad)
    for ok in ("auto", None, "bf16", torch.bfloat16):
        assert StaticKVCache.for_model(bf16, 1, 8, ok).k[0].dtype == torch.bfloat16
    assert StaticKVCache.for_model(bf16, 1, 8, "int8").k[0].dtype == torch.int8
    assert StaticKVCache.for_model(model, 1, 8, "fp32").k[0].dtype == torch.float32
    with pytest.raises(ValueError, match=r'it must be one of "auto", "float32", "fp32", '
                                         r'"bfloat16", "bf16", "int8"'):
        Engine(model, kv_cache_dtype="int4")


def _save(model, run_dir):
    from moekit.train.checkpoint import save_checkpoint

    save_checkpoint(run_dir, model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})


def test_cli_prompts_file(tmp_path, capsys):
    model = _model()
    _save(model, tmp_path / "run")
    texts = ["def f(", "x", "import os"]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    args = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompts-file",
            str(tmp_path / "prompts.txt"), "--max-new-tokens", "6", "--temperature", "0",
            "--batch", "2"]
    assert cli_main(args) == 0
    out = capsys.readouterr()
    assert "tokens/s" in out.err
    for t in texts:
        new = _greedy_alone(model, list(t.encode()), 6)
        assert (t.encode() + bytes(new)).decode("utf-8", errors="replace") in out.out
    (tmp_path / "bad.txt").write_text("a\n\nb\n")
    assert cli_main([*args[:4], str(tmp_path / "bad.txt")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert cli_main([*args, "--max-new-tokens", "80"]) == 2
    assert "max_seq_len=64" in capsys.readouterr().err


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
def test_cli_generates_over_a_small_cache(tmp_path, capsys, kv):
    """--kv-cache-dtype bfloat16 / int8: one prompt (the engine) and a prompts file (the
    batcher) print what the engine generates over that cache; with --no-cache, or a bf16
    model asked for a float32 cache, a named error."""
    model = _model()
    _save(model, tmp_path / "run")
    cfg = GenerationConfig(max_new_tokens=6)
    want = {t: bytes(Engine(model, kv_cache_dtype=kv).generate(
        [list(t.encode())], cfg)[0][0].tokens) for t in ("ab", "x", "import os")}
    base = ["generate", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "6",
            "--temperature", "0", "--kv-cache-dtype", kv]
    assert cli_main([*base, "--prompt", "ab"]) == 0
    assert capsys.readouterr().out == "ab" + want["ab"].decode("utf-8", errors="replace") + "\n"
    (tmp_path / "prompts.txt").write_text("x\nimport os\n")
    assert cli_main([*base, "--prompts-file", str(tmp_path / "prompts.txt")]) == 0
    out = capsys.readouterr().out
    for t in ("x", "import os"):
        assert (t.encode() + want[t]).decode("utf-8", errors="replace") in out
    assert cli_main([*base, "--prompt", "ab", "--no-cache"]) == 2
    assert f"--kv-cache-dtype={kv} is not allowed with --no-cache" in capsys.readouterr().err
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "run"), "--dtype", "bf16",
                     "--kv-cache-dtype", "float32"]) == 2
    assert "kv_cache_dtype='float32' is not allowed" in capsys.readouterr().err


def test_cli_streams_a_single_prompt(tmp_path, capsys):
    model = _model()
    _save(model, tmp_path / "run")
    rc = cli_main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "ab",
                   "--max-new-tokens", "5", "--temperature", "0"])
    out = capsys.readouterr()
    new = bytes(_greedy_alone(model, [97, 98], 5)).decode("utf-8", errors="replace")
    assert rc == 0 and out.out == "ab" + new + "\n"
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", ""]) == 2
    assert "empty" in capsys.readouterr().err


def test_patched_transformers_generate_equals_unpatched():
    """A left-padded batch through transformers' own generate(), in inference mode."""
    hf_models = pytest.importorskip("tests.hf_models")
    from moekit.integrations import hf

    original = hf_models.build("olmoe").eval()
    original.config.output_router_logits = False  # its aux loss breaks padded generate()
    patched = hf.apply(copy.deepcopy(original))
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # the second prompt is 3 tokens shorter
    kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.inference_mode():
        a, b = original.generate(ids, **kw), patched.generate(ids, **kw)
    assert torch.equal(a, b)


def test_an_expert_choice_model_generates_each_prompt_as_alone():
    """Expert choice picks tokens among a call's rows: batched, each sequence's experts had
    depended on the other sequences' tokens. The engine runs such a model's prompts one at
    a time: each equals that prompt generated alone, and the callbacks see the prompt's own
    index."""
    model = _model(router="expert_choice", num_experts=8, top_k=2, tie_embeddings=False)
    with torch.no_grad():  # sharper routing and logits than at init
        for p in model.parameters():
            p.mul_(3)
    cfg = GenerationConfig(max_new_tokens=10)
    engine = Engine(model)
    alone = [engine.generate([p], cfg)[0][0].tokens for p in PROMPTS]
    seen: dict[int, list[int]] = {}
    batched, stats = engine.generate(PROMPTS, cfg,
                                     on_token=lambda i, t: seen.setdefault(i, []).append(t))
    assert [g.tokens for g in batched] == alone
    assert seen == dict(enumerate(alone))
    assert stats.sequences == len(PROMPTS) and stats.new_tokens == sum(map(len, alone))
