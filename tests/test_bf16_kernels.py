"""The AVX-512 BF16 expert kernels (moekit/csrc/cpu_bf16.cpp) and the bf16 default of training.

The fused expert Function in bf16, on the hand kernels and on the forced aten
fallback, against an fp64 per-token computation from the same bf16 values:
the output and every gradient (x, routing weights, w_in, w_out, biases) on odd
sizes, an expert with no rows, every row on one expert, T=1, K=E and experts
large enough to be cut into tiles and reduction chunks; without biases, with only
some gradients wanted and rows dropped by a capacity; and the offloaded experts'
forward (fused_experts_into, stacked and list weights). The GEMM entry points
alone against fp64 products (transposed weight views, odd widths). A bf16 training
step of the tiny model on the kernels, as close to fp32 as on aten's mm. And the
dtype `moekit train` picks on CPUs with and without native bf16 (simulated).

Shape letters: T tokens, D hidden, F expert hidden, E experts, K top-k,
S routed rows, N rows, X input width, Y output width.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from moekit.functions import cpu_ext
from moekit.functions.moe_experts import (
    RowBuffers,
    fused_experts,
    fused_experts_into,
    reuse_row_buffers,
)
from moekit.models import MoETransformer, preset
from moekit.train import TrainConfig, compare
from moekit.train import cli as train_cli
from moekit.train.step import accumulate_gradients

# bf16 keeps 8 significant bits: each rounding of a stored value is off by at
# most u = 2^-9 of it. The bf16 path stores h, act(h) (2 roundings: act, then
# times up), y, weight * y and K partial sums of the combine, and in backward
# as many again on the way to dh; about 12 roundings of values no larger than
# the tensor's largest entry: 12 u = 2.3e-2 of max |reference|. The fp64
# reference sees the same bf16 inputs, so input rounding is not counted.
TOL = 12 * 2.0**-9

CASES = [
    # T, E, K, D, F, routing   what it exercises
    (1, 4, 1, 16, 8, "random"),      # a single token
    (37, 7, 3, 33, 19, "random"),    # odd T, D and F, prime E
    (24, 5, 5, 64, 32, "random"),    # K == E: every expert sees every token
    (40, 6, 1, 64, 48, "one"),       # every row on expert 2, the others idle
    (50, 8, 2, 128, 96, "skip"),     # experts 0 and 5 get no rows
    (600, 2, 2, 96, 80, "random"),   # 600 rows per expert: tiles, reduction chunks of 512
]


def _routing(T: int, E: int, K: int, how: str, gen: torch.Generator) -> torch.Tensor:
    """experts_TK, distinct experts per token."""
    if how == "one":
        return torch.full((T, 1), 2)
    pool = [e for e in range(E) if not (how == "skip" and e in (0, 5))]
    picks = [torch.randperm(len(pool), generator=gen)[:K] for _ in range(T)]
    return torch.tensor(pool)[torch.stack(picks)]


def _problem(T, E, K, D, Fd, how, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts_TK = _routing(T, E, K, how, gen)
    expert_S = experts_TK.reshape(-1)
    order = torch.argsort(expert_S, stable=True)
    token_S = torch.arange(T).repeat_interleave(experts_TK.shape[1])[order]
    offsets_E = torch.bincount(expert_S, minlength=E).cumsum(0).to(torch.int32)

    def bf16(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).bfloat16()

    inputs = dict(x=bf16(T, D), weight=torch.rand(len(order), generator=gen).bfloat16(),
                  w_in=bf16(E, D, 2 * Fd, scale=D**-0.5), w_out=bf16(E, Fd, D, scale=Fd**-0.5),
                  b_in=bf16(E, 2 * Fd, scale=0.1), b_out=bf16(E, D, scale=0.1))
    return token_S, offsets_E, expert_S[order], inputs, bf16(T, D)


def _act(kind):
    def act(h):
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) if kind == "swiglu" else F.gelu(gate)) * up
    return act


def _reference(token_S, expert_S, inputs, g, kind, need=None):
    """y[t] = sum over rows r of token t: weight[r] * expert_e(x[t]), one row at a time, fp64;
    then the gradients of the inputs named in ``need`` (default: all). A bias may be None.
    Only the rows of token_S count: pass the kept ones where a capacity dropped some."""
    need = [k for k, v in inputs.items() if v is not None] if need is None else need
    p = {k: None if v is None else v.double().requires_grad_(k in need)
         for k, v in inputs.items()}
    rows = []
    for r in range(len(token_S)):
        t, e = int(token_S[r]), int(expert_S[r])
        h = p["x"][t] @ p["w_in"][e]
        h = h if p["b_in"] is None else h + p["b_in"][e]
        y_r = _act(kind)(h) @ p["w_out"][e]
        rows.append(p["weight"][r] * (y_r if p["b_out"] is None else y_r + p["b_out"][e]))
    y = torch.zeros_like(p["x"]).index_add(0, token_S, torch.stack(rows))
    if not need:
        return [y.detach()]
    return [y.detach(), *torch.autograd.grad(y, [p[k] for k in need], g.double())]


def _fused(token_S, offsets_E, inputs, g, kind, need=None):
    need = [k for k, v in inputs.items() if v is not None] if need is None else need
    p = {k: None if v is None else v.clone().requires_grad_(k in need)
         for k, v in inputs.items()}
    y = fused_experts(p["x"], token_S, p["weight"], offsets_E, p["w_in"], p["w_out"],
                      p["b_in"], p["b_out"], _act(kind), kind)
    return [y.detach(), *torch.autograd.grad(y, [p[k] for k in need], g)]


def _assert_close(got, want, names):
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == torch.bfloat16, name
        err = (a.double() - b).abs().max().item()
        scale = b.abs().max().item()
        assert err <= TOL * scale, f"{name}: max error {err:.3g} > {TOL:.3g} x {scale:.3g}"


class _Counting:
    """The kernel module, counting the calls that reach it."""

    def __init__(self, module):
        self.module = module
        self.calls = dict.fromkeys(["grouped_mm_out", "grouped_mm_weight_out", "glu_up_out",
                                    "scatter_mm", "glu_backward_out"], 0)

    def __getattr__(self, name):
        if name in self.calls:
            self.calls[name] += 1
        return getattr(self.module, name)


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setenv(cpu_ext.BF16_ENV, "1")  # the kernels, even where AMX makes aten faster
    module = cpu_ext.bf16()
    if module is None:  # say which: a failed build must not read as a CPU without bf16
        pytest.skip("the bf16 kernels did not load: " + (
            "MOEKIT_CPU_EXT=0 or their build failed (see its warning)" if cpu_ext.native_bf16()
            else "no AVX-512 BF16 on this CPU"))
    return module


def test_kernels_load_where_torch_sees_native_bf16(monkeypatch):
    """On a CPU with AVX-512 BF16 the kernels must not silently fall back when asked for."""
    monkeypatch.setenv(cpu_ext.BF16_ENV, "1")
    if cpu_ext.native_bf16():
        assert cpu_ext.bf16() is not None


@pytest.mark.parametrize("has_amx", [False, True])
def test_default_leaves_amx_cpus_to_aten(monkeypatch, has_amx):
    """Unset, the kernels run only on CPUs without AMX (simulated both ways here)."""
    monkeypatch.delenv(cpu_ext.BF16_ENV, raising=False)
    monkeypatch.setattr(cpu_ext, "amx", lambda: has_amx)
    if has_amx:
        assert cpu_ext.bf16() is None
    elif cpu_ext.native_bf16():
        assert cpu_ext.bf16() is not None


def test_bad_bf16_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(cpu_ext.BF16_ENV, "yes")
    with pytest.raises(ValueError, match=r"MOEKIT_BF16_KERNEL='yes' is not allowed: 0"):
        cpu_ext.bf16()


NAMES = ["y", "x", "weight", "w_in", "w_out", "b_in", "b_out"]


@pytest.mark.parametrize("T,E,K,D,Fd,how,kind", [
    *((*c, "swiglu") for c in CASES), (*CASES[1], "geglu"), (*CASES[5], "geglu")])
def test_fused_bf16_kernels_match_fp64_per_token(kernels, monkeypatch, T, E, K, D, Fd, how,
                                                 kind):
    counting = _Counting(kernels)
    monkeypatch.setattr(cpu_ext, "bf16", lambda: counting)
    token_S, offsets_E, expert_S, inputs, g = _problem(T, E, K, D, Fd, how)
    got = _fused(token_S, offsets_E, inputs, g, kind)
    _assert_close(got, _reference(token_S, expert_S, inputs, g, kind), NAMES)
    # one block, all fused: forward gate+up+GLU, down+combine; backward the GLU
    # backward GEMM, 2 weight GEMMs and the input gradient's scatter GEMM
    assert counting.calls == {"grouped_mm_out": 0, "grouped_mm_weight_out": 2,
                              "glu_up_out": 1, "scatter_mm": 2, "glu_backward_out": 1}
    idle = [e for e in range(E) if e not in expert_S.tolist()]
    assert not got[NAMES.index("w_in")][idle].any() and not got[NAMES.index("w_out")][idle].any()


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """1 thread, and 2: the down kernel cuts columns into narrower ranges per thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _hf_layout(inputs):
    """The weights as transposed views of [E, G, D] and [E, D, F] storage (transformers)."""
    out = dict(inputs)
    out["w_in"] = inputs["w_in"].transpose(1, 2).contiguous().transpose(1, 2)
    out["w_out"] = inputs["w_out"].transpose(1, 2).contiguous().transpose(1, 2)
    return out


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_fused_bf16_blocks_and_weight_views(kernels, monkeypatch, threads, kind):
    """Several blocks (the fp32 combine accumulates across them), transposed weight views,
    odd widths and an idle expert, against the fp64 per-token reference."""
    counting = _Counting(kernels)
    monkeypatch.setattr(cpu_ext, "bf16", lambda: counting)
    token_S, offsets_E, expert_S, inputs, g = _problem(45, 9, 3, 47, 37, "skip", seed=2)
    inputs = _hf_layout(inputs)
    p = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = fused_experts(p["x"], token_S, p["weight"], offsets_E, p["w_in"], p["w_out"],
                      p["b_in"], p["b_out"], _act(kind), kind, block_rows=40)
    got = [y.detach(), *torch.autograd.grad(y, list(p.values()), g)]
    _assert_close(got, _reference(token_S, expert_S, inputs, g, kind), NAMES)
    assert counting.calls["glu_up_out"] >= 3  # 135 rows in blocks of at most 40 + one expert
    assert got[NAMES.index("w_in")].stride() == inputs["w_in"].stride()


def test_other_activations_keep_the_unfused_path(kernels, monkeypatch):
    """An activation without a fused epilogue: the plain bf16 GEMMs and aten in between."""
    counting = _Counting(kernels)
    monkeypatch.setattr(cpu_ext, "bf16", lambda: counting)
    token_S, offsets_E, expert_S, inputs, g = _problem(37, 7, 3, 33, 19, "random", seed=3)
    got = _fused(token_S, offsets_E, inputs, g, None)  # _act(None): gelu(gate) * up, generic
    _assert_close(got, _reference(token_S, expert_S, inputs, g, None), NAMES)
    assert counting.calls["glu_up_out"] == counting.calls["scatter_mm"] == 0
    assert counting.calls["grouped_mm_out"] == 4


# which inputs want a gradient, and whether the experts have biases: each leaves out
# another part of the fused backward (bf16_fused.backward_block), and the rest must not
# change; the calls that reach the kernels show what it skipped
NEEDS = [
    (["x", "weight", "w_in", "w_out"], False),   # no biases: MoEConfig's default
    (["x", "weight"], True),                     # frozen experts: no weight or bias GEMMs
    (["weight", "w_in", "w_out", "b_in", "b_out"], True),  # x wants none (frozen embedding)
    (["w_in", "w_out", "b_out"], True),          # routing weights detached, b_in frozen
    (["weight"], False),                         # only the router learns: no dx, no dw
]


@pytest.mark.parametrize("need,biases", NEEDS, ids=["+".join(n) + ("" if b else ",no_bias")
                                                    for n, b in NEEDS])
@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_fused_bf16_kernels_compute_only_the_gradients_asked_for(kernels, monkeypatch, need,
                                                                 biases, kind):
    """Without biases and with some inputs frozen, and 5 rows dropped by a capacity (past
    offsets_E[-1]: no output, weight gradient 0): the output and the gradients asked for
    against the fp64 per-token reference over the kept rows."""
    counting = _Counting(kernels)
    monkeypatch.setattr(cpu_ext, "bf16", lambda: counting)
    token_S, offsets_E, expert_S, inputs, g = _problem(37, 7, 3, 33, 19, "random", seed=5)
    if not biases:
        inputs = {**inputs, "b_in": None, "b_out": None}
    S = len(token_S) - 5
    offsets_E = offsets_E.clamp(max=S)
    got = _fused(token_S, offsets_E, inputs, g, kind, need)
    want = _reference(token_S[:S], expert_S[:S], inputs, g, kind, need)
    _assert_close(got, want, ["y", *need])
    if "weight" in need:
        assert not got[1 + need.index("weight")][S:].any()
    assert counting.calls == {
        "grouped_mm_out": 0, "glu_up_out": 1, "glu_backward_out": 1,
        "scatter_mm": 1 + ("x" in need),  # the output's, then dx's
        "grouped_mm_weight_out": ("w_in" in need) + ("w_out" in need)}


@pytest.mark.parametrize("layout", ["stacked", "list", "list_of_views"])
def test_fused_experts_into_bf16_on_the_kernels(kernels, monkeypatch, layout):
    """The offloaded experts' prefill (fused_experts_into, no autograd) in bf16: per-block
    GEMMs on the kernels (a list of per-expert matrices, as the expert cache holds them,
    stacked in its layout first), added to an output that already holds values, against
    the fp64 per-token reference. The combine adds K rows in bf16 onto those values: K + 1
    roundings in place of the fused path's fp32 sum, within the same 12 u."""
    counting = _Counting(kernels)
    monkeypatch.setattr(cpu_ext, "bf16", lambda: counting)
    token_S, offsets_E, expert_S, inputs, start = _problem(45, 9, 3, 47, 37, "skip", seed=6)
    w_in, w_out = inputs["w_in"], inputs["w_out"]
    if layout != "stacked":
        w_in, w_out = list(w_in.unbind(0)), list(w_out.unbind(0))
    if layout == "list_of_views":  # [D, G] views of [G, D] storage (transformers' layout)
        w_in, w_out = ([w.t().contiguous().t() for w in ws] for ws in (w_in, w_out))
    out = start.clone()
    got = fused_experts_into(out, inputs["x"], token_S, inputs["weight"], offsets_E, w_in,
                             w_out, inputs["b_in"], inputs["b_out"], _act("swiglu"), "swiglu",
                             block_rows=40)
    assert got is out
    want = start.double() + _reference(token_S, expert_S, inputs, None, "swiglu", need=[])[0]
    _assert_close([out], [want], ["y"])
    assert counting.calls["grouped_mm_out"] >= 6  # up and down of 3 blocks or more


@pytest.mark.parametrize("T,E,K,D,Fd,how", [CASES[1], CASES[4]])
def test_forced_aten_fallback_matches_fp64_per_token(monkeypatch, T, E, K, D, Fd, how):
    monkeypatch.setenv(cpu_ext.BF16_ENV, "0")
    assert cpu_ext.bf16() is None
    token_S, offsets_E, expert_S, inputs, g = _problem(T, E, K, D, Fd, how, seed=1)
    got = _fused(token_S, offsets_E, inputs, g, "geglu")
    _assert_close(got, _reference(token_S, expert_S, inputs, g, "geglu"), NAMES)


# -- the GEMM entry points ------------------------------------------------------------

# (X, Y, rows per expert): an expert without rows, single rows, odd widths, and
# experts cut into column and row tiles
GEMMS = [(64, 256, [0, 1, 37, 0, 300, 5]), (512, 64, [0, 2000, 3]), (33, 47, [3, 0, 17, 1])]


@pytest.mark.parametrize("X,Y,rows", GEMMS)
@pytest.mark.parametrize("transposed", [False, True], ids=["w", "w_view_T"])
def test_grouped_mm_matches_fp64(kernels, X, Y, rows, transposed):
    gen = torch.Generator().manual_seed(0)
    ends = torch.tensor(rows).cumsum(0).tolist()
    a = torch.randn(ends[-1] + 3, X, generator=gen).bfloat16()  # 3 rows past the last expert
    shape = (len(rows), Y, X) if transposed else (len(rows), X, Y)
    w = torch.randn(shape, generator=gen).bfloat16()
    w = w.transpose(1, 2) if transposed else w
    out = torch.full((a.shape[0], Y), 7.0).bfloat16()
    kernels.grouped_mm_out(a, w, ends, out)
    for e, (s, t) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        want = a[s:t].double() @ w[e].double()
        # one bf16 rounding (u = 2^-9 of the entry; 2^-8 leaves room) plus the fp32 sum's
        # error, at most X * 2^-24 of the sum of |products| (2^-15 covers X <= 512)
        bound = 2.0**-8 * want.abs() + 2.0**-15 * (a[s:t].double().abs() @ w[e].double().abs())
        assert ((out[s:t].double() - want).abs() <= bound).all()
    assert (out[ends[-1]:] == 7).all()


@pytest.mark.parametrize("X,Y,rows", GEMMS)
def test_grouped_weight_grad_matches_fp64(kernels, X, Y, rows):
    gen = torch.Generator().manual_seed(1)
    ends = torch.tensor(rows).cumsum(0).tolist()
    a = torch.randn(ends[-1], X, generator=gen).bfloat16()
    b = torch.randn(ends[-1], Y, generator=gen).bfloat16()
    out = torch.full((len(rows), Y, X), 7.0).bfloat16().transpose(1, 2)  # a strided target
    kernels.grouped_mm_weight_out(a, b, ends, out)
    for e, (s, t) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        if s == t:
            assert (out[e] == 7).all()  # experts without rows: untouched
            continue
        want = a[s:t].double().t() @ b[s:t].double()
        # the whole reduction in fp32, then one bf16 rounding (as above; 2000 rows: 2^-13)
        bound = 2.0**-8 * want.abs() + 2.0**-13 * (a[s:t].double().abs().t() @
                                                   b[s:t].double().abs())
        assert ((out[e].double() - want).abs() <= bound).all()


@pytest.mark.parametrize("X,Y,rows", GEMMS)
def test_scatter_mm_matches_fp64(kernels, threads, X, Y, rows):
    """out[tok] += w * (a @ b[e] + bias[e]) into a float32 out that already holds values,
    rows of one token spread over several experts, transposed weight views."""
    gen = torch.Generator().manual_seed(2)
    ends = torch.tensor(rows).cumsum(0).tolist()
    N, T = ends[-1], 11
    a = torch.randn(N + 2, X, generator=gen).bfloat16()  # 2 rows past the last expert
    b = torch.randn(len(rows), Y, X, generator=gen).bfloat16().transpose(1, 2)
    bias = torch.randn(len(rows), Y, generator=gen).bfloat16()
    w = torch.rand(N + 2, generator=gen)
    tok = torch.randint(0, T, (N + 2,), generator=gen)
    out = torch.randn(T, Y, generator=gen)
    want = out.double().clone()
    for e, (s, t) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        y = a[s:t].double() @ b[e].double() + bias[e].double()
        want.index_add_(0, tok[s:t], w[s:t, None].double() * y)
    kernels.scatter_mm(a, b, bias, w, tok, ends, out)
    # fp32 products and sums only, no bf16 rounding: X * 2^-24 of the sum of |terms|
    # (2^-14 covers X <= 512 with the adds of the scatter)
    scale = torch.zeros(T, Y, dtype=torch.float64)
    for e, (s, t) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        mag = a[s:t].double().abs() @ b[e].double().abs() + bias[e].double().abs()
        scale.index_add_(0, tok[s:t], w[s:t, None].double() * mag)
    assert ((out.double() - want).abs() <= 2.0**-14 * (scale + want.abs())).all()


def test_rejects_non_bf16(kernels):
    a = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="a_NX must be bfloat16"):
        kernels.grouped_mm_out(a, torch.randn(1, 8, 8).bfloat16(), [4],
                               torch.empty(4, 8).bfloat16())


# -- the dtype `moekit train` picks ------------------------------------------------------

def _train_config(monkeypatch, native: bool, flags: list[str], command=train_cli):
    """TrainConfig from the command line on a CPU with or without native bf16 (simulated
    where torch reads the CPU's flags)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return train_cli.configs_from_args(parser.parse_args(flags))[1]


@pytest.mark.parametrize("native,flags,bf16", [
    (True, [], False),                 # fp32 by default: bf16 measured slower end to end
    (False, [], False),                # no native bf16: fp32
    (True, ["--fp32"], False),         # forced off
    (False, ["--bf16"], True),         # asked for
    (True, ["--device", "cuda"], False),  # the default is about this CPU only
])
def test_train_default_dtype(monkeypatch, native, flags, bf16):
    assert _train_config(monkeypatch, native, flags).bf16 is bf16


def test_compare_keeps_fp32_and_flags_conflict(monkeypatch):
    assert _train_config(monkeypatch, True, [], compare).bf16 is False
    with pytest.raises(ValueError, match="--bf16 and --fp32"):
        _train_config(monkeypatch, True, ["--bf16", "--fp32"])


def test_experts_run_in_bf16_under_cpu_autocast():
    """Autocast's rules stop at the fused Function: Experts casts as nn.Linear would, so
    `moekit train --bf16` runs bf16 expert GEMMs while the parameters stay fp32."""
    from moekit import MoE, MoEConfig

    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=32, ffn_dim=16, num_experts=4, top_k=2))
    x = torch.randn(10, 32)
    want = moe(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)[0]
    assert y.dtype == torch.bfloat16
    assert (y.double() - want.double()).abs().max() <= TOL * want.abs().max()
    y.float().square().sum().backward()
    assert moe.experts.w_in.grad.dtype == torch.float32 and moe.experts.w_in.grad.abs().sum() > 0


def test_fused_bf16_with_kept_row_buffers(kernels, monkeypatch):
    """Inference inside reuse_row_buffers: the same output, every block's h in one kept
    buffer instead of a fresh one per block."""
    counting = _Counting(kernels)
    monkeypatch.setattr(cpu_ext, "bf16", lambda: counting)
    token_S, offsets_E, _, inputs, _ = _problem(45, 9, 3, 47, 37, "skip", seed=4)

    def run():
        return fused_experts(inputs["x"], token_S, inputs["weight"], offsets_E, inputs["w_in"],
                             inputs["w_out"], inputs["b_in"], inputs["b_out"], _act("swiglu"),
                             "swiglu", block_rows=40)

    with torch.no_grad():
        want = run()
        kept = RowBuffers()
        with reuse_row_buffers(kept):
            got = run()
    assert counting.calls["glu_up_out"] >= 6  # both runs in blocks
    assert {k[0] for k in kept._bufs} == {"a", "h"}
    assert torch.equal(got, want)


def test_bf16_training_step_on_the_kernels_is_as_close_to_fp32_as_aten(kernels, monkeypatch):
    """`moekit train --bf16`'s step end to end (the tiny preset, aux loss included): every
    parameter's gradient under bf16 autocast, on the kernels and on aten's mm, against the
    same model's fp32 gradient. Outside the experts both run the same bf16 ops, and the
    kernels round the same bf16 values no more often (their combine sums in fp32), so
    their error may exceed aten's only by the scatter of rounding errors: at most 1.5x
    (measured 0.72-1.06x here with 1 or 2 threads, 0.70-1.03x from seed 1, 0.89-1.08x
    on the small preset). A wrong term shows as a multiple: d weight 10% too large made
    the routers' gradient errors 17-20x aten's and the FFN norms' 5-7x."""
    counting = _Counting(kernels)
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny"))
    ids_BL = torch.randint(0, model.config.vocab_size, (4, 65))

    def grads(bf16: bool, ext) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(cpu_ext, "bf16", lambda: ext)  # None: aten's mm
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, [(ids_BL[:, :-1], ids_BL[:, 1:])], TrainConfig(bf16=bf16))
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want, on, off = grads(False, None), grads(True, counting), grads(True, None)
    assert counting.calls["glu_backward_out"] == 2  # both MoE layers on the kernels
    for name, g in want.items():
        err_on, err_off = ((got[name] - g).norm() / g.norm() for got in (on, off))
        assert err_on <= 1.5 * err_off, f"{name}: {err_on:.2e} > 1.5 x aten's {err_off:.2e}"
