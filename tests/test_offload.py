"""moekit.offload: experts read on demand under a byte budget compute exactly what the
resident model computes; the cache evicts in the order its policy says; Belady's
hit count matches a hand count; broken checkpoints and small budgets fail early.

Oracles: the resident model (same weights, same backend) for outputs, bitwise;
hand-worked traces for eviction order, Belady and prefetch accuracy.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

from moekit.models import MoETransformer
from moekit.models.config import LMConfig
from moekit.models.generate import generate
from moekit.offload import (
    LFU,
    LRU,
    ExpertCache,
    ExpertMemoryError,
    PrefetchError,
    ShardError,
    belady,
    flatten,
    load_offloaded,
    parse_bytes,
    simulate,
)
from moekit.train.checkpoint import CheckpointError, save_checkpoint

# -- budgets -------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(prefetch="no"), "prefetch="), (dict(threaded="False"), "threaded="),
    (dict(policy="fifo"), "policy="), (dict(backend="fast"), "backend="),
])
def test_load_offloaded_options_checked_before_reading(tmp_path, kwargs, name):
    # a truthy string was taken as True; the path does not exist: nothing was read
    with pytest.raises(ValueError, match=name):
        load_offloaded(tmp_path / "absent", "1GiB", **kwargs)


@pytest.mark.parametrize("value,expected", [
    (1000, 1000), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000),
    ("64 KiB", 65536), ("7", 7), ("3b", 3), (2e9, 2_000_000_000), ("0.5KB", 500)])
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["", "12XB", "-1MiB", 0, -5, "MiB", True,
                                   1.5, "1.5"])  # 1.5 was read as 1 byte
def test_parse_bytes_rejects(value):
    with pytest.raises(ValueError, match="expert_memory="):
        parse_bytes(value)


# -- policies on hand-made traces ----------------------------------------------------


class FakeStore:
    """Every expert is ``size`` bytes; ``load`` returns its key (or fails / sleeps)."""

    def __init__(self, keys, size=10, fail=None, delay=0.0):
        self.experts = {k: None for k in keys}
        self.size, self.fail, self.delay = size, fail, delay
        self.loaded = []

    def nbytes(self, key):
        return self.size

    raw_nbytes = nbytes

    def load(self, key):
        time.sleep(self.delay)
        if key == self.fail:
            raise OSError(f"cannot read {key}")
        self.loaded.append(key)
        return {"key": key}

    def close(self):
        pass


A, B, C, D = (0, 0), (0, 1), (0, 2), (0, 3)
TRACE = [A, B, C, A, B, D, A, C]


def _replay(policy: str, trace, capacity: int):
    """Run single-expert steps through a real ExpertCache; (hits, cached set after each)."""
    cache = ExpertCache(FakeStore([A, B, C, D]), 10 * capacity, policy, prefetch=False)
    hits, states = [], []
    for layer, e in trace:
        before = cache.stats.layers[0].hits
        assert cache.get(layer, [e]) == [{"key": (layer, e)}]
        hits.append(cache.stats.layers[0].hits > before)
        states.append(set(cache.entries))
    cache.close()
    return hits, states


def test_lru_eviction_order():
    hits, states = _replay("lru", TRACE, capacity=2)
    # A B -> {A,B}; C evicts A; A evicts B; B evicts C; D evicts A; A evicts B; C evicts D
    assert hits == [False] * 8
    assert states == [{A}, {A, B}, {B, C}, {C, A}, {A, B}, {B, D}, {D, A}, {A, C}]
    assert simulate(LRU(), TRACE, 2) == hits


def test_lfu_eviction_order():
    trace = [A, A, B, C, B, D, C, A]
    hits, states = _replay("lfu", trace, capacity=2)
    # counts survive eviction; ties go to the least recently used
    # A(1) A(2,hit) B(1) | C: victims B(1) vs A(2) -> B | B(2): A(2) vs C(1) -> C
    # D: A(2) B(2) tie, A older -> A | C(2): B(2) D(1) -> D | A(3): B(2) C(2), B older -> B
    assert hits == [False, True, False, False, False, False, False, False]
    assert states == [{A}, {A}, {A, B}, {A, C}, {A, B}, {B, D}, {B, C}, {C, A}]
    assert simulate(LFU(), trace, 2) == hits


def test_lru_and_lfu_differ_on_a_skewed_trace():
    trace = [A, A, A, B, C, A, D, A]
    assert sum(_replay("lfu", trace, 2)[0]) == 4  # A is kept: hits at 2, 3, 6, 8
    assert sum(_replay("lru", trace, 2)[0]) == 3  # A evicted by C, D: hits at 2, 3, 8


def test_belady_by_hand():
    # capacity 2: A B C(bypassed: C is never used again) A(hit) B(hit) D(bypassed) A(hit)
    assert belady([A, B, C, A, B, D, A], capacity=2) == [False, False, False, True, True,
                                                         False, True]
    # capacity 1: the first B is used and dropped, since A comes back before B
    assert belady([A, A, B, A, B, B], capacity=1) == [False, True, False, True, False, True]
    # bytes: D is twice as large; budget 20 fits A+B or D alone
    sizes = {A: 10, B: 10, D: 20}
    assert belady([A, B, D, A, B], budget=20, nbytes=sizes.__getitem__) == [
        False, False, False, True, True]


def test_belady_bounds_the_online_policies():
    gen = torch.Generator().manual_seed(0)
    trace = [(0, int(e)) for e in torch.randint(0, 4, (200,), generator=gen)]
    best = sum(belady(trace, capacity=2))
    assert best >= sum(simulate(LRU(), trace, 2))
    assert best >= sum(simulate(LFU(), trace, 2))
    assert flatten([(1, (2, 3)), (0, (1,))]) == [(1, 2), (1, 3), (0, 1)]


def test_prefetch_precision_recall_by_hand():
    keys = [(1, e) for e in range(4)]
    cache = ExpertCache(FakeStore(keys), 40, "lru", prefetch=True, threaded=False,
                        num_layers=2)
    cache.prefetch(1, [0, 1])  # predicted {0, 1}
    cache.get(1, [1, 2])  # used {1, 2}: 1 was predicted; hits: 1 only
    s = cache.stats
    assert (s.prefetch_precision, s.prefetch_recall) == (0.5, 0.5)
    assert (s.layers[1].hits, s.layers[1].requests) == (1, 2)
    assert s.layers[1].bytes_loaded == 30  # 0, 1 prefetched, 2 on demand
    cache.close()


# -- the prefetch thread -------------------------------------------------------------


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "moekit-prefetch"]


def test_prefetch_thread_stops_cleanly():
    keys = [(0, e) for e in range(8)]
    store = FakeStore(keys, delay=0.2)
    cache = ExpertCache(store, 80, "lru", prefetch=True)
    cache.prefetch(0, list(range(8)))  # 1.6 s of queued reads
    t0 = time.perf_counter()
    assert cache.close(timeout=5.0)
    assert time.perf_counter() - t0 < 1.0  # the read in progress, not the queue
    assert not cache.loader.thread.is_alive()
    assert len(store.loaded) <= 2


def test_prefetch_exception_surfaces_in_caller():
    keys = [(0, e) for e in range(4)]
    cache = ExpertCache(FakeStore(keys, fail=(0, 2)), 40, "lru", prefetch=True)
    cache.prefetch(0, [2, 3])
    with pytest.raises(PrefetchError, match="cannot read"):
        for _ in range(100):  # the next call after the read fails raises it
            cache.get(0, [0])
            time.sleep(0.01)
    assert cache.close(timeout=5.0)


def test_waiting_on_a_failed_prefetch_raises():
    cache = ExpertCache(FakeStore([(0, 0)], fail=(0, 0)), 10, "lru", prefetch=True)
    cache.prefetch(0, [0])
    cache.raise_failures = lambda: None  # go straight to the wait
    with pytest.raises(PrefetchError, match="layer 0"):
        cache.get(0, [0])
    assert cache.close(timeout=5.0)


# -- moekit checkpoints --------------------------------------------------------------

CFG = LMConfig(dim=32, num_layers=3, num_heads=2, ffn_dim=24, num_experts=8, top_k=2,
               max_seq_len=64)
EXPERT_BYTES = (32 * 48 + 24 * 32) * 4  # w_in [D, 2F] + w_out [F, D], fp32


@pytest.fixture(scope="module")
def moekit_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = MoETransformer(CFG).eval()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, model, torch.optim.AdamW(model.parameters()),
                    {"step": 1, "model_config": CFG.to_dict()})
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    tokens = generate(model, ids, 12, temperature=0)
    with torch.no_grad():
        logits = model(tokens).logits
    return run, ids, tokens, logits


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("prefetch,threaded", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("experts", [2, 5, 24])  # one layer's top-k .. everything
def test_moekit_offloaded_equals_resident(moekit_ckpt, policy, prefetch, threaded, experts):
    run, ids, tokens, logits = moekit_ckpt
    model = load_offloaded(run, experts * EXPERT_BYTES, policy, prefetch=prefetch,
                           threaded=threaded)
    try:
        assert torch.equal(generate(model, ids, 12, temperature=0), tokens)
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, logits)  # bitwise
        stats = model.expert_offload.stats
        assert stats.total("requests") > 0
        assert model.expert_offload.cache.used <= experts * EXPERT_BYTES
        if experts == 24 and not prefetch:  # all fit: one miss per expert ever used
            assert stats.total("loads") == len({k for k in flatten(stats.trace)})
        assert stats.belady_hit_rate() >= (0.0 if prefetch else stats.hit_rate)
    finally:
        assert model.expert_offload.close(timeout=5.0)


def test_moekit_offloaded_frozen_with_grad_on_equals_no_grad(moekit_ckpt):
    """A frozen offloaded model run with grad mode on wants no gradient: the experts take
    no_grad's path (the decode kernels on the cached tensors; they took the fused GEMMs,
    ~5e-8 off), bitwise the same logits."""
    run, _, tokens, _ = moekit_ckpt
    model = load_offloaded(run, 24 * EXPERT_BYTES, prefetch=False, threaded=False)
    try:
        model.requires_grad_(False)
        for ids in (tokens[:1, :1], tokens[:1, :5], tokens):
            with torch.no_grad():
                want = model(ids).logits
            assert torch.equal(model(ids).logits, want)
    finally:
        assert model.expert_offload.close(timeout=5.0)


@pytest.mark.parametrize("what", ["input", "router"])
def test_moekit_offloaded_refuses_a_gradient_it_would_drop(moekit_ckpt, what):
    """The offloaded experts keep no graph (decode kernels, fused_experts_into): with a
    gradient wanted through their input (a trainable embedding) or combine weights (a
    trainable router) the experts' part of it went missing, silently (the embedding's
    gradient 292.61 against the resident model's 292.55). Now a named error, the step's
    lock released: the model still runs under no_grad and closes."""
    run, _, tokens, logits = moekit_ckpt
    model = load_offloaded(run, 24 * EXPERT_BYTES, prefetch=False, threaded=False)
    try:
        model.requires_grad_(False)
        learner = model.embed.weight if what == "input" else model.blocks[0].ffn.router.weight
        learner.requires_grad_(True)
        with pytest.raises(RuntimeError, match=r"offloaded experts \(layer \d\) have no "
                                               r"backward.*torch.no_grad\(\)"):
            model(tokens[:1, :5])
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, logits)
    finally:
        assert model.expert_offload.close(timeout=5.0)


@pytest.mark.parametrize("B,L", [(20, 30), (4, 50)])
def test_moekit_prefill_past_the_decode_rows_equals_resident(moekit_ckpt, B, L):
    """600 tokens x top-2 = 1200 routed rows (past DECODE_MAX_ROWS), and 400 (past the
    per-expert limit, 24 x 8 experts, not 1024): the fused GEMMs, a chunk of experts at a
    time into one output (budget 2: chunks of 2 experts), bitwise as one resident call."""
    run = moekit_ckpt[0]
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(3))
    resident = _resident(run)
    with torch.no_grad():
        want = resident(ids).logits
    for experts in (2, 24):
        model = load_offloaded(run, experts * EXPERT_BYTES, prefetch=False, threaded=False)
        try:
            with torch.no_grad():
                assert torch.equal(model(ids).logits, want)
        finally:
            model.expert_offload.close()


def _resident(run):
    from moekit.quant.io import load_model

    return load_model(run)


def test_moekit_decode_reads_only_the_cache(moekit_ckpt, monkeypatch):
    """Decode and prefill (decode kernels or GEMMs) compute on the cached tensors
    themselves: no stacked copy (stack_experts is never called), every cached tensor
    lies in the cache's one budget-sized buffer."""
    from moekit.functions import expert_blocks

    run, ids, tokens, logits = moekit_ckpt
    # gmm (expert_blocks.py) is where the fused path would stack a copy
    monkeypatch.setattr(expert_blocks, "stack_experts", lambda ws: pytest.fail("stacked a copy"))
    model = load_offloaded(run, 5 * EXPERT_BYTES, prefetch=True, threaded=True)
    try:
        assert torch.equal(generate(model, ids, 12, temperature=0), tokens)
        long_ids = torch.randint(0, 256, (4, 50), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():  # 400 routed rows: the GEMMs
            assert torch.equal(model(long_ids).logits, _resident(run)(long_ids).logits)
        cache = model.expert_offload.cache
        buf = cache.arena.buf_B
        lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
        assert buf.numel() == 5 * EXPERT_BYTES
        for entry in cache.entries.values():
            for t in (entry.value["w_in"], entry.value["w_out"]):
                assert lo <= t.data_ptr() and t.data_ptr() + t.numel() * 4 <= hi
    finally:
        model.expert_offload.close()


CFG_Q = LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=32, num_experts=8, top_k=2,
                 max_seq_len=64)


def _one_call_counter(monkeypatch, one_call: bool) -> list:
    """Counts the quantized prefill's one-call runs (decode.quantized_experts_into);
    ``one_call`` False turns it off (the dequantized blocks run)."""
    from moekit.functions import decode

    monkeypatch.setattr(decode, "QUANT_ONE_CALL", one_call)
    calls, real = [], decode.quantized_experts_into
    monkeypatch.setattr(decode, "quantized_experts_into",
                        lambda *a: calls.append(1) or real(*a))
    return calls


def _one_call_expected() -> bool:
    from moekit.functions import cpu_ext

    ext = cpu_ext.get()
    return ext is not None and hasattr(ext, "quantized_swiglu_experts_ok") and \
        ext.quantized_swiglu_experts_ok() and ext.sgemm_max_rows() > 0


@pytest.mark.parametrize("one_call", [True, False], ids=["one_call", "dequantized"])
@pytest.mark.parametrize("bits,activations", [(8, "float"), (4, "float"), (8, "int8"),
                                              (4, "int8")])
def test_moekit_quantized_checkpoint_offloaded_equals_resident(bits, activations, one_call,
                                                               tmp_path, monkeypatch):
    """A `moekit quantize` directory under an expert budget: the int8/int4 bytes are
    cached (budget in quantized bytes) and outputs equal the resident quantized model,
    decode (kernels), a 300-row prefill (past 24 rows per expert: the one call where it
    runs, else the kernels) and a 1200-row one (the one call, or dequantized blocks) alike;
    int8 activations (W8A8, W4A8) keep them offloaded too."""
    from moekit.quant import quantize
    from moekit.quant.io import load_quantized, save_quantized

    calls = _one_call_counter(monkeypatch, one_call)
    torch.manual_seed(0)
    save_quantized(quantize(MoETransformer(CFG_Q).eval(), bits, 32 if bits == 4 else None,
                            activations=activations), tmp_path / "q")
    resident = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    long_ids = torch.randint(0, 256, (20, 30), generator=torch.Generator().manual_seed(2))
    mid_ids = long_ids[:5]
    tokens = generate(resident, ids, 8, temperature=0)
    with torch.no_grad():
        logits, long_logits = resident(tokens).logits, resident(long_ids).logits
        mid_logits = resident(mid_ids).logits
    resident_calls = len(calls)
    # 2 prefills x 2 layers; 3 for W8A8 where the one call rounds the inputs (its row limit,
    # backends.A8_ROWS_PER_EXPERT: 6 per expert, so the 60 rows of `tokens` pass it too)
    from moekit.functions import decode
    prefills = 3 if (bits, activations) == (8, "int8") and decode.int8_gemm_here() else 2
    assert (resident_calls == 2 * prefills) == (one_call and _one_call_expected())
    qt = resident.blocks[0].ffn.experts.w_in
    per_expert = qt.nbytes_per_expert() + resident.blocks[0].ffn.experts.w_out.nbytes_per_expert()
    for experts in (2, 16):
        model = load_offloaded(tmp_path / "q", experts * per_expert, prefetch=True)
        try:
            assert torch.equal(generate(model, ids, 8, temperature=0), tokens)
            with torch.no_grad():
                assert torch.equal(model(tokens).logits, logits)
                before = len(calls)
                assert torch.equal(model(long_ids).logits, long_logits)
                assert torch.equal(model(mid_ids).logits, mid_logits)
            # the same path as the resident model: one call per chunk of cached experts
            assert (len(calls) > before) == (resident_calls > 0)
            assert model.expert_offload.cache.capacity == experts  # quantized bytes cached
            assert model.blocks[0].attn.qkv.weight.activations == activations
        finally:
            model.expert_offload.close()


@pytest.mark.parametrize("embeddings", [True, False], ids=["int4 table", "float table"])
def test_quantized_untied_table_offloaded_equals_resident(embeddings, tmp_path):
    """A quantized directory of an untied model, its table quantized or kept float:
    offloaded, the table is resident as saved and the tokens and logits are the
    resident model's."""
    from moekit.quant import quantize
    from moekit.quant.io import load_quantized, save_quantized
    from moekit.quant.linear import QuantizedEmbedding

    torch.manual_seed(0)
    save_quantized(quantize(MoETransformer(CFG_Q.replace(tie_embeddings=False)).eval(), 4, 32,
                            embeddings=embeddings), tmp_path / "q")
    resident = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    tokens = generate(resident, ids, 8, temperature=0)
    model = load_offloaded(tmp_path / "q", "1MiB")
    try:
        assert isinstance(model.embed, QuantizedEmbedding) == embeddings
        assert torch.equal(generate(model, ids, 8, temperature=0), tokens)
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, resident(tokens).logits)
    finally:
        model.expert_offload.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moekit_quantized_offloaded_prefill_in_several_chunks(dtype, tmp_path, monkeypatch):
    """Blocks of 3 experts: the offloaded dequantized prefill (the one call off) runs three
    chunks per layer (the last of 2 experts) through one reused buffer per weight (bf16
    for a bf16 model: dequantized straight to it), and equals the resident model (same
    blocks) bitwise."""
    from moekit.functions import decode
    from moekit.offload import runtime
    from moekit.quant import quantize
    from moekit.quant.io import load_quantized, save_quantized

    monkeypatch.setattr(decode, "DEQUANT_BLOCK_EXPERTS", 3)
    monkeypatch.setattr(decode, "QUANT_ONE_CALL", False)
    torch.manual_seed(0)
    save_quantized(quantize(MoETransformer(CFG_Q).eval(), 4, 32), tmp_path / "q")
    resident = load_quantized(tmp_path / "q").to(dtype)
    long_ids = torch.randint(0, 256, (20, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = resident(long_ids).logits
    experts = resident.blocks[0].ffn.experts
    per_expert = experts.w_in.nbytes_per_expert() + experts.w_out.nbytes_per_expert()
    model = load_offloaded(tmp_path / "q", 16 * per_expert).to(dtype)
    buffers, real = [], runtime.dequantize_NK
    monkeypatch.setattr(runtime, "dequantize_NK",
                        lambda q, e0, e1, out: buffers.append(out.dtype) or real(q, e0, e1, out))
    try:
        with torch.no_grad():
            got = model(long_ids).logits
        assert got.dtype == dtype and torch.equal(got, want)
        assert set(buffers) == {dtype}
    finally:
        model.expert_offload.close()


def test_moekit_offloaded_with_shared_experts_and_qkv_biases_equals_resident(tmp_path):
    """A Qwen2-MoE-like model (a gated shared expert, q / k / v biases): its routed experts
    read from disk, its shared expert and biases resident, the same tokens and logits."""
    cfg = CFG.replace(qkv_bias=True, num_shared_experts=1, shared_ffn_dim=48,
                      shared_expert_gate=True)
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("qkv.bias", "shared.gate")):
                p.uniform_(-1, 1)
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 1, "model_config": cfg.to_dict()})
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    tokens = generate(model, ids, 12, temperature=0)
    off = load_offloaded(tmp_path / "run", 5 * EXPERT_BYTES, "lru")
    try:
        assert torch.equal(generate(off, ids, 12, temperature=0), tokens)
        with torch.no_grad():
            assert torch.equal(off(tokens).logits, model(tokens).logits)
        assert off.expert_offload.stats.total("loads") > 0
    finally:
        assert off.expert_offload.close(timeout=5.0)


# a layer step holds top_k=2 experts: 18,432 bytes, exactly 18 KiB
BUDGET_NEEDED = "MoE layer 0 needs 18,432 bytes (0.018 MiB) to hold the top-k experts one "\
    "token uses at once; give at least 18,432 bytes, e.g. 18KiB"


@pytest.mark.parametrize("given,shown", [
    (2 * EXPERT_BYTES - 1, "expert_memory=18431 (18,431 bytes, 0.018 MiB)"),
    ("17KiB", "expert_memory='17KiB' (17,408 bytes, 0.017 MiB)"),  # as the caller wrote it
])
def test_moekit_budget_below_one_layer(moekit_ckpt, given, shown):
    with pytest.raises(ExpertMemoryError) as e:
        load_offloaded(moekit_ckpt[0], given)
    assert str(e.value) == f"{shown} is too small: {BUDGET_NEEDED}"


def test_moekit_dense_checkpoint_is_refused_by_name(tmp_path):
    """A dense run has no experts to offload: a named error, not max() of an empty list."""
    cfg = CFG.replace(dense=True)
    model = MoETransformer(cfg)
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 1, "model_config": cfg.to_dict()})
    with pytest.raises(ExpertMemoryError, match=r"^expert_memory='1MiB' is not allowed for "
                       r".*run: its model is dense \(dense=True\), with no experts"):
        load_offloaded(tmp_path / "run", "1MiB")


def test_moekit_budget_of_the_minimum_named_loads(moekit_ckpt):
    """The size the error names is the least that works, not a guess above it."""
    for budget in (2 * EXPERT_BYTES, "18KiB"):
        model = load_offloaded(moekit_ckpt[0], budget)
        assert model.expert_offload.close(timeout=5.0)


@pytest.mark.parametrize("n,size", [
    (1, "1KiB"), (1024, "1KiB"), (1025, "2KiB"), (2**20, "1024KiB"), (2**20 + 1, "2MiB"),
    (5 * 2**30, "5120MiB"),
])
def test_size_at_least_is_the_least_whole_unit_that_holds_n(n, size):
    from moekit.offload.store import size_at_least
    assert size_at_least(n) == size
    assert parse_bytes(size) >= n  # suggested sizes must be ones the flag accepts


def test_moekit_truncated_checkpoint(moekit_ckpt, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(moekit_ckpt[0], run)
    step = next(run.glob("step_*"))
    with open(step / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    threads = len(_prefetch_threads())
    with pytest.raises(CheckpointError, match="truncated"):
        load_offloaded(run, "1MiB")
    assert len(_prefetch_threads()) == threads  # nothing started


def test_generate_cli_expert_memory(moekit_ckpt, capsys):
    import argparse

    from moekit.train.generate_cli import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    common = ["--checkpoint", str(moekit_ckpt[0]), "--max-new-tokens", "8",
              "--temperature", "0", "--prompt", "ab"]
    assert run(p.parse_args(common)) == 0
    resident = capsys.readouterr().out
    assert run(p.parse_args(common + ["--expert-memory", f"{3 * EXPERT_BYTES}"])) == 0
    out = capsys.readouterr()
    assert out.out == resident
    assert "hit rate" in out.err and "Belady" in out.err
    assert run(p.parse_args(common + ["--expert-memory", "1KiB"])) == 2
    err = capsys.readouterr().err  # the flag and the value as typed, and what would do
    assert err == ("moekit generate: error: --expert-memory: expert_memory='1KiB' (1,024 "
                   f"bytes, 0.001 MiB) is too small: {BUDGET_NEEDED}\n"), err


# -- transformers checkpoints --------------------------------------------------------

HF_ARCHS = ["mixtral", "qwen3_moe", "olmoe"]


@pytest.fixture(scope="module", params=HF_ARCHS)
def hf_ckpt(request, tmp_path_factory):
    hf_models = pytest.importorskip("tests.hf_models")
    transformers = pytest.importorskip("transformers")
    from moekit.integrations import hf

    path = tmp_path_factory.mktemp(request.param)
    hf_models.build(request.param).save_pretrained(path, max_shard_size="40KB")
    resident = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.apply(resident).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    tokens = resident.generate(ids, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        logits = resident(tokens).logits
    experts = [m for m in resident.modules() if hasattr(m, "gate_up_proj")]
    per_expert = sum(p[0].numel() * 4 for p in (experts[0].gate_up_proj, experts[0].down_proj))
    top_k = resident.config.num_experts_per_tok
    return path, ids, tokens, logits, per_expert, top_k


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("share", [1, 3])  # experts per layer the budget holds, x top-k
def test_hf_offloaded_equals_resident(hf_ckpt, policy, share):
    from moekit.integrations import hf

    path, ids, tokens, logits, per_expert, top_k = hf_ckpt
    assert json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    model = hf.load_offloaded(path, expert_memory=share * top_k * per_expert, policy=policy)
    try:
        assert not any(p.is_meta for p in model.parameters())
        assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), tokens)
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, logits)  # bitwise
        assert model.expert_offload.stats.total("loads") > 0
    finally:
        assert model.expert_offload.close(timeout=5.0)


def _assert_generates_and_closes(model, ids, new_tokens, tokens, logits):
    """The offloaded model's greedy ``tokens`` and its ``logits`` on them equal the resident
    model's, bitwise; its expert offload then shuts down cleanly (also after a failure)."""
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=new_tokens, do_sample=False),
                           tokens)
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, logits)
    finally:
        assert model.expert_offload.close(timeout=5.0)


@pytest.mark.parametrize("bits", [8])
def test_hf_quantized_offloaded_equals_resident(hf_ckpt, bits):
    """quantize=8: each expert quantized as it is read equals moekit.quantize on the
    resident model, bitwise; the budget counts quantized bytes."""
    import transformers

    from moekit import quantize
    from moekit.integrations import hf

    path, ids, *_, per_expert, top_k = hf_ckpt
    resident = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    quantize(hf.apply(resident).eval(), bits)
    tokens = resident.generate(ids, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = resident(tokens).logits
    model = hf.load_offloaded(path, expert_memory=top_k * per_expert // 3, quantize=bits)
    _assert_generates_and_closes(model, ids, 6, tokens, logits)


def test_hf_int4_offloaded_equals_resident(tmp_path):
    """quantize=4 (group 32) on an OLMoE whose expert widths the groups tile."""
    transformers = pytest.importorskip("transformers")
    hf_models = pytest.importorskip("tests.hf_models")
    from moekit import quantize
    from moekit.integrations import hf

    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(**{**hf_models.COMMON, "intermediate_size": 32,
                                      "num_experts": 8, "num_experts_per_tok": 2})
    transformers.OlmoeForCausalLM(cfg).save_pretrained(tmp_path, max_shard_size="40KB")
    resident = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    quantize(hf.apply(resident).eval(), 4, 32)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    tokens = resident.generate(ids, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = resident(tokens).logits
    long_ids = torch.randint(3, 64, (8, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        long_logits = resident(long_ids).logits  # 960 rows: the one call where it runs
    model = hf.load_offloaded(tmp_path, expert_memory="32KiB", quantize=4, group_size=32)
    with torch.no_grad():
        assert torch.equal(model(long_ids).logits, long_logits)
    _assert_generates_and_closes(model, ids, 6, tokens, logits)


def test_hf_errors(hf_ckpt, tmp_path):
    import shutil

    from moekit.integrations import hf

    path, *_, per_expert, top_k = hf_ckpt
    need = top_k * per_expert
    with pytest.raises(ExpertMemoryError, match=f"expert_memory={need - 1} .*too small: .* "
                                                 f"give at least {need:,} bytes"):
        hf.load_offloaded(path, expert_memory=need - 1)
    with pytest.raises(ValueError, match="quantize=3"):
        hf.load_offloaded(path, expert_memory="1MiB", quantize=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name, shard = next((n, f) for n, f in sorted(index.items()) if ".experts." in n)
    threads = len(_prefetch_threads())
    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    (missing / shard).unlink()
    with pytest.raises(ShardError, match=f"{shard}.*missing|missing.*{shard}") as e:
        hf.load_offloaded(missing, expert_memory="1MiB")
    assert any(n in str(e.value) for n, f in index.items() if f == shard)  # names a tensor
    truncated = tmp_path / "truncated"
    shutil.copytree(path, truncated)
    with open(truncated / shard, "r+b") as f:
        f.truncate(f.seek(0, 2) - 8)
    with pytest.raises(ShardError, match="truncated") as e:
        hf.load_offloaded(truncated, expert_memory="1MiB")
    assert shard in str(e.value)
    assert any(n in str(e.value) for n, f in index.items() if f == shard)
    assert len(_prefetch_threads()) == threads  # nothing was started


def test_hf_revert_refuses_offloaded_experts(hf_ckpt):
    from moekit.integrations import hf

    path, *_, per_expert, top_k = hf_ckpt
    model = hf.load_offloaded(path, expert_memory=2 * top_k * per_expert)
    try:
        classes = {n: type(m) for n, m in model.named_modules()}
        with pytest.raises(ValueError, match="streamed from disk by load_offloaded"):
            hf.revert(model)
        assert {n: type(m) for n, m in model.named_modules()} == classes
    finally:
        assert model.expert_offload.close(timeout=5.0)


def _save_stacked(model, path) -> None:
    """The checkpoint layout of model.state_dict() itself (experts.gate_up_proj [E, 2F, D],
    no per-expert tensors), without the tied lm_head copy."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    path.mkdir()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)


@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_hf_offloaded_tied_embeddings_equal_transformers(arch, layout, tmp_path):
    """tie_word_embeddings=True: lm_head is the embedding table, as transformers ties it.
    Before: ShardError "tensor lm_head.weight is missing" (the model was built without
    tying, so lm_head had its own weight, absent from the checkpoint)."""
    transformers = pytest.importorskip("transformers")
    hf_models = pytest.importorskip("tests.hf_models")
    from safetensors import safe_open

    from moekit.integrations import hf

    torch.manual_seed(0)
    cls, kw = {"mixtral": (transformers.MixtralConfig, dict(intermediate_size=24,
                                                             num_local_experts=8)),
               "olmoe": (transformers.OlmoeConfig, dict(intermediate_size=16,
                                                         num_experts=8))}[arch]
    cfg = cls(**hf_models.COMMON, **kw, num_experts_per_tok=2, tie_word_embeddings=True)
    reference = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    path = tmp_path / layout
    if layout == "stacked":
        _save_stacked(reference, path)
    else:
        reference.save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "lm_head.weight" not in names
    assert any(n.endswith("experts.gate_up_proj") for n in names) == (layout == "stacked")
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    model = hf.load_offloaded(path, expert_memory="1MiB")
    try:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits,
                                       atol=1e-5, rtol=1e-4)
    finally:
        assert model.expert_offload.close(timeout=5.0)


def test_hf_save_pretrained_refuses_offloaded_experts(hf_ckpt, tmp_path):
    """Before: save_pretrained wrote a checkpoint with no expert tensors, silently."""
    from moekit.integrations import hf

    path, *_ = hf_ckpt
    model = hf.load_offloaded(path, expert_memory="1MiB")
    try:
        with pytest.raises(ValueError, match="streamed from disk by load_offloaded"):
            model.save_pretrained(tmp_path / "out")
        assert not (tmp_path / "out").exists()
    finally:
        assert model.expert_offload.close(timeout=5.0)


def test_hf_quantize_of_offloaded_experts_points_to_load_offloaded(hf_ckpt):
    """Before: AttributeError "'MoekitMixtralExperts' object has no attribute
    'gate_up_proj'"; now a QuantizationError naming load_offloaded(..., quantize=), and the
    model unchanged (same modules, same logits)."""
    from moekit import quantize
    from moekit.integrations import hf
    from moekit.quant import QuantizationError

    path, ids, *_ = hf_ckpt
    model = hf.load_offloaded(path, expert_memory="1MiB")
    try:
        with torch.no_grad():
            before = model(ids).logits
        modules = dict(model.named_modules())
        with pytest.raises(QuantizationError, match=r"experts streamed from disk by "
                           r"load_offloaded.*load_offloaded\(path, expert_memory, quantize="):
            quantize(model, bits=8)
        assert dict(model.named_modules()) == modules
        with torch.no_grad():
            assert torch.equal(model(ids).logits, before)
    finally:
        assert model.expert_offload.close(timeout=5.0)
    model = hf.load_offloaded(path, expert_memory="1MiB", quantize=8)
    try:
        with pytest.raises(QuantizationError, match="already quantized"):
            quantize(model, bits=8)
    finally:
        assert model.expert_offload.close(timeout=5.0)


class _HeldStore(FakeStore):
    """A FakeStore whose reads of ``held`` wait until ``release`` is set (a slow disk)."""

    def __init__(self, keys, held):
        super().__init__(keys)
        self.held, self.started, self.release = held, threading.Event(), threading.Event()

    def load(self, key):
        if key == self.held:
            self.started.set()
            assert self.release.wait(10)
        return super().load(key)


def test_a_prefetch_still_reading_is_not_a_hit():
    """Expert 0 is prefetched and its read is still going when the step asks for it: the
    step waits for it, which counts as in flight, not a hit (was a hit, so a hit rate of
    0.92 beat Belady's 0.86 on the same trace). Asked again once read: a hit. Expert 1,
    prefetched and read before it is asked for: a hit."""
    keys = [(0, e) for e in range(3)]
    store = _HeldStore(keys, held=(0, 0))
    cache = ExpertCache(store, 40, "lru", prefetch=True, threaded=True, num_layers=1)
    cache.prefetch(0, [0])
    assert store.started.wait(10)  # the thread is reading expert 0 now
    threading.Timer(0.2, store.release.set).start()
    t0 = time.perf_counter()
    assert cache.get(0, [0]) == [{"key": (0, 0)}]
    assert time.perf_counter() - t0 >= 0.15  # it did wait for the read
    s = cache.stats.layers[0]
    assert (s.requests, s.hits, s.in_flight) == (1, 0, 1)
    cache.get(0, [0])
    cache.prefetch(0, [1])
    cache.entries[(0, 1)].value.result(10)  # its read finishes before the step asks
    cache.get(0, [1])
    cache.get(0, [2])  # a miss
    assert (s.requests, s.hits, s.in_flight) == (4, 2, 1)
    assert cache.stats.hit_rate == 0.5 and cache.stats.in_flight_rate == 0.25
    assert "0.250 of requests waited for a prefetch still reading" in cache.stats.summary()
    cache.close()


# -- non-finite scales of offloaded quantized experts ----------------------------------


def _quantized_with(path, bits: int, bad: list[tuple[str, int | None, float]]):
    """A `moekit quantize` directory of CFG_Q where each (tensor, expert, value) of
    ``bad`` puts the value at flat index 1 of the tensor's row ``expert`` (None: of the
    whole tensor); quantized.json's SHA-256 fixed up to match (as a file damaged after
    it was written and re-hashed)."""
    from safetensors.torch import load_file, save_file

    from moekit.quant import quantize
    from moekit.quant.io import save_quantized
    from moekit.train import rundir

    torch.manual_seed(0)
    out = save_quantized(quantize(MoETransformer(CFG_Q).eval(), bits,
                                  32 if bits == 4 else None), path)
    tensors = load_file(str(out / "model.safetensors"))
    for name, expert, value in bad:
        t = tensors[name] if expert is None else tensors[name][expert]
        t.view(-1)[1] = value
    save_file(tensors, str(out / "model.safetensors"))
    meta = json.loads((out / "quantized.json").read_text())
    meta["sha256"] = rundir.sha256(out / "model.safetensors")
    (out / "quantized.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize("prefetch,threaded", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("bits,part,value", [(8, "scales", float("nan")),
                                             (4, "scales", float("inf")),
                                             (4, "zeros", float("-inf"))])
def test_non_finite_scales_of_an_offloaded_expert_are_refused_as_it_is_read(
        tmp_path, monkeypatch, bits, part, value, prefetch, threaded):
    """Expert 3 of MoE layer 1 holds a non-finite scale or zero point: the model loads (no
    expert read: checking them all would read every expert), and the first read of that
    expert raises NonFiniteScalesError naming the file, the tensor and the expert, on
    demand or from the prefetch thread alike (was: NaN logits); the other experts read
    as before, each one checked once however often it is read."""
    from moekit.errors import NonFiniteScalesError
    from moekit.offload.store import ExpertStore

    name = f"blocks.1.ffn.experts.w_out.{part}"
    out = _quantized_with(tmp_path / "q", bits, [(name, 3, value)])
    checks, real = [], ExpertStore._check_finite
    monkeypatch.setattr(ExpertStore, "_check_finite",
                        lambda self, key, stored: checks.append(key) or real(self, key, stored))
    model = load_offloaded(out, "64KiB", prefetch=prefetch, threaded=threaded)
    try:
        cache = model.expert_offload.cache
        assert sum(s.loads for s in cache.stats.layers) == 0 and checks == []
        words = (rf"checkpoint {re.escape(str(out / 'model.safetensors'))}: "
                 rf"{re.escape(name)}\[3\], expert 3 of MoE layer 1, holds 1 non-finite")
        with pytest.raises(NonFiniteScalesError, match=words):
            cache.store.load((1, 3))
        for _ in range(3):
            cache.store.load((1, 2))
        assert checks == [(1, 3), (1, 2)]  # the good one once, the bad one each read
        ids = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(3))
        with pytest.raises(NonFiniteScalesError, match=words), torch.no_grad():
            model(ids)  # (its 160 tokens x top-2 reach every expert of 8)
    finally:
        model.expert_offload.close()


def test_non_finite_scales_of_resident_tensors_are_refused_at_an_offloaded_load(tmp_path):
    """The tensors an offloaded model holds resident (attention, embeddings: scope "all")
    are checked at load, as load_quantized checks them (they are read anyway)."""
    from moekit.errors import NonFiniteScalesError

    out = _quantized_with(tmp_path / "q", 8, [("blocks.0.attn.qkv.weight.scales", None,
                                               float("nan"))])
    threads = len(_prefetch_threads())
    with pytest.raises(NonFiniteScalesError, match=r"blocks\.0\.attn\.qkv\.weight\.scales "
                       r"holds 1 non-finite"):
        load_offloaded(out, "64KiB")
    assert len(_prefetch_threads()) == threads  # nothing left running


def test_generate_names_an_offloaded_expert_with_non_finite_scales(tmp_path, capsys):
    """`moekit generate --expert-memory`: the error as one line, exit 2, no traceback."""
    from moekit.cli import main as cli_main

    bad = [("blocks.1.ffn.experts.w_in.scales", e, float("nan")) for e in range(8)]
    out = _quantized_with(tmp_path / "q", 8, bad)
    argv = ["generate", "--checkpoint", str(out), "--expert-memory", "64KiB",
            "--prompt", "hello world", "--max-new-tokens", "4"]
    assert cli_main(argv) == 1  # a runtime failure, not a usage error
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match(r"moekit generate: error: checkpoint .*model\.safetensors: "
                    r"blocks\.1\.ffn\.experts\.w_in\.scales\[\d\], expert \d of MoE layer 1, "
                    r"holds 1 non-finite value", lines[0]), lines[0]


def test_serve_answers_an_offloaded_expert_with_non_finite_scales_with_a_500(tmp_path):
    """`moekit serve --expert-memory`: a request that reaches an expert with NaN scales is
    a 500 whose JSON error names the tensor and the expert (was: NaN logits, then
    "largest logit of nan" from sampling); the server goes on serving."""
    import urllib.error
    import urllib.request

    from moekit.inference.server import Service, make_server
    from moekit.inference.text import ByteText

    bad = [("blocks.1.ffn.experts.w_in.scales", e, float("nan")) for e in range(8)]
    model = load_offloaded(_quantized_with(tmp_path / "q", 8, bad), "64KiB")
    server = make_server(Service(model, ByteText(), "q"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for _ in range(2):
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(
                {"prompt": "hello world", "max_tokens": 4}).encode())
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=120)
            assert e.value.code == 500
            message = json.loads(e.value.read())["error"]["message"]
            assert re.search(r"NonFiniteScalesError: checkpoint .*model\.safetensors: "
                             r"blocks\.1\.ffn\.experts\.w_in\.scales\[\d\], expert \d of MoE "
                             r"layer 1, holds 1 non-finite", message), message
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert r.status == 200
    finally:
        server.shutdown()
        server.server_close()
        model.expert_offload.close()


class _BadScalesStore(FakeStore):
    def load(self, key):
        from moekit.errors import NonFiniteScalesError

        if key == self.fail:
            raise NonFiniteScalesError(f"expert {key} holds NaN scales")
        return super().load(key)


@pytest.mark.parametrize("waited", [True, False], ids=["waited_for", "raised_after"])
def test_a_prefetch_that_finds_non_finite_scales_raises_them_by_name(waited):
    """The named error from the prefetch thread's read comes out as itself (was wrapped in
    PrefetchError: "a prefetch read failed: ..."), whether the step waits for that
    expert or the next call finds the failed read."""
    from moekit.errors import NonFiniteScalesError

    cache = ExpertCache(_BadScalesStore([(0, 0), (0, 1)], fail=(0, 0)), 20, "lru",
                        prefetch=True)
    cache.prefetch(0, [0])
    cache.entries[(0, 0)].value.exception(10)  # its read has failed
    if waited:
        cache.raise_failures = lambda: None  # go straight to the wait
    with pytest.raises(NonFiniteScalesError, match=r"expert \(0, 0\) holds NaN scales"):
        cache.get(0, [0] if waited else [1])
    assert cache.close(timeout=5.0)


def test_a_budget_above_every_expert_allocates_only_the_experts(moekit_ckpt):
    # 1 TiB for a model of 24 experts: the slot buffer was the whole budget, and failed
    # to allocate ("DefaultCPUAllocator: can't allocate memory")
    model = load_offloaded(moekit_ckpt[0], "1TiB", prefetch=False)
    try:
        cache = model.expert_offload.cache
        n_experts = CFG.num_layers * CFG.num_experts
        assert cache.arena.buf_B.numel() == n_experts * EXPERT_BYTES
        with torch.no_grad():
            logits = model(moekit_ckpt[2]).logits
        assert torch.equal(logits, moekit_ckpt[3])
        assert len(cache.entries) <= n_experts
    finally:
        model.expert_offload.close()


@pytest.mark.parametrize("how", ["in_place", "renamed_over"])
def test_a_shard_changed_on_disk_after_loading(moekit_ckpt, tmp_path, how):
    # rewritten in place, the shard's new bytes were read and computed with, silently
    import shutil

    from moekit.offload.safetensors_io import read_header

    run = tmp_path / "run"
    shutil.copytree(moekit_ckpt[0], run)
    file = next(run.glob("step_*")) / "model.safetensors"
    model = load_offloaded(run, 2 * EXPERT_BYTES, prefetch=False)  # re-reads experts
    try:
        loc = read_header(file)["blocks.0.ffn.experts.w_in"]
        target = file if how == "in_place" else file.with_suffix(".new")
        if how == "renamed_over":
            shutil.copy(file, target)
        with open(target, "r+b") as f:
            f.seek(loc.offset)
            f.write(bytes(loc.nbytes))  # every expert's w_in of layer 0 zeroed
        if how == "renamed_over":  # the open file is the old one: nothing changed for it
            target.replace(file)
            with torch.no_grad():
                assert torch.equal(model(moekit_ckpt[2]).logits, moekit_ckpt[3])
            return
        with pytest.raises(ShardError, match=f"shard {re.escape(str(file))} has changed on "
                                             "disk since the model was loaded"):
            with torch.no_grad():
                model(moekit_ckpt[2])
    finally:
        model.expert_offload.close()


@pytest.mark.parametrize("prefetch", [False, True])
def test_generate_names_a_shard_truncated_mid_run_in_one_line(moekit_ckpt, tmp_path,
                                                             monkeypatch, capsys, prefetch):
    # a ShardError found mid-generation (a shard truncated or rewritten after the load)
    # escaped `moekit generate` as a traceback (it caught CheckpointError only); on the
    # prefetch thread it came wrapped in PrefetchError
    import argparse
    import shutil

    from moekit.train import generate_cli

    run = tmp_path / "run"
    shutil.copytree(moekit_ckpt[0], run)
    file = next(run.glob("step_*")) / "model.safetensors"
    load = generate_cli.load_for_generation

    def load_then_truncate(args):
        model = load(args)
        with open(file, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        return model

    monkeypatch.setattr(generate_cli, "load_for_generation", load_then_truncate)
    p = argparse.ArgumentParser()
    generate_cli.add_arguments(p)
    args = ["--checkpoint", str(run), "--max-new-tokens", "8", "--temperature", "0",
            "--prompt", "ab", "--expert-memory", str(2 * EXPERT_BYTES)]
    assert generate_cli.run(p.parse_args(args + ([] if prefetch else ["--no-prefetch"]))) == 1
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("moekit generate: error:")]
    assert len(err) == 1 and f"shard {file} has changed on disk" in err[0]


@pytest.mark.parametrize("flags,named", [(["--no-prefetch"], "--no-prefetch"),
                                         (["--expert-policy", "lfu"], "--expert-policy=lfu"),
                                         (["--expert-policy", "lru"], "--expert-policy=lru")])
def test_generate_refuses_cache_flags_without_expert_memory(moekit_ckpt, capsys, flags,
                                                            named):
    # they were ignored: the run loaded every expert resident and generated
    import argparse

    from moekit.train.generate_cli import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = ["--checkpoint", str(moekit_ckpt[0]), "--max-new-tokens", "4", "--temperature",
            "0", "--prompt", "ab", *flags]
    assert run(p.parse_args(args)) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert f"{named} is not allowed without --expert-memory" in out.err


@pytest.mark.parametrize("experts", [2, 5])  # one layer's top-k: prefetch has no room
def test_prefetch_counts_its_reads_and_the_predictions_with_no_room(moekit_ckpt, experts):
    # prefetch at a budget of one layer's top-k read nothing, and the summary showed only
    # its prediction precision: counted here at the store's loads made inside prefetch()
    model = load_offloaded(moekit_ckpt[0], experts * EXPERT_BYTES, threaded=False)
    cache = model.expert_offload.cache
    inside, reads = [False], {"prefetch": 0, "demand": 0}
    no_room = [0]
    load, prefetch = cache.store.load, cache.prefetch

    def counted_load(key, out=None):
        reads["prefetch" if inside[0] else "demand"] += 1
        return load(key, out)

    def counted_prefetch(layer, predicted):
        inside[0] = True
        cached_before = {e for (lay, e) in cache.entries if lay == layer}
        before = reads["prefetch"]
        try:
            prefetch(layer, predicted)
        finally:
            inside[0] = False
        no_room[0] += len(set(predicted) - cached_before) - (reads["prefetch"] - before)

    cache.store.load, cache.prefetch = counted_load, counted_prefetch
    try:
        with torch.no_grad():
            assert torch.equal(model(moekit_ckpt[2]).logits, moekit_ckpt[3])
            for t in moekit_ckpt[2][0, :8]:  # one token a step: up to 2 experts a layer
                model(t.view(1, 1))
        st = model.expert_offload.stats
        assert st.total("prefetched") == reads["prefetch"]
        assert st.total("prefetch_no_room") == no_room[0]
        assert st.total("loads") == reads["prefetch"] + reads["demand"]
        if experts == 2:
            assert reads["prefetch"] == 0 and no_room[0] > 0
        else:
            assert reads["prefetch"] > 0
        assert f"prefetch read {reads['prefetch']} experts; {no_room[0]} predicted found " \
               "no room" in st.summary()
    finally:
        model.expert_offload.close()


def test_a_refused_perplexity_input_prints_one_line_not_an_empty_cache_summary(
        moekit_ckpt, tmp_path, capsys):
    from moekit.cli import main

    text = tmp_path / "t.txt"
    text.write_text("ab\n")  # shorter than one chunk of context: refused before any step
    assert main(["perplexity", "--checkpoint", str(moekit_ckpt[0]), "--text", str(text),
                 "--expert-memory", str(3 * EXPERT_BYTES)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moekit perplexity: error: --text=")
    assert "it holds 3 tokens, fewer than one chunk of --context=" in err[0]


@pytest.mark.parametrize("value", ["-5", "-1MiB", " -0.5 GiB", "-0"])
def test_a_negative_or_zero_size_is_told_it_must_be_positive(value, moekit_ckpt, capsys):
    # '-5' was told "it must be a number of bytes ... such as '2GiB'", and on the command
    # line the value was named expert_memory=, not the flag typed
    import argparse

    from moekit.train.generate_cli import add_arguments, run

    with pytest.raises(ValueError, match=re.escape(f"expert_memory={value!r} is not allowed: "
                                                   "it must be > 0 bytes")):
        parse_bytes(value)
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(["--checkpoint", str(moekit_ckpt[0]), "--prompt", "ab",
                             f"--expert-memory={value}"])) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.strip() == (f"moekit generate: error: --expert-memory={value!r} is not "
                               "allowed: it must be > 0 bytes")
