"""Inference from several Python threads at once, as a threaded web app serving one model
runs it: the same module called concurrently, and one Engine (its own KV cache) per thread.

Oracle: each input's result computed single-threaded first, on the same module; every
concurrent result must equal it bit for bit (fp32, deterministic kernels). Inputs of 1, 3,
16 and a prefill's rows alternate so kept buffers are resized between calls. The decode
kernels release the GIL, so two threads really are inside them together.

Objects that hold one generation's state (an Engine, a Batcher) refuse a second call
while one runs: ``ConcurrentUseError``. ``MOEKIT_THREAD_ROUNDS`` (default 3) sets how
many times each thread runs every input.
"""

from __future__ import annotations

import copy
import os
import threading
import time

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.functions import cpu_ext
from moekit.inference import Batcher, ConcurrentUseError, Engine, GenerationConfig
from moekit.inference.decode_plan import DecodePlan
from moekit.models import MoETransformer, generate, preset
from moekit.models.config import LMConfig
from moekit.models.kv_cache import KVCache, StaticKVCache
from moekit.offload import load_offloaded
from moekit.quant import quantize
from moekit.train.checkpoint import save_checkpoint

THREADS = 3
ROUNDS = int(os.environ.get("MOEKIT_THREAD_ROUNDS", "3"))
PROMPTS = [[[5, 6, 7]], [[9, 1, 2, 3, 4], [7]], [[i, i + 1] for i in range(16)]]
GREEDY = GenerationConfig(max_new_tokens=6)
SAMPLED = GenerationConfig(max_new_tokens=6, temperature=0.8, top_k=20, seed=3)


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _concurrently(fn, inputs: list) -> None:
    """``fn`` on every input single-threaded (the references), then THREADS threads each
    running every input ROUNDS times, starting at different inputs; each result must
    equal its reference and no thread may raise."""
    refs = [fn(x) for x in inputs]
    wrong: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        try:
            start.wait()
            for n in range(ROUNDS * len(inputs)):
                j = (t + n) % len(inputs)
                if not _same(fn(inputs[j]), refs[j]):
                    wrong.append((t, j))
        except BaseException as e:  # noqa: BLE001 - reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    runs = THREADS * ROUNDS * len(inputs)
    assert not wrong, f"{len(wrong)} of {runs} concurrent results differ (thread, input): " \
                      f"{wrong[:5]}"


def _infer(module):
    def call(x):
        with torch.inference_mode():
            return module.infer(x)
    return call


def _logits(model, mode=torch.inference_mode):
    def call(ids):
        with mode():
            return model(ids).logits
    return call


def _rows(dim: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(T, dim, generator=g) for T in (1, 3, 16, 300)]  # 300: prefill


def _ids() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (B, L), generator=g) for B, L in ((1, 1), (3, 1), (16, 1),
                                                                     (2, 40))]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MoETransformer(preset("tiny")).eval()


# -- one module, called from several threads ----------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "fused", "decode"])
def test_layer_shared_across_threads(backend, two_threads):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=64, ffn_dim=96, num_experts=8, top_k=2), backend=backend).eval()
    _concurrently(_infer(moe), _rows(64))

    def forward(x):
        with torch.inference_mode():
            return moe(x).output
    _concurrently(forward, _rows(64))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_quantized_layer_and_model_shared_across_threads(tiny, bits, group_size):
    model = quantize(copy.deepcopy(tiny), bits=bits, group_size=group_size)
    _concurrently(_infer(model.blocks[0].ffn), _rows(model.config.dim))
    _concurrently(_logits(model), _ids())


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_model_forward_shared_across_threads(tiny, mode, two_threads):
    _concurrently(_logits(tiny, mode), _ids())


# -- one Engine (its KV cache) per thread, one model ---------------------------------------

def _tokens(gens) -> list[list[int]]:
    return [g.tokens for g in gens]


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_engines_of_one_model_on_threads(tiny, quantized):
    model = quantize(copy.deepcopy(tiny), bits=8) if quantized else tiny
    for cfg in (GREEDY, SAMPLED):
        _concurrently(lambda p, cfg=cfg: _tokens(Engine(model).generate(p, cfg)[0]), PROMPTS)
    prompts = [torch.tensor(p) for p in ([[5, 6, 7]], [[9, 1], [7, 3]])]
    _concurrently(lambda ids: generate(model, ids, 5, temperature=0.7,
                                       generator=torch.Generator().manual_seed(1)), prompts)


def test_batchers_of_one_model_on_threads(tiny):
    def run(prompts):
        batcher = Batcher(tiny, rows=4, context=64)
        group = batcher.run(batcher.submit(prompts[:4], SAMPLED))
        return _tokens(group.gens)
    _concurrently(run, PROMPTS)


# -- an offloaded model: one expert cache for every thread ---------------------------------

CFG = LMConfig(dim=32, num_layers=3, num_heads=2, ffn_dim=24, num_experts=8, top_k=2,
               max_seq_len=64)
EXPERT_BYTES = (32 * 48 + 24 * 32) * 4  # w_in [D, 2F] + w_out [F, D], fp32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = MoETransformer(CFG).eval()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 1, "model_config": CFG.to_dict()})
    return run


@pytest.mark.parametrize("experts,prefetch", [(2, False), (5, True)])
def test_offloaded_model_shared_across_threads(run_dir, experts, prefetch):
    """Steps of several threads share one cache: a budget of 2 experts (every step evicts)
    gave 11 of 30 wrong forwards before ExpertOffload.run took one step at a time."""
    model = load_offloaded(run_dir, experts * EXPERT_BYTES, prefetch=prefetch)
    try:
        _concurrently(_logits(model), _ids())
        _concurrently(lambda p: _tokens(Engine(model).generate(p, GREEDY)[0]), PROMPTS)
        assert model.expert_offload.cache.used <= experts * EXPERT_BYTES
    finally:
        assert model.expert_offload.close(timeout=5.0)


# -- objects that hold one generation: a second call is refused ----------------------------

def _while_running(start_call, second_call) -> BaseException | None:
    """Run ``start_call(pause)`` on a thread, which calls ``pause()`` from inside (a
    callback); while it is paused, ``second_call()`` on this thread. Returns what that
    raised (None: nothing)."""
    inside, resume = threading.Event(), threading.Event()

    def pause() -> None:
        inside.set()
        resume.wait(10)

    errors: list[BaseException] = []

    def first() -> None:
        try:
            start_call(pause)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    th = threading.Thread(target=first)
    th.start()
    assert inside.wait(10), "the first call never reached its callback"
    try:
        second_call()
        raised = None
    except BaseException as e:  # noqa: BLE001 - the caller checks it
        raised = e
    finally:
        resume.set()
        th.join()
    assert not errors, errors
    return raised


def test_one_engine_refuses_a_second_concurrent_generate(tiny):
    engine = Engine(tiny)
    want = _tokens(Engine(tiny).generate(PROMPTS[1], GREEDY)[0])
    paused = []

    def first(pause):
        def on_token(i, tok):
            if not paused:
                paused.append(True)
                pause()
        assert _tokens(engine.generate(PROMPTS[1], GREEDY, on_token=on_token)[0]) == want

    raised = _while_running(first, lambda: engine.generate(PROMPTS[0], GREEDY))
    assert isinstance(raised, ConcurrentUseError), raised
    assert "give each thread its own Engine" in str(raised)
    # the refused call changed nothing, and the engine serves the next call
    assert _tokens(engine.generate(PROMPTS[1], GREEDY)[0]) == want

    inner: list[BaseException] = []

    def reenter(i, tok):  # from its own callback: the same cache, refused too
        if not inner:
            with pytest.raises(ConcurrentUseError) as e:
                engine.generate(PROMPTS[0], GREEDY)
            inner.append(e.value)
    engine.generate(PROMPTS[0], GREEDY, on_token=reenter)
    assert inner


def test_one_batcher_refuses_a_step_or_submit_from_another_thread(tiny):
    batcher = Batcher(tiny, rows=4, context=64)
    paused = []

    def first(pause):
        def on_token(i, tok):
            if not paused:
                paused.append(True)
                pause()
                # a callback of the step may submit (its own thread)
                batcher.submit(PROMPTS[0], GREEDY)
        batcher.run(batcher.submit(PROMPTS[1], GREEDY, on_token=on_token))
        while batcher.step():
            pass

    raised = _while_running(first, batcher.step)
    assert isinstance(raised, ConcurrentUseError), raised
    paused.clear()
    raised = _while_running(first, lambda: batcher.submit(PROMPTS[0], GREEDY))
    assert isinstance(raised, ConcurrentUseError), raised
    assert batcher.running == 0 and batcher.waiting == 0


# -- one KV cache: a second forward on it while one writes it is refused -------------------

PREFILL = torch.tensor([[5, 6, 7], [9, 1, 2]])
NEXT = torch.tensor([[3], [4]])


def _static(model) -> StaticKVCache:
    return StaticKVCache.for_model(model, 2, 16)


def _state(cache: StaticKVCache) -> list:
    return [t.clone() for t in (*cache.k, *cache.v, cache.valid_BM, cache.pad_B)] + \
        [cache.length, cache.rows]


def _refused_on_a_written_cache(model, cache, second) -> BaseException | None:
    """``model.infer(PREFILL, cache)`` on a thread, paused inside its layer 1 write (layer
    0's keys written); meanwhile ``second(cache)`` here. The refused call must change
    nothing, and the paused forward end as it would alone."""
    with torch.inference_mode():
        want = model.infer(PREFILL, ref := _static(model)), model.infer(NEXT, ref)
    write, got, state = cache.write, [], []

    def first(pause):
        def held(layer, k, v):
            if layer == 1:
                state.append(_state(cache))
                pause()
            return write(layer, k, v)
        cache.write = held
        with torch.inference_mode():
            got.append(model.infer(PREFILL, cache))

    def call():
        try:
            with torch.inference_mode():
                second(cache)
        finally:
            state.append(_state(cache))  # while the first is still paused

    try:
        raised = _while_running(first, call)
    finally:
        cache.write = write
    assert all(_same(a, b) for a, b in zip(*state, strict=True))
    with torch.inference_mode():
        assert torch.equal(got[0], want[0])  # the paused forward computed its own logits
        assert torch.equal(model.infer(NEXT, cache), want[1])  # on a whole cache
    return raised


SECOND = {  # what a second thread does with the cache while a forward writes it
    "infer": lambda m, c: m.infer(NEXT, c),
    "forward": lambda m, c: m(NEXT, cache=c),
    "infer_pair": lambda m, c: m.infer_pair(PREFILL, _static(m), NEXT, c),
    "DecodePlan.step": lambda m, c: _plan(m).step(NEXT, c),
    "reset": lambda m, c: c.reset(),
    "keep_rows": lambda m, c: c.keep_rows(torch.tensor([1])),
    "shift": lambda m, c: c.shift(0),
    "join": lambda m, c: c.join(c, torch.tensor([0]), [1]),
}


def _plan(model):
    plan = DecodePlan.build(model)
    if plan is None:
        pytest.skip("no decode plan here (the C++ decode kernels did not build)")
    return plan


@pytest.mark.parametrize("second", list(SECOND))
def test_a_second_forward_on_one_kv_cache_is_refused(tiny, second):
    """Was not detected: a second thread's forward on the StaticKVCache a prefill was
    writing ran, with no error (``infer``: the prefill's logits off by up to 0.037, the
    cache's length 4 after 3 tokens); a row change under it failed the prefill ("The
    expanded size of the tensor (1) must match...") or left it computing on moved rows."""
    if second == "DecodePlan.step":
        _plan(tiny)
    cache = _static(tiny)
    raised = _refused_on_a_written_cache(tiny, cache, lambda c: SECOND[second](tiny, c))
    assert isinstance(raised, ConcurrentUseError), raised
    assert "StaticKVCache(batch=2, max_len=16, 2 layers) is being written by another " \
           "forward" in str(raised), raised
    assert "give each thread its own cache" in str(raised)


def test_a_second_forward_on_one_growing_kv_cache_is_refused(tiny):
    with torch.no_grad():
        want = tiny(PREFILL, cache=KVCache(2)).logits
    cache = KVCache(2)
    extend, got = cache.extend, []

    def first(pause):
        def held(layer, k, v):
            if layer == 1:
                pause()
            return extend(layer, k, v)
        cache.extend = held
        with torch.no_grad():
            got.append(tiny(PREFILL, cache=cache).logits)

    raised = _while_running(first, lambda: tiny(NEXT, cache=cache))
    assert isinstance(raised, ConcurrentUseError), raised
    assert "KVCache(2 layers) is being written by another forward" in str(raised)
    assert torch.equal(got[0], want) and cache.length == PREFILL.shape[1]


# -- the C++ modules' first use -----------------------------------------------------------

def test_first_use_from_several_threads_builds_once_and_nobody_sees_none(monkeypatch):
    """A server whose first requests come together: every thread waits for the one build
    (or load) of each module. Before, get() marked itself tried before building, so 2 of
    3 threads got None and ran the torch fallback, and get_decode() built once per thread."""
    built: list[str] = []

    def slow_build(name, *args, **kwargs):
        built.append(name)
        time.sleep(0.2)
        return _FakeModule(name)

    monkeypatch.setattr(cpu_ext, "_build", slow_build)
    monkeypatch.setattr(cpu_ext, "_module", None)
    monkeypatch.setattr(cpu_ext, "_tried", False)
    monkeypatch.setattr(cpu_ext, "_decode", [])
    monkeypatch.setattr(cpu_ext, "_bf16", None)
    monkeypatch.setattr(cpu_ext, "_bf16_tried", False)
    monkeypatch.setattr(cpu_ext, "amx", lambda: False)
    monkeypatch.setenv(cpu_ext.BF16_ENV, "1")
    for var in (cpu_ext.ENV, cpu_ext.ISA_ENV, cpu_ext.AMX_ENV, cpu_ext.TERMS_ENV):
        monkeypatch.delenv(var, raising=False)
    got: list[dict] = []
    start = threading.Barrier(4)
    getters = [cpu_ext.get, cpu_ext.get_decode, cpu_ext.bf16]

    def first_calls(t: int) -> None:  # each thread calls the getters in its own order
        start.wait()
        order = getters[t % 3:] + getters[:t % 3]
        got.append({g.__name__: getattr(g(), "name", None) for g in order})

    threads = [threading.Thread(target=first_calls, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(built) == sorted([cpu_ext.NAME, cpu_ext.DECODE_NAME, cpu_ext.BF16_NAME])
    want = {"get": cpu_ext.NAME, "get_decode": cpu_ext.DECODE_NAME, "bf16": cpu_ext.BF16_NAME}
    assert got == [want] * 4
    assert len(cpu_ext._decode) == 1


class _FakeModule:
    def __init__(self, name: str) -> None:
        self.name = name

    def available(self) -> bool:  # cpu_bf16's: the CPU runs its instructions
        return True

