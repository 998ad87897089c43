"""A patched experts module's decode call with its arguments prepared once
(``integrations.hf.experts_plan``): the bits of the general path it replaces, for float and
quantized weights; and the weights it uses are the module's current ones after every way
they change (``.to``, ``moekit.quantize``, ``load_state_dict`` copying, assigning or
swapping, ``param.data = ...``, a Parameter put in ``_parameters``, an in-place update), with
nothing it holds kept alive or blocking ``swap_tensors``. Oracles: transformers' own eager
experts loop on the module's weights (fp32), and the general path (``_moekit_forward``:
the path before the plan) for the same bits."""

from __future__ import annotations

import copy
import io
import weakref

import pytest
import torch
from torch import nn

import moekit
from moekit.functions import decode
from moekit.integrations import hf
from moekit.integrations.hf.experts import StackedExperts
from moekit.integrations.hf.experts_plan import PLAN_ATTR, ExpertsPlan
from tests import hf_models  # skips this module when transformers is missing

pytestmark = pytest.mark.skipif(not decode.available(), reason="no decode kernels")


def _experts() -> tuple[nn.Module, nn.Module]:
    """An OLMoE model (tests/hf_models.py's, experts 32 wide so int4 groups of 32 tile
    them) patched, and its first experts module."""
    torch.manual_seed(0)
    model = hf_models.transformers.OlmoeForCausalLM(hf_models.transformers.OlmoeConfig(
        **hf_models.COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2))
    model.set_experts_implementation("eager")
    model = hf.apply(model.eval())
    return model, next(m for m in model.modules() if isinstance(m, StackedExperts))


def _choice(m: nn.Module, T: int = 1, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    D, E = m.hidden_dim, m.num_experts
    K = 2
    x = torch.randn(T, D, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=gen).softmax(-1).to(dtype)
    return x, idx, w


def _transformers(m: nn.Module, *args) -> torch.Tensor:
    """transformers' eager loop on the module's current weights."""
    return type(m)._moekit_original.forward(m, *args)


def _planned(m: nn.Module, *args) -> torch.Tensor:
    """The module's call, asserting it went through a plan that makes the C++ call."""
    y = m(*args)
    plan = m.__dict__.get(PLAN_ATTR)
    assert isinstance(plan, ExpertsPlan) and plan.call is not None and plan.fresh()
    return y


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4", "int8a8"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_plan_gives_the_bits_of_the_general_path(kind, T, mode):
    model, m = _experts()
    if kind == "bf16":
        model.to(torch.bfloat16)
    elif kind.startswith("int"):
        moekit.quantize(model, bits=int(kind[3]), **({"group_size": 32} if kind[3] == "4"
                                                     else {}),
                        **({"activations": "int8"} if kind.endswith("a8") else {}))
    args = _choice(m, T, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    with getattr(torch, mode)():
        got = _planned(m, *args)
        again = _planned(m, *args)
        want = m._moekit_forward(*args)
    assert got.dtype == want.dtype == args[0].dtype
    assert torch.equal(got, want) and torch.equal(again, want)
    if kind == "fp32":
        with torch.no_grad():
            torch.testing.assert_close(got, _transformers(m, *args), atol=1e-5, rtol=1e-4)


def test_to_bfloat16_drops_the_plan_and_frees_the_old_weights():
    model, m = _experts()
    args = _choice(m)
    with torch.no_grad():
        _planned(m, *args)
    old = weakref.ref(m.gate_up_proj.data.untyped_storage())
    model.to(torch.bfloat16)
    assert PLAN_ATTR not in m.__dict__ and old() is None
    bf16 = tuple(a.bfloat16() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        assert torch.equal(_planned(m, *bf16), m._moekit_forward(*bf16))


def test_quantize_drops_the_plan_and_the_float_weights():
    model, m = _experts()
    args = _choice(m)
    with torch.no_grad():
        _planned(m, *args)
    old = weakref.ref(m.gate_up_proj)
    moekit.quantize(model, bits=8)
    assert PLAN_ATTR not in m.__dict__ and old() is None
    with torch.no_grad():
        got = _planned(m, *args)
        assert torch.equal(got, m._moekit_forward(*args))


def _new_weights(m: nn.Module, seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in m.state_dict().items()}


# every way the module's weights can change after a call; each must reach the next call
def _load_copy(m, new):
    m.load_state_dict(new)


def _load_assign(m, new):
    m.load_state_dict(new, assign=True)


def _data(m, new):
    for k, v in new.items():
        getattr(m, k).data = v.clone()


def _parameters_dict(m, new):  # as accelerate's set_module_tensor_to_device does
    for k, v in new.items():
        m._parameters[k] = nn.Parameter(v.clone())


def _in_place(m, new):
    with torch.no_grad():
        for k, v in new.items():
            getattr(m, k).copy_(v)


def _swap(m, new):
    for k, v in new.items():
        torch.utils.swap_tensors(getattr(m, k), nn.Parameter(v.clone()))


def _setattr(m, new):
    for k, v in new.items():
        setattr(m, k, nn.Parameter(v.clone()))


@pytest.mark.parametrize("change", [_load_copy, _load_assign, _data, _parameters_dict,
                                    _in_place, _swap, _setattr])
def test_the_next_call_uses_the_changed_weights(change):
    _, m = _experts()
    args = _choice(m, T=2)
    with torch.no_grad():
        before = _planned(m, *args)
    new = _new_weights(m)
    change(m, new)
    assert all(torch.equal(getattr(m, k), v) for k, v in new.items())
    with torch.no_grad():
        got = _planned(m, *args)
        want = _transformers(m, *args)
        general = m._moekit_forward(*args)
    assert not torch.allclose(before, want, atol=1e-3)  # the change matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(got, general)


def test_swap_on_conversion_works_with_a_plan():
    """``.to`` under swap_module_params_on_conversion swaps each Parameter's tensor in
    place, which fails while anything holds the Parameter (a view of it did)."""
    model, m = _experts()
    args = _choice(m)
    with torch.no_grad():
        _planned(m, *args)
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64).to(torch.float32)
        m.load_state_dict(_new_weights(m))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    with torch.no_grad():
        torch.testing.assert_close(_planned(m, *args), _transformers(m, *args), atol=1e-5,
                                   rtol=1e-4)


def test_backend_and_activation_changes_reach_the_next_call(monkeypatch):
    model, m = _experts()
    args = _choice(m, T=2)
    with torch.no_grad():
        _planned(m, *args)
    hf.apply(model, backend="loop")  # the loop backend: no kernels, the general path
    with torch.no_grad():
        got = m(*args)
    assert m.__dict__[PLAN_ATTR].call is None
    assert torch.equal(got, m._moekit_forward(*args))
    hf.apply(model, backend="auto")
    m.act_fn = nn.GELU()  # an activation the kernels do not run
    with torch.no_grad():
        got = m(*args)
        want = _transformers(m, *args)
    assert m.__dict__[PLAN_ATTR].call is None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_rows_autograd_and_autocast_leave_the_plan():
    """Beyond the decode rows, with autograd or under autocast the general path runs (and
    decides as before): the plan's call returns None there."""
    _, m = _experts()
    plan = ExpertsPlan.build(m)
    x, idx, w = _choice(m, T=plan.max_rows // 2 + 1)
    with torch.no_grad():
        assert plan(x, idx, w) is None  # 2 * T rows > max_rows
        assert plan(*_choice(m, T=1)) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert plan(*_choice(m, T=1)) is None
    assert plan(*_choice(m, T=1)) is None  # grad enabled


def test_the_plan_refuses_where_forward_skips_it(monkeypatch):
    """StackedExperts.forward and the plan's call share one gate (``plan_may_run``):
    under torch.compile forward traces the general path, and the plan's call, which
    checked autograd alone, returned the C++ call's output there too."""
    _, m = _experts()
    plan = ExpertsPlan.build(m)
    args = _choice(m, T=1)
    with torch.no_grad():
        assert plan(*args) is not None
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert plan(*args) is None


def test_deepcopy_pickle_and_revert_leave_no_plan_behind():
    model, m = _experts()
    args = _choice(m)
    with torch.no_grad():
        want = _planned(m, *args)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        e = next(x for x in other.modules() if isinstance(x, StackedExperts))
        assert e.__dict__.get(PLAN_ATTR) is None
        with torch.no_grad():
            assert torch.equal(_planned(e, *args), want)
        assert e.gate_up_proj.data_ptr() != m.gate_up_proj.data_ptr()
    hf.revert(model)
    assert not any(k.startswith("_moekit_") for k in m.__dict__)
