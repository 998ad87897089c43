"""Numerical edge cases of the MoE layer as a demanding user meets them, on every backend
and router, against the per-token reference (tests/reference.py: ties to the lower
index, a NaN score last where tokens are ranked): ties in the router's scores (a zero
router, zero tokens), NaN / inf / 1e30 tokens (their own output only), determinism,
infer against forward within a derived fp32 rounding bound, fp16 / bf16 overflow,
zero and one token, quantized experts.

Shape letters: T tokens, D hidden, E experts, K experts per token, R rows, N candidates.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import moekit
from moekit import MoE, MoEConfig
from moekit.routing import topk
from moekit.routing.topk import top_indices
from tests.reference import ref_moe

D, F, E = 32, 16, 8


def _oracle_top(row: list[float], k: int) -> list[int]:
    """The k largest, largest first, equal values in index order, NaN the largest."""
    return sorted(range(len(row)), key=lambda i: (not math.isnan(row[i]),
                                                  -row[i] if not math.isnan(row[i]) else 0,
                                                  i))[:k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("everywhere", [False, True], ids=["cpu", "compiled"])
@pytest.mark.parametrize("N,k", [(8, 1), (8, 2), (8, 7), (8, 8), (5, 3), (64, 8)])
def test_top_indices_ties_go_to_the_lower_index(N, k, everywhere, dtype, monkeypatch):
    """Keys of a few values (most rows tie at the k-th), +-inf, one NaN in some rows;
    ``everywhere``: the path of CUDA and torch.compile, which recomputes every tied row
    without asking the host whether any row ties."""
    if everywhere:
        monkeypatch.setattr(topk.torch.compiler, "is_compiling", lambda: True)
    gen = torch.Generator().manual_seed(N * 100 + k)
    key_RN = torch.randint(-2, 3, (200, N), generator=gen).to(dtype)
    key_RN[3] = 0.0  # a zero router, a zero token
    key_RN[5, 1] = float("inf")
    key_RN[6, :2] = float("-inf")
    if k >= 2:  # one NaN: topk counts it as the largest, so the tie rule still decides
        key_RN[7::9, N // 2] = float("nan")
    got = top_indices(key_RN, k)
    want = [_oracle_top(row, k) for row in key_RN.tolist()]
    assert got.tolist() == want


# -- ties reach the layer: forward, infer and the reference choose the same experts --------

TIE_ROUTERS = {
    "softmax": dict(router="softmax"),
    "softmax_unnormalised": dict(router="softmax", renormalize=False),
    "softmax_topk": dict(router="softmax_topk"),
    "sigmoid": dict(router="sigmoid"),
    "sigmoid_bias": dict(router="sigmoid", bias_update_rate=0.01),  # bias 0: ties remain
    "switch": dict(router="switch", top_k=1),
    "noisy_topk": dict(router="noisy_topk"),
    "softmax_groups": dict(router="softmax", num_groups=4, topk_groups=2),
    "sigmoid_groups": dict(router="sigmoid", num_groups=4, topk_groups=2),
    "expert_choice": dict(router="expert_choice"),
}


def _tied_layer(over: dict, backend: str, case: str) -> tuple[MoE, torch.Tensor]:
    """Expert biases make every expert's output differ even for a zero token, so the
    choice among tied experts shows in the output."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=over.pop("top_k", 2),
                        expert_bias=True, **over), backend=backend).eval()
    with torch.no_grad():
        moe.experts.b_in.normal_()
        moe.experts.b_out.normal_()
        if case == "zero router":
            moe.router.weight.zero_()
    x = torch.randn(11, D)
    x[[2, 7]] = 0.0  # zero (padding) tokens: every logit 0
    return moe, x


@pytest.mark.parametrize("case", ["zero router", "zero tokens"])
@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm"])
@pytest.mark.parametrize("name", list(TIE_ROUTERS))
def test_tied_scores_route_as_the_reference_in_forward_and_infer(name, backend, case):
    """torch.topk broke ties by its algorithm (experts [6, 5] of 8 for a zero row) where
    the reference and infer's decode kernel take the lower index: a zero-initialised
    router sent every token elsewhere in forward than in infer (max difference 5.7 on
    outputs of 3.8), and zero tokens differed with expert biases."""
    moe, x = _tied_layer(dict(TIE_ROUTERS[name]), backend, case)
    want, _, _ = ref_moe(moe, x)
    xg = x.clone().requires_grad_()  # the training backends' forward
    got = moe(xg).output.detach()
    with torch.inference_mode():
        inferred = moe.infer(x)
    bound = 1e-5 + 1e-4 * want.abs().max().item()  # test_layer's fp32 tolerance
    assert (got - want).abs().max().item() <= bound
    assert (inferred - want).abs().max().item() <= bound


# -- a NaN token's score ranks last where tokens compete for capacity ---------------------

NAN_RANKED = {
    "expert_choice": dict(router="expert_choice"),
    "expert_choice_tight": dict(router="expert_choice", capacity_factor=0.5),  # C = 1
    "probability": dict(router="softmax", capacity_factor=1.0, drop_policy="probability"),
}


@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm"])
@pytest.mark.parametrize("name", list(NAN_RANKED))
def test_a_nan_token_takes_no_capacity_from_finite_ones(name, backend):
    """Expert choice and the probability drop policy rank tokens by score, and a NaN
    score ranked first (topk and a descending sort put NaN on top): one token with a
    NaN took a slot of every expert, and at capacity 1 every slot, zeroing the output
    of the 12 other tokens. A NaN score now ranks last, as in the reference."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=2, **NAN_RANKED[name]),
              backend=backend).eval()
    x = torch.randn(13, D)
    x[6, 3] = float("nan")
    good = torch.arange(13) != 6
    y = moe(x.clone().requires_grad_()).output.detach()
    want, _, (pairs, keep) = ref_moe(moe, x)
    if name.startswith("expert_choice"):  # (the case at stake: it lost every contest)
        assert not any(k for (t, _, _), k in zip(pairs, keep, strict=True) if t == 6)
    bound = 1e-5 + 1e-4 * want[good].abs().max().item()
    assert torch.isfinite(y[good]).all()
    assert (y[good] - want[good]).abs().max().item() <= bound


# -- NaN, inf and huge tokens: their own output only --------------------------------------

ISOLATED = {
    "softmax": dict(router="softmax"),
    "softmax_topk": dict(router="softmax_topk", renormalize=False),
    "sigmoid_bias": dict(router="sigmoid", bias_update_rate=0.01),
    "softmax_groups": dict(router="softmax", num_groups=4, topk_groups=2),
    "sigmoid_groups": dict(router="sigmoid", num_groups=4, topk_groups=1),
    "switch": dict(router="switch", top_k=1, jitter_eps=0.1),
    "noisy_topk": dict(router="noisy_topk"),
    "hash": dict(router="hash", hash_vocab_size=50),
    "shared_gate": dict(router="softmax", num_shared_experts=1, shared_expert_gate=True,
                        expert_bias=True, activation="swiglu_oai"),
    "position_capacity": dict(router="softmax", capacity_factor=1.0),  # bad tokens last
}
T_ISO, BAD = 13, [9, 10, 11, 12]


def _bad_tokens(x_TD: torch.Tensor) -> torch.Tensor:
    """The last four tokens: a NaN, a +inf, a -inf element, every element 1e30; among
    the finite ones a zero token and two identical ones."""
    x_TD = x_TD.clone()
    x_TD[9, 3], x_TD[10, 5], x_TD[11, 7], x_TD[12] = math.nan, math.inf, -math.inf, 1e30
    x_TD[4] = 0.0
    x_TD[6] = x_TD[5]
    return x_TD


def _isolated_layer(name: str, backend: str) -> tuple[MoE, torch.Tensor, torch.Tensor | None]:
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=ISOLATED[name].get("top_k", 2),
                        **{k: v for k, v in ISOLATED[name].items() if k != "top_k"}),
              backend=backend).eval()  # eval: no noise or jitter to replay in the reference
    with torch.no_grad():
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.normal_(0, 0.1)
        if moe.experts.b_in is not None:
            moe.experts.b_in.normal_()
            moe.experts.b_out.normal_()
    ids = torch.randint(0, 50, (T_ISO,)) if name == "hash" else None
    return moe, _bad_tokens(torch.randn(T_ISO, D)), ids


def _dropless_twin(moe: MoE) -> MoE:
    """``moe`` without its capacity: what ``infer`` computes for token choice."""
    twin = MoE(moe.config.replace(capacity_factor=None)).eval()
    twin.load_state_dict(moe.state_dict())
    return twin


@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm"])
@pytest.mark.parametrize("name", list(ISOLATED))
def test_non_finite_tokens_leave_the_others_alone(name, backend):
    """Forward and input gradient (the training backends) and infer: the finite tokens
    are finite and match the reference, which computes each token alone (token choice;
    with the position policy the bad tokens come last, after every finite pair)."""
    moe, x, ids = _isolated_layer(name, backend)
    good = torch.ones(T_ISO, dtype=torch.bool)
    good[BAD] = False
    g_TD = torch.randn(T_ISO, D) * good[:, None]  # the bad tokens' loss masked out
    xg = x.clone().requires_grad_()
    y = moe(xg, ids).output
    (dx,) = torch.autograd.grad((y * g_TD).nansum(), xg)
    xr = x.clone().requires_grad_()
    want, _, _ = ref_moe(moe, xr, ids)
    (dx_want,) = torch.autograd.grad((want * g_TD).nansum(), xr)
    with torch.inference_mode():
        inferred = moe.infer(x, ids)
    with torch.no_grad():
        want_infer = ref_moe(_dropless_twin(moe), x, ids)[0]
    for got, ref in ((y.detach(), want.detach()), (inferred, want_infer)):
        assert torch.isfinite(got[good]).all()
        bound = 1e-5 + 1e-4 * ref[good].abs().max().item()  # test_layer's fp32 tolerance
        assert (got[good] - ref[good]).abs().max().item() <= bound
    assert torch.isfinite(dx[good]).all()
    bound = 1e-5 + 1e-4 * dx_want[good].abs().max().item()
    assert (dx[good] - dx_want[good]).abs().max().item() <= bound


# -- determinism: the same call twice gives the same bits ----------------------------------

@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm", "decode"])
@pytest.mark.parametrize("name", ["softmax", "sigmoid_bias", "hash", "shared_gate"])
def test_same_input_twice_gives_the_same_bits(name, backend):
    """Output, input and weight gradients (training backends), and infer, on 2 threads
    (the kernels' parallel splits) at T=300, a multiple of nothing."""
    moe, _, _ = _isolated_layer(name, backend)
    x = torch.randn(300, D)
    ids = torch.randint(0, 50, (300,)) if name == "hash" else None
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [_outputs_and_grads(moe, x, ids, backend) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def _outputs_and_grads(moe: MoE, x: torch.Tensor, ids: torch.Tensor | None,
                       backend: str) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = [moe.infer(x, ids), moe(x, ids).output]
    if backend == "decode":  # no backward
        return out
    xg = x.clone().requires_grad_()
    y = moe(xg, ids).output
    params = [p for p in moe.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum(),
                                [xg, *params], allow_unused=True)
    return out + [y.detach()] + [g for g in grads if g is not None]


# -- infer == forward, within a bound on fp32 rounding derived from the math ---------------

U = 2.0 ** -24  # fp32 unit roundoff


def _gamma(n: int) -> float:
    """Higham's gamma_n: |fl(sum of n products) - exact| <= gamma_n * sum of |products|,
    for any summation order (blocked, pairwise, FMA), hence for every GEMM here."""
    return n * U / (1 - n * U)


def _rounding_bound(moe: MoE, x_TD: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """First-order bound [T, D] on |y - exact| for one fp32 evaluation of a bias-free
    SwiGLU layer on the reference's routing; two evaluations differ by at most twice it.

    h = x W_in: |dh| <= gamma_D |x||W_in|; a = silu(g) v: |da| <= |da/dg||dg| +
    |da/dv||dv| + 6u|a| (exp within 2 ulp, then 1 + e, the division and two products);
    y_e = a W_out: |dy_e| <= gamma_F |a||W_out| + |da||W_out|. A routing weight (softmax
    or logsigmoid-softmax over the chosen logits, softmax over all E, or sigmoid) moves
    by at most w (2 max|dl| + (E + K + 8)u + 4u(1 + max|l|)) where |dl| <= gamma_D
    |W_r||x| (hash weights are exact). The combine adds K products: gamma_{K+1}.
    """
    cfg = moe.config
    D_, F_, E_, K = cfg.dim, cfg.ffn_dim, cfg.num_experts, cfg.top_k
    _, _, (pairs, keep) = ref_moe(moe, x_TD, ids)
    x64 = x_TD.double()
    w_in, w_out = moe.experts.w_in.detach().double(), moe.experts.w_out.detach().double()
    w_r = None if moe.router.weight is None else moe.router.weight.detach().double()
    out_TD = torch.zeros_like(x64)
    for (t, e, w), kept in zip(pairs, keep, strict=True):
        if not kept:
            continue
        w, x_D = abs(float(w.detach())), x64[t]
        h, dh = x_D @ w_in[e], _gamma(D_) * (x_D.abs() @ w_in[e].abs())
        (g, v), (dg, dv) = h.split(F_), dh.split(F_)
        s = torch.sigmoid(g)
        a = g * s * v
        da = (v * s * (1 + g * (1 - s))).abs() * dg + (g * s).abs() * dv + 6 * U * a.abs()
        y = a @ w_out[e]
        dy = _gamma(F_) * (a.abs() @ w_out[e].abs()) + da @ w_out[e].abs()
        dw = 0.0
        if w_r is not None:
            logits_E = w_r @ x_D
            dl = _gamma(D_) * (w_r.abs() @ x_D.abs()).max()
            dw = w * (2 * dl + (E_ + K + 8) * U + 4 * U * (1 + logits_E.abs().max()))
        out_TD[t] += dw * y.abs() + w * dy + _gamma(K + 1) * (w * y).abs()
    return out_TD


INFER_ROUTERS = {
    "softmax": dict(router="softmax"),
    "softmax_unnormalised": dict(router="softmax", renormalize=False),
    "softmax_topk": dict(router="softmax_topk"),
    "sigmoid": dict(router="sigmoid", routed_scaling_factor=2.5),
    "sigmoid_bias": dict(router="sigmoid", bias_update_rate=0.01),
    "sigmoid_unnormalised": dict(router="sigmoid", renormalize=False),
    "switch": dict(router="switch", top_k=1, jitter_eps=0.1),
    "noisy_topk": dict(router="noisy_topk"),
    "softmax_groups": dict(router="softmax", num_groups=4, topk_groups=2),
    "sigmoid_groups": dict(router="sigmoid", num_groups=4, topk_groups=1),
    "hash": dict(router="hash", hash_vocab_size=50),
    "expert_choice": dict(router="expert_choice"),
}


@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm", "auto"])
@pytest.mark.parametrize("name", list(INFER_ROUTERS))
def test_infer_matches_forward_within_the_rounding_bound(name, backend):
    """``infer`` routes on the decode kernel (route_sort, its own logits GEMV) where
    ``forward`` routes with torch ops, and "auto" runs the decode experts in infer but
    the fused ones under autograd: each may round differently, by at most
    ``_rounding_bound`` (the seeded inputs hold no near-tie that a rounding could flip:
    the two would then differ by a whole expert's output, far beyond the bound)."""
    over = dict(INFER_ROUTERS[name])
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=over.pop("top_k", 2), **over),
              backend=backend).eval()
    if moe.router.expert_bias is not None:
        moe.router.expert_bias.normal_(0, 0.1)
    x = torch.randn(37, D)
    ids = torch.randint(0, 50, (37,)) if name == "hash" else None
    y = moe(x.clone().requires_grad_(), ids).output.detach()
    with torch.inference_mode():
        inferred = moe.infer(x, ids)
    bound = 2 * _rounding_bound(moe, x, ids)
    assert ((inferred.double() - y.double()).abs() <= bound).all()


# -- half precision: a token that overflows the experts' GEMMs, and odd token counts ------

@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_overflow_stays_in_its_token(dtype, backend):
    """Token 3 holds 6e4 (fp16's largest is 65504; bf16: 1e36): its expert GEMMs
    overflow, so its output is inf or NaN, but the router runs in fp32, and the other
    tokens (T = 13, 1, and 0) match the reference within test_layer's bf16 tolerance,
    in forward and its input gradient (training backends) and in infer."""
    if backend == "grouped_mm" and dtype == torch.float16:
        pytest.skip("torch._grouped_mm takes fp32 / bf16")
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E), backend=backend).eval().to(dtype)
    for T in (13, 1, 0):
        x = torch.randn(T, D).to(dtype)
        good = torch.ones(T, dtype=torch.bool)
        if T > 3:
            x[3] = 6e4 if dtype == torch.float16 else 1e36
            good[3] = False
        xg = x.clone().requires_grad_()
        y = moe(xg).output
        (dx,) = torch.autograd.grad((y.float() * good[:, None]).nansum(), xg)
        with torch.inference_mode():
            inferred = moe.infer(x)
        want = ref_moe(moe, x)[0] if T else x.float()  # (the reference stacks >= 1 row)
        if T > 3:  # (what is at stake: that token overflows)
            assert not torch.isfinite(y[3]).all()
        bound = 1e-2 + 3e-2 * want[good].abs().max().item() if T else 0.0
        for got in (y.detach(), inferred):
            assert got.shape == x.shape and got.dtype == dtype
            assert torch.isfinite(got[good]).all()
            assert ((got[good].float() - want[good]).abs() <= bound).all()
        assert torch.isfinite(dx[good]).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e30])
@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm"])
def test_a_dropped_bad_token_reaches_no_weight_gradient(backend, bad):
    """grouped_mm computes the capacity's dropped rows in the last expert's group with
    weight 0, and 0 * NaN (or inf from a 1e30 token) is NaN: a dropped bad token made
    expert E-1's weight gradients NaN though it never reached that expert, and its own
    output NaN where the reference (and loop, fused) have 0. The experts' gradients
    must be finite. (The router's is NaN for a NaN or inf token, kept or not: the
    softmax's backward multiplies its NaN probabilities by zero gradients.)"""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=D, ffn_dim=F, num_experts=E, capacity_factor=0.25, expert_bias=True)
    moe = MoE(cfg, backend=backend)
    x = torch.randn(40, D)
    x[39, 2] = bad  # the last token: the position policy drops it first
    _, _, dispatch, _ = moe.route(x)
    assert (dispatch.token_S[int(dispatch.offsets_E[-1]):] == 39).sum() == 2  # both dropped
    y = moe(x).output
    grads = torch.autograd.grad((y[:39] * torch.randn(39, D)).sum(),
                                list(moe.experts.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    want = ref_moe(moe, x)[0]
    assert torch.isfinite(want[39]).all()  # kept nowhere: 0
    assert (y[39] - want[39]).abs().max() <= 1e-5 + 1e-4 * want.abs().max()


# -- quantized experts (the decode kernels, int8 / int4, float or int8 activations) --------

@pytest.mark.parametrize("activations", ["float", "int8"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_infer_keeps_bad_tokens_to_themselves(bits, activations):
    """infer of a quantized layer (shared experts quantized too) at T = 13 and 1: the
    finite tokens are finite and match the reference on the dequantized weights; with
    int8 activations (each row rounded per block of 32 inputs, on its own scale) they
    match the same layer run with the bad tokens replaced by finite ones."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=64, ffn_dim=32, num_experts=E, num_shared_experts=1)).eval()
    float_twin = copy.deepcopy(moe)
    moekit.quantize(nn.Sequential(moe), bits=bits, group_size=32 if bits == 4 else None,
                    scope="experts", activations=activations)
    with torch.no_grad():
        for name in ("experts.w_in", "experts.w_out", "shared.w_in", "shared.w_out"):
            q = _attr(moe, name)
            _attr(float_twin, name).copy_(q.dequantize() if hasattr(q, "dequantize") else q)
    x = torch.randn(13, 64)
    x[9, 3], x[10, 1], x[11, 5], x[12] = math.nan, math.inf, -math.inf, 1e30
    good = torch.arange(13) < 9
    with torch.inference_mode():
        y = moe.infer(x)
        x_fine = x.clone()
        x_fine[~good] = torch.randn(4, 64)
        want = (ref_moe(float_twin, x)[0] if activations == "float" else moe.infer(x_fine))
        single = moe.infer(x[:1])
    assert torch.isfinite(y[good]).all()
    bound = 1e-5 + 1e-4 * want[good].abs().max().item()
    assert ((y[good] - want[good]).abs() <= bound).all()
    assert ((single - want[:1]).abs() <= bound).all()


def _attr(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module
