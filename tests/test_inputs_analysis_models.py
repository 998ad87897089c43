"""Bad input to the LM (MoETransformer.forward, generate, sample_next, StaticKVCache,
LMConfig) and to the routing analysis (RoutingCollector.set_tokens, summarise,
write_report, windows, `moekit analyze --tokens`): a ValueError naming the argument,
its value and what is allowed, before any state changes, instead of torch errors deep
inside, a silently wrong answer, or a half-written report."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from moekit.analysis import RoutingCollector, analyze_model
from moekit.analysis.analyze import windows
from moekit.analysis.cli import add_arguments, run
from moekit.analysis.report import JSON_FILE, write_report
from moekit.analysis.stats import summarise
from moekit.models import KVCache, LMConfig, MoETransformer, generate, preset, sample_next
from moekit.models.transformer import StaticKVCache


def raises(words: str):
    return pytest.raises(ValueError, match=re.escape(words))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoETransformer(preset("tiny")).train()  # V=256, 2 layers, max_seq_len=64


IDS = torch.tensor([[1, 5, 9, 255, 0], [7, 3, 100, 200, 42]])


# -- MoETransformer.forward -----------------------------------------------------------

@pytest.mark.parametrize(("ids", "words"), [
    (IDS.tolist(), "ids_BL='list' is not allowed"),  # was AttributeError: .shape
    (IDS.float(), "ids_BL.dtype=torch.float32 is not allowed: it must be int64 or int32"),
    (IDS.to(torch.uint8), "ids_BL.dtype=torch.uint8 is not allowed"),  # torch embedding error
    (IDS[0], "ids_BL.shape=(5,) is not allowed"),  # was "not enough values to unpack"
    (IDS[None], "ids_BL.shape=(1, 2, 5) is not allowed"),
    (IDS + 300, "ids_BL has values in [300, 555], which is not allowed: they must lie in "
                "[0, vocab_size=256)"),  # was IndexError: index out of range in self
    (IDS - 1 - IDS.max(), "ids_BL has values in"),
])
def test_forward_checks_ids(model, ids, words):
    with raises(words):
        model(ids)


def test_forward_checks_targets(model):
    ids = IDS[:, :4].reshape(4, 2)
    with raises("targets_BL.shape=(2, 4) is not allowed: it must be ids_BL's shape (4, 2)"):
        model(ids, IDS[:, :4])  # same numel, other shape: was a silently wrong loss
    with raises("targets_BL.shape=(2, 4) is not allowed"):
        model(IDS, IDS[:, :4])  # was "Expected input batch_size (10) to match ... (8)"
    with raises("targets_BL.dtype=torch.float32 is not allowed"):
        model(IDS, IDS.float())
    with raises("targets_BL=list is not allowed"):
        model(IDS, IDS.tolist())


def test_forward_good_ids_and_targets(model):
    with torch.no_grad():
        out = model(IDS, IDS)
        out32 = model(IDS.int(), IDS.int())  # int32 targets were a torch error
    assert out.logits.shape == (2, 5, 256) and torch.equal(out.logits, out32.logits)
    assert torch.equal(out.loss, out32.loss)


def test_forward_checks_cache(model):
    with raises("cache='dict' is not allowed: it must be None, a KVCache or a StaticKVCache"):
        model(IDS, cache={})  # was AttributeError: 'dict' object has no attribute 'length'
    with raises("cache='KVCache of 1 layers' is not allowed: it must hold num_layers=2"):
        model(IDS, cache=KVCache(1))  # was IndexError after layer 0 had run
    cache = KVCache(2)
    with torch.no_grad():
        model(IDS, cache=cache)
    assert cache.length == 5


# -- generate / sample_next -----------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(ids_BL=IDS.tolist()), "ids_BL=list is not allowed"),  # AttributeError: .dim
    (dict(ids_BL=IDS > 100), "ids_BL.dtype=torch.bool is not allowed"),  # ran as ids 0 / 1
    (dict(ids_BL=IDS.float()), "ids_BL.dtype=torch.float32 is not allowed"),
    (dict(ids_BL=IDS[:0]), "ids_BL.shape=(0, 5) is not allowed"),  # no cache: (0, 7)
    (dict(ids_BL=IDS + 300), "ids_BL has values in [300, 555]"),  # IndexError
    (dict(max_new_tokens=-1), "max_new_tokens=-1 is not allowed: it must be an int >= 0"),
    (dict(max_new_tokens=None), "max_new_tokens=None is not allowed"),  # TypeError
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5 is not allowed"),  # range() TypeError
    (dict(use_cache="no"), "use_cache='no' is not allowed: it must be True or False"),
    (dict(model=None), "model='NoneType' is not allowed"),
])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_checks_its_arguments(model, kwargs, words, use_cache):
    args = dict(model=model, ids_BL=IDS, max_new_tokens=2, temperature=0.0,
                use_cache=use_cache) | kwargs
    with raises(words):
        generate(**args)
    assert model.training


def test_generate_bad_generator_leaves_the_model_training(model):
    """No cache: was a TypeError from multinomial after the first forward, with the model
    left in eval mode."""
    with raises("generator=42 is not allowed: it must be None or a torch.Generator"):
        generate(model, IDS, 2, 1.0, use_cache=False, generator=42)
    assert model.training


def test_generate_prompt_dtype_must_hold_the_vocabulary():
    """uint8 prompt, V=512: was a RuntimeError (overflow) after generating every token."""
    m = MoETransformer(LMConfig(vocab_size=512, dim=32, num_layers=2, num_heads=2,
                                max_seq_len=64, ffn_dim=32, num_experts=4))
    with raises("ids_BL.dtype=torch.uint8 is not allowed: it cannot hold the ids the model "
                "produces (up to vocab_size - 1 = 511)"):
        generate(m, IDS.to(torch.uint8), 4, 1.0)
    assert generate(m, IDS.to(torch.int16), 4, 1.0).dtype == torch.int16


def test_generate_good_prompts(model):
    """uint8 byte prompts (V=256) run with and without the cache (no cache: was a torch
    embedding error) and give the prompt's dtype both ways."""
    for dtype in (torch.uint8, torch.int32, torch.int64):
        with_cache = generate(model, IDS.to(dtype), 3, 0.0)
        without = generate(model, IDS.to(dtype), 3, 0.0, use_cache=False)
        assert with_cache.dtype == without.dtype == dtype
        assert torch.equal(with_cache, without)
    assert torch.equal(generate(model, IDS, 0, 0.0), IDS)  # 0 new tokens: the prompt
    assert model.training


@pytest.mark.parametrize(("args", "words"), [
    ((-1.0, None, None), "temperature=-1.0 is not allowed"),  # sampled the least likely
    ((1.0, 0, None), "top_k=0 is not allowed"),  # "size of tensor a (4) must match ..."
    ((1.0, None, 0.0), "top_p=0.0 is not allowed"),  # "probability tensor contains ..."
    ((1.0, None, -1.0), "top_p=-1.0 is not allowed"),
    ((float("nan"), None, None), "temperature=nan is not allowed"),
])
def test_sample_next_checks_sampling(args, words):
    with raises(words):
        sample_next(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), *args, None)


def test_sample_next_checks_logits_shape():
    with raises("logits_BV.shape=(4,) is not allowed: it must be a [batch, vocab] tensor"):
        sample_next(torch.tensor([0.0, 3.0, 1.0, 2.0]), 1.0, 2, None, None)  # IndexError
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 1.0, 0.0]])
    assert sample_next(logits, 0.0, None, None, None).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, 1.0, 1, 0.5, gen).tolist() == [1, 0]


# -- StaticKVCache.for_model, LMConfig ------------------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    ((-1,), "batch=-1 is not allowed: it must be a positive int"),  # torch.zeros error
    ((2.5,), "batch=2.5 is not allowed"),  # torch.zeros TypeError
    ((0,), "batch=0 is not allowed"),  # a cache no reset() could use
    ((1, 2.5), "max_len=2.5 is not allowed: it must be an int between 1 and max_seq_len=64"),
    ((1, 65), "max_len=65 is not allowed"),
])
def test_static_cache_for_model_checks(model, args, words):
    with raises(words):
        StaticKVCache.for_model(model, *args)


def test_static_cache_for_model_good(model):
    cache = StaticKVCache.for_model(model, 2, 8)
    assert (cache.batch, cache.max_len) == (2, 8)


def test_lmconfig_hash_vocab_names_vocab_size():
    """Was 'hash_vocab_size=8388608 is not allowed', a field LMConfig does not have."""
    with raises("vocab_size=8388608 is not allowed: it must be <= 4194304 with router='hash'"):
        LMConfig(router="hash", vocab_size=2**23)
    assert LMConfig(router="hash", vocab_size=512).moe_config(0).hash_vocab_size == 512
    assert LMConfig(router="hash", vocab_size=2**23, dense=True).dense  # no hash table


# -- analysis -------------------------------------------------------------------------

def test_analyze_model_takes_byte_ids(model):
    """analyze_model accepts uint8 / int16 ids (its own check says so); the LM's
    embedding got them as they were: a torch error."""
    want = analyze_model(model, IDS, 256, min_count=1)
    for dtype in (torch.uint8, torch.int16):
        assert analyze_model(model, IDS.to(dtype), 256, min_count=1) == want
    assert model.training


def test_analyze_model_ids_past_the_model_vocabulary(model):
    with raises("ids_BL has values in [300, 555]"):  # was IndexError: index out of range
        analyze_model(model, IDS + 300, 1000)
    assert model.training and not model.blocks[0].ffn._forward_hooks


@pytest.mark.parametrize(("ids", "words"), [
    (IDS.float() + 0.7, "ids_BL.dtype=torch.float32 is not allowed"),  # truncated silently
    (IDS > 100, "ids_BL.dtype=torch.bool is not allowed"),  # counted as ids 0 and 1
    (IDS.tolist(), "ids_BL=list is not allowed"),  # AttributeError: .detach
])
def test_set_tokens_checks_the_dtype(model, ids, words):
    rc = RoutingCollector(model, 256)
    with raises(words):
        rc.set_tokens(ids)
    assert rc.ids_T is None and int(rc.base_V.sum()) == 0
    rc.set_tokens(IDS.to(torch.uint8))
    assert rc.ids_T.tolist() == IDS.reshape(-1).tolist()


@pytest.fixture(scope="module")
def collected(model):
    rc = RoutingCollector(model, 256)
    with rc, torch.no_grad():
        rc.set_tokens(IDS)
        model(IDS)
    return rc


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(top=0), "top=0 is not allowed"),  # listed nothing
    (dict(top=-1), "top=-1 is not allowed"),  # listed all items but the last
    (dict(min_count=0), "min_count=0 is not allowed"),
    (dict(top=2.5), "top=2.5 is not allowed"),
])
def test_summarise_checks_top_and_min_count(collected, kwargs, words):
    with raises(words):
        summarise(collected.layers[0], collected.base_V, collected.base_CC, **kwargs)
    out = summarise(collected.layers[0], collected.base_V, collected.base_CC, top=2,
                    min_count=1)
    assert all(len(e["tokens"]) <= 2 for e in out["specialisation"]["experts"])


def result_of(model) -> dict:
    meta = {"checkpoint": "ck", "step": 0, "source": "text", "tokens": IDS.numel(),
            "sequences": 2, "seq_len": 5, "model": "tiny"}
    return {"meta": meta, "layers": analyze_model(model, IDS, 256, min_count=1)}


def test_write_report_checks_before_writing(model, tmp_path):
    (tmp_path / JSON_FILE).write_text("OLD")
    layers = analyze_model(model, IDS, 256, min_count=1)
    # was: routing.json overwritten, then KeyError: 'meta'
    with raises("result=['layers'] is not allowed: it must be a dict"):
        write_report({"layers": layers}, tmp_path)
    with raises("result='list' is not allowed"):
        write_report(layers, tmp_path)  # type: ignore[arg-type]
    with raises("result['meta']=['step'] is not allowed: it lacks ['checkpoint', 'source'"):
        write_report({"meta": {"step": 0}, "layers": layers}, tmp_path)
    assert (tmp_path / JSON_FILE).read_text() == "OLD"
    bad = result_of(model)
    bad["meta"]["tokens"] = torch.tensor(10)  # was: the directory made, then a TypeError
    with raises("result='dict' is not allowed: it must hold JSON values only"):
        write_report(bad, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    with raises("out_dir="):  # was FileExistsError from mkdir
        write_report(result_of(model), tmp_path / "afile")
    with raises("out_dir='' is not allowed"):  # was: written into the current directory
        write_report(result_of(model), "")


def test_write_report_good(model, tmp_path):
    paths = write_report(result_of(model), tmp_path / "out")
    assert json.loads(paths["json"].read_text())["meta"]["step"] == 0
    assert "## Summary" in paths["report"].read_text()


def test_windows_names_tokens_below_seq_len():
    """Was 'the text has 1000 tokens, which is not allowed', blaming the text."""
    data = torch.arange(1000) % 256
    with raises("tokens=10 is not allowed: it must be >= seq_len=64"):
        windows(data, 10, 64)
    with raises("the text has 1000 tokens, which is not allowed: it needs at least "
                "seq_len=2000"):
        windows(data, 5000, 2000)
    assert windows(data.to(torch.uint8), 130, 64).shape == (2, 64)


def test_analyze_cli_names_the_tokens_flag(model, tmp_path, capsys):
    from moekit.train.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    (tmp_path / "text.txt").write_text("hello world " * 500)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(tmp_path / "run"), "--data", str(tmp_path / "text.txt"),
                         "--tokens", "10", "--out", str(tmp_path / "out")])
    assert run(args) == 2
    assert "--tokens: tokens=10 is not allowed: it must be >= seq_len=64" \
        in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
