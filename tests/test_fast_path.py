"""The fused CPU expert path against the loop backend and a per-token computation.

Checks the output and the gradients of x, w_in, w_out, b_in, b_out and the
router weight through the whole MoE layer, and the Function on hand-made
dispatches (dropped rows, blocks split across calls, odd sizes).
Shape letters: T tokens, D hidden, F expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig
from moekit.dispatch.plan import Dispatch
from moekit.dispatch.sort import sort_by_expert
from moekit.functions import cpu_ext, moe_experts
from moekit.functions.moe_experts import (
    RowBuffers,
    fused_experts,
    fused_experts_into,
    reuse_row_buffers,
)

DTYPES = [
    # (dtype, atol, rtol): max |got - want| <= atol + rtol * max |want|, per tensor
    (torch.float32, 1e-5, 1e-4),
    (torch.bfloat16, 3e-2, 3e-2),
]

CASES = [
    # T, E, K, D, F, extra config                     what it exercises
    (1, 4, 1, 16, 8, {}),                              # a single token
    (37, 7, 3, 16, 8, {}),                             # odd T, prime E
    (24, 5, 5, 16, 8, {}),                             # K == E
    (40, 6, 2, 16, 8, {"capacity_factor": 0.5}),       # capacity: rows dropped
    (30, 4, 2, 16, 8, {"expert_bias": True}),          # biases
    (29, 5, 2, 23, 13, {"expert_bias": True}),         # odd D/F
    (20, 4, 2, 16, 8, {"activation": "geglu"}),
    (20, 4, 2, 16, 8, {"activation": "relu2"}),
    (20, 4, 2, 16, 8, {"activation": "gelu", "expert_bias": True}),
    (20, 4, 2, 16, 8, {"activation": "swiglu_oai", "expert_bias": True}),
    (32, 8, 2, 16, 8, {"router": "expert_choice"}),
    (25, 6, 2, 16, 8, {"router": "sigmoid"}),
]


def _layer(cfg: MoEConfig, backend: str, dtype: torch.dtype, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg, backend=backend)
    with torch.no_grad():  # non-zero biases so their gradients and outputs matter
        for name, p in moe.named_parameters():
            if name.startswith("experts.b_"):
                p.normal_(std=0.1)
        for p in moe.parameters():  # parameters only: the router keeps fp32 buffers
            p.data = p.data.to(dtype)
    return moe


def _run(moe: MoE, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y, _, _ = moe(x)
    params = [p for _, p in moe.named_parameters()]
    grads = torch.autograd.grad(y, [x, *params], g, allow_unused=True)
    return [y.detach(), *grads]


def _assert_close(got: list, want: list, names: list[str], atol: float, rtol: float) -> None:
    for name, a, b in zip(names, got, want, strict=True):
        if b is None:
            assert a is None or not a.abs().any(), name
            continue
        err = (a.double() - b.double()).abs().max()
        bound = atol + rtol * b.abs().max().double()
        assert err <= bound, f"{name}: max error {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("T,E,K,D,Fd,extra", CASES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_fused_matches_loop_backend(T, E, K, D, Fd, extra, dtype, atol, rtol):
    cfg = MoEConfig(dim=D, ffn_dim=Fd, num_experts=E, top_k=K, **extra)
    torch.manual_seed(1)
    x = torch.randn(T, D).to(dtype)
    g = torch.randn(T, D).to(dtype)
    fused, loop = _layer(cfg, "fused", dtype), _layer(cfg, "loop", dtype)
    names = ["y", "x", *(n for n, _ in fused.named_parameters())]
    _assert_close(_run(fused, x, g), _run(loop, x, g), names, atol, rtol)


def test_auto_picks_fused_on_cpu():
    moe = MoE(MoEConfig(dim=16, ffn_dim=8, num_experts=4, top_k=2))
    assert moe.experts.auto_backend(torch.randn(3, 16)) == "fused"


# -- per-token computation, written out independently --------------------------

def _act(h: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu2":
        return torch.relu(h) ** 2
    gate, up = h.chunk(2)
    return (F.silu(gate) if kind == "swiglu" else F.gelu(gate)) * up


def _per_token(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """y[t] = sum over t's kept rows of weight * (act(x[t] @ w_in[e] + b) @ w_out[e] + b)."""
    cfg, ex = moe.config, moe.experts
    routed = moe.router(x)
    d = sort_by_expert(routed.plan, cfg.num_experts, None if cfg.capacity_factor is None
                       else cfg.capacity(x.shape[0]), cfg.drop_policy)
    expert_of_row = torch.repeat_interleave(torch.arange(cfg.num_experts), d.counts_E)
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(cfg.dim)
        for r in range(expert_of_row.shape[0]):
            if int(d.token_S[r]) != t:
                continue
            e = int(expert_of_row[r])
            h = x[t] @ ex.w_in[e] + (0 if ex.b_in is None else ex.b_in[e])
            out = _act(h, cfg.activation) @ ex.w_out[e] + (0 if ex.b_out is None else ex.b_out[e])
            y = y + d.weight_S[r].to(x.dtype) * out
        rows.append(y)
    return torch.stack(rows)


PER_TOKEN = [
    (1, 3, 2, {}),
    (11, 5, 2, {"expert_bias": True}),
    (12, 4, 4, {"activation": "relu2"}),
    (16, 4, 2, {"capacity_factor": 0.5, "activation": "geglu"}),
]


@pytest.mark.parametrize("T,E,K,extra", PER_TOKEN)
def test_fused_matches_per_token(T, E, K, extra):
    cfg = MoEConfig(dim=12, ffn_dim=6, num_experts=E, top_k=K, **extra)
    moe = _layer(cfg, "fused", torch.float64)
    torch.manual_seed(2)
    x, g = torch.randn(T, 12, dtype=torch.float64), torch.randn(T, 12, dtype=torch.float64)
    params = [p for _, p in moe.named_parameters()]
    xr = x.clone().requires_grad_(True)
    want = _per_token(moe, xr)
    want = [want.detach(), *torch.autograd.grad(want, [xr, *params], g, allow_unused=True)]
    names = ["y", "x", *(n for n, _ in moe.named_parameters())]
    # 1e-6: the router computes in fp32 whatever the input dtype
    _assert_close(_run(moe, x, g), want, names, 1e-6, 1e-6)


def test_all_tokens_to_one_expert_and_idle_experts():
    cfg = MoEConfig(dim=16, ffn_dim=8, num_experts=6, top_k=1)
    fused, loop = _layer(cfg, "fused", torch.float32), _layer(cfg, "loop", torch.float32)
    for m in (fused, loop):
        with torch.no_grad():
            m.router.weight.zero_()
            m.router.weight[3] = 1.0
    x = torch.rand(9, 16) + 0.1  # positive: expert 3 wins for every token
    g = torch.randn(9, 16)
    got, want = _run(fused, x, g), _run(loop, x, g)
    names = ["y", "x", *(n for n, _ in fused.named_parameters())]
    _assert_close(got, want, names, 1e-5, 1e-4)
    w_in_grad = got[names.index("experts.w_in")]
    assert w_in_grad[3].abs().sum() > 0 and w_in_grad[[0, 1, 2, 4, 5]].abs().sum() == 0


# -- the Function on hand-made dispatches -------------------------------------------

def _dispatch(E: int, counts: list[int], dropped: int, T: int, seed: int) -> Dispatch:
    gen = torch.Generator().manual_seed(seed)
    S = sum(counts) + dropped
    weight = torch.rand(S, generator=gen)
    weight[sum(counts):] = 0
    counts_E = torch.tensor(counts)
    return Dispatch(token_S=torch.randint(T, (S,), generator=gen), weight_S=weight,
                    counts_E=counts_E, offsets_E=torch.cumsum(counts_E, 0).to(torch.int32),
                    assigned_E=counts_E)


def _swiglu(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("block_rows", [1, 5, 8192])
@pytest.mark.parametrize("D,Fd", [(16, 8), (15, 7)])
def test_blocks_dropped_rows_and_odd_sizes(block_rows, D, Fd):
    """Dropped rows contribute nothing and get no gradient, however rows are blocked."""
    E, T, counts = 5, 10, [3, 0, 6, 1, 4]
    d = _dispatch(E, counts, dropped=4, T=T, seed=0)
    torch.manual_seed(0)
    x = torch.randn(T, D, requires_grad=True)
    weight = d.weight_S.clone().requires_grad_(True)
    w_in = torch.randn(E, D, 2 * Fd, requires_grad=True)
    w_out = torch.randn(E, Fd, D, requires_grad=True)
    b_in = torch.randn(E, 2 * Fd, requires_grad=True)
    b_out = torch.randn(E, D, requires_grad=True)
    inputs = [x, weight, w_in, w_out, b_in, b_out]
    y = fused_experts(x, d.token_S, weight, d.offsets_E, w_in, w_out, b_in, b_out, _swiglu,
                      "swiglu", block_rows=block_rows)
    g = torch.randn(T, D)
    got = [y.detach(), *torch.autograd.grad(y, inputs, g)]
    # the same sum, one kept row at a time
    want_y = torch.zeros(T, D)
    ends = torch.cumsum(torch.tensor(counts), 0).tolist()
    for r in range(ends[-1]):
        e = sum(r >= end for end in ends)
        t = int(d.token_S[r])
        h = x[t] @ w_in[e] + b_in[e]
        want_y = want_y.index_add(0, d.token_S[r:r + 1],
                                  (weight[r] * (_swiglu(h) @ w_out[e] + b_out[e]))[None])
    want = [want_y.detach(), *torch.autograd.grad(want_y, inputs, g)]
    names = ["y", "x", "weight", "w_in", "w_out", "b_in", "b_out"]
    _assert_close(got, want, names, 1e-5, 1e-4)
    assert not got[2][ends[-1]:].any()  # dropped rows: zero weight gradient
    assert not got[3][1].any() and not got[4][1].any()  # expert 1 has no rows


def test_skips_gradients_nobody_needs():
    E, T, D, Fd = 3, 6, 16, 8
    d = _dispatch(E, [2, 3, 1], dropped=0, T=T, seed=1)
    x = torch.randn(T, D)
    w_in = torch.randn(E, D, 2 * Fd, requires_grad=True)
    w_out = torch.randn(E, Fd, D)
    y = fused_experts(x, d.token_S, d.weight_S, d.offsets_E, w_in, w_out, None, None,
                      _swiglu, "swiglu")
    (gw,) = torch.autograd.grad(y.sum(), [w_in])
    assert gw.shape == w_in.shape and x.grad is None and w_out.grad is None


# -- row buffers kept between calls (inference) ---------------------------------------

def _blocked_problem(dtype=torch.float32, seed=3):
    E, T, D, Fd, counts = 6, 40, 24, 12, [9, 0, 30, 4, 17, 20]
    d = _dispatch(E, counts, dropped=3, T=T, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    args = [torch.randn(T, D, generator=gen), torch.randn(E, D, 2 * Fd, generator=gen) / 5,
            torch.randn(E, Fd, D, generator=gen) / 5]
    return d, [a.to(dtype) for a in args]


@pytest.mark.parametrize("block_rows", [8, 8192])  # several blocks share one buffer
@pytest.mark.parametrize("one_call", [True, False])
def test_kept_row_buffers_give_the_same_output_and_are_reused(block_rows, one_call,
                                                               monkeypatch):
    monkeypatch.setattr(moe_experts, "ONE_CALL_FORWARD", one_call)
    d, (x, w_in, w_out) = _blocked_problem()

    def run():
        return fused_experts(x, d.token_S, d.weight_S, d.offsets_E, w_in, w_out, None, None,
                             _swiglu, "swiglu", block_rows=block_rows)

    with torch.no_grad():
        want = run()
        kept = RowBuffers()
        with reuse_row_buffers(kept):
            got = run()
            ptrs = {k: b.data_ptr() for k, b in kept._bufs.items()}
            again = run()
    assert torch.equal(got, want) and torch.equal(again, want)
    # the one-call forward gathers x's rows and keeps h in its threads' own buffers
    assert {k[0] for k in ptrs} == ({"a", "y"} if one_call else {"x", "h", "a", "y"})
    assert {k: b.data_ptr() for k, b in kept._bufs.items()} == ptrs  # no new buffers
    assert all(got.data_ptr() != p for p in ptrs.values())  # the output is the caller's
    assert kept.nbytes > 0
    kept.clear()
    assert kept.nbytes == 0


def test_kept_row_buffers_are_not_used_where_autograd_saves_tensors():
    d, (x, w_in, w_out) = _blocked_problem()
    p = [t.clone().requires_grad_(True) for t in (x, w_in, w_out)]

    def grads():
        y = fused_experts(p[0], d.token_S, d.weight_S, d.offsets_E, p[1], p[2], None, None,
                          _swiglu, "swiglu", block_rows=8)
        return [y.detach(), *torch.autograd.grad(y, p, torch.ones_like(y))]

    want = grads()
    kept = RowBuffers()
    with reuse_row_buffers(kept):
        got = grads()
    assert kept.nbytes == 0
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_generation_keeps_row_buffers_in_its_cache(monkeypatch):
    """A prefill through the fused path, twice on one cache: the same logits as without
    kept buffers, and the second prefill allocates none."""
    from moekit.models import LMConfig, MoETransformer, transformer

    torch.manual_seed(0)
    model = MoETransformer(LMConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                                    max_seq_len=128, num_experts=4, top_k=2, ffn_dim=16)).eval()
    ids = torch.randint(64, (2, 100))  # 400 routed rows a layer: past the decode kernels'
    cache = transformer.StaticKVCache.for_model(model, 2, 100)
    with torch.inference_mode():
        got = model.infer(ids, cache)
        ptrs = {k: b.data_ptr() for k, b in cache.row_buffers._bufs.items()}
        cache.reset()
        again = model.infer(ids, cache)
    assert {k[0] for k in ptrs} >= {"a", "y"}
    assert {k: b.data_ptr() for k, b in cache.row_buffers._bufs.items()} == ptrs
    monkeypatch.setattr(transformer, "reuse_row_buffers", lambda b: contextlib.nullcontext())
    plain = transformer.StaticKVCache.for_model(model, 2, 100)
    with torch.inference_mode():
        want = model.infer(ids, plain)
    assert plain.row_buffers.nbytes == 0
    assert torch.equal(got, want) and torch.equal(again, want)


# -- the one-call fp32 SwiGLU forward (swiglu_experts_out) ------------------------------

# rows per expert: none, the register blocks' edge cases, the last sgemm_rows size (96)
# and past it (aten's mm; 300 rows: in two pieces of at most 256); F = 520 makes a
# task's columns a multiple of 64 but for the last one (both halves of a narrow tile);
# D x 2F is past sgemm_rows' smallest weight
ONE_CALL_COUNTS, ONE_CALL_D, ONE_CALL_F, ONE_CALL_T = [0, 1, 5, 7, 64, 96, 97, 300], 512, 520, 200


def _one_call_problem(seed=5):
    E = len(ONE_CALL_COUNTS)
    d = _dispatch(E, ONE_CALL_COUNTS, dropped=3, T=ONE_CALL_T, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    D, Fd = ONE_CALL_D, ONE_CALL_F
    x = torch.randn(ONE_CALL_T, D, generator=gen)
    w_in = torch.randn(E, D, 2 * Fd, generator=gen) / D**0.5
    w_out = torch.randn(E, Fd, D, generator=gen) / Fd**0.5
    return d, x, w_in, w_out


def _per_row_fp64(d, x, w_in, w_out):
    """sum over kept rows r of weight[r] * swiglu(x[t] @ w_in[e]) @ w_out[e], in fp64."""
    x, w_in, w_out = x.double(), w_in.double(), w_out.double()
    want = torch.zeros_like(x)
    start = 0
    for e, end in enumerate(d.offsets_E.tolist()):
        tok = d.token_S[start:end]
        y = _swiglu(x[tok] @ w_in[e]) @ w_out[e]
        want.index_add_(0, tok, d.weight_S[start:end, None].double() * y)
        start = end
    return want


@pytest.mark.parametrize("sgemm", ["1", "0"], ids=["moekit_gemm", "aten_mm"])
def test_one_call_forward_matches_per_row_sums(sgemm, monkeypatch, two_threads):
    ext = cpu_ext.get()
    if ext is None:
        pytest.skip("the C++ kernels did not build")
    monkeypatch.setenv("MOEKIT_SGEMM", sgemm)
    d, x, w_in, w_out = _one_call_problem()

    def run(one_call):
        monkeypatch.setattr(moe_experts, "ONE_CALL_FORWARD", one_call)
        with torch.no_grad():
            return fused_experts(x, d.token_S, d.weight_S, d.offsets_E, w_in, w_out, None,
                                 None, _swiglu, "swiglu")

    tiles = ext.sgemm_tiles()
    got = run(True)
    assert (ext.sgemm_tiles() > tiles) == (ext.sgemm_max_rows() > 0)  # which GEMM ran
    _assert_close([got], [_per_row_fp64(d, x, w_in, w_out)], ["y"], 1e-5, 1e-4)
    if ext.sgemm_max_rows() > 0:
        # sgemm_rows: each element one FMA chain over k in order, however the columns are
        # cut; the combine adds a token's rows in row order, as index_add_ does
        assert torch.equal(got, run(False))


def test_one_call_forward_with_listed_experts_adds_into_out(two_threads):
    """fused_experts_into (the expert cache's call): weights as lists, two chunks of experts
    added into one output that already holds values."""
    d, x, w_in, w_out = _one_call_problem(seed=6)
    start = torch.randn(ONE_CALL_T, ONE_CALL_D)
    with torch.no_grad():
        want = start + fused_experts(x, d.token_S, d.weight_S, d.offsets_E, w_in, w_out, None,
                                     None, _swiglu, "swiglu")
        out = start.clone()
        ends = d.offsets_E.tolist()
        for e0, e1 in ((0, 5), (5, len(ends))):
            r0 = ends[e0 - 1] if e0 else 0
            fused_experts_into(out, x, d.token_S[r0:ends[e1 - 1]], d.weight_S[r0:ends[e1 - 1]],
                               d.offsets_E[e0:e1] - r0, list(w_in[e0:e1]), list(w_out[e0:e1]),
                               None, None, _swiglu, "swiglu")
    _assert_close([out], [want], ["out"], 1e-5, 1e-5)


def test_one_call_forward_rejects_a_token_outside_x():
    ext = cpu_ext.get()
    if ext is None:
        pytest.skip("the C++ kernels did not build")
    d, x, w_in, w_out = _one_call_problem()
    rows = int(d.offsets_E[-1])
    tok = d.token_S.clone()
    tok[rows - 1] = ONE_CALL_T  # one past the last token
    out = torch.zeros(ONE_CALL_T, ONE_CALL_D)
    a, y = torch.empty(len(tok), ONE_CALL_F), torch.empty(len(tok), ONE_CALL_D)
    with pytest.raises(RuntimeError, match=rf"tok_N\[{rows - 1}\]={ONE_CALL_T} is not a row"):
        ext.swiglu_experts_out(x, tok, d.weight_S, w_in, w_out, d.offsets_E.tolist(), a, y, out)
    assert not out.any()  # checked before anything is written
