"""The expert cache's statistics against an independent count.

The reference routing is recomputed from the resident model (each MoE layer's input
times its router weight, top-k) on one teacher-forced forward over the generated
sequence; the cache is simulated by hand (LRU / LFU as the README describes them: one
pool of ``budget // expert bytes`` slots, a step's experts asked for in id order, in
chunks of what the cache holds). Shape letters: T tokens, D hidden size, E experts,
K experts per token.
"""

from collections import OrderedDict

import pytest
import torch

from moekit.layer import MoE
from moekit.models.config import LMConfig
from moekit.models.generate import generate
from moekit.models.transformer import MoETransformer
from moekit.offload import load_offloaded
from moekit.train.checkpoint import save_checkpoint

CFG = LMConfig(dim=32, num_layers=3, num_heads=2, ffn_dim=24, num_experts=8, top_k=2,
               max_seq_len=64)
EXPERT_BYTES = (32 * 48 + 24 * 32) * 4  # w_in [D, 2F] + w_out [F, D], fp32
PROMPT, NEW = 9, 24


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(run dir, prompt, resident tokens, per-step routing [(layer, sorted experts)],
    each MoE layer's input x_TD and router weight w_ED)."""
    torch.manual_seed(0)
    model = MoETransformer(CFG).eval()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 1, "model_config": CFG.to_dict()})
    ids = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    routes, inputs = {}, {}

    def hook(layer):
        def record(mod, args, kwargs):
            x_TD = args[0].reshape(-1, CFG.dim)
            inputs[layer] = x_TD
            routes[layer] = torch.topk(x_TD @ mod.router.weight.T, CFG.top_k).indices
        return record

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for i, m in enumerate(moes):
        m.register_forward_pre_hook(hook(i), with_kwargs=True)
    with torch.no_grad():
        tokens = generate(model, ids, NEW, generator=torch.Generator().manual_seed(3))
        model(tokens[:, :-1])  # every position the run feeds, teacher-forced
    steps = [range(PROMPT)] + [range(t, t + 1) for t in range(PROMPT, PROMPT + NEW - 1)]
    trace = [(layer, sorted(set(routes[layer][list(pos)].flatten().tolist())))
             for pos in steps for layer in range(len(moes))]
    routers = [m.router.weight.detach() for m in moes]
    return run, ids, tokens, trace, inputs, routers


def simulate(trace, slots: int, policy: str) -> dict[str, list[int]]:
    """Per-layer requests, hits and loads of a hand-run LRU / LFU cache of ``slots``."""
    layers = 1 + max(layer for layer, _ in trace)
    out = {k: [0] * layers for k in ("requests", "hits", "loads")}
    cache: OrderedDict = OrderedDict()  # least recently used first
    counts: dict = {}  # LFU: requests per expert, kept after eviction
    for layer, experts in trace:
        for c0 in range(0, len(experts), slots):
            chunk = [(layer, e) for e in experts[c0:c0 + slots]]
            for key in chunk:
                out["requests"][layer] += 1
                counts[key] = counts.get(key, 0) + 1
                if key in cache:
                    out["hits"][layer] += 1
                    cache.move_to_end(key)
                    continue
                out["loads"][layer] += 1
                if len(cache) == slots:
                    order = [k for k in cache if k not in chunk]
                    victim = order[0] if policy == "lru" else min(
                        order, key=lambda k: (counts[k], order.index(k)))
                    del cache[victim]
                cache[key] = None
    return out


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("slots", [2, 5, 12])  # one layer's top-k .. half the experts
def test_offload_stats_equal_an_independent_count(traced, policy, slots):
    run, ids, tokens, trace, _, _ = traced
    # a budget under one layer's E experts runs the prefill (every expert touched) in chunks
    assert slots >= CFG.num_experts or max(len(e) for _, e in trace) > slots
    model = load_offloaded(run, slots * EXPERT_BYTES, policy, prefetch=False,
                           threaded=False)
    try:
        with torch.no_grad():
            # sampled (a seeded generator): greedy decoding of this random model repeats one
            # token, so every decode step would route alike
            again = generate(model, ids, NEW, generator=torch.Generator().manual_seed(3))
            assert torch.equal(again, tokens)
        got = model.expert_offload.stats.layers
    finally:
        model.expert_offload.close()
    want = simulate(trace, slots, policy)
    for name in ("requests", "hits", "loads"):
        assert [getattr(s, name) for s in got] == want[name], name
    assert [s.bytes_loaded for s in got] == [n * EXPERT_BYTES for n in want["loads"]]


def steps() -> list[list[int]]:
    """The positions each step feeds: the prompt, then one token at a time."""
    return [list(range(PROMPT))] + [[t] for t in range(PROMPT, PROMPT + NEW - 1)]


def predicted(x_TD, w_ED, limit: int) -> set[int]:
    """The ``limit`` experts most of ``x_TD``'s tokens pick under ``w_ED`` (ties: lower id)."""
    picks = torch.topk(x_TD @ w_ED.T, CFG.top_k).indices.flatten().tolist()
    ranked = sorted(set(picks), key=lambda e: (-picks.count(e), e))
    return set(ranked[:limit])


@pytest.mark.parametrize("slots", [2, 5, 12])
def test_prefetch_precision_and_recall_count_every_chunk_of_a_step(traced, slots):
    """Layer l+1's experts predicted from layer l's input (at most max(K, slots / L) a
    step), against every expert the step asks for, however many chunks it runs in
    (the first chunk alone had been counted: precision 0.979 for a true 1.0)."""
    run, ids, tokens, _, x, w = traced
    layers, limit = len(w), max(CFG.top_k, slots // len(w))
    want = {"predicted": [0] * layers, "predicted_used": [0] * layers,
            "needed_after_prediction": [0] * layers}
    for pos in steps():
        for layer in range(1, layers):
            guess = predicted(x[layer - 1][pos], w[layer], limit)
            need = set(torch.topk(x[layer][pos] @ w[layer].T, CFG.top_k).indices.flatten()
                       .tolist())
            want["predicted"][layer] += len(guess)
            want["predicted_used"][layer] += len(guess & need)
            want["needed_after_prediction"][layer] += len(need)
    model = load_offloaded(run, slots * EXPERT_BYTES, "lru", prefetch=True, threaded=False)
    try:
        with torch.no_grad():
            again = generate(model, ids, NEW, generator=torch.Generator().manual_seed(3))
        got = model.expert_offload.stats.layers
    finally:
        model.expert_offload.close()
    assert torch.equal(again, tokens)
    for name, counts in want.items():
        assert [getattr(s, name) for s in got] == counts, name


def test_a_budget_above_the_model_takes_and_says_only_what_the_experts_need(traced):
    run, ids, _, _, _, _ = traced
    everything = CFG.num_layers * CFG.num_experts * EXPERT_BYTES
    model = load_offloaded(run, "64GiB", prefetch=False, threaded=False)
    try:
        with torch.no_grad():
            generate(model, ids, 2, temperature=0)
        cache = model.expert_offload.cache
        assert cache.arena.buf_B.numel() == everything  # not 64 GiB
        line = model.expert_offload.stats.summary().splitlines()[0]
    finally:
        model.expert_offload.close()
    assert line.startswith(f"expert cache: 64.0 GiB (every expert fits: "
                           f"{everything / 2**10:.1f} KiB at most), lru;"), line
