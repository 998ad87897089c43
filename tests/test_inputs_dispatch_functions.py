"""Bad input to moekit.dispatch and moekit.functions: a ValueError naming the argument,
its value and what is allowed, raised before anything runs; valid input unchanged.

What each case did before the checks:
- sort_by_expert / capacity_keep: an unknown policy ran as "probability"; capacity -1
  dropped every pair and 1.5 acted as 2; expert ids >= num_experts, num_experts <= 0,
  float or int32 ids gave torch's index / scatter errors; a token_S or weight_S longer
  than expert_S was cut silently, a shorter one gave an IndexError.
- moe_experts.fused_experts(_into): a negative offset crashed the process
  (segmentation fault in the one-call forward); decreasing offsets or one offset too
  few ran silently on the wrong experts; a token id outside x under autograd, a 3-D x
  or a bias of the wrong shape gave torch's index / broadcast errors.
- experts.fused_experts (Triton): biases of the wrong shape were read past their end
  (1e23 or NaN outputs); a 2-D token_S crashed the process; float offsets were cut.
- routing.fused_topk / fused_dispatch: a bias_E of the wrong length was read past its
  end; top_k=True ran as 1; scale=nan gave NaN weights.
- grouped_mm: a 2-D weight returned [E, S, N] where [S, N] was promised.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F, E experts, S routed rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from moekit.dispatch import RoutingPlan, capacity_keep, sort_by_expert
from moekit.functions.grouped_mm import grouped_mm
from moekit.functions.moe_experts import fused_experts, fused_experts_into

# -- dispatch -------------------------------------------------------------------------------


def _plan(expert_S=None, token_S=None, weight_S=None) -> RoutingPlan:
    """Four tokens, top-1, over E=4 experts: expert ids [0, 1, 1, 3]."""
    return RoutingPlan(
        token_S=torch.arange(4) if token_S is None else token_S,
        expert_S=torch.tensor([0, 1, 1, 3]) if expert_S is None else expert_S,
        weight_S=torch.tensor([0.9, 0.2, 0.7, 0.5]) if weight_S is None else weight_S,
        probs_TE=torch.full((4, 4), 0.25), logits_TE=None, top_k=1)


BAD_PLANS = [
    # (plan fields, match)
    ({"expert_S": torch.tensor([0, 1, 1, 4])}, r"plan.expert_S has values in \[0, 4\].*"
                                                r"\[0, num_experts=4\)"),
    ({"expert_S": torch.tensor([0, -1, 1, 3])}, r"plan.expert_S has values in \[-1, 3\]"),
    ({"expert_S": torch.tensor([0., 1., 1., 3.])}, r"plan.expert_S.dtype=torch.float32.*int64"),
    ({"expert_S": torch.tensor([0, 1, 1, 3], dtype=torch.int32)},
     r"plan.expert_S.dtype=torch.int32"),
    ({"expert_S": torch.tensor([[0, 1], [1, 3]])}, r"plan.expert_S.shape=\(2, 2\).*1-D"),
    ({"expert_S": [0, 1, 1, 3]}, r"plan.expert_S=list.*torch.Tensor"),
    ({"token_S": torch.arange(3)}, r"plan.token_S.shape=\(3,\).*\(4,\)"),
    ({"token_S": torch.arange(5)}, r"plan.token_S.shape=\(5,\).*\(4,\)"),
    ({"token_S": torch.arange(4.)}, r"plan.token_S.dtype=torch.float32"),
    ({"weight_S": torch.ones(5)}, r"plan.weight_S.shape=\(5,\).*\(4,\)"),
    ({"weight_S": torch.ones(4, dtype=torch.long)}, r"plan.weight_S.dtype=torch.int64.*floating"),
]
BAD_PLANS_IDS = [
    "expert_too_big", "expert_negative", "expert_float", "expert_int32", "expert_2d",
    "expert_list", "token_short", "token_long", "token_float", "weight_long", "weight_int"
]


@pytest.mark.parametrize("fields,match", BAD_PLANS, ids=BAD_PLANS_IDS)
@pytest.mark.parametrize("capacity", [None, 1])
def test_sort_by_expert_refuses_a_bad_plan(fields, match, capacity):
    with pytest.raises(ValueError, match=match):
        sort_by_expert(_plan(**fields), 4, capacity)


@pytest.mark.parametrize("fields,match", BAD_PLANS, ids=BAD_PLANS_IDS)
def test_capacity_keep_refuses_a_bad_plan(fields, match):
    with pytest.raises(ValueError, match=match):
        capacity_keep(_plan(**fields), 4, 1, "position")


@pytest.mark.parametrize("args,match", [
    ((0, None), r"num_experts=0 is not allowed: it must be an int >= 1"),
    ((-1, None), r"num_experts=-1"),
    ((2.5, None), r"num_experts=2.5"),
    ((True, None), r"num_experts=True"),
    ((4, -1), r"capacity=-1 is not allowed: it must be an int >= 0"),
    ((4, 1.5), r"capacity=1.5"),
    ((4, True), r"capacity=True"),
    ((4, "2"), r"capacity='2'"),
    ((4, 1, "prob"), r"policy='prob' is not allowed: it must be one of position, probability"),
    ((4, None, "prob"), r"policy='prob'"),
], ids=["E0", "E_negative", "E_float", "E_bool", "capacity_negative", "capacity_float",
        "capacity_bool", "capacity_str", "policy_unknown", "policy_unknown_dropless"])
def test_sort_by_expert_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        sort_by_expert(_plan(), *args)


@pytest.mark.parametrize("args,match", [
    ((0, 1, "position"), r"num_experts=0"),
    ((4, -1, "position"), r"capacity=-1"),
    ((4, 2.5, "position"), r"capacity=2.5"),
    ((4, 1, "random"), r"policy='random'"),
], ids=["E0", "capacity_negative", "capacity_float", "policy_unknown"])
def test_capacity_keep_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        capacity_keep(_plan(), *args)


def test_plan_of_another_type_is_refused():
    for fn in (lambda p: sort_by_expert(p, 4, None), lambda p: capacity_keep(p, 4, 1, "position")):
        with pytest.raises(ValueError, match=r"plan=dict is not allowed.*RoutingPlan"):
            fn({"expert_S": torch.tensor([0, 1])})


def test_valid_plans_still_sort():
    d = sort_by_expert(_plan(), 4, None)
    assert d.token_S.tolist() == [0, 1, 2, 3] and d.counts_E.tolist() == [1, 2, 0, 1]
    assert d.offsets_E.dtype == torch.int32 and d.offsets_E.tolist() == [1, 3, 3, 4]
    # capacity 1: expert 1 keeps one of its two pairs, the other goes last with weight 0
    by_position = sort_by_expert(_plan(), 4, 1, "position")
    assert by_position.token_S.tolist() == [0, 1, 3, 2]
    assert by_position.weight_S.tolist() == pytest.approx([0.9, 0.2, 0.5, 0.0])
    by_weight = sort_by_expert(_plan(), 4, 1, "probability")
    assert by_weight.token_S.tolist() == [0, 2, 3, 1]
    assert capacity_keep(_plan(), 4, 1, "probability").tolist() == [True, False, True, True]
    assert capacity_keep(_plan(), 4, 0, "position").tolist() == [False] * 4
    # no pairs at all (an empty batch): num_experts=0 is fine there (HF Switch's copies)
    empty = _plan(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                  torch.zeros(0))
    assert capacity_keep(empty, 0, 3, "position").shape == (0,)
    assert sort_by_expert(empty, 4, 2).counts_E.tolist() == [0, 0, 0, 0]


# -- the fused CPU experts --------------------------------------------------------------------

T, D, F, E = 5, 8, 6, 3


def _swiglu(h):
    gate, up = h.chunk(2, -1)
    return Fn.silu(gate) * up


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x_TD=torch.randn(T, D, generator=g),
                token_S=torch.tensor([0, 2, 1, 3, 4, 0]),
                weight_S=torch.rand(6, generator=g),
                offsets_E=torch.tensor([2, 4, 6], dtype=torch.int32),
                w_in_EDG=torch.randn(E, D, 2 * F, generator=g) / D ** 0.5,
                w_out_EFD=torch.randn(E, F, D, generator=g) / F ** 0.5,
                b_in_EG=None, b_out_ED=None)


def _reference(p):
    """Row by row: y[token] += weight * expert_e(x[token])."""
    y = torch.zeros(T, D, dtype=torch.float64)
    ends = p["offsets_E"].tolist()
    for r in range(ends[-1]):
        e, t = sum(r >= end for end in ends), int(p["token_S"][r])
        h = p["x_TD"][t].double() @ p["w_in_EDG"][e].double()
        y[t] += float(p["weight_S"][r]) * (_swiglu(h) @ p["w_out_EFD"][e].double())
    return y.float()


BAD_EXPERTS = [
    # (changes, match)
    ({"offsets_E": torch.tensor([-2, 4, 6])}, r"offsets_E=\[-2, 4, 6\] is not allowed: "
                                              r".*non-decreasing"),
    ({"offsets_E": torch.tensor([4, 2, 6])}, r"offsets_E=\[4, 2, 6\] is not allowed"),
    ({"offsets_E": torch.tensor([2, 4, 9])}, r"offsets_E=\[2, 4, 9\].*token_S.shape\[0\]=6"),
    ({"offsets_E": torch.tensor([2, 6])}, r"offsets_E.shape=\(2,\).*\(3,\)"),
    ({"offsets_E": torch.tensor([2., 4., 6.])}, r"offsets_E.dtype=torch.float32"),
    ({"token_S": torch.tensor([0, 2, 1, 3, 9, 0])},
     r"token_S has values in \[0, 9\].*\[0, x_TD.shape\[0\]=5\)"),
    ({"token_S": torch.tensor([0, 2, -1, 3, 4, 0])}, r"token_S has values in \[-1, 4\]"),
    ({"token_S": torch.tensor([0., 2., 1., 3., 4., 0.])}, r"token_S.dtype=torch.float32"),
    ({"weight_S": torch.rand(4)}, r"weight_S.shape=\(4,\).*token_S.shape = \(6,\)"),
    ({"x_TD": torch.randn(1, T, D)}, r"x_TD.shape=\(1, 5, 8\).*2 dimensions"),
    ({"x_TD": torch.ones(T, D, dtype=torch.long)}, r"x_TD.dtype=torch.int64.*floating"),
    ({"b_in_EG": torch.zeros(E, 5)}, r"b_in_EG.shape=\(3, 5\).*\(3, 12\)"),
    ({"b_out_ED": torch.zeros(2, D)}, r"b_out_ED.shape=\(2, 8\).*\(3, 8\)"),
    ({"w_in_EDG": torch.randn(E, 7, 2 * F)}, r"w_in_EDG.shape=\(3, 7, 12\).*D=x_TD.shape\[1\]=8"),
    ({"w_out_EFD": torch.randn(E, 5, D)}, r"w_in_EDG.shape=\(3, 8, 12\) with w_out_EFD.shape="
                                          r"\(3, 5, 8\).*G = 2F"),
]
BAD_EXPERTS_IDS = [
    "offsets_negative", "offsets_decreasing", "offsets_past_rows", "offsets_short",
    "offsets_float", "token_too_big", "token_negative", "token_float", "weight_short", "x_3d",
    "x_int", "b_in_shape", "b_out_experts", "w_in_width", "glu_width"
]


@pytest.mark.parametrize("changes,match", BAD_EXPERTS, ids=BAD_EXPERTS_IDS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_fused_experts_refuses_bad_rows(changes, match, grad):
    p = {**_problem(), **changes}
    p["x_TD"].requires_grad_(grad and p["x_TD"].is_floating_point())
    with pytest.raises(ValueError, match=match):
        fused_experts(*p.values(), _swiglu, "swiglu")


def test_fused_experts_into_refuses_bad_rows_before_adding():
    p = {**_problem(), "offsets_E": torch.tensor([-2, 4, 6])}  # crashed the process
    out = torch.ones(T, D)
    with pytest.raises(ValueError, match=r"offsets_E=\[-2, 4, 6\]"):
        fused_experts_into(out, *p.values(), _swiglu, "swiglu")
    with pytest.raises(ValueError, match=r"len\(w_out_EFD\)=2.*len\(w_in_EDG\) = 3"):
        fused_experts_into(out, *{**_problem(), "w_in_EDG": list(p["w_in_EDG"]),
                                  "w_out_EFD": list(p["w_out_EFD"])[:2]}.values(),
                           _swiglu, "swiglu")
    assert torch.equal(out, torch.ones(T, D))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("kind", ["swiglu", None])
def test_fused_experts_valid_input_still_runs(grad, kind):
    p = _problem()
    want = _reference(p)
    for token_S in (p["token_S"], p["token_S"].int()):  # int32 ids stay accepted
        x = p["x_TD"].clone().requires_grad_(grad)
        args = {**p, "x_TD": x, "token_S": token_S}
        y = fused_experts(*args.values(), _swiglu, kind)
        torch.testing.assert_close(y.detach(), want, atol=1e-5, rtol=1e-4)
        if grad:
            (dx,) = torch.autograd.grad(y.sum(), x)
            assert dx.shape == x.shape and dx.abs().sum() > 0
    out = torch.ones(T, D)
    with torch.no_grad():
        fused_experts_into(out, *{**p, "w_in_EDG": list(p["w_in_EDG"]),
                                  "w_out_EFD": list(p["w_out_EFD"])}.values(),
                           _swiglu, kind)
    torch.testing.assert_close(out, want + 1, atol=1e-5, rtol=1e-4)


# -- grouped_mm ---------------------------------------------------------------------------


def test_grouped_mm_refuses_bad_shapes():
    x, w = torch.randn(6, 8), torch.randn(3, 8, 4)
    off = torch.tensor([2, 4, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"w_EDN.shape=\(8, 4\).*3-D \[E, D, N\]"):
        grouped_mm(x, w[0], off)  # ran another grouping and returned [3, 6, 4]
    with pytest.raises(ValueError, match=r"w_EDN.shape=\(3, 8, 4\).*D=x_SD.shape\[1\]=7"):
        grouped_mm(x[:, :7], w, off)
    with pytest.raises(ValueError, match=r"x_SD.shape=\(1, 6, 8\)"):
        grouped_mm(x[None], w, off)
    with pytest.raises(ValueError, match=r"offsets_E.dtype=torch.int64.*int32"):
        grouped_mm(x, w, off.long())
    with pytest.raises(ValueError, match=r"offsets_E.shape=\(2,\).*\(3,\)"):
        grouped_mm(x, w, off[:2])


def test_grouped_mm_valid_input_still_runs_forward_and_backward():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(3, 8, 4, generator=g, requires_grad=True)
    off = torch.tensor([2, 2, 6], dtype=torch.int32)  # expert 1 has no rows
    y = grouped_mm(x, w, off)
    want = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    torch.testing.assert_close(y, want)
    gy = torch.randn(6, 4, generator=g)
    got = torch.autograd.grad(y, (x, w), gy)
    ref = torch.autograd.grad(want, (x, w), gy)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)


# -- the Triton wrappers (their checks run before any kernel, on any device) --------------


def _triton_problem():
    p = _problem()
    p["w_in_EDG"] = torch.randn(E, D, 2 * 16) / D ** 0.5  # F=16: the kernels' smallest tile
    p["w_out_EFD"] = torch.randn(E, 16, D) / 4
    return p


@pytest.mark.parametrize("changes,match", [
    ({"b_in_EG": torch.ones(E, 5)}, r"b_in_EG.shape=\(3, 5\).*must be \(3, 32\)"),
    ({"b_in_EG": torch.ones(2, 32)}, r"b_in_EG.shape=\(2, 32\)"),
    ({"b_out_ED": torch.ones(E, 3)}, r"b_out_ED.shape=\(3, 3\).*must be \(3, 8\)"),
    ({"token_S": torch.tensor([[0, 2, 1], [3, 4, 0]]), "weight_S": torch.rand(2, 3)},
     r"token_S.shape=\(2, 3\).*1-D"),
    ({"token_S": torch.tensor([0., 2., 1., 3., 4., 0.])}, r"token_S.dtype=torch.float32"),
    ({"offsets_E": torch.tensor([2.5, 4.5, 6.5])}, r"offsets_E.dtype=torch.float32"),
    ({"x_TD": torch.ones(T, D, dtype=torch.long)}, r"x_TD.dtype=torch.int64.*floating"),
    ({"x_TD": [[0.0] * D] * T}, r"x_TD=list.*torch.Tensor"),
], ids=["b_in_width", "b_in_experts", "b_out_width", "token_2d", "token_float",
        "offsets_float", "x_int", "x_list"])
def test_triton_experts_refuse_bad_arguments(changes, match):
    pytest.importorskip("triton")
    from moekit.functions.experts import fused_experts as triton_experts

    with pytest.raises(ValueError, match=match):
        triton_experts(*{**_triton_problem(), **changes}.values())


@pytest.mark.parametrize("kwargs,match", [
    ({"top_k": True}, r"top_k=True is not allowed: it must be an int in \[1, 4\]"),
    ({"top_k": 2.0}, r"top_k=2.0"),
    ({"top_k": 5}, r"top_k=5"),
    ({"bias_E": torch.zeros(3), "score": "sigmoid"}, r"bias_E.shape=\(3,\).*\(E,\) = \(4,\)"),
    ({"bias_E": torch.zeros(6), "score": "sigmoid"}, r"bias_E.shape=\(6,\)"),
    ({"bias_E": [0.0] * 4}, r"bias_E=list"),
    ({"scale": float("nan")}, r"scale=nan is not allowed: it must be a finite number"),
    ({"scale": "2"}, r"scale='2'"),
    ({"renormalize": "False"}, r"renormalize='False' is not allowed: it must be True or False"),
    ({"score": "tanh"}, r"score='tanh'"),
    ({"logits_TE": torch.randn(1, 5, 4)}, r"logits_TE.shape=\(1, 5, 4\)"),
    ({"logits_TE": [[0.0] * 4] * 5}, r"logits_TE=list"),
], ids=["k_bool", "k_float", "k_too_big", "bias_short", "bias_long", "bias_list", "scale_nan",
        "scale_str", "renormalize_str", "score_unknown", "logits_3d", "logits_list"])
def test_triton_routing_refuses_bad_arguments(kwargs, match):
    pytest.importorskip("triton")
    from moekit.functions.routing import fused_dispatch, fused_topk

    args = {"logits_TE": torch.randn(5, 4), "top_k": 2, **kwargs}
    for fn in (fused_topk, fused_dispatch):
        with pytest.raises(ValueError, match=match):
            fn(**args)


def _interpreted():
    """Skip unless the Triton kernels run interpreted here (no CUDA: tests/conftest.py)."""
    pytest.importorskip("triton")
    from moekit.kernels.common import INTERPRET

    if not INTERPRET:
        pytest.skip("the Triton kernels are compiled here (tests/test_triton_gpu.py)")


def test_triton_valid_input_still_runs(monkeypatch):
    _interpreted()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from moekit.functions.experts import fused_experts as triton_experts
    from moekit.functions.routing import fused_topk
    from moekit.routing.token_choice import sigmoid_topk

    logits_TE, bias_E = torch.randn(5, 4), torch.randn(4) * 0.2
    got = fused_topk(logits_TE, 2, "sigmoid", bias_E=bias_E, scale=2.5)
    want = sigmoid_topk(logits_TE, 2, bias_E=bias_E, renormalize=True, scale=2.5)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    p = _triton_problem()
    p["b_in_EG"], p["b_out_ED"] = torch.randn(E, 32) / 4, torch.randn(E, D) / 4
    y = triton_experts(*p.values())
    ref = torch.zeros(T, D)
    for e, (s, t) in enumerate(zip([0, 2, 4], [2, 4, 6], strict=True)):
        tok = p["token_S"][s:t]
        h = p["x_TD"][tok] @ p["w_in_EDG"][e] + p["b_in_EG"][e]
        ref.index_add_(0, tok, p["weight_S"][s:t, None]
                       * (_swiglu(h) @ p["w_out_EFD"][e] + p["b_out_ED"][e]))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)

