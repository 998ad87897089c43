"""Triton kernels on CPU through the interpreter (TRITON_INTERPRET=1), against plain torch.

The interpreter runs every program in Python (about 1.5 s for one forward and
backward at these sizes on 2 cores), so the shapes are tiny but odd: T=1, K=E,
an expert with no tokens, every token on one expert, dropped rows, sizes that
span several tiles. The oracle below computes each routed row on its own in
fp64 with plain torch ops (no sorting, no grouped GEMM).

On a CUDA machine this module is skipped (tests/test_triton_gpu.py runs the
compiled kernels there) unless MOEKIT_TEST_INTERPRET=1: triton.jit chooses
interpreted or compiled when moekit.kernels is imported, once per process.

Shape letters: T tokens, D hidden, F expert hidden, G = 2F for GLU kinds else
F, E experts, K experts per token, S routed rows.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if torch.cuda.is_available() and os.environ.get("MOEKIT_TEST_INTERPRET") != "1":
    pytest.skip("CUDA present: tests/test_triton_gpu.py covers the compiled kernels",
                allow_module_level=True)

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before moekit.kernels: triton.jit decides at import
pytest.importorskip("triton")

from moekit import MoE, MoEConfig  # noqa: E402
from moekit.dispatch.plan import RoutingPlan  # noqa: E402
from moekit.dispatch.sort import sort_by_expert  # noqa: E402
from moekit.experts.backends import BACKENDS  # noqa: E402
from moekit.functions.experts import fused_experts, fused_experts_fwd  # noqa: E402
from moekit.functions.routing import fused_dispatch, fused_topk  # noqa: E402
from moekit.kernels.common import INTERPRET  # noqa: E402
from moekit.routing.token_choice import sigmoid_topk, softmax_topk  # noqa: E402

if not INTERPRET:
    pytest.skip("moekit.kernels was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)


def _set_interpret(value: str | None) -> None:
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value


_set_interpret(_PREV_INTERPRET)


@pytest.fixture(autouse=True, scope="module")
def interpret_env():
    """The interpreter also reads TRITON_INTERPRET while it runs: set it for this module only."""
    _set_interpret("1")
    yield
    _set_interpret(_PREV_INTERPRET)


# -- the oracle ---------------------------------------------------------------------------

LIMIT, ALPHA = 1.5, 1.702  # a small swiglu_oai clamp so that some values hit it


def act_ref(h_SG: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu2":
        return F.relu(h_SG) ** 2
    if kind == "gelu":
        return F.gelu(h_SG)
    g, u = h_SG.chunk(2, dim=-1)
    if kind == "swiglu":
        return F.silu(g) * u
    if kind == "geglu":
        return F.gelu(g) * u
    g, u = g.clamp(max=LIMIT), u.clamp(-LIMIT, LIMIT)
    return g * torch.sigmoid(ALPHA * g) * (u + 1)


def experts_ref(x_TD, d, w_in, w_out, b_in, b_out, kind):
    """Each kept row alone, fp64: y[token] += weight * expert(x[token])."""
    S, E = d.token_S.shape[0], w_in.shape[0]
    expert_S = torch.searchsorted(d.offsets_E.long(), torch.arange(S), right=True)
    kept = expert_S < E
    tok, e, wt = d.token_S[kept], expert_S[kept], d.weight_S[kept].double()
    h = torch.einsum("sd,sdg->sg", x_TD.double()[tok], w_in.double()[e])
    if b_in is not None:
        h = h + b_in.double()[e]
    y = torch.einsum("sf,sfd->sd", act_ref(h, kind), w_out.double()[e])
    if b_out is not None:
        y = y + b_out.double()[e]
    return torch.zeros(x_TD.shape, dtype=torch.float64).index_add(0, tok, wt[:, None] * y)


# -- cases --------------------------------------------------------------------------------

CASES = [
    # (T, D, F, E, K, act, bias, capacity, empty)   what it exercises
    (1, 16, 8, 4, 1, "swiglu", False, None, ()),  # a single token, 3 idle experts
    (6, 24, 20, 5, 5, "swiglu", True, None, ()),  # K == E: every expert sees every token
    (9, 40, 36, 7, 2, "geglu", False, None, (3,)),  # prime E, expert 3 gets none, 2 tiles in D, F
    (16, 24, 12, 4, 2, "swiglu_oai", True, 5, ()),  # capacity drops rows; clamps active
    (11, 20, 33, 3, 2, "relu2", True, None, ()),  # non-GLU, odd F
    (8, 16, 16, 3, 1, "gelu", False, None, (0, 1)),  # every token to expert 2
]

DTYPES = [
    # (dtype, atol, rtol): against the fp64 oracle
    (torch.float32, 1e-5, 1e-4),
    (torch.float16, 1e-2, 1e-2),
]


def make_inputs(T, D, F_, E, K, act, bias, capacity, empty, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = 2 * F_ if act in ("swiglu", "geglu", "swiglu_oai") else F_
    logits_TE = torch.randn(T, E, generator=g)
    logits_TE[:, list(empty)] = float("-inf")
    experts_TK = logits_TE.topk(K, dim=-1).indices
    weights_TK = torch.rand(T, K, generator=g).requires_grad_()
    plan = RoutingPlan(token_S=torch.arange(T).repeat_interleave(K),
                       expert_S=experts_TK.reshape(-1), weight_S=weights_TK.reshape(-1),
                       probs_TE=logits_TE.softmax(-1), logits_TE=logits_TE, top_k=K)
    d = sort_by_expert(plan, E, capacity)
    params = [torch.randn(T, D, generator=g),
              torch.randn(E, D, G, generator=g) / D ** 0.5,
              torch.randn(E, F_, D, generator=g) / F_ ** 0.5,
              torch.randn(E, G, generator=g) if bias else None,
              torch.randn(E, D, generator=g) if bias else None]
    x, w_in, w_out, b_in, b_out = (None if p is None else p.to(dtype).requires_grad_()
                                   for p in params)
    return d, weights_TK, x, w_in, w_out, b_in, b_out


def check_case(case, dtype, atol, rtol):
    d, weights_TK, *tensors = make_inputs(*case, dtype)
    act = case[5]
    leaves = [t for t in (weights_TK, *tensors) if t is not None]
    x, w_in, w_out, b_in, b_out = tensors
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y = fused_experts(x, d.token_S, d.weight_S, d.offsets_E, w_in, w_out, b_in, b_out, act,
                      LIMIT, ALPHA)
    assert y.dtype == dtype
    got = torch.autograd.grad(y, leaves, dy.to(dtype), retain_graph=True)  # weight_S is shared
    y_ref = experts_ref(x, d, w_in, w_out, b_in, b_out, act)
    want = torch.autograd.grad(y_ref, leaves, dy.double())
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    names = ["weights_TK", "x", "w_in", "w_out", "b_in", "b_out"]
    names = [n for n, t in zip(names, (weights_TK, *tensors), strict=True) if t is not None]
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol,
                                   msg=lambda m, n=name:
                                   f"d{n}: {m}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_experts_match_oracle(case, dtype, atol, rtol):
    check_case(case, dtype, atol, rtol)


def test_experts_bf16_upcast():
    # The interpreter's tl.dot on bf16 returns wrong values (triton 3.9), so under
    # TRITON_INTERPRET the kernels upcast bf16 tiles to fp32 before each dot
    # (kernels/common.needs_upcast): this checks the bf16 loads, stores and casts.
    check_case(CASES[2], torch.bfloat16, 5e-2, 5e-2)


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


def test_bad_activation_raises():
    d, _, x, w_in, w_out, _, _ = make_inputs(*CASES[0], torch.float32)
    with pytest.raises(ValueError, match="act='tanh'"):
        fused_experts(x, d.token_S, d.weight_S, d.offsets_E, w_in, w_out, None, None, "tanh")


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


def test_opcheck_fused_experts():
    d, _, x, w_in, w_out, b_in, b_out = make_inputs(*CASES[0][:6], True, None, (), torch.float32)
    args = (x.detach().requires_grad_(), d.token_S, d.weight_S.detach(), d.offsets_E, w_in,
            w_out, b_in, b_out, "swiglu", 7.0, 1.702, True)
    torch.library.opcheck(fused_experts_fwd, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
