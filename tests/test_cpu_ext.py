"""The C++ CPU grouped GEMMs (moekit/csrc/cpu_experts.cpp) against fp64 per-expert products.

Covers experts without rows, transposed weight views, outputs cut into tiles
(large experts), 1 and 2 threads, bf16, rows past the last expert left alone,
the whole MoE layer with and without the extension, and the fallback when the
build is disabled or fails. Shape letters: N rows sorted by expert, X input
width, Y output width, B experts.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.functions import cpu_ext

# (X, Y, rows per expert): empty experts, a single row, and experts large enough
# that their output is cut into tiles (cost > 32 x 64 x 512 multiply-adds): by
# columns in the first shape, by rows in the second (Y = 64 is one column tile)
SHAPES = [(64, 256, [0, 1, 37, 0, 300, 5, 260]), (512, 64, [0, 2000, 3])]
X, Y = 64, 256
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


@pytest.fixture(scope="module")
def ext():
    module = cpu_ext.get()
    assert module is not None, "the C++ CPU kernels did not build on this machine"
    return module


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _ends(rows):
    return torch.tensor(rows).cumsum(0).tolist()


def _close(got, want, dtype):
    atol, rtol = TOL[dtype]
    err = (got.double() - want).abs().max().item()
    assert err <= atol + rtol * want.abs().max().item(), err


@pytest.mark.parametrize("shape", SHAPES, ids=["col_tiles", "row_tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["w", "w_view_T"])
def test_grouped_mm_matches_per_expert_products(ext, threads, shape, dtype, transposed):
    X, Y, rows = shape
    gen = torch.Generator().manual_seed(0)
    ends, B = _ends(rows), len(rows)
    a = torch.randn(ends[-1] + 3, X, generator=gen).to(dtype)  # 3 rows past the last expert
    w = torch.randn(B, Y, X, generator=gen).to(dtype).transpose(1, 2) if transposed \
        else torch.randn(B, X, Y, generator=gen).to(dtype)
    out = torch.full((a.shape[0], Y), 7.0, dtype=dtype)
    ext.grouped_mm_out(a, w, ends, out)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            _close(out[start:end], a[start:end].double() @ w[e].double(), dtype)
        start = end
    assert (out[ends[-1]:] == 7).all()  # rows past the last expert untouched
    # the experts as a list of [X, Y] matrices (the expert cache's): the same tiles
    listed = torch.full_like(out, 7.0)
    ext.grouped_mm_list_out(a, list(w.unbind(0)), ends, listed)
    assert torch.equal(listed, out)


@pytest.mark.parametrize("shape", SHAPES, ids=["col_tiles", "row_tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_grouped_weight_grad_matches_per_expert_products(ext, threads, shape, dtype):
    X, Y, rows = shape
    gen = torch.Generator().manual_seed(1)
    ends, B = _ends(rows), len(rows)
    a = torch.randn(ends[-1], X, generator=gen).to(dtype)
    b = torch.randn(ends[-1], Y, generator=gen).to(dtype)
    out = torch.full((B, X, Y), 7.0, dtype=dtype)
    ext.grouped_mm_weight_out(a, b, ends, out)
    start = 0
    for e, end in enumerate(ends):
        if end == start:
            assert (out[e] == 7).all()  # experts without rows: left to the caller
        else:
            _close(out[e], a[start:end].double().t() @ b[start:end].double(), dtype)
        start = end


# moekit's own fp32 GEMM (sgemm_rows: on AVX-512F CPUs, experts of up to
# ext.sgemm_max_rows() rows and weights of at least 512 x 1024 elements): rows 1-6 (every
# register block), 7 and 13 (blocks of 4 + 3 and 5 + 4 + 4), 96 (the limit: its own kernel)
# and 97 (aten); X = 300 spans 3 packed blocks of 128 with a tail, Y = 2100 three passes
# of columns, the last with a partial panel (1,024 + 1,024 + 52); with 2 threads the
# larger experts' outputs are also cut into column tiles
SGEMM_ROWS = [1, 2, 3, 4, 5, 6, 7, 13, 0, 64, 96, 97]
SGEMM_X, SGEMM_Y = 300, 2100


def _small_ints(gen, *shape):
    return torch.randint(-3, 4, shape, generator=gen).float()


@pytest.mark.parametrize("sgemm", ["1", "0"], ids=["moekit_gemm", "aten_mm"])
def test_small_row_gemm_is_exact_on_integers(ext, threads, monkeypatch, sgemm):
    """Small integers: every product and partial sum is exact in fp32, so any path must
    equal the fp64 product bit for bit (an indexing, masking or packing slip cannot hide
    in a tolerance)."""
    monkeypatch.setenv("MOEKIT_SGEMM", sgemm)
    gen = torch.Generator().manual_seed(3)
    ends, B = _ends(SGEMM_ROWS), len(SGEMM_ROWS)
    a = _small_ints(gen, ends[-1] + 2, SGEMM_X)
    w = _small_ints(gen, B, SGEMM_X, SGEMM_Y)
    out = torch.full((a.shape[0], SGEMM_Y), 7.0)
    before = ext.sgemm_tiles()
    ext.grouped_mm_out(a, w, ends, out)
    assert (ext.sgemm_tiles() > before) == (ext.sgemm_max_rows() > 0)  # which path ran
    start = 0
    for e, end in enumerate(ends):
        assert torch.equal(out[start:end], (a[start:end].double() @ w[e].double()).float())
        start = end
    assert (out[ends[-1]:] == 7).all()
    listed = torch.full_like(out, 7.0)
    ext.grouped_mm_list_out(a, list(w.unbind(0)), ends, listed)
    assert torch.equal(listed, out)


def test_small_row_gemm_on_floats(ext, threads, monkeypatch):
    """Random floats: both paths within fp32's error of the fp64 product."""
    gen = torch.Generator().manual_seed(4)
    ends, B = _ends(SGEMM_ROWS), len(SGEMM_ROWS)
    a = torch.randn(ends[-1], SGEMM_X, generator=gen)
    w = torch.randn(B, SGEMM_X, SGEMM_Y, generator=gen)
    for flag in ("1", "0"):
        monkeypatch.setenv("MOEKIT_SGEMM", flag)
        out = torch.empty(a.shape[0], SGEMM_Y)
        ext.grouped_mm_out(a, w, ends, out)
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                _close(out[start:end], a[start:end].double() @ w[e].double(), torch.float32)
            start = end


def test_small_row_gemm_takes_experts_up_to_its_limit(ext, monkeypatch):
    """Where the CPU has AVX-512F: experts of up to 96 rows run moekit's GEMM; larger
    ones, weights under 512 x 1024 elements, other dtypes, strided weights and
    MOEKIT_SGEMM=0 aten's mm."""
    monkeypatch.setenv("MOEKIT_SGEMM", "1")
    limit = ext.sgemm_max_rows()
    if limit == 0:
        pytest.skip("no AVX-512F: aten's mm only")
    assert limit == 96
    gen = torch.Generator().manual_seed(5)

    def tiles(rows, dtype=torch.float32, transposed=False, x=512, y=1024):
        ends = _ends(rows)
        a = torch.randn(ends[-1], x, generator=gen).to(dtype)
        w = torch.randn(len(rows), y, x, generator=gen).to(dtype).transpose(1, 2) \
            if transposed else torch.randn(len(rows), x, y, generator=gen).to(dtype)
        before = ext.sgemm_tiles()
        ext.grouped_mm_out(a, w, ends, torch.empty(ends[-1], y, dtype=dtype))
        return ext.sgemm_tiles() - before

    assert tiles([96, 1, 0]) >= 2
    assert tiles([97, 200]) == 0
    assert tiles([96, 97]) >= 1 and tiles([97]) == 0
    assert tiles([30], dtype=torch.bfloat16) == 0
    assert tiles([30], transposed=True) == 0
    assert tiles([30], y=1008) == 0 and tiles([30], x=1024, y=512) >= 1
    monkeypatch.setenv("MOEKIT_SGEMM", "0")
    assert ext.sgemm_max_rows() == 0 and tiles([30]) == 0


def test_bad_shapes_are_named(ext):
    a, w, out = torch.randn(10, X), torch.randn(3, X, Y), torch.empty(10, Y)
    with pytest.raises(RuntimeError, match="ends has 2 entries for 3 experts"):
        ext.grouped_mm_out(a, w, [4, 10], out)
    with pytest.raises(RuntimeError, match="exceeds the 10 rows"):
        ext.grouped_mm_out(a, w, [4, 10, 11], out)
    with pytest.raises(RuntimeError, match="do not chain"):
        ext.grouped_mm_out(a, torch.randn(3, X + 1, Y), [4, 8, 10], out)
    with pytest.raises(RuntimeError, match="ends has 2 entries for 3 experts"):
        ext.grouped_mm_list_out(a, list(w), [4, 10], out)
    with pytest.raises(RuntimeError, match=rf"b_XY\[i\] must be \[{X}, {Y}\] of Float, "
                                           rf"got \[{X}, {Y + 1}\]"):
        ext.grouped_mm_list_out(a, [w[0], w[1], torch.randn(X, Y + 1)], [4, 8, 10], out)
    with pytest.raises(RuntimeError, match=r"got \[64, 256\] of Double"):
        ext.grouped_mm_list_out(a, [w[0], w[1], w[2].double()], [4, 8, 10], out)


@pytest.mark.parametrize("cfg", [
    dict(num_experts=16, top_k=4),
    dict(num_experts=6, top_k=2, capacity_factor=0.6, expert_bias=True),
    dict(num_experts=8, top_k=2, activation="gelu"),
], ids=["E16K4", "drops+bias", "gelu"])
def test_layer_with_and_without_the_extension_agree(ext, threads, cfg, monkeypatch):
    """Weights require grad: the pool's threads must not record autograd."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=32, ffn_dim=48, **cfg), backend="fused")
    x = torch.randn(2, 150, 32)

    def run(module):
        monkeypatch.setattr(cpu_ext, "_module", module)
        xx = x.clone().requires_grad_(True)
        moe.zero_grad(set_to_none=True)
        out = moe(xx)
        (out.output.square().sum() + out.aux_loss).backward()
        return [out.output.detach(), xx.grad] + [p.grad for p in moe.parameters()]

    with_ext, without = run(ext), run(None)
    assert len(with_ext) == len(without)
    for got, want in zip(with_ext, without, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_backward_runs_the_weighted_swiglu_pass(ext, dtype, monkeypatch):
    """The fused path's backward takes the one-pass SwiGLU (glu.weighted_backward) and
    gives the gradients of the aten passes it replaced (capacity drops, expert biases)."""
    from moekit.functions import expert_grads

    if dtype == torch.bfloat16 and cpu_ext.bf16() is not None:
        pytest.skip("this CPU runs bf16 blocks on the AVX-512 BF16 kernels (bf16_fused)")
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=32, ffn_dim=48, num_experts=6, top_k=2, capacity_factor=0.6,
                        expert_bias=True), backend="fused").to(dtype)
    x = torch.randn(2, 150, 32, dtype=dtype)
    calls: list[bool] = []
    real = expert_grads.weighted_backward

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    def grads(layer, inp, weighted):
        # Grads (expert_grads.py) calls it: patch it there
        monkeypatch.setattr(expert_grads, "weighted_backward", weighted)
        xx = inp.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(xx)
        (out.output.double().square().sum() + out.aux_loss).backward()
        return [xx.grad.double()] + [p.grad.double() for p in layer.parameters()
                                     if p.grad is not None]

    fast = grads(moe, x, spy)
    assert calls and all(calls)
    slow = grads(moe, x, lambda *args: False)
    assert len(fast) == len(slow) >= 5  # x, router, w_in, w_out, b_in, b_out
    if dtype == torch.float32:
        for got, want in zip(fast, slow, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        return
    # bf16 rounds at other points (once per output, not after each of nine passes):
    # against the float64 layer, its error is no larger than the aten passes' (it was
    # 0.4-1.1% of each gradient's largest entry, the passes' 0.4-1.2%)
    ref = grads(copy.deepcopy(moe).double(), x.double(), real)
    for got, want, exact in zip(fast, slow, ref, strict=True):
        scale = exact.abs().max().item()
        err_fast = (got - exact).abs().max().item() / scale
        err_slow = (want - exact).abs().max().item() / scale
        assert err_fast <= 1.1 * err_slow + 1e-3 and err_fast < 0.03, (err_fast, err_slow)


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_tried", False)
    monkeypatch.setattr(cpu_ext, "_module", None)
    monkeypatch.setenv(cpu_ext.ENV, "0")
    assert cpu_ext.get() is None


def test_a_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_ext, "_tried", False)
    monkeypatch.setattr(cpu_ext, "_module", None)
    monkeypatch.setattr(cpu_ext, "SOURCE", broken)
    monkeypatch.setattr(cpu_ext, "NAME", "moekit_test_broken_build")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.delenv(cpu_ext.ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="could not be built or loaded.*Python loop"):
        assert cpu_ext.get() is None
    assert cpu_ext.get() is None  # tried once, not again


@pytest.mark.parametrize("built", [False, True], ids=["first-build", "rebuild"])
@pytest.mark.parametrize("age_min, removed", [(60, True), (1, False)])
def test_a_killed_builds_lock_is_removed_a_live_ones_is_not(tmp_path, monkeypatch, capsys,
                                                             age_min, removed, built):
    """torch waits forever on a lock its build left when killed; moekit removes one older
    than STALE_LOCK_S before building and leaves a younger one (a build in progress).
    Also where the module was built before and torch rebuilds it (its source moved: a
    killed rebuild's lock hung every later run)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    where = cpu_ext.build_dir("moekit_test_lock", cpu_ext.SOURCE)
    where.mkdir(parents=True)
    if built:
        (where / "moekit_test_lock.so").touch()
    lock = where / "lock"
    lock.touch()
    old = time.time() - 60 * age_min
    os.utime(lock, (old, old))
    seen = {}

    def fake_load(**kwargs):  # stands in for torch's build: records what it would wait on
        seen["lock"] = lock.exists()
        return "module"

    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    assert cpu_ext._build("moekit_test_lock", cpu_ext.SOURCE, "test kernels", "") == "module"
    assert seen["lock"] is not removed
    err = capsys.readouterr().err
    assert ("removing the build lock" in err) is removed
    assert ("waiting for another build's lock" in err) is not removed


def _swiglu64(h, da):
    """fp64 SwiGLU and its backward from the formulas: (a, d gate, d up)."""
    F = h.shape[1] // 2
    g, u, da = h[:, :F].double(), h[:, F:].double(), da.double()
    s = torch.sigmoid(g)
    return g * s * u, da * u * s * (1 + g * (1 - s)), da * g * s


@pytest.mark.parametrize("F", [1, 13, 100, 256], ids=lambda f: f"F{f}")
def test_one_pass_swiglu_matches_the_formulas(ext, threads, F):
    """Odd widths hit the vector loops' remainders; |gate| up to 100 saturates exp."""
    gen = torch.Generator().manual_seed(2)
    n = 70
    h_wide = torch.randn(n, 2 * F + 5, generator=gen) * 6  # rows with a stride > 2F
    h_wide[0, :F] = torch.linspace(-100, 100, F)
    h = h_wide[:, :2 * F]
    da = torch.randn(n, F, generator=gen)
    a, a2, dh = torch.empty(n, F), torch.empty(n, F), torch.empty(n, 2 * F)
    ext.swiglu_out(h, a)
    ext.swiglu_backward_out(h, da, a2, dh)
    want_a, want_dg, want_du = _swiglu64(h, da)
    for got, want in ((a, want_a), (a2, want_a), (dh[:, :F], want_dg), (dh[:, F:], want_du)):
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(),
                                   rtol=1e-5)


def _bf16_close(got, want, scale):
    """Within one bf16 rounding of the exact value (2^-8 relative), plus fp32 arithmetic
    on the row's scale."""
    err = (got.double() - want).abs()
    assert (err <= 2.0**-8 * want.abs() + 1e-6 * scale).all(), (err - 2.0**-8 * want.abs()).max()


@pytest.mark.parametrize("F", [1, 13, 256, 300], ids=lambda f: f"F{f}")
def test_one_pass_swiglu_in_bf16(ext, threads, F):
    """bf16 rows: computed in fp32 from the bf16 inputs, each output rounded once.
    F = 300 crosses the kernels' 256-element chunks."""
    gen = torch.Generator().manual_seed(3)
    n = 40
    h = (torch.randn(n, 2 * F + 3, generator=gen) * 6).bfloat16()[:, :2 * F]
    da = torch.randn(n, F, generator=gen).bfloat16()
    a, a2 = torch.empty(n, F, dtype=torch.bfloat16), torch.empty(n, F, dtype=torch.bfloat16)
    dh = torch.empty(n, 2 * F, dtype=torch.bfloat16)
    ext.swiglu_out(h, a)
    ext.swiglu_backward_out(h, da, a2, dh)
    want_a, want_dg, want_du = _swiglu64(h, da)
    for got, want in ((a, want_a), (a2, want_a), (dh[:, :F], want_dg), (dh[:, F:], want_du)):
        _bf16_close(got, want, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("F", [1, 13, 256, 300], ids=lambda f: f"F{f}")
def test_weighted_swiglu_backward_matches_the_formulas(ext, threads, dtype, F):
    """aw = w act(h), dh with da = w gu, and d w = rowsum(gu act(h)) in one pass."""
    gen = torch.Generator().manual_seed(4)
    n = 50
    h = (torch.randn(n, 2 * F + 5, generator=gen) * 4).to(dtype)[:, :2 * F]
    gu = torch.randn(n, F, generator=gen).to(dtype)
    w = torch.rand(n, generator=gen)
    aw, dh = torch.empty(n, F, dtype=dtype), torch.empty(n, 2 * F, dtype=dtype)
    dw = torch.empty(n)
    ext.swiglu_backward_weighted_out(h, gu, w, aw, dh, dw)
    w64 = w.double()[:, None]
    act, dg, du = _swiglu64(h, gu.double() * w64)
    want_dw = (gu.double() * act).sum(1)
    dw_scale = (gu.double() * act).abs().sum(1)  # the sum's own rounding scale
    assert ((dw.double() - want_dw).abs() <= 1e-5 * dw_scale + 1e-12).all()
    for got, want in ((aw, act * w64), (dh[:, :F], dg), (dh[:, F:], du)):
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1e-5,
                                       atol=1e-5 * want.abs().max().item())
        else:
            _bf16_close(got, want, want.abs().max().item())


def test_one_pass_swiglu_rejects_other_dtypes(ext):
    h = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="h_NG must be float32 or bfloat16, got Double"):
        ext.swiglu_out(h, torch.empty(4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"h_NG must be \[4, 6\]"):
        ext.swiglu_out(h.float(), torch.empty(4, 3))
    with pytest.raises(RuntimeError, match="a_NF must be Float like h_NG, got BFloat16"):
        ext.swiglu_out(h.float(), torch.empty(4, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"w_N must be a contiguous float32 \[4\]"):
        ext.swiglu_backward_weighted_out(h.float(), torch.randn(4, 4), torch.rand(4).double(),
                                         torch.empty(4, 4), torch.empty(4, 8), torch.empty(4))


def test_two_checkouts_of_one_source_build_from_the_same_file(tmp_path, monkeypatch):
    """torch's ninja file names the source path: built from each checkout's own path, every
    clone of the same tree rebuilt the kernels. The build names a copy in the build
    directory (keyed by the source's text), the same path for every checkout."""
    import torch.utils.cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    sources, sources_seen = [], []

    def fake_load(name, sources: list, build_directory, **kwargs):
        sources_seen.append((sources, build_directory))
        return "module"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    for clone in ("a", "b"):
        src = tmp_path / clone / "csrc" / "cpu_decode.cpp"
        src.parent.mkdir(parents=True)
        src.write_text(cpu_ext.DECODE_SOURCE.read_text())
        sources.append(src)
        assert cpu_ext._build("moekit_test_copy", src, "test kernels", "") == "module"
    (s1, d1), (s2, d2) = sources_seen
    assert s1 == s2 and d1 == d2
    built_from = Path(s1[0])
    assert built_from.parent == Path(d1) and built_from.read_text() == sources[0].read_text()
    # a changed source gets its own directory and its own copy
    sources[1].write_text(sources[1].read_text() + "\n// changed\n")
    cpu_ext._build("moekit_test_copy", sources[1], "test kernels", "")
    s3, d3 = sources_seen[-1]
    assert d3 != d1 and Path(s3[0]).read_text().endswith("// changed\n")
    assert built_from.read_text() == sources[0].read_text()
