"""Shared oracle and cases for the Triton kernel tests (CPU interpreter and GPU).

The oracle computes each routed row on its own in fp64 with plain torch ops:
no sorting by expert, no grouped GEMM, no fused activation. Shape letters: T
tokens, D hidden, F expert hidden, G = 2F for GLU kinds else F, E experts,
K experts per token, S routed rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.dispatch.plan import RoutingPlan
from moekit.dispatch.sort import sort_by_expert
from moekit.functions.experts import fused_experts

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


def experts_ref(x_TD, d, w_in, w_out, b_in, b_out, kind, dtype=torch.float64):
    """Each kept row alone: y[token] += weight * expert(x[token]), computed in ``dtype``
    (fp64 for the oracle; the inputs' own dtype for the same-precision reference)."""
    S, E = d.token_S.shape[0], w_in.shape[0]
    rows = torch.arange(S, device=x_TD.device)
    expert_S = torch.searchsorted(d.offsets_E.long(), rows, right=True)
    kept = expert_S < E
    tok, e, wt = d.token_S[kept], expert_S[kept], d.weight_S[kept].to(dtype)
    h = torch.einsum("sd,sdg->sg", x_TD.to(dtype)[tok], w_in.to(dtype)[e])
    if b_in is not None:
        h = h + b_in.to(dtype)[e]
    y = torch.einsum("sf,sfd->sd", act_ref(h, kind), w_out.to(dtype)[e])
    if b_out is not None:
        y = y + b_out.to(dtype)[e]
    y_TD = torch.zeros(x_TD.shape, dtype=dtype, device=x_TD.device)
    return y_TD.index_add(0, tok, wt[:, None] * y)


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


def make_inputs(T, D, F_, E, K, act, bias, capacity, empty, dtype, seed=0, device="cpu"):
    """(Dispatch, weights_TK leaf, x, w_in, w_out, b_in, b_out): random routing, then
    sort_by_expert; gradients reach weights_TK through dispatch.weight_S."""
    g = torch.Generator().manual_seed(seed)
    G = 2 * F_ if act in ("swiglu", "geglu", "swiglu_oai") else F_
    logits_TE = torch.randn(T, E, generator=g)
    logits_TE[:, list(empty)] = float("-inf")
    experts_TK = logits_TE.topk(K, dim=-1).indices
    weights_TK = torch.rand(T, K, generator=g).to(device).requires_grad_()
    plan = RoutingPlan(token_S=torch.arange(T, device=device).repeat_interleave(K),
                       expert_S=experts_TK.reshape(-1).to(device),
                       weight_S=weights_TK.reshape(-1), probs_TE=logits_TE.softmax(-1),
                       logits_TE=logits_TE, top_k=K)
    d = sort_by_expert(plan, E, capacity)
    params = [torch.randn(T, D, generator=g),
              torch.randn(E, D, G, generator=g) / D ** 0.5,
              torch.randn(E, F_, D, generator=g) / F_ ** 0.5,
              torch.randn(E, G, generator=g) if bias else None,
              torch.randn(E, D, generator=g) if bias else None]
    x, w_in, w_out, b_in, b_out = (None if p is None else p.to(device, dtype).requires_grad_()
                                   for p in params)
    return d, weights_TK, x, w_in, w_out, b_in, b_out


def check_case(case, dtype, atol, rtol, device="cpu", same_precision_factor=None):
    """Output and every gradient of fused_experts against the fp64 oracle.

    A tensor passes within (atol, rtol). With ``same_precision_factor`` (fp16/bf16 on a
    GPU) a tensor outside them still passes when the kernel's largest error is at most
    that factor times the largest error of ``experts_ref`` run in ``dtype`` itself (plain
    torch ops, the same inputs): at large T or D a fixed tolerance fails on sums that
    cancel to near zero, and at a clamp's kink (swiglu_oai) a pre-activation rounded to
    fp16 falls on the other side of the limit than its fp64 value, in either
    implementation. A wrong kernel is far worse than the plain same-precision one."""
    d, weights_TK, *tensors = make_inputs(*case, dtype, device=device)
    act = case[5]
    leaves = [t for t in (weights_TK, *tensors) if t is not None]
    x, w_in, w_out, b_in, b_out = tensors
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    y = fused_experts(x, d.token_S, d.weight_S, d.offsets_E, w_in, w_out, b_in, b_out, act,
                      LIMIT, ALPHA)
    assert y.dtype == dtype
    got = torch.autograd.grad(y, leaves, dy.to(dtype), retain_graph=True)  # weight_S is shared
    y_ref = experts_ref(x, d, w_in, w_out, b_in, b_out, act)
    want = torch.autograd.grad(y_ref, leaves, dy.double(), retain_graph=True)
    same = None
    if same_precision_factor is not None:
        y_same = experts_ref(x, d, w_in, w_out, b_in, b_out, act, dtype)
        same = (y_same, *torch.autograd.grad(y_same, leaves, dy.to(dtype)))
    names = ["weights_TK", "x", "w_in", "w_out", "b_in", "b_out"]
    names = ["y"] + [n for n, t in zip(names, (weights_TK, *tensors), strict=True)
                     if t is not None]
    for i, (name, a, b) in enumerate(zip(names, (y, *got), (y_ref, *want), strict=True)):
        a, b = a.double(), b.double()
        if same is not None and not torch.allclose(a, b, atol=atol, rtol=rtol):
            err, err_same = (a - b).abs().max().item(), (same[i].double() - b).abs().max().item()
            step = torch.finfo(dtype).eps * b.square().mean().sqrt().item()
            print(f"{name}: max error {err:.3g}, same-precision torch {err_same:.3g}, "
                  f"step {step:.3g}, ratio {err / max(err_same, step):.2f}")
            assert err <= same_precision_factor * max(err_same, step), (
                f"{name}: max error {err:.3g} against the fp64 oracle is over "
                f"{same_precision_factor} x max(the same-precision torch reference's "
                f"{err_same:.3g}, one rounding step {step:.3g})")
            continue
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{'d' * (n != 'y')}{n}: {m}")
