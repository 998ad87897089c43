"""Triton kernels on CPU through the interpreter (TRITON_INTERPRET=1), against plain torch.

The interpreter runs every program in Python (about 1.5 s for one forward and
backward at these sizes on 2 cores), so the shapes are tiny but odd: T=1, K=E,
an expert with no tokens, every token on one expert, dropped rows, sizes that
span several tiles. The oracle below computes each routed row on its own in
fp64 with plain torch ops (no sorting, no grouped GEMM).

On a CUDA machine this module is skipped (tests/test_triton_gpu.py runs the
compiled kernels there) unless MOEKIT_TEST_INTERPRET=1: triton chooses
interpreted or compiled once per process, when it and moekit.kernels are first
imported, which tests/conftest.py does under TRITON_INTERPRET=1.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU kinds else
F, E experts, K experts per token, S routed rows.
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("MOEKIT_TEST_INTERPRET") != "1":
    pytest.skip("CUDA present: tests/test_triton_gpu.py covers the compiled kernels",
                allow_module_level=True)

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")


def _set_interpret(value: str | None) -> None:
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value


_set_interpret("1")  # in case conftest.py did not import the kernels already
try:
    pytest.importorskip("triton")
    from moekit import MoE, MoEConfig
    from moekit.dispatch.plan import RoutingPlan
    from moekit.dispatch.sort import sort_by_expert
    from moekit.experts.backends import BACKENDS
    from moekit.functions.experts import fused_experts, fused_experts_fwd
    from moekit.functions.routing import fused_dispatch, fused_route, fused_topk
    from moekit.kernels.common import INTERPRET
    from moekit.routing.token_choice import sigmoid_topk, softmax_topk
    from tests.reference import assert_valid_selection, ref_selection_key
    from tests.triton_oracle import CASES, DTYPES, check_case, make_inputs
finally:
    _set_interpret(_PREV_INTERPRET)

if not INTERPRET:
    pytest.skip("moekit.kernels was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def interpret_env():
    """The interpreter also reads TRITON_INTERPRET while it runs: set it for this module only."""
    _set_interpret("1")
    yield
    _set_interpret(_PREV_INTERPRET)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_experts_match_oracle(case, dtype, atol, rtol):
    check_case(case, dtype, atol, rtol)


def test_experts_bf16_upcast():
    # The interpreter's tl.dot on bf16 returns wrong values (triton 3.9), so under
    # TRITON_INTERPRET the kernels upcast bf16 tiles to fp32 before each dot
    # (kernels/common.needs_upcast): this checks the bf16 loads, stores and casts.
    check_case(CASES[2], torch.bfloat16, 5e-2, 5e-2)


def test_same_precision_bound_catches_a_wrong_kernel(monkeypatch):
    """The GPU tests' fp16 / bf16 bound (check_case's same_precision_factor) passes the
    kernel held to it alone and fails one whose last routed row has a 10% wrong weight."""
    import tests.triton_oracle as oracle

    case = (64, 48, 40, 8, 2, "swiglu_oai", True, None, ())
    check_case(case, torch.float16, 0.0, 0.0, same_precision_factor=4.0)  # bound only

    def wrong_weight(x, token_S, weight_S, *rest):
        weight_S = torch.cat([weight_S[:-1], 0.9 * weight_S[-1:]])
        return fused_experts(x, token_S, weight_S, *rest)

    monkeypatch.setattr(oracle, "fused_experts", wrong_weight)
    with pytest.raises(AssertionError, match="same-precision torch reference"):
        check_case(case, torch.float16, 1e-2, 1e-2, same_precision_factor=4.0)


def test_layer_triton_backend_matches_loop():
    """The "triton" backend inside MoE, all gradients, against the "loop" backend."""
    cfg = MoEConfig(dim=24, ffn_dim=20, num_experts=5, top_k=2, expert_bias=True)
    torch.manual_seed(0)
    ref = MoE(cfg, backend="loop")
    fused = MoE(cfg, backend="triton")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 24)
    outs = []
    for moe in (ref, fused):
        y, aux, _ = moe(x)
        (y.square().sum() + aux).backward()
        outs.append([y, *(p.grad for p in moe.parameters())])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unknown_activation_falls_back():
    d, _, x, w_in, w_out, _, _ = make_inputs(*CASES[1][:6], False, None, (), torch.float32)
    act = lambda h: torch.tanh(h[:, :20]) * h[:, 20:]  # noqa: E731
    got = BACKENDS["triton"](x, d, w_in, w_out, None, None, act)
    want = BACKENDS["loop"](x, d, w_in, w_out, None, None, act)
    torch.testing.assert_close(got, want)


def test_bad_arguments_raise():
    d, _, x, w_in, w_out, _, _ = make_inputs(*CASES[0], torch.float32)
    args = (d.token_S, d.weight_S, d.offsets_E)
    with pytest.raises(ValueError, match="act='tanh'"):
        fused_experts(x, *args, w_in, w_out, None, None, "tanh")
    with pytest.raises(ValueError, match=r"x_TD.shape=\(1, 15\)"):
        fused_experts(x[:, :15], *args, w_in, w_out, None, None)
    with pytest.raises(ValueError, match=r"w_out_EFD.shape=\(4, 8, 15\)"):
        fused_experts(x, *args, w_in, w_out[..., :15], None, None)
    with pytest.raises(ValueError, match=r"w_out_EFD.shape=\(4, 8, 16\).*must be \(4, 16, 16\)"):
        fused_experts(x, *args, w_in, w_out, None, None, "relu2")


# -- routing ------------------------------------------------------------------------------

ROUTES = [
    # (T, E, K, score, bias, renormalize, scale)
    (1, 4, 2, "softmax", False, True, 1.0),  # a single token
    (13, 7, 7, "softmax", True, True, 1.0),  # K == E, prime E
    (21, 8, 2, "softmax", False, False, 1.0),  # Qwen2-MoE: no renormalisation
    (19, 6, 3, "sigmoid", True, True, 2.5),  # DeepSeek-V3: bias, routed scaling
    (5, 3, 1, "sigmoid", False, False, 1.0),
]


def _route_ref(logits_TE, K, score, bias_E, renorm, scale):
    fn = softmax_topk if score == "softmax" else sigmoid_topk
    experts_TK, weights_TK, _ = fn(logits_TE, K, bias_E=bias_E, renormalize=renorm, scale=scale)
    scores_TE = logits_TE.softmax(-1) if score == "softmax" else logits_TE.sigmoid()
    return experts_TK, weights_TK, scores_TE


@pytest.mark.parametrize("T,E,K,score,bias,renorm,scale", ROUTES)
def test_fused_topk_matches_router(T, E, K, score, bias, renorm, scale):
    g = torch.Generator().manual_seed(T)
    logits_TE = torch.randn(T, E, generator=g, requires_grad=True)
    bias_E = torch.randn(E, generator=g) * 0.2 if bias else None
    got = fused_topk(logits_TE, K, score, bias_E=bias_E, renormalize=renorm, scale=scale)
    want = _route_ref(logits_TE, K, score, bias_E, renorm, scale)
    assert torch.equal(got[0], want[0])
    dw_TK, ds_TE = torch.randn(T, K, generator=g), torch.randn(T, E, generator=g)
    grads = [torch.autograd.grad((out[1] * dw_TK).sum() + (out[2] * ds_TE).sum(), logits_TE)[0]
             for out in (got, want)]
    for a, b in zip((*got[1:], grads[0]), (*want[1:], grads[1]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score,scale,bias", [
    ("softmax", 1e4, False),  # fp32 probabilities: one 1.0, the rest 0.0
    ("softmax", 300.0, True),  # gaps of ~100-700: 0 in fp32, still ordered in fp64
    ("sigmoid", 100.0, False),  # fp32 sigmoid: 1.0 above ~17, 0.0 below ~-103
    ("sigmoid", 100.0, True),
])
def test_fused_topk_follows_the_fp64_rule(score, scale, bias):
    """The kernel selects like routing/token_choice.py, checked against the fp64 rule."""
    T, E, K = 48, 16, 4
    g = torch.Generator().manual_seed(3)
    logits_TE = torch.randn(T, E, generator=g) * scale
    bias_E = torch.randint(-3, 4, (E,), generator=g) * 1e-3 if bias else None
    experts_TK, weights_TK, _ = fused_topk(logits_TE, K, score, bias_E=bias_E)
    assert_valid_selection(experts_TK, ref_selection_key(logits_TE, score, bias_E))
    lg_TK = logits_TE.double().gather(1, experts_TK)
    u_TK = lg_TK if score == "softmax" else torch.nn.functional.logsigmoid(lg_TK)
    torch.testing.assert_close(weights_TK.double(), u_TK.softmax(-1), atol=1e-6, rtol=1e-5)


def test_fused_topk_renormalises_underflowed_sigmoid():
    logits_TE = (-200.0 + torch.randn(8, 6, generator=torch.Generator().manual_seed(4)))
    logits_TE.requires_grad_()
    got = fused_topk(logits_TE, 3, "sigmoid")
    want = sigmoid_topk(logits_TE, 3, bias_E=None)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1].sum(-1), torch.ones(8))  # was 0: 0 / clamp(0)
    dw_TK = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    grads = [torch.autograd.grad((out[1] * dw_TK).sum(), logits_TE)[0] for out in (got, want)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("T,E,K", [(1, 4, 2), (23, 5, 5), (40, 6, 2)])
def test_fused_dispatch_matches_sort(T, E, K):
    g = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(T, E, generator=g)
    logits_TE[:, 1] = -30.0 if K < E else logits_TE[:, 1]  # expert 1 gets no token
    d, experts_TK, _ = fused_dispatch(logits_TE, K)
    _, weights_TK, probs_TE = softmax_topk(logits_TE, K)
    plan = RoutingPlan(token_S=torch.arange(T).repeat_interleave(K),
                       expert_S=experts_TK.reshape(-1), weight_S=weights_TK.reshape(-1),
                       probs_TE=probs_TE, logits_TE=logits_TE, top_k=K)
    ref = sort_by_expert(plan, E, None)
    assert torch.equal(d.token_S, ref.token_S)
    assert torch.equal(d.counts_E, ref.counts_E)
    assert torch.equal(d.offsets_E, ref.offsets_E) and d.offsets_E.dtype == torch.int32
    torch.testing.assert_close(d.weight_S, ref.weight_S, atol=1e-6, rtol=1e-5)


def test_fused_topk_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k=5"):
        fused_topk(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="score='tanh'"):
        fused_topk(torch.randn(3, 4), 2, "tanh")


# -- torch.compile and the custom-op contract -----------------------------------------------


def test_compile_fullgraph_forward_backward():
    """Route, dispatch and experts trace as one graph (fake kernels, no host sync)."""
    T, D, F_, E, K = 7, 16, 16, 4, 2
    g = torch.Generator().manual_seed(0)
    w_r = torch.randn(E, D, generator=g, requires_grad=True)
    w_in = (torch.randn(E, D, 2 * F_, generator=g) / 4).requires_grad_()
    w_out = (torch.randn(E, F_, D, generator=g) / 4).requires_grad_()

    def step(x_TD):
        d, _, _ = fused_dispatch(x_TD @ w_r.t(), K)
        y = fused_experts(x_TD, d.token_S, d.weight_S, d.offsets_E, w_in, w_out, None, None)
        return y.square().sum()

    x = torch.randn(T, D, generator=g)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    grads = torch.autograd.grad(loss, (w_r, w_in, w_out))
    loss_ref = step(x)
    grads_ref = torch.autograd.grad(loss_ref, (w_r, w_in, w_out))
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_opcheck_fused_route():
    logits_TE = torch.randn(9, 5, requires_grad=True)
    torch.library.opcheck(fused_route, (logits_TE, torch.randn(5), 2, "sigmoid", True, 2.0),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_opcheck_fused_experts():
    d, _, x, w_in, w_out, b_in, b_out = make_inputs(*CASES[0][:6], True, None, (), torch.float32)
    args = (x.detach().requires_grad_(), d.token_S, d.weight_S.detach(), d.offsets_E, w_in,
            w_out, b_in, b_out, "swiglu", 7.0, 1.702, True)
    torch.library.opcheck(fused_experts_fwd, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_wide_tiles_only_for_16_bit_and_many_rows_per_expert():
    """The autotuners' pruning (moekit.kernels.grouped._prune): the WIDE_* tiles join the
    search only for fp16 / bf16 inputs with MIN_WIDE_ROWS or more rows per expert."""
    import triton

    from moekit.kernels import grouped

    for base, wide in [(grouped.BASE_ROW, grouped.WIDE_SCATTER),
                       (grouped.BASE_ROW, grouped.WIDE_DOWN_BWD),
                       (grouped.BASE_WGRAD, grouped.WIDE_WGRAD)]:
        assert not set(base) & set(wide)
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                                 num_stages=s) for m, n, k, w, s in base + wide]
        prune = grouped._prune(base)["early_config_prune"]

        def kept(dtype, rows, prune=prune, configs=configs):
            args = {"M": 8, "a_ptr": torch.zeros(2, dtype=dtype), "M_BUCKET": rows}
            return [grouped.config_shape(c) for c in prune(configs, args)]

        rows = grouped.MIN_WIDE_ROWS
        assert kept(torch.bfloat16, rows) == base + wide
        assert kept(torch.float16, 4 * rows) == base + wide
        assert kept(torch.bfloat16, rows // 2) == base
        assert kept(torch.float32, 4 * rows) == base
