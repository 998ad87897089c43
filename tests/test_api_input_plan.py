"""The planner's Python API on bad input: a ValueError naming the argument, its value and
what is allowed, instead of a deep traceback or a silently wrong list of plans."""

from __future__ import annotations

import json
import re

import pytest

from moekit.plan import (
    PRECISIONS,
    Cluster,
    Layout,
    TrainSetup,
    from_hf_config,
    get_gpu,
    get_preset,
    make_plan,
    read_spec_file,
    search,
)
from moekit.plan.cluster import Precision


@pytest.mark.parametrize(("config", "words"), [
    ({"model_type": "mixtral", "num_attention_heads": 0}, "num_attention_heads=0"),
    ({"model_type": "olmoe", "num_attention_heads": -4}, "num_attention_heads=-4"),
    ({"model_type": "qwen3_moe", "num_attention_heads": None}, "num_attention_heads=None"),
    ({"model_type": "mixtral", "hidden_size": None}, "hidden_size=None"),
    ({"model_type": "gpt_oss", "num_attention_heads": 0}, "num_attention_heads=0"),
    ({"model_type": "dbrx", "n_heads": 0}, "n_heads=0"),
    ({"model_type": "dbrx", "d_model": "2048"}, "d_model='2048'"),
])
def test_hf_config_heads_checked_before_dividing(tmp_path, config, words):
    """Was ZeroDivisionError / TypeError, also through `moekit plan config.json`."""
    with pytest.raises(ValueError, match=re.escape(f"{words} is not allowed")):
        from_hf_config(config)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"{words} is not allowed")):
        read_spec_file(path)


def test_hf_config_must_be_a_dict():
    with pytest.raises(ValueError, match=r"config=\[\] is not allowed: it must be a dict"):
        from_hf_config([])


@pytest.fixture(scope="module")
def small():
    spec = get_preset("olmoe-1b-7b").spec
    return spec, Cluster(gpu=get_gpu("h100"), num_gpus=8), TrainSetup(seq_len=512,
                                                                      global_batch=64)


@pytest.mark.parametrize("top", [-1, 0, 2.5, True, None, "3"])
def test_search_top_is_a_positive_int(small, top):
    """top=-1 returned every fitting layout but the last; top=2.5 a slice TypeError."""
    with pytest.raises(ValueError, match=re.escape(f"top={top!r} is not allowed")):
        search(*small, top=top)


def test_search_top_still_counts(small):
    assert len(search(*small, top=3)) == 3


@pytest.mark.parametrize("precision", ["fp32", None, {"name": "fp32"}])
def test_setup_precision_must_be_a_precision(small, precision):
    """A precision name was accepted and failed in make_plan with an AttributeError."""
    words = re.escape(f"precision={precision!r} is not allowed")
    with pytest.raises(ValueError, match=words + ".*fp32"):
        TrainSetup(precision=precision)
    assert TrainSetup(precision=PRECISIONS["fp32"]).precision.name == "fp32"


@pytest.mark.parametrize("dispatcher", ["all_gather", "dedup", None])
def test_setup_dispatcher_is_one_the_planner_models(dispatcher):
    with pytest.raises(ValueError, match=re.escape(f"dispatcher={dispatcher!r} is not allowed")
                       + ".*all_to_all, all_to_all_dedup"):
        TrainSetup(dispatcher=dispatcher)


def test_precision_bytes_are_checked():
    """weight_bytes=0 planned a model whose weights take no memory."""
    with pytest.raises(ValueError, match="weight_bytes=0 is not allowed"):
        Precision(name="x", weight_bytes=0, grad_bytes=2, optimizer_bytes=12,
                  activation_bytes=2)
    with pytest.raises(ValueError, match="optimizer_bytes=-1 is not allowed"):
        Precision(name="x", weight_bytes=2, grad_bytes=2, optimizer_bytes=-1,
                  activation_bytes=2)


def test_make_plan_and_search_arguments_have_their_types(small):
    spec, cluster, setup = small
    lay = Layout(dp=8, ep=8)
    for args, name in (((spec.to_dict(), cluster, setup, lay), "spec"),
                       ((spec, None, setup, lay), "cluster"),
                       ((spec, cluster, "bf16-mixed", lay), "setup"),
                       ((spec, cluster, setup, {"dp": 8}), "layout")):
        with pytest.raises(ValueError, match=f"^{name}=.* is not allowed: it must be a "):
            make_plan(*args)
    with pytest.raises(ValueError, match="^cluster='h100' is not allowed"):
        search(spec, "h100", setup)


@pytest.mark.parametrize("name", [None, 3])
def test_gpu_and_preset_names_must_be_strings(name):
    with pytest.raises(ValueError, match=f"gpu={name!r} is not allowed: known GPUs"):
        get_gpu(name)
    with pytest.raises(ValueError, match=f"preset={name!r} is not allowed: known presets"):
        get_preset(name)
