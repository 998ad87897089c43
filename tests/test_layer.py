"""The MoE layer against the per-token oracle in tests/reference.py.

Every router x capacity mode x odd shape, fp32 tightly and bf16 loosely: the
output, the auxiliary loss and the gradient of the input and of every parameter.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.experts.backends import BACKENDS
from moekit.functions import decode
from tests.reference import ref_moe

D, F = 16, 8  # 16-byte aligned in fp32 and bf16, so grouped_mm backends run too

ROUTERS = {
    # name: config overrides
    "softmax": dict(router="softmax"),
    "softmax_norenorm": dict(router="softmax", renormalize=False),
    "softmax_topk": dict(router="softmax_topk"),
    "softmax_topk_norenorm": dict(router="softmax_topk", renormalize=False),
    "sigmoid": dict(router="sigmoid", routed_scaling_factor=2.5),
    "switch": dict(router="switch", top_k=1),
    "noisy_topk": dict(router="noisy_topk"),
    "noisy_topk_norenorm": dict(router="noisy_topk", renormalize=False),
    "hash": dict(router="hash", hash_vocab_size=50),
    "expert_choice": dict(router="expert_choice"),
}

SHAPES = [
    # (lead shape, E, K)      what it exercises
    ((1,), 4, 1),             # a single token
    ((37,), 7, 3),            # odd T, prime E
    ((12,), 4, 4),            # K == E: every expert sees every token
    ((2, 9), 6, 2),           # 3-D input, sequences for the sequence-level loss
]

CAPACITY = [
    None,                     # dropless
    ("position", 1.0),
    ("probability", 0.75),    # tight: guarantees drops at most shapes
]

DTYPES = [
    # (dtype, atol, rtol): error <= atol + rtol * max|reference|
    (torch.float32, 1e-5, 1e-4),
    (torch.bfloat16, 1e-2, 3e-2),
]


def assert_close(actual, expected, atol, rtol, what=""):
    actual, expected = actual.float(), expected.float()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def build(lead, E, K, dtype=torch.float32, seed=0, backend="auto", **over):
    torch.manual_seed(seed)
    kw = dict(dim=D, ffn_dim=F, num_experts=E, top_k=min(K, E), aux_loss_coef=0.01,
              z_loss_coef=1e-3, seq_aux_loss_coef=0.02)
    kw.update(over)
    if kw.get("router") == "expert_choice":
        kw["seq_aux_loss_coef"] = 0.0
    moe = MoE(MoEConfig(**kw), backend=backend)
    if moe.router.expert_bias is not None:  # a nonzero selection bias must matter
        moe.router.expert_bias.normal_(0, 0.1)
    moe = moe.to(dtype)
    x = torch.randn(*lead, D).to(dtype).requires_grad_()
    ids = torch.randint(0, 50, lead) if kw.get("router") == "hash" else None
    return moe, x, ids


def grads_of(out, aux, inputs):
    g = torch.linspace(-1, 1, out.numel()).view(out.shape)
    loss = (out.float() * g).sum() + aux.float()
    got = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(i) if v is None else v for v, i in zip(got, inputs, strict=True)]


def check_against_reference(moe, x, ids, atol, rtol, train=False, seed=1):
    moe.train(train)
    cfg = moe.config
    torch.manual_seed(seed)
    y, aux, _ = moe(x, token_ids=ids)
    T = x.numel() // cfg.dim
    torch.manual_seed(seed)  # replay the same noise draws for the reference
    jitter_u = noise = None
    if train and cfg.router == "switch" and cfg.jitter_eps:
        jitter_u = torch.rand(T, cfg.dim)
    if train and cfg.router == "noisy_topk":
        noise = torch.randn(T, cfg.num_experts)
    y_ref, aux_ref, _ = ref_moe(moe, x, ids, jitter_u, noise)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y_ref, atol, rtol, "output")
    assert_close(aux, aux_ref, atol, rtol, "aux loss")
    params = [p for p in moe.parameters() if p.requires_grad]
    names = [n for n, p in moe.named_parameters() if p.requires_grad]
    got = grads_of(y, aux, [x, *params])
    want = grads_of(y_ref, aux_ref, [x, *params])
    for name, a, b in zip(["x", *names], got, want, strict=True):
        assert_close(a, b, atol, rtol, f"grad {name}")


@pytest.mark.parametrize("capacity", CAPACITY, ids=lambda c: "dropless" if c is None else c[0])
@pytest.mark.parametrize("lead,E,K", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=["fp32", "bf16"])
def test_router_matches_reference(router, lead, E, K, capacity, dtype, atol, rtol):
    over = dict(ROUTERS[router])
    if capacity is not None:
        over.update(drop_policy=capacity[0], capacity_factor=capacity[1])
    moe, x, ids = build(lead, E, over.pop("top_k", K), dtype, **over)
    check_against_reference(moe, x, ids, atol, rtol, train=router.startswith("noisy_topk"))


# "decode" has no backward (inference only): tests/test_decode.py checks it
@pytest.mark.parametrize("backend", sorted(set(BACKENDS) - {"decode"}))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity", [None, 0.5])
def test_every_backend_matches_reference(backend, dtype, atol, rtol, capacity):
    moe, x, ids = build((29,), 5, 2, dtype, backend=backend, capacity_factor=capacity,
                        expert_bias=True, num_shared_experts=1)
    check_against_reference(moe, x, ids, atol, rtol)


@pytest.mark.parametrize("router,over", [
    ("softmax", dict(num_groups=4, topk_groups=2)),
    ("sigmoid", dict(num_groups=4, topk_groups=2, renormalize=True)),
    ("sigmoid", dict(num_groups=2, topk_groups=1, renormalize=False)),
])
@pytest.mark.parametrize("capacity", [None, 1.0])
def test_group_limited_routing(router, over, capacity):
    moe, x, ids = build((31,), 8, 3, router=router, capacity_factor=capacity, **over)
    check_against_reference(moe, x, ids, 1e-5, 1e-4)
    # every token's experts lie within topk_groups groups
    _, _, (pairs, _) = ref_moe(moe, x, ids)
    moe.eval()
    plan = moe.router(x.reshape(-1, D)).plan
    groups = (plan.expert_S.view(31, 3) // (8 // over["num_groups"]))
    assert all(len(set(row.tolist())) <= over["topk_groups"] for row in groups)


def test_switch_jitter_only_in_training():
    moe, x, _ = build((23,), 4, 1, router="switch", jitter_eps=0.3)
    check_against_reference(moe, x, None, 1e-5, 1e-4, train=True)
    check_against_reference(moe, x, None, 1e-5, 1e-4, train=False)
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])  # no noise in eval


def test_noisy_topk_eval_is_deterministic_and_train_is_noisy():
    moe, x, _ = build((40,), 8, 2, router="noisy_topk")
    with torch.no_grad():
        moe.router.noise_weight.normal_(0, 1.0)
    check_against_reference(moe, x, None, 1e-5, 1e-4, train=False)
    moe.train()
    torch.manual_seed(0)
    a = moe(x).stats.tokens_per_expert
    torch.manual_seed(1)
    b = moe(x).stats.tokens_per_expert
    assert not torch.equal(a, b), "training noise never changed any routing decision"


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu2", "gelu", "swiglu_oai"])
@pytest.mark.parametrize("bias", [False, True])
def test_activations_and_biases(activation, bias):
    moe, x, _ = build((19,), 5, 2, activation=activation, expert_bias=bias,
                      swiglu_limit=0.5)  # a small limit makes the GPT-OSS clamps bite
    if bias:
        with torch.no_grad():
            moe.experts.b_in.normal_()
            moe.experts.b_out.normal_()
    check_against_reference(moe, x, None, 1e-5, 1e-4)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=["fp32", "bf16"])
def test_shared_experts(gate, dtype, atol, rtol):
    moe, x, _ = build((2, 7), 4, 2, dtype, num_shared_experts=2, shared_expert_gate=gate)
    assert moe.shared.w_out.shape == (2 * F, D)
    check_against_reference(moe, x, None, atol, rtol)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "swiglu_oai", "relu2", "gelu"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=["fp32", "bf16"])
def test_shared_experts_on_the_decode_kernels(activation, dtype, atol, rtol, monkeypatch):
    """Few rows without autograd: the shared experts' two kernel calls (decode.shared_rows,
    the gate as the down projection's combine weight, biases) against the reference."""
    moe, x, _ = build((3,), 4, 2, dtype, num_shared_experts=2, shared_expert_gate=True,
                      expert_bias=True, activation=activation, swiglu_limit=1.5)
    with torch.no_grad():
        for b in (moe.shared.b_in, moe.shared.b_out):
            b.normal_()
    calls = []
    shared_rows = decode.shared_rows
    monkeypatch.setattr(decode, "shared_rows", lambda *a: calls.append(1) or shared_rows(*a))
    with torch.no_grad():
        y, _, _ = moe.eval()(x)
        assert len(calls) == 1
        y_ref, _, _ = ref_moe(moe, x.detach())
    assert_close(y, y_ref, atol, rtol, "output")
    y_grad = moe.shared(x)  # autograd on: the torch ops, which give the same
    assert len(calls) == 1
    with torch.no_grad():
        assert_close(moe.shared(x), y_grad, atol, rtol, "kernel vs torch ops")


def test_odd_dims_use_a_fallback_and_match():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=10, ffn_dim=6, num_experts=3, top_k=2))
    x = torch.randn(11, 10, requires_grad=True)
    y_ref, _, _ = ref_moe(moe, x)
    assert_close(moe(x)[0], y_ref, 1e-5, 1e-4, "output")


def _steer(moe, x, expert, sign):
    """Make expert's logit +/- large for every token: x > 0 and a constant router row."""
    with torch.no_grad():
        x.abs_()
        moe.router.weight[expert] = sign * 5.0


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "softmax_topk"])
@pytest.mark.parametrize("capacity", [None, 1.0])
def test_an_expert_with_no_tokens(router, capacity):
    moe, x, _ = build((33,), 5, 2, router=router, capacity_factor=capacity)
    _steer(moe, x, expert=3, sign=-1)
    assert moe(x).stats.tokens_per_expert[3] == 0
    check_against_reference(moe, x, None, 1e-5, 1e-4)


@pytest.mark.parametrize("capacity,policy", [(None, "position"), (1.0, "position"),
                                             (1.0, "probability")])
def test_every_token_to_one_expert(capacity, policy):
    moe, x, _ = build((20,), 4, 1, capacity_factor=capacity, drop_policy=policy)
    _steer(moe, x, expert=2, sign=+1)
    stats = moe(x).stats
    assert stats.tokens_per_expert.tolist() == [0, 0, 20, 0]
    if capacity is not None:  # C = ceil(1.0 * 20 * 1 / 4) = 5 of 20 kept
        assert stats.dropped_fraction.item() == pytest.approx(0.75)
    check_against_reference(moe, x, None, 1e-5, 1e-4)


def test_probability_policy_keeps_the_highest_weights():
    moe, x, _ = build((40,), 4, 1, capacity_factor=0.5, drop_policy="probability")
    _, _, (pairs, keep) = ref_moe(moe, x)
    for e in range(4):
        mine = [(float(w.detach()), k) for (_, ex, w), k in zip(pairs, keep, strict=True)
                if ex == e]
        kept = [w for w, k in mine if k]
        dropped = [w for w, k in mine if not k]
        if kept and dropped:
            assert min(kept) >= max(dropped)
    check_against_reference(moe, x, None, 1e-5, 1e-4)


def test_one_expert_top1_equals_dense_ffn():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=1, top_k=1))
    x = torch.randn(3, 5, D)
    w_in, w_out = moe.experts.w_in[0].detach(), moe.experts.w_out[0].detach()
    h = x @ w_in
    dense = (torch.nn.functional.silu(h[..., :F]) * h[..., F:]) @ w_out
    torch.testing.assert_close(moe(x)[0], dense, atol=1e-5, rtol=1e-4)


def test_expert_choice_capacity_and_coverage():
    moe, x, _ = build((24,), 6, 2, router="expert_choice")
    stats = moe(x).stats
    assert stats.tokens_per_expert.tolist() == [8] * 6  # C = ceil(2 * 24 / 6)
    assert 0.0 <= stats.dropped_fraction.item() < 1.0


def test_same_seed_same_result():
    outs = []
    for _ in range(2):
        moe, x, _ = build((2, 9), 6, 2, router="noisy_topk", seed=7)
        moe.train()
        torch.manual_seed(3)
        y, aux, _ = moe(x)
        outs.append((y, aux))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_compile_fullgraph_matches_eager():
    moe, x, _ = build((64,), 8, 2, aux_loss_coef=0.01, z_loss_coef=1e-3)
    eager_y, eager_aux, _ = moe(x)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    y, aux, _ = compiled(x)
    torch.testing.assert_close(y, eager_y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(aux, eager_aux, atol=1e-6, rtol=1e-5)
    g1 = torch.autograd.grad(y.sum() + aux, moe.experts.w_in)[0]
    g2 = torch.autograd.grad(eager_y.sum() + eager_aux, moe.experts.w_in)[0]
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_stats_against_definitions():
    moe, x, _ = build((50,), 5, 2, capacity_factor=1.0)
    y, aux, stats = moe(x)
    _, _, (pairs, keep) = ref_moe(moe, x)
    counts = [sum(1 for p in pairs if p[1] == e) for e in range(5)]
    assert stats.tokens_per_expert.tolist() == counts
    assert stats.dropped_fraction.item() == pytest.approx(1 - sum(keep) / len(keep))
    assert stats.load_max_over_mean.item() == pytest.approx(max(counts) / (sum(counts) / 5))
    p = torch.softmax(x.detach() @ moe.router.weight.detach().t(), -1)
    ent = -(p * p.log()).sum(-1).mean()
    assert stats.router_entropy.item() == pytest.approx(ent.item(), rel=1e-5)
    assert stats.aux_loss.item() == pytest.approx(aux.item())
    assert not stats.router_entropy.requires_grad


def test_no_losses_configured_gives_zero_aux():
    moe, x, _ = build((10,), 4, 2, aux_loss_coef=0.0, z_loss_coef=0.0, seq_aux_loss_coef=0.0)
    assert moe(x).aux_loss.item() == 0.0


def test_aux_loss_is_one_when_perfectly_balanced():
    from moekit.routing.losses import switch_aux_loss
    probs = torch.full((8, 4), 0.25)
    experts = torch.tensor([[0], [1], [2], [3], [0], [1], [2], [3]])
    assert switch_aux_loss(probs, experts).item() == pytest.approx(1.0)


@pytest.mark.parametrize("E,K", [(512, 8), (64, 64)])
def test_many_experts(E, K):
    moe, x, _ = build((3,), E, K, capacity_factor=None)
    check_against_reference(moe, x, None, 1e-5, 1e-4)


@pytest.mark.parametrize("F_, grad, dtype, capability, want", [
    (1024, True, torch.bfloat16, (9, 0), "grouped_mm"),  # training wide experts
    (1408, True, torch.bfloat16, (10, 0), "grouped_mm"),
    (768, True, torch.bfloat16, (9, 0), "triton"),  # narrow experts: the fused kernels
    (1024, False, torch.bfloat16, (9, 0), "triton"),  # no autograd: the fused forward
    (1024, True, torch.float16, (9, 0), "triton"),  # grouped_mm takes bf16 only
    (1024, True, torch.bfloat16, (8, 0), "triton"),  # before sm_90
])
def test_auto_on_cuda_trains_wide_experts_on_grouped_mm(monkeypatch, F_, grad, dtype,
                                                        capability, want):
    """backend="auto" where triton serves the tensors (faked here: no GPU): grouped_mm
    only for a bf16 training step on sm_90+ with experts of GROUPED_MM_TRAIN_MIN_HIDDEN
    or more (the H200 measurements in moekit/experts/experts.py)."""
    from moekit.experts import experts

    monkeypatch.setattr(experts, "triton_supported", lambda x: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    x = torch.zeros(4, 64, dtype=dtype, requires_grad=grad)
    w_in = torch.zeros(8, 64, 2 * F_, dtype=dtype, requires_grad=grad)
    w_out = torch.zeros(8, F_, 64, dtype=dtype, requires_grad=grad)
    assert experts.GROUPED_MM_TRAIN_MIN_HIDDEN == 1024
    assert experts.auto_backend_name(x, w_in, w_out) == want
    with torch.no_grad():  # the same tensors outside autograd: always the fused forward
        assert experts.auto_backend_name(x, w_in, w_out) == "triton"
