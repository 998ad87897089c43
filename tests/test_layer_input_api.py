"""Bad input through the layer's other entry points: ``MoE.infer`` (generation),
``load_state_dict`` of another config, ``replace``/``preset`` with unknown fields, and
config fields that only some routers read. Each is a ValueError naming the argument,
its value and what is allowed, raised before any state changes.

Shape letters: T tokens, D hidden, E experts.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig, MultiGateMoE
from moekit.models.config import LMConfig, preset

BASE = dict(dim=8, ffn_dim=4, num_experts=4, top_k=2)
HASH = dict(BASE, router="hash", hash_vocab_size=10)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, before):
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


# -- MoE.infer checks its input like forward ------------------------------------------

@pytest.mark.parametrize("x,needle", [
    (torch.randn(2, 4), "x.shape=(2, 4)"),  # was a silently wrong [2, 4] output
    (torch.randn(3, 7), "x.shape=(3, 7)"),  # was a RuntimeError from reshape
    (torch.randn(()), "x.shape=()"),
    (torch.randint(0, 5, (3, 8)), "x.dtype=torch.int64"),  # was a RuntimeError in the GEMM
    (torch.randn(3, 8, dtype=torch.float64), "x.dtype=torch.float64"),
    ([[0.0] * 8], "x=list"),  # was an AttributeError
])
def test_infer_rejects_bad_x(x, needle):
    moe = MoE(MoEConfig(**BASE)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="not allowed") as err:
        moe.infer(x)
    assert needle in str(err.value)


def test_infer_rejects_non_finite_x_when_checking():
    moe = MoE(MoEConfig(**BASE, check_finite=True)).eval()
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or inf"):
        moe.infer(x)


@pytest.mark.parametrize("ids,needle", [
    (torch.tensor([1, 2, 10]), "hash_vocab_size=10"),  # was an IndexError
    (torch.tensor([1, 2, -1]), "[-1, 2]"),  # was silently wrapped to the last row
    (torch.tensor([1, 2]), "shape (2,)"),  # was silently routed
    (torch.tensor([1.0, 2.0, 3.0]), "torch.float32"),  # was an IndexError
])
def test_infer_rejects_bad_token_ids(ids, needle):
    moe = MoE(MoEConfig(**HASH)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="not allowed") as err:
        moe.infer(torch.randn(3, 8), ids)
    assert needle in str(err.value)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32])
def test_infer_takes_token_ids_of_any_integer_dtype(dtype):
    # uint8 ids were read as a mask (IndexError), int8 ones refused by the lookup
    moe = MoE(MoEConfig(**HASH)).eval()
    x, ids = torch.randn(2, 3, 8), torch.randint(0, 10, (2, 3))
    with torch.no_grad():
        want = moe(x, ids).output
        got = moe.infer(x, ids.to(dtype))
    torch.testing.assert_close(got, want)


def test_token_ids_are_ignored_by_routers_without_a_table():
    moe = MoE(MoEConfig(**BASE))
    x = torch.randn(3, 8)
    want = moe(x).output
    # a non-tensor was an AttributeError from .reshape, though this router reads no ids
    torch.testing.assert_close(moe(x, "not ids").output, want)
    with torch.no_grad():
        torch.testing.assert_close(moe.infer(x, "not ids"), want)


# -- load_state_dict of another config writes nothing -----------------------------------

@pytest.mark.parametrize("other,needle", [
    (dict(ffn_dim=6), "experts.w_in: (4, 8, 12) where the layer's is (4, 8, 8)"),
    (dict(bias_update_rate=0.1), "unexpected keys ['router.expert_bias', 'router.load']"),
    (dict(expert_bias=True), "unexpected keys ['experts.b_in', 'experts.b_out']"),
    (dict(num_shared_experts=1), "unexpected keys ['shared.w_in', 'shared.w_out']"),
])
def test_load_state_dict_of_another_config_changes_nothing(other, needle):
    moe = MoE(MoEConfig(**BASE))
    before = _snapshot(moe)
    state = MoE(MoEConfig(**{**BASE, **other})).state_dict()
    with pytest.raises(ValueError, match="state_dict .* is not allowed") as err:
        moe.load_state_dict(state)
    assert needle in str(err.value)
    assert _unchanged(moe, before)  # router.weight was overwritten before the error


def test_load_state_dict_missing_keys_and_non_tensors():
    moe = MoE(MoEConfig(**BASE, bias_update_rate=0.1))
    before = _snapshot(moe)
    state = MoE(MoEConfig(**BASE)).state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['router.expert_bias', 'router.load'\]"):
        moe.load_state_dict(state)
    state = {**moe.state_dict(), "experts.w_out": [[0.0]]}
    with pytest.raises(ValueError, match="experts.w_out: list where the layer's is"):
        moe.load_state_dict(state)
    assert _unchanged(moe, before)


def test_load_state_dict_that_fits_still_loads():
    src, dst = MoE(MoEConfig(**BASE)), MoE(MoEConfig(**BASE))
    dst.load_state_dict(src.state_dict())
    assert _unchanged(dst, src.state_dict())
    partial = {k: v for k, v in src.state_dict().items() if k.startswith("router.")}
    res = MoE(MoEConfig(**BASE)).load_state_dict(partial, strict=False)
    assert res.missing_keys == ["experts.w_in", "experts.w_out"]
    with pytest.raises(ValueError, match="experts.w_in"):  # a wrong shape even when lax
        dst.load_state_dict({"experts.w_in": torch.zeros(1)}, strict=False)


def test_multigate_load_state_dict_of_another_task_count_changes_nothing():
    mg = MultiGateMoE(MoEConfig(**BASE), num_tasks=2)
    before = _snapshot(mg)
    other = MultiGateMoE(MoEConfig(**{**BASE, "ffn_dim": 6}), num_tasks=3)
    with pytest.raises(ValueError, match=r"unexpected keys \['gates.2.weight'\]"):
        mg.load_state_dict(other.state_dict())
    assert _unchanged(mg, before)


# -- replace and preset with unknown fields -------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: MoEConfig(**BASE).replace(num_expert=8),
    lambda: LMConfig().replace(num_expert=8),
    lambda: preset("tiny", num_expert=8),
])
def test_replace_with_an_unknown_field_lists_the_allowed(make):
    # was TypeError: __init__() got an unexpected keyword argument
    with pytest.raises(ValueError, match=r"unknown keys \['num_expert'\]; allowed: .*"
                                         r"'num_experts'"):
        make()


def test_preset_name_that_is_not_a_string():
    with pytest.raises(ValueError, match=r"preset=\['tiny'\] is not allowed: .*tiny, small"):
        preset(["tiny"])  # was TypeError: unhashable type: 'list'


# -- fields only some routers read are still checked --------------------------------------

@pytest.mark.parametrize("value", [-5, 0, "10", 10.0, True, 10**12])
def test_hash_vocab_size_is_checked_for_every_router(value):
    with pytest.raises(ValueError, match="not allowed") as err:
        MoEConfig(**BASE, hash_vocab_size=value)
    assert f"hash_vocab_size={value!r}" in str(err.value)


def test_hash_vocab_size_may_stay_on_another_router():
    cfg = MoEConfig(**HASH).replace(router="softmax")  # a valid leftover is fine
    assert MoE(cfg)(torch.randn(3, 8)).output.shape == (3, 8)


# -- an explicit backend that cannot take the input ---------------------------------------

@pytest.mark.parametrize("dim,dtype,autocast", [
    (20, torch.bfloat16, False),  # 40-byte rows: "strides should be multiple of 16 bytes"
    (16, torch.float64, False),  # "Expected mat_a to be Float32, BFloat16 or Float16"
    (20, torch.float32, True),  # fp32 aligns at 4 elements, bf16 (the autocast dtype) at 8
])
@pytest.mark.parametrize("multigate", [False, True])
def test_grouped_mm_backend_refuses_what_it_cannot_take(dim, dtype, autocast, multigate):
    cfg = MoEConfig(dim=dim, ffn_dim=8, num_experts=4, top_k=2, router="sigmoid",
                    bias_update_rate=0.1)
    layer = (MultiGateMoE(cfg, 2, backend="grouped_mm") if multigate
             else MoE(cfg, backend="grouped_mm")).to(dtype).train()
    before = _snapshot(layer)
    x = torch.randn(5, dim, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with pytest.raises(ValueError, match="backend='grouped_mm' is not allowed") as err:
            layer(x)
    assert f"dim={dim}" in str(err.value) and "use backend='auto'" in str(err.value)
    assert _unchanged(layer, before)  # refused before the router counted the load
    if not autocast and dtype == torch.float32:
        return
    auto = MoE(cfg).to(dtype)  # "auto" takes the same input
    auto.load_state_dict(layer.state_dict() if not multigate else {
        **{f"router.{k}": v for k, v in layer.gates[0].state_dict().items()},
        **{f"experts.{k}": v for k, v in layer.experts.state_dict().items()}})
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert auto(x).output.shape == x.shape
