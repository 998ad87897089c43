"""Continuous batching (moekit.inference.batcher) and the cache operations it uses.

Oracle: each group generated alone by ``Engine.generate`` (itself tested against the
no-cache forward in test_engine.py): identical tokens and finish reasons, greedy and
seeded sampling, whatever else runs beside a group and however the rows shift.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from moekit.inference.batcher import Batcher
from moekit.inference.engine import ContextLengthError, Engine, GenerationConfig
from moekit.models import MoETransformer, preset
from moekit.models.transformer import StaticKVCache


def _model(dtype=torch.float32, **changes) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(preset("tiny", **changes)).eval().to(dtype)


def _requests(seed: int, count: int, context: int, vocab: int = 256) -> list:
    """(prompts, config, steps to run before the next one comes) at random: prompt
    lengths, new tokens up to the context, 1 or 2 samples, greedy or sampled, a stop id."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = rng.randint(1, context // 2 + 4)
        prompt = [rng.randrange(vocab) for _ in range(n)]
        cfg = GenerationConfig(max_new_tokens=rng.randint(1, context - n),
                               temperature=rng.choice([0.0, 0.9]), top_k=rng.choice([None, 40]),
                               seed=1000 * seed + i, stop_ids=(rng.randrange(vocab),))
        out.append(([prompt] * rng.choice([1, 1, 2]), cfg, rng.randint(0, 4)))
    return out


def _run(batcher: Batcher, requests: list) -> tuple[list, dict]:
    """Submit the requests as they come; step until all are done. The groups, and how
    often the rows shifted and the most that ran at once."""
    seen = {"shifts": 0, "most": 0}
    shift = batcher.cache.shift

    def counting(d: int) -> None:
        seen["shifts"] += 1
        shift(d)

    batcher.cache.shift = counting
    groups = []
    for prompts, cfg, wait in requests:
        groups.append(batcher.submit(prompts, cfg))
        for _ in range(wait):
            batcher.step()
            seen["most"] = max(seen["most"], batcher.running)
    while batcher.step():
        seen["most"] = max(seen["most"], batcher.running)
    return groups, seen


def _alone(model, prompts, cfg):
    gens, _ = Engine(model).generate(prompts, cfg)
    return [(g.tokens, g.finish_reason) for g in gens]


def test_groups_that_come_and_go_generate_what_they_generate_alone():
    """Random arrivals, five runs; chunk 3 / 5: the prompts that join running sequences
    prefill in chunks of that many tokens, each carried by a decode step."""
    model = _model()
    shifts = 0
    for seed, chunk in ((0, 256), (1, 256), (2, 256), (3, 3), (4, 5)):
        requests = _requests(seed, 14, context=40)
        batcher = Batcher(model, rows=3, context=40, prefill_chunk=chunk)
        groups, seen = _run(batcher, requests)
        for g, (prompts, cfg, _) in zip(groups, requests, strict=True):
            assert g.done and g.error is None
            assert [(s.tokens, s.finish_reason) for s in g.gens] == _alone(model, prompts, cfg)
            assert g.stats.new_tokens == sum(len(s.tokens) for s in g.gens)
        assert seen["most"] == 3  # batches shared
        assert batcher.running == batcher.waiting == 0 and batcher.cache.length == 0
        shifts += seen["shifts"]
    assert shifts > 0  # rows moved to make room


def test_quantized_and_bf16_models_batch_as_they_generate_alone():
    from moekit.quant import quantize

    for model in (quantize(_model(), bits=8), _model(torch.bfloat16)):
        requests = [(p, GenerationConfig(max_new_tokens=12), 1) for p in
                    ([[5, 6, 7, 8, 9]], [[40]], [[100, 101, 102]], [[7, 7, 7, 7, 7, 7, 7, 7]])]
        groups, seen = _run(Batcher(model, rows=4, context=32), requests)
        assert seen["most"] == 4
        for g, (prompts, cfg, _) in zip(groups, requests, strict=True):
            assert [(s.tokens, s.finish_reason) for s in g.gens] == _alone(model, prompts, cfg)


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
def test_a_small_cache_batches_as_it_generates_alone(kv):
    """kv_cache_dtype "bfloat16" / "int8" under fp32 weights: the shared cache, the
    prefill caches that join it (in chunks of 3 while others decode) and the decode steps
    all hold that dtype; each group's tokens are the engine's over such a cache alone. A
    bad dtype is refused by name."""
    model = _model()
    requests = [(p, GenerationConfig(max_new_tokens=12), 1) for p in
                ([[5, 6, 7, 8, 9]], [[40]], [[100, 101, 102]], [[7, 7, 7, 7, 7, 7, 7, 7]])]
    batcher = Batcher(model, rows=2, context=32, prefill_chunk=3, kv_cache_dtype=kv)
    assert batcher.cache.k[0].dtype == getattr(torch, kv)
    groups, seen = _run(batcher, requests)
    assert seen["most"] == 2
    for g, (prompts, cfg, _) in zip(groups, requests, strict=True):
        gens, _ = Engine(model, kv_cache_dtype=kv).generate(prompts, cfg)
        assert [(s.tokens, s.finish_reason) for s in g.gens] == \
            [(x.tokens, x.finish_reason) for x in gens]
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):
        Batcher(model, kv_cache_dtype="int4")


def test_log_probabilities_in_a_batch_match_the_engines():
    model = _model()
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.7, seed=5)
    batcher = Batcher(model, rows=3, context=32)
    other = batcher.submit([[9, 9, 9]], GenerationConfig(max_new_tokens=20))
    batcher.step()
    group = batcher.submit([[1, 2, 3, 4]], cfg, logprobs=3)
    batcher.run(group)
    batcher.run(other)
    (ref,), _ = Engine(model).generate([[1, 2, 3, 4]], cfg, logprobs=3)
    (got,) = group.gens
    assert got.tokens == ref.tokens
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs),
                               atol=1e-5, rtol=0)
    assert [[t for t, _ in top] for top in got.top_logprobs] == \
        [[t for t, _ in top] for top in ref.top_logprobs]


def test_a_continued_conversation_prefills_only_its_new_tokens():
    model = _model()
    cfg = GenerationConfig(max_new_tokens=6)
    for entries in (2, 0):
        batcher = Batcher(model, rows=2, context=48, prefix_entries=entries)
        first = batcher.run(batcher.submit([[3, 4, 5, 6]], cfg))
        turn = [3, 4, 5, 6] + first.gens[0].tokens + [50, 51]
        other = batcher.submit([[8, 8]], GenerationConfig(max_new_tokens=30))
        batcher.step()
        second = batcher.run(batcher.submit([turn], cfg))
        batcher.run(other)
        # every token of the first turn but its last was fed back: held
        assert second.stats.reused_tokens == (4 + 6 - 1 if entries else 0)
        assert second.gens[0].tokens == _alone(model, [turn], cfg)[0][0]
        c = model.config  # keys and values of every layer, fp32, for the whole context
        per_token = 2 * c.num_layers * c.kv_heads * c.head_size * 4
        assert batcher.prefix_bytes == per_token * 48 * entries
        assert batcher.kv_bytes == per_token * 2 * 96


def test_a_group_waits_for_rows_and_joins_in_order():
    model = _model()
    batcher = Batcher(model, rows=2, context=32)
    long = batcher.submit([[1, 2], [3, 4]], GenerationConfig(max_new_tokens=10))
    batcher.step()
    late = batcher.submit([[5]], GenerationConfig(max_new_tokens=3))
    later = batcher.submit([[6]], GenerationConfig(max_new_tokens=3))
    for _ in range(5):
        batcher.step()
        assert batcher.running == 2 and batcher.waiting == 2 and not late.gens[0].tokens
    batcher.run(later)
    assert long.done and late.done and later.done
    assert late.gens[0].tokens == _alone(model, [[5]], GenerationConfig(max_new_tokens=3))[0][0]


def test_a_failed_step_fails_its_groups_and_the_batcher_goes_on(monkeypatch):
    model = _model()
    batcher = Batcher(model, rows=4, context=32)
    done = []
    a = batcher.submit([[1, 2, 3]], GenerationConfig(max_new_tokens=9), on_done=done.append)
    batcher.step()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(batcher.plan, "step", broken)
    monkeypatch.setattr(model, "infer", broken)
    monkeypatch.setattr(model, "infer_pair", broken)
    b = batcher.submit([[4]], GenerationConfig(max_new_tokens=9))
    assert not batcher.step()  # a's step, which carries b's prefill, fails
    assert done == [a] and isinstance(a.error, RuntimeError) and isinstance(b.error,
                                                                             RuntimeError)
    monkeypatch.undo()
    c = batcher.run(batcher.submit([[4]], GenerationConfig(max_new_tokens=5)))
    assert c.error is None and c.gens[0].tokens == _alone(
        model, [[4]], GenerationConfig(max_new_tokens=5))[0][0]


def test_bad_input_is_refused_before_it_is_queued():
    model = _model()
    batcher = Batcher(model, rows=2, context=20)
    for kwargs, words in (
            ({"prompts": [[1]] * 3}, "at most rows=2 sequences"),
            ({"prompts": [[1] * 10], "config": GenerationConfig(max_new_tokens=11)},
             "max_new_tokens=11 is not allowed: a prompt of 10 tokens"),
            ({"prompts": [[]]}, r"prompts\[0\] is empty"),
            ({"prompts": [[1]], "logprobs": 99}, "logprobs=99"),
            ({"prompts": [[1]], "on_done": 3}, "on_done=3")):
        with pytest.raises(ValueError, match=words):
            batcher.submit(**{"config": GenerationConfig(max_new_tokens=5), **kwargs})
    with pytest.raises(ContextLengthError):
        batcher.submit([[1] * 60], GenerationConfig(max_new_tokens=5))
    assert batcher.waiting == 0
    for kwargs, words in (({"rows": 0}, "rows=0"), ({"context": 65}, "context=65"),
                          ({"prefix_entries": -1}, "prefix_entries=-1"),
                          ({"prefill_chunk": 0}, "prefill_chunk=0")):
        with pytest.raises(ValueError, match=words):
            Batcher(model, **kwargs)
    with pytest.raises(ValueError, match="model="):
        Batcher(torch.nn.Linear(2, 2))


def test_shifted_and_joined_rows_compute_what_they_computed():
    """StaticKVCache.shift moves the rows (their positions kept); join appends a prefill's
    rows right-aligned: the next step's logits are those of the unmoved cache."""
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 40, 41, 42, 43]])
    with torch.inference_mode():
        ref = StaticKVCache.for_model(model, 2, 16)
        ref.reset(torch.tensor([0, 2]))
        model.infer(ids, ref)
        want = model.infer(torch.tensor([[11], [44]]), ref)
        for d in (3, -2):
            c = StaticKVCache(2, 2, model.config.kv_heads, 24, model.config.head_size)
            c.reset(torch.tensor([0, 2]))
            model.infer(ids, c)
            c.shift(5)
            if d < 0:
                c.shift(d)
            assert c.length == 11 + min(d, 0) and c.pad_B.tolist() == [5 + min(d, 0),
                                                                      7 + min(d, 0)]
            torch.testing.assert_close(model.infer(torch.tensor([[11], [44]]), c), want)
        # a row joined from a prefill of its own
        c = StaticKVCache(2, 2, model.config.kv_heads, 24, model.config.head_size)
        c.reset(torch.tensor([0]))
        model.infer(ids[:1], c)
        alone = StaticKVCache.for_model(model, 1, 8)
        alone.reset()
        model.infer(ids[1:, 2:], alone)
        c.join(alone, torch.tensor([0]), [4])
        assert c.rows == 2 and c.pad_B[:2].tolist() == [0, 2]
        torch.testing.assert_close(model.infer(torch.tensor([[11], [44]]), c), want)
        with pytest.raises(ValueError, match="shift d=-3 is not allowed"):
            c.shift(-3)  # row 0 starts at slot 0
        with pytest.raises(ValueError, match="joining 1 rows of lengths"):
            c.join(alone, torch.tensor([0]), [4])  # no free row


def test_a_lazy_cache_is_zeros_and_writable():
    c = StaticKVCache(2, 3, 2, 4096, 16, torch.bfloat16, lazy=True)
    assert c.k[0].shape == (3, 2, 4096, 16) and c.k[1].dtype == torch.bfloat16
    assert not c.v[1].any()
    c.v[1][2, 1, 4095] = 1.5
    assert c.v[1].sum().item() == 16 * 1.5 and not c.v[0].any()


def test_the_samples_of_a_prompt_prefill_it_once(monkeypatch):
    model = _model()
    shapes, infer = [], model.infer

    def spy(ids, cache):
        shapes.append(tuple(ids.shape))
        return infer(ids, cache)

    monkeypatch.setattr(model, "infer", spy)
    prompts = [[1, 2, 3], [1, 2, 3], [4, 5], [1, 2, 3]]
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.9, seed=4)
    batcher = Batcher(model, rows=4, context=32)
    group = batcher.run(batcher.submit(prompts, cfg))
    assert shapes[0] == (2, 3)  # the two distinct prompts
    monkeypatch.undo()
    assert [(s.tokens, s.finish_reason) for s in group.gens] == _alone(model, prompts, cfg)
    assert len({tuple(s.tokens) for s in group.gens}) > 2  # the samples drew apart


def test_a_long_prompt_prefills_in_chunks_while_the_others_decode():
    """A 30-token prompt joins a running sequence in chunks of 4, each carried by one of
    its decode steps: the running one gets a token every step meanwhile, the new one its
    first in the ceil(30 / 4) = 8th, and it decodes from the next."""
    model = _model()
    batcher = Batcher(model, rows=2, context=60, prefill_chunk=4)
    a = batcher.submit([[1, 2, 3]], GenerationConfig(max_new_tokens=25))
    batcher.step()
    prompt = list(range(10, 40))
    b = batcher.submit([prompt], GenerationConfig(max_new_tokens=5))
    for i in range(8):
        before = len(a.gens[0].tokens)
        batcher.step()
        assert len(a.gens[0].tokens) == before + 1
        assert len(b.gens[0].tokens) == (1 if i == 7 else 0)  # the last chunk's token
    batcher.step()
    assert batcher.running == 2 and len(b.gens[0].tokens) == 2
    batcher.run(b)
    batcher.run(a)
    assert b.gens[0].tokens == _alone(model, [prompt], GenerationConfig(max_new_tokens=5))[0][0]
    assert a.gens[0].tokens == _alone(model, [[1, 2, 3]],
                                      GenerationConfig(max_new_tokens=25))[0][0]


def test_generate_prompts_file_batches_continuously(tmp_path, capsys):
    """`moekit generate --prompts-file`: sampled text per sequence is what the engine
    draws alone with that sequence's generator (sequence_seed), printed in order, the
    same whatever --batch; the run's stats count every sequence."""
    from moekit.cli import main as cli_main
    from moekit.inference.batcher import sequence_seed
    from moekit.train.checkpoint import save_checkpoint

    model = _model()
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    texts = ["def f(", "x", "import os", "class A:"]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    outs = []
    for batch in ("1", "3"):
        assert cli_main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompts-file",
                         str(tmp_path / "prompts.txt"), "--max-new-tokens", "12",
                         "--temperature", "0.9", "--seed", "5", "--samples", "2",
                         "--batch", batch]) == 0
        out = capsys.readouterr()
        assert "moekit generate: 8 sequences" in out.err
        outs.append(out.out)
    assert outs[0] == outs[1]
    want = []
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.9, seed=5)
    for i, t in enumerate(t for t in texts for _ in range(2)):
        (g,), _ = Engine(model).generate(
            [list(t.encode())], cfg, generator=torch.Generator().manual_seed(
                sequence_seed(5, i)))
        text = (t.encode() + bytes(g.tokens)).decode("utf-8", errors="replace")
        want.append(f"--- {i} (length, 12 tokens)\n{text}\n")
    assert outs[0] == "".join(want)
    # --jsonl: the same sequences as JSON lines, nothing on stdout
    out = tmp_path / "out.jsonl"
    args = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompts-file",
            str(tmp_path / "prompts.txt"), "--max-new-tokens", "12", "--temperature", "0.9",
            "--seed", "5", "--samples", "2", "--jsonl", str(out)]
    assert cli_main(args) == 0 and capsys.readouterr().out == ""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(8))
    # the printed headers carry the same 0-based index (they had counted from 1)
    assert [int(line.split()[1]) for line in outs[0].splitlines()
            if line.startswith("--- ")] == [r["index"] for r in records]
    assert [r["prompt"] + r["text"] for r in records] == [w.split("\n", 1)[1][:-1]
                                                          for w in want]
    assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 12
               and r["prompt_tokens"] == len(r["prompt"].encode()) for r in records)
    for bad, words in ((str(tmp_path), "not a directory"),
                       (str(tmp_path / "none" / "x.jsonl"), "does not exist")):
        assert cli_main([*args[:-1], bad]) == 2
        err = capsys.readouterr().err
        assert f"--jsonl={bad!r} is not allowed" in err and words in err
    assert cli_main([*args, "--no-cache"]) == 2 and "--jsonl" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 8  # the refused runs left it as it was


def test_groups_that_wait_together_prefill_in_one_forward(monkeypatch):
    """Three groups submitted at once prefill as one left-padded forward; a fourth whose
    prompt would make the padding outweigh the prompts waits for a prefill of its own.
    Each generates what it generates alone."""
    model = _model()
    shapes, infer, pair = [], model.infer, model.infer_pair

    def spy(ids, cache):
        shapes.append(tuple(ids.shape))
        return infer(ids, cache)

    def spy_pair(ids, cache, chunk, other):
        shapes.append(("with a step", tuple(chunk.shape)))
        return pair(ids, cache, chunk, other)

    monkeypatch.setattr(model, "infer", spy)
    monkeypatch.setattr(model, "infer_pair", spy_pair)
    prompts = [[5, 6, 7, 8], [40, 41], [100, 101, 102], [9] * 30]
    cfgs = [GenerationConfig(max_new_tokens=6 + i, temperature=0.8 * (i % 2), seed=i)
            for i in range(4)]
    batcher = Batcher(model, rows=4, context=48)
    groups = [batcher.submit([p], cfg) for p, cfg in zip(prompts, cfgs, strict=True)]
    while batcher.step():
        pass
    # two prefills: the first alone, the second carried by a decode step (the other
    # steps run the plan)
    assert shapes == [(3, 4), ("with a step", (1, 30))]
    monkeypatch.undo()
    for g, p, cfg in zip(groups, prompts, cfgs, strict=True):
        assert [(s.tokens, s.finish_reason) for s in g.gens] == _alone(model, [p], cfg)


@pytest.mark.parametrize("changes", [{}, {"num_kv_heads": 1, "qk_norm": "head"}],
                         ids=["mha", "gqa-qknorm"])
def test_infer_pair_is_two_infers(changes):
    """MoETransformer.infer_pair: a decode step of padded rows and a padded prefill chunk
    after a prefix, each with its own cache, in one pass: the logits and the caches of
    two infer calls."""
    import copy

    model = _model(**changes)
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        a = StaticKVCache.for_model(model, 3, 32)
        a.reset(torch.tensor([0, 2, 1]))
        model.infer(torch.randint(256, (3, 6), generator=gen), a)
        b = StaticKVCache.for_model(model, 2, 32)
        b.reset(torch.tensor([0, 3]))
        model.infer(torch.randint(256, (2, 5), generator=gen), b)
        a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
        ids_a, ids_b = torch.randint(256, (3, 1), generator=gen), torch.randint(
            256, (2, 4), generator=gen)
        got_a, got_b = model.infer_pair(ids_a, a, ids_b, b)
        want_a, want_b = model.infer(ids_a, a2), model.infer(ids_b, b2)
    torch.testing.assert_close(got_a, want_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_b, want_b, atol=1e-5, rtol=1e-5)
    assert (a.length, b.length) == (7, 9)
    for x, y in zip(a.k + a.v + b.k + b.v, a2.k + a2.v + b2.k + b2.v, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_cancelled_groups_leave_and_the_others_are_unchanged():
    """cancel: a waiting group never runs; a running one stops at the next step with the
    tokens it had (a prefix of its solo generation); a group being prefilled leaves once
    its prefill ends; those beside them generate what they generate alone."""
    model = _model()
    cfg = GenerationConfig(max_new_tokens=12)
    prompts = [[5, 6, 7], [8, 9], list(range(10, 22)), [14] * 9]
    batcher = Batcher(model, rows=2, context=40, prefill_chunk=4)
    done = []
    groups = [batcher.submit([p], cfg, on_done=done.append) for p in prompts]
    batcher.step()  # groups 0 and 1 run; 2 and 3 wait
    assert batcher.running == 2 and batcher.waiting == 2
    batcher.cancel(groups[3])  # waiting: gone now, never prefilled
    assert groups[3].done and done == [groups[3]] and batcher.waiting == 1
    assert groups[3].gens[0].tokens == [] and groups[3].gens[0].finish_reason == "cancelled"
    for _ in range(3):
        batcher.step()
    batcher.cancel(groups[0])  # running: leaves at the next step with the tokens it has
    n = len(groups[0].gens[0].tokens)
    assert not groups[0].done and 1 < n < 12
    batcher.step()
    assert groups[0].done and groups[0].gens[0].finish_reason == "cancelled"
    assert groups[0].gens[0].tokens == _alone(model, [prompts[0]], cfg)[0][0][:n]
    # group 2's prefill (12 tokens: 3 chunks of 4) rides on group 1's steps
    assert batcher._filling is not None and groups[2] in batcher._filling.groups
    batcher.cancel(groups[2])
    while batcher.step():
        pass
    assert groups[2].done and groups[2].gens[0].finish_reason == "cancelled"
    assert len(groups[2].gens[0].tokens) <= 1
    assert [(s.tokens, s.finish_reason) for s in groups[1].gens] == _alone(
        model, [prompts[1]], cfg)
    assert done.count(groups[0]) == done.count(groups[2]) == 1
    batcher.cancel(groups[1])  # done: left as it was
    assert groups[1].gens[0].finish_reason == "length"
    with pytest.raises(ValueError, match="group='list' is not allowed"):
        batcher.cancel([groups[1]])


def test_a_cancelled_group_leaves_its_cohort_unchanged():
    """Two groups prefilling together in chunks beside a running one; one is cancelled
    mid-prefill: it leaves as the cohort joins, the other two generate what they
    generate alone."""
    model = _model()
    cfg = GenerationConfig(max_new_tokens=10)
    batcher = Batcher(model, rows=4, context=48, prefill_chunk=3)
    first = batcher.submit([[1, 2, 3]], cfg)
    batcher.step()
    a, b = (batcher.submit([list(range(20 + 7 * k, 30 + 7 * k))], cfg) for k in range(2))
    batcher.step()
    assert batcher._filling is not None and batcher._filling.groups == [a, b]
    batcher.cancel(b)
    while batcher.step():
        pass
    assert b.done and b.gens[0].finish_reason == "cancelled" and len(b.gens[0].tokens) <= 1
    for g in (first, a):
        assert [(s.tokens, s.finish_reason) for s in g.gens] == _alone(model, g.ids, cfg)



class _Clock:
    """A fake ``time.perf_counter`` that only moves when a forward carrying prompt tokens
    runs (by ``cost`` seconds), so the prefill times a batcher records are known."""

    def __init__(self, model, cost: float) -> None:
        self.now, self.cost, self.forwards, self.shared = 100.0, cost, 0, None
        infer, pair = model.infer, model.infer_pair

        def infer_spy(ids, cache):
            if cache is not self.shared:  # a prefill (the shared cache's are decode steps)
                self.tick()
            return infer(ids, cache)

        def pair_spy(ids, cache, chunk, other):
            self.tick()
            return pair(ids, cache, chunk, other)

        self.infer, self.pair = infer_spy, pair_spy

    def tick(self) -> None:
        self.forwards += 1
        self.now += self.cost

    def __call__(self) -> float:
        return self.now


def test_a_cohorts_prefill_is_counted_once_and_shared_by_prompt_tokens(monkeypatch):
    """Three groups prefilled in one forward of 1 s: the batcher's total is 1 s (was 3 s:
    each group was charged the whole forward), the groups' shares are their prompt tokens'
    (4, 2, 3 of 9) and add up to it. A fourth prompt carried in chunks by 8 decode steps
    (0.5 s each): 4 s more, all its own, and those steps counted as prefill steps."""
    import moekit.inference.batcher as batcher_module

    model = _model()
    clock = _Clock(model, 1.0)
    monkeypatch.setattr(model, "infer", clock.infer)
    monkeypatch.setattr(model, "infer_pair", clock.pair)
    monkeypatch.setattr(batcher_module.time, "perf_counter", clock)
    batcher = Batcher(model, rows=4, context=48, prefill_chunk=4)
    clock.shared = batcher.cache
    prompts = [[5, 6, 7, 8], [40, 41], [100, 101, 102]]
    groups = [batcher.submit([p], GenerationConfig(max_new_tokens=12)) for p in prompts]
    batcher.step()
    assert clock.forwards == 1 and batcher.prefill_s == pytest.approx(1.0)
    assert [g.prefill_s for g in groups] == pytest.approx([4 / 9, 2 / 9, 3 / 9])
    assert batcher.prefill_steps == 0
    clock.cost, clock.forwards = 0.5, 0
    late = batcher.submit([[9] * 30], GenerationConfig(max_new_tokens=3))
    batcher.run(late)
    assert clock.forwards == batcher.prefill_steps == 8  # ceil(30 / 4) chunks
    assert batcher.prefill_s == pytest.approx(1.0 + 8 * 0.5)
    assert late.prefill_s == pytest.approx(4.0)
    assert [g.prefill_s for g in groups] == pytest.approx([4 / 9, 2 / 9, 3 / 9])
    assert sum(g.prefill_s for g in [*groups, late]) == pytest.approx(batcher.prefill_s)


def test_generate_timing_line_counts_each_prefill_once_and_not_the_kernel_build(
        tmp_path, capsys, monkeypatch):
    """`moekit generate`: one prompt, and three from --prompts-file prefilled in one
    forward: the prefill is a fraction of the run and each decode step takes a positive
    time (was 'prefill 20.7 ms, -12.19 ms per decode step': the forward counted per
    prompt). A kernel build (here 2 s on first use) happens before the clock starts.
    --no-cache prints the line too."""
    import re

    from moekit.cli import main as cli_main
    from moekit.functions import cpu_ext
    from moekit.train.checkpoint import save_checkpoint

    model = _model()
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    (tmp_path / "p.txt").write_text("def f(\nimport os\nclass A:\n")
    built = []

    def slow_first_build(load):
        def loading():
            if not built:
                built.append(True)
                import time
                time.sleep(2.0)
            return load()
        return loading

    for name in ("get", "get_decode"):
        monkeypatch.setattr(cpu_ext, name, slow_first_build(getattr(cpu_ext, name)))
    line = re.compile(r"(\d+) sequences? \(batch <= (\d+)\), (\d+) new tokens in ([\d.]+) s: "
                      r"[\d.]+ tokens/s; prefill ([\d.]+) ms, ([\d.]+) ms per decode step")
    base = ["generate", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "10",
            "--temperature", "0"]
    for argv, sequences in (([], 1), (["--prompts-file", str(tmp_path / "p.txt")], 3),
                            (["--prompts-file", str(tmp_path / "p.txt"), "--no-cache"], 3)):
        assert cli_main([*base, *argv]) == 0
        err = capsys.readouterr().err
        m = line.search(err)
        assert m, err
        seqs, _, new, seconds, prefill_ms, step_ms = map(float, m.groups())
        assert (seqs, new) == (sequences, 10 * sequences) and built
        assert prefill_ms < 1500 and step_ms > 0, err  # the 2 s build is not in them
        assert seconds < 2.0, err
