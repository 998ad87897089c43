"""Weight-only quantized experts: the format, the kernels, moekit.quantize, checkpoints.

Oracles: the quantization's own definition (every weight within half a step of
its dequantized value), and "dequantize, then the float loop backend" for the
kernels: both see exactly the same float weights, so fp32 tolerances apply
(1e-5 absolute, 1e-4 relative: summation order only).

Shape letters: T tokens, D hidden, F expert hidden, E experts, K experts per token,
N output width, g group size.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import moekit
from moekit.experts import backends
from moekit.experts.backends import BACKENDS
from moekit.functions import cpu_ext, decode
from moekit.inference import sorted_rows
from moekit.models import MoETransformer, preset
from moekit.quant import QuantizationError, QuantizedTensor, quantize, quantize_tensor
from moekit.quant import io as qio
from moekit.quant.linear import QuantizedEmbedding, QuantizedLinear
from moekit.quant.tensor import _dequantize_torch, dequantize_NK, pack_int4, unpack_int4
from moekit.train.checkpoint import CheckpointError, save_checkpoint
from moekit.train.rundir import sha256 as _sha256

FORMATS = [(8, None), (4, 32), (4, 64), (4, 128)]


@pytest.mark.parametrize("bits,g", FORMATS)
def test_every_weight_within_half_a_step(bits, g):
    w = torch.randn(3, 128, 40) * torch.linspace(0.1, 3, 40)  # [E, K, N], varied columns
    w[1, :, 5] = 0.7  # a constant column: int4 represents it exactly
    q = quantize_tensor(w, bits, g)
    assert q.shape == w.shape
    back = q.dequantize()
    w_ENK = w.transpose(1, 2)
    if bits == 8:
        step = w_ENK.abs().amax(-1, keepdim=True) / 127
    else:
        grp = w_ENK.unflatten(-1, (-1, g))
        step = ((grp.amax(-1) - grp.amin(-1)) / 15).repeat_interleave(g, -1)
    err = (back.transpose(1, 2) - w_ENK).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    if bits == 4:
        assert torch.equal(back[1, :, 5], w[1, :, 5])


@pytest.mark.parametrize("bits,g", [(8, None), (4, 32)])
@pytest.mark.parametrize("piece", [64, 3 * 64 * 40, 1 << 30], ids=["rows", "experts", "whole"])
def test_quantizing_in_pieces_is_bitwise_the_whole_stack(monkeypatch, bits, g, piece):
    """quantize_tensor works through pieces of QUANT_PIECE elements (rows of an expert,
    or whole experts) to bound its fp32 temporaries: the same bytes as one piece."""
    from moekit.quant import tensor as qt

    w = torch.randn(7, 64, 40, generator=torch.Generator().manual_seed(3)).bfloat16()
    w[2, :, 5] = 0.25  # a constant row: int4 groups with scale 0
    monkeypatch.setattr(qt, "QUANT_PIECE", 1 << 30)
    whole = quantize_tensor(w.transpose(1, 2).contiguous().transpose(1, 2), bits, g)
    monkeypatch.setattr(qt, "QUANT_PIECE", piece)
    got = quantize_tensor(w, bits, g)
    for name, t in whole.state_dict().items():
        assert torch.equal(got.state_dict()[name], t), name


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (2, 3, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (2, 3, 32)
    assert torch.equal(packed[0, 0, 0], q[0, 0, 0] | (q[0, 0, 16] << 4))  # j and j + 16
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.skipif(cpu_ext.get_decode() is None, reason="decode kernels not built")
@pytest.mark.parametrize("bits,g", FORMATS)
def test_cpp_dequantize_equals_torch(bits, g):
    q = quantize_tensor(torch.randn(4, 128, 24), bits, g)
    got = cpu_ext.get_decode().dequantize(q.data, q.scales, q.zeros, bits, g or 0, 1, 3)
    assert torch.equal(got, _dequantize_torch(q, 1, 3))


@pytest.mark.parametrize("kernel", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("bits,g", FORMATS)
def test_dequantize_into_a_buffer(bits, g, kernel, monkeypatch):
    """Into a given buffer (prefill reuses one): the same values, in that buffer; a buffer
    of another shape, dtype or layout is named and left alone."""
    if kernel and cpu_ext.get_decode() is None:
        pytest.skip("decode kernels not built")
    if not kernel:
        monkeypatch.setattr(cpu_ext, "get_decode", lambda: None)
    q = quantize_tensor(torch.randn(4, 128, 24), bits, g)
    buf = torch.full((2, 24, 128), float("nan"))
    got = dequantize_NK(q, 1, 3, buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(buf, _dequantize_torch(q, 1, 3))
    if not kernel:
        return
    for bad in (torch.zeros(2, 24, 127), torch.zeros(2, 24, 128, dtype=torch.float64),
                torch.zeros(2, 128, 24).transpose(1, 2)):
        with pytest.raises(RuntimeError, match=r"out must be a contiguous float32 or bfloat16 "
                                               r"CPU tensor of shape \[2, 24, 128\]"):
            dequantize_NK(q, 1, 3, bad)
        assert (bad == 0).all()


@pytest.mark.parametrize("kernel", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("bits,g", FORMATS)
def test_dequantize_to_bf16_rounds_as_torch_does(bits, g, kernel, monkeypatch):
    """bfloat16 (and float16) out: bitwise float32's values through .to(); in the kernel
    (AVX-512: 16 lanes, then a scalar tail) with ties to even, values that overflow to inf,
    subnormal results, NaN and inf scales."""
    if kernel and cpu_ext.get_decode() is None:
        pytest.skip("decode kernels not built")
    if not kernel:
        monkeypatch.setattr(cpu_ext, "get_decode", lambda: None)
    K = {8: 72, 32: 96, 64: 192, 128: 384}[g or 8]  # int8: 4 x 16 lanes + a tail of 8
    q = quantize_tensor(torch.randn(3, K, 40), bits, g)
    special = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, 1e-41, float("nan"),
                            float("inf")])
    q.scales[1, :special.numel()] = special.view(-1, *[1] * (q.scales.dim() - 2))
    if q.zeros is not None:  # s * q exactly: 1 + 3 * 2**-8 (q = 1) is a tie to round up
        q.zeros[1, :special.numel()] = 0
    want = dequantize_NK(q, 0, 3)
    assert want.isnan().any() and want.isinf().any()  # the cases above are there

    def same(a, b):  # bitwise, NaN for NaN (its payload aside)
        nan = b.isnan()
        return torch.equal(a.isnan(), nan) and torch.equal(
            a.masked_fill(nan, 0).view(torch.int16), b.masked_fill(nan, 0).view(torch.int16))

    for dtype in (torch.bfloat16, torch.float16):
        got = dequantize_NK(q, 0, 3, dtype=dtype)
        assert got.dtype == dtype and same(got, want.to(dtype))
    buf = torch.empty(2, 40, K, dtype=torch.bfloat16)
    assert dequantize_NK(q, 1, 3, buf).data_ptr() == buf.data_ptr()
    assert same(buf, want[1:].bfloat16())


@pytest.mark.parametrize("bits,g", FORMATS)
def test_dequantized_prefill_skips_empty_experts_and_reuses_its_buffer(bits, g, monkeypatch):
    """Blocks of 3 experts, rows for experts 0, 1, 3, 5 and 7 only: experts 2, 4 and 6
    are never dequantized, and their buffer slots (4 and 6 hold experts 1 and 3 of an
    earlier block) are never read: the result is dequantize-then-matmul's."""
    monkeypatch.setattr(backends, "QUANT_KERNEL_MAX_ROWS", 0)
    monkeypatch.setattr(decode, "DEQUANT_BLOCK_EXPERTS", 3)
    seen = []
    real = decode.dequantize_NK

    def spy(qt, e0, e1, out=None):
        seen.append((e0, e1))
        return real(qt, e0, e1, out)

    monkeypatch.setattr(decode, "dequantize_NK", spy)
    D, E = 128, 8
    cfg = moekit.MoEConfig(dim=D, ffn_dim=128, num_experts=E, top_k=2, expert_bias=True)
    ex = moekit.experts.Experts(cfg).requires_grad_(False)
    ex.b_in.normal_()
    qi, qo = quantize_tensor(ex.w_in, bits, g), quantize_tensor(ex.w_out, bits, g)
    gen = torch.Generator().manual_seed(0)
    touched = torch.tensor([0, 1, 3, 5, 7])
    T = 12
    idx = torch.stack([touched[torch.randperm(5, generator=gen)[:2]] for _ in range(T)])
    d = sorted_rows(idx, torch.rand(T, 2, generator=gen), E)
    assert set(idx.flatten().tolist()) == set(touched.tolist())
    x = torch.randn(T, D, generator=gen)
    with torch.no_grad():
        got = BACKENDS["decode"](x, d, qi, qo, ex.b_in, ex.b_out, ex._act)
        want = BACKENDS["loop"](x, d, _dequantized(qi), _dequantized(qo), ex.b_in, ex.b_out,
                                ex._act)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    done = sorted({e for e0, e1 in seen for e in range(e0, e1)})
    assert done == touched.tolist()
    assert sorted(set(seen)) == [(0, 2), (3, 4), (5, 6), (7, 8)]  # runs of experts with rows


@pytest.mark.parametrize("bits,g", [(8, None), (4, 32)])
def test_bf16_prefill_dequantizes_straight_to_bf16(bits, g, monkeypatch):
    """bf16 activations past the kernels' rows: the experts are dequantized into bf16
    buffers (no float32 copy), and the layer equals the loop backend on dequantize's
    weights rounded to bf16."""
    monkeypatch.setattr(backends, "QUANT_KERNEL_MAX_ROWS", 0)
    seen = []
    real = decode.dequantize_NK

    def spy(qt, e0, e1, out=None):
        seen.append(out.dtype)
        return real(qt, e0, e1, out)

    monkeypatch.setattr(decode, "dequantize_NK", spy)
    cfg = moekit.MoEConfig(dim=64, ffn_dim=96, num_experts=6, top_k=2)
    ex = moekit.experts.Experts(cfg).requires_grad_(False)
    qi, qo = quantize_tensor(ex.w_in, bits, g), quantize_tensor(ex.w_out, bits, g)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=gen).bfloat16()
    w, idx = torch.rand(40, 6, generator=gen).topk(2, dim=-1)
    d = sorted_rows(idx, w, 6)
    with torch.no_grad():
        got = BACKENDS["decode"](x, d, qi, qo, None, None, ex._act)
        want = BACKENDS["loop"](x, d, _dequantized(qi).bfloat16(), _dequantized(qo).bfloat16(),
                                None, None, ex._act)
    assert seen and set(seen) == {torch.bfloat16} and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def _dequantized(q: QuantizedTensor) -> torch.Tensor:
    return _dequantize_torch(q, 0, q.data.shape[0]).transpose(1, 2)


@pytest.mark.parametrize("bits,g", FORMATS)
@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (4, 6, 6), (16, 16, 4)])  # 2, 24, 64 rows
@pytest.mark.parametrize("prefill", [False, True], ids=["kernel", "dequantize+fused"])
def test_quantized_experts_match_dequantize_then_matmul(bits, g, T, E, K, prefill,
                                                        monkeypatch):
    if prefill:  # force the many-rows path: dequantize blocks of experts + fused GEMMs
        monkeypatch.setattr(backends, "QUANT_KERNEL_MAX_ROWS", 0)
    D = 256 if bits == 4 else 72  # int8: D not a multiple of 32 (the kernel's tail)
    cfg = moekit.MoEConfig(dim=D, ffn_dim=128 if bits == 4 else 40, num_experts=E, top_k=K,
                           expert_bias=True)
    ex = moekit.experts.Experts(cfg).requires_grad_(False)
    ex.b_in.normal_()
    qi, qo = quantize_tensor(ex.w_in, bits, g), quantize_tensor(ex.w_out, bits, g)
    x = torch.randn(T, D)
    w, idx = torch.rand(T, E).topk(K, dim=-1)
    d = sorted_rows(idx, w, E)
    with torch.no_grad():
        got = BACKENDS["decode"](x, d, qi, qo, ex.b_in, ex.b_out, ex._act)
        want = BACKENDS["loop"](x, d, _dequantized(qi), _dequantized(qo), ex.b_in, ex.b_out,
                                ex._act)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _lm(seed=0, **changes) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(preset("tiny", dim=64, ffn_dim=64, **changes)).eval()


def _dequantized_copy(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """The float model with every quantized weight replaced by its dequantized value
    (torch ops, not the kernels): expert stacks [E, K, N], nn.Linear / nn.Embedding
    weights [N, K], shared-expert weights [K, N]."""
    ref = copy.deepcopy(model)
    for name, q in quantized.named_modules():
        if not isinstance(q, QuantizedTensor):
            continue
        w_EKN = _dequantized(q)
        owner, _, attr = name.rpartition(".")
        parent = ref.get_submodule(owner)
        target = getattr(parent, attr)
        if isinstance(parent, nn.Linear | nn.Embedding):
            value = w_EKN[0].T
        else:
            value = w_EKN if target.dim() == 3 else w_EKN[0]
        with torch.no_grad():
            target.copy_(value)
    return ref


@pytest.mark.parametrize("bits,g", [(8, None), (4, 32)])
def test_quantize_lm_in_place(bits, g):
    model = _lm()
    qmodel = moekit.quantize(copy.deepcopy(model), bits=bits, group_size=g)
    assert isinstance(qmodel.moe_layers()[0].experts.w_in, QuantizedTensor)
    assert qmodel.moe_layers()[0].experts.w_in.shape == model.moe_layers()[0].experts.w_in.shape
    ids = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        got = qmodel(ids).logits
        want = _dequantized_copy(model, qmodel)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw,match", [
    (dict(bits=3), "bits=3"),
    (dict(bits=4, group_size=48), "group_size=48"),
    (dict(bits=8, group_size=64), "group_size=64 is not allowed with bits=8"),
    (dict(bits=4, group_size=128), "does not divide"),  # tiny preset: D = F = 64
    (dict(bits=4, group_size=32.0), "group_size=32.0"),  # was a TypeError from unflatten
    (dict(bits=8.0), "bits=8.0"),
])
def test_bad_requests_change_nothing(kw, match):
    model = _lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=match):
        quantize(model, **kw)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_quantizing_twice_is_refused():
    model = quantize(_lm(), bits=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(model, bits=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_to_dtype_keeps_scales_exact():
    model = quantize(_lm(), bits=4, group_size=32)
    scales = model.moe_layers()[0].experts.w_in.scales.clone()
    model.to(torch.bfloat16)
    q = model.moe_layers()[0].experts.w_in
    assert q.scales.dtype == torch.float32 and torch.equal(q.scales, scales)


def _trained_checkpoint(tmp_path, **changes) -> tuple[MoETransformer, object]:
    model = _lm(**changes)
    with torch.no_grad():  # nonzero biases and gates (their init would hide a lost one)
        for name, p in model.named_parameters():
            if name.endswith(("qkv.bias", "shared.gate")):
                p.uniform_(-1, 1)
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    save_checkpoint(run, model, opt, {"step": 1, "model_config": model.config.to_dict()})
    return model, run


@pytest.mark.parametrize("bits,g,changes", [
    (8, None, {}), (4, 64, {}),
    (4, 64, dict(qkv_bias=True, num_shared_experts=1, shared_ffn_dim=128,
                 shared_expert_gate=True))], ids=["int8", "int4", "int4 qwen2-like"])
def test_checkpoint_round_trip_and_cli(tmp_path, bits, g, changes, capsys):
    from moekit.cli import main

    model, run = _trained_checkpoint(tmp_path, **changes)
    out = tmp_path / "q"
    argv = ["quantize", str(run), "--bits", str(bits), "--out", str(out)]
    assert main(argv + ([] if g is None else ["--group-size", str(g)])) == 0
    loaded = qio.load_quantized(out)
    expect = quantize(copy.deepcopy(model), bits=bits, group_size=g)
    assert loaded.state_dict().keys() == expect.state_dict().keys()
    for k, v in expect.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.randint(0, 256, (1, 9))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, expect(ids).logits)
    assert isinstance(loaded.blocks[0].attn.qkv, QuantizedLinear)
    assert loaded.embed.weight is loaded.head.weight  # tied: one table, saved once
    saved = load_file(str(out / qio.MODEL_FILE))
    assert "blocks.0.attn.qkv.weight.scales" in saved
    if changes:  # the biases and the gate float, the shared expert quantized
        assert torch.equal(saved["blocks.0.attn.qkv.bias"], model.blocks[0].attn.qkv.bias)
        assert isinstance(loaded.blocks[0].ffn.shared.w_in, QuantizedTensor)
        assert torch.equal(loaded.blocks[0].ffn.shared.gate, model.blocks[0].ffn.shared.gate)
    capsys.readouterr()
    for dtype in ("fp32", "bf16"):
        assert main(["generate", "--checkpoint", str(out), "--prompt", "ab", "--dtype", dtype,
                     "--max-new-tokens", "5", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.startswith("ab")


@pytest.mark.parametrize("kw,changes", [
    (dict(bits=8), {}),
    (dict(bits=4, group_size=32), dict(tie_embeddings=False)),
    (dict(bits=4, group_size=64, scope="experts"), {}),
    (dict(bits=4, group_size=64, activations="int8"),
     dict(qkv_bias=True, num_shared_experts=1, shared_ffn_dim=128, shared_expert_gate=True)),
    (dict(bits=8, activations="int8"), dict(tie_embeddings=False, num_kv_heads=2)),
    (dict(bits=8, embeddings=False), dict(tie_embeddings=False)),
], ids=["int8 tied", "int4 untied", "int4 experts", "int4a8 qwen2-like", "int8a8 gqa",
        "int8 float table"])
def test_quantize_checkpoint_streams_the_files_quantizing_the_model_writes(tmp_path, kw,
                                                                          changes):
    """`moekit quantize` writes each weight as it is quantized (a meta model gives the
    layout): the same model.safetensors and quantized.json, bitwise, as quantizing the
    whole model and saving it (``save_quantized``), with one weight's quantized tensors
    alive at a time."""
    import gc
    import weakref

    model, run = _trained_checkpoint(tmp_path, **changes)
    whole = qio.save_quantized(quantize(copy.deepcopy(model), **kw).float(), tmp_path / "whole")
    alive: list[weakref.ref] = []
    peak = [0]
    real = qio.quantize_tensor

    def counting(*a, **k):
        gc.collect()
        peak[0] = max(peak[0], 1 + sum(r() is not None for r in alive))
        q = real(*a, **k)
        alive.append(weakref.ref(q))
        return q

    qio.quantize_tensor = counting
    try:
        streamed = qio.quantize_checkpoint(run, tmp_path / "streamed", **kw)
    finally:
        qio.quantize_tensor = real
    assert len(alive) >= 4 and peak[0] == 1  # (2 layers: w_in, w_out each at least)
    model_file = qio.MODEL_FILE
    assert (streamed / model_file).read_bytes() == (whole / model_file).read_bytes()
    # quantized.json the same but for the float checkpoint a `moekit quantize` output
    # records (its source; save_quantized of a model in memory has none)
    meta_s, meta_w = (json.loads((d / qio.META_FILE).read_text()) for d in (streamed, whole))
    source = meta_s.pop("source")
    assert meta_w.pop("source", None) is None and meta_s == meta_w
    assert source["checkpoint"] == str(run.resolve() / "step_00000001"), source
    assert source["step"] == 1, source


def test_a_bf16_checkpoint_loads_and_quantizes_without_an_fp32_copy(tmp_path):
    """A bf16 checkpoint (what `moekit convert` writes from a bf16 transformers model) is
    assembled from its own tensors: load_model keeps bf16 when asked (dtype=None) or
    gives what restoring into an fp32 model gave, and quantize_checkpoint writes the
    same files as quantizing that fp32 model (bf16 -> fp32 is exact)."""
    from moekit.train.checkpoint import load_checkpoint, restore

    model = _lm().to(torch.bfloat16)
    run = tmp_path / "run"
    save_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 1, "model_config": model.config.to_dict()})
    kept = qio.load_model(run, dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert kept.head.weight is kept.embed.weight
    for (name, p), q in zip(kept.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name
    old = MoETransformer(model.config)
    restore(load_checkpoint(run), old, rng=False)
    new = qio.load_model(run)
    ids = torch.randint(0, 256, (2, 9))
    with torch.inference_mode():
        assert torch.equal(new(ids).logits, old.eval()(ids).logits)
        # (as `moekit generate --dtype bf16` loads it: .to() rounds the rotary tables too)
        assert torch.equal(qio.load_model(run, torch.bfloat16)(ids).logits,
                           model.eval()(ids).logits)
    out = qio.quantize_checkpoint(run, tmp_path / "q", bits=4, group_size=32)
    expect = quantize(old, bits=4, group_size=32).state_dict()
    got = load_file(str(out / qio.MODEL_FILE))
    assert all(torch.equal(got[k], v) for k, v in expect.items() if k in got)
    assert {t.dtype for t in got.values()} <= {torch.float32, torch.uint8}


def test_a_checkpoint_of_integer_weights_is_named_and_builds_nothing(tmp_path):
    model = _lm()
    run = tmp_path / "run"
    save_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 1, "model_config": model.config.to_dict()})
    from moekit.train.checkpoint import load_checkpoint

    ck = load_checkpoint(run)
    ck.model["norm.weight"] = ck.model["norm.weight"].long()
    with pytest.raises(CheckpointError, match=r"norm.weight: torch.int64"):
        qio.assemble(model.config, ck.model, ck.path)


def test_experts_only_checkpoint_and_format_version_1(tmp_path):
    """scope="experts" is recorded; a version-1 file (no scope) loads as experts-only."""
    _, run = _trained_checkpoint(tmp_path)
    out = qio.quantize_checkpoint(run, tmp_path / "q", bits=8, scope="experts")
    assert type(qio.load_quantized(out).blocks[0].attn.qkv) is not QuantizedLinear
    meta = json.loads((out / qio.META_FILE).read_text())
    del meta["scope"]
    meta["format_version"] = 1
    (out / qio.META_FILE).write_text(json.dumps(meta))
    loaded = qio.load_quantized(out)
    assert isinstance(loaded.blocks[0].ffn.experts.w_in, QuantizedTensor)
    assert type(loaded.embed) is nn.Embedding


def test_untied_table_checkpoint_and_format_version_2(tmp_path):
    """An untied table quantized (format 3, "embeddings": true) loads as the model
    quantize() gives; a version-2 file (no "embeddings": its table float) loads with the
    float table; a version-3 file without the key is refused by name."""
    model, run = _trained_checkpoint(tmp_path, tie_embeddings=False)
    out = qio.quantize_checkpoint(run, tmp_path / "q", bits=4, group_size=32)
    assert json.loads((out / qio.META_FILE).read_text())["embeddings"] is True
    loaded, want = qio.load_quantized(out), quantize(copy.deepcopy(model), bits=4, group_size=32)
    assert isinstance(loaded.embed, QuantizedEmbedding)
    ids = torch.tensor([[1, 2, 3, 250]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want(ids).logits)
    from moekit.cli import main

    old = tmp_path / "old"  # `moekit quantize --float-embeddings`: the table kept float
    assert main(["quantize", str(run), "--bits", "4", "--group-size", "32",
                 "--float-embeddings", "--out", str(old)]) == 0
    meta = json.loads((old / qio.META_FILE).read_text())
    assert meta["embeddings"] is False
    del meta["embeddings"]
    (old / qio.META_FILE).write_text(json.dumps({**meta, "format_version": 2}))
    loaded = qio.load_quantized(old)
    assert type(loaded.embed) is nn.Embedding
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    (old / qio.META_FILE).write_text(json.dumps(meta))  # version 3 without the key
    with pytest.raises(CheckpointError, match="embeddings must be true or false, got "
                                              "'nothing'"):
        qio.load_quantized(old)


def _tamper(out, edit) -> None:
    f = out / qio.MODEL_FILE
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))
    meta = json.loads((out / qio.META_FILE).read_text())
    meta["sha256"] = _sha256(f)  # a consistent file: the names and shapes must catch it
    (out / qio.META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("blocks.0.ffn.experts.w_in.scales"), "missing"),
    (lambda t: t.update({"blocks.1.ffn.experts.w_out.scales":
                         t["blocks.1.ffn.experts.w_out.scales"][:, :, :1].contiguous()}),
     "shape mismatches"),
    (lambda t: t.update({"blocks.0.ffn.experts.w_in.zeros":
                         t["blocks.0.ffn.experts.w_in.zeros"].bfloat16()}), "dtype"),
    (lambda t: t.pop("blocks.1.attn.qkv.weight.scales"), "missing"),
    (lambda t: t.update({"blocks.0.attn.out.weight.zeros":
                         t["blocks.0.attn.out.weight.zeros"][:, :3].contiguous()}),
     "shape mismatches"),
])
def test_bad_quantized_checkpoint_raises(tmp_path, edit, match):
    _, run = _trained_checkpoint(tmp_path)
    out = qio.quantize_checkpoint(run, tmp_path / "q", bits=4, group_size=32)
    _tamper(out, edit)
    with pytest.raises(CheckpointError, match=match):
        qio.load_quantized(out)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])  # qwen2: a shared expert
def test_hf_patched_model_quantized_int8_generates_like_dequantized_original(family):
    """Patched + int8 transformers model (experts, attention, shared expert, lm_head):
    generate() gives the greedy tokens of the unpatched model holding the dequantized
    weights; routers (``gate``, ``shared_expert_gate``) stay float."""
    from moekit.integrations import hf
    from tests import hf_models

    original = hf_models.build(family).eval()
    patched = quantize(hf.apply(copy.deepcopy(original)), bits=8)
    reference = copy.deepcopy(original)
    for name, m in patched.named_modules():
        if isinstance(getattr(m, "gate_up_proj", None), QuantizedTensor):
            target = reference.get_submodule(name)
            for attr in ("gate_up_proj", "down_proj"):
                w_ENK = _dequantize_torch(getattr(m, attr), 0, None)  # [E, out, in]
                with torch.no_grad():
                    getattr(target, attr).copy_(
                        w_ENK.transpose(1, 2) if m.is_transposed else w_ENK)
        if isinstance(m, QuantizedLinear):  # attention projections, lm_head
            with torch.no_grad():
                reference.get_submodule(name).weight.copy_(_dequantize_torch(m.weight, 0, 1)[0])
        if isinstance(m, QuantizedEmbedding):  # [1, D, V] dequantized as [1, V, D]
            with torch.no_grad():
                reference.get_submodule(name).weight.copy_(_dequantize_torch(m.weight, 0, 1)[0])
    layer = patched.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantizedLinear)
    assert isinstance(patched.lm_head, QuantizedLinear)
    assert isinstance(patched.model.embed_tokens, QuantizedEmbedding)
    assert not isinstance(layer.mlp.gate.weight, QuantizedTensor)
    if family == "qwen2_moe":
        assert isinstance(layer.mlp.shared_expert.down_proj, QuantizedLinear)
        assert type(layer.mlp.shared_expert_gate) is nn.Linear
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(patched.generate(ids, **kw), reference.generate(ids, **kw))
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits,
                                   reference(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


# -- dense projections: QuantizedLinear, the float decode-kernel Linear, whole models --------

# (bits, g, K): int4 with K a multiple of 128 runs the 128-input block kernel on AVX-512,
# other K the per-chunk one
LINEAR_FORMATS = [(8, None, 72), (4, 32, 96), (4, 64, 192), (4, 128, 384), (4, 32, 256),
                  (4, 64, 128)]
needs_kernel = pytest.mark.skipif(cpu_ext.get_decode() is None, reason="decode kernels not built")
needs_gemm = pytest.mark.skipif(
    cpu_ext.get_decode() is None or cpu_ext.get() is None or cpu_ext.get().sgemm_max_rows() == 0,
    reason="moekit's GEMM does not run here (AVX-512F, MOEKIT_SGEMM)")


@pytest.mark.parametrize("bits,g,K", LINEAR_FORMATS)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 17])  # the kernels' passes of 1-8 rows
@pytest.mark.parametrize("path", [pytest.param("kernel", marks=needs_kernel), "dequantize",
                                  pytest.param("gemm", marks=needs_gemm)])
def test_quantized_linear_matches_dequantize_then_matmul(bits, g, K, T, path, monkeypatch):
    """QuantizedLinear on the decode kernel, on dequantize-then-matmul and, from
    weight_gemm_min_rows rows (1 here; K a multiple of 32), on q_linear_out."""
    from moekit.functions import decode

    monkeypatch.setattr(decode, "QUANT_LINEAR_MAX_ROWS", 10**6 if path == "kernel" else 0)
    monkeypatch.setattr(decode, "weight_gemm_min_rows", lambda bits: 1 if path == "gemm" else None)
    N = 37  # odd output width; int8's K = 72 is not a multiple of 32 (the kernel's tail)
    w_NK, b_N = torch.randn(N, K) * torch.linspace(0.2, 2, K), torch.randn(N)
    lin = QuantizedLinear(quantize_tensor(w_NK.T[None], bits, g), b_N)
    x = torch.randn(T, 3, K)[:, 1]  # a strided input
    with torch.no_grad():
        got = lin(x)
    w_KN = _dequantized(lin.weight)[0].double()
    want = x.double() @ w_KN + b_N.double()
    # fp32 against fp64: Higham's bound for a sum of K + 2 terms, (K + 2) eps times the
    # sum of their magnitudes. The kernels sum s * sum(x q) + z * sum(x) per int4 group,
    # two partial sums that cancel, so the zero points' magnitudes count too. Clean runs
    # stay under 1% of it; flipping the lowest bit of any one stored weight exceeds it
    # (checked for 20 random flips per format).
    mag = x.double().abs() @ w_KN.abs()
    if lin.weight.zeros is not None:
        z_KN = lin.weight.zeros[0].double().repeat_interleave(g, dim=1).T
        mag = mag + x.double().abs() @ z_KN.abs()
    bound = (K + 2) * torch.finfo(torch.float32).eps * mag + 1e-6
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, max excess {(err - bound).max():.3g}"


@needs_kernel
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-4),
                                             (torch.bfloat16, 2e-2, 2e-2)])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_float_linear_kernel_matches_torch(dtype, atol, rtol, T):
    """moekit's Linear under no_grad (the decode kernel for <= 8 rows) == F.linear in fp64
    of the same weights; with autograd on it is F.linear itself."""
    from moekit.models.transformer import Linear

    lin = Linear(72, 37, bias=False).to(dtype)
    x = torch.randn(2, T, 72).to(dtype)
    want = (x.double() @ lin.weight.double().T).to(dtype)
    with torch.no_grad():
        got = lin(x)
    assert got.dtype == dtype and got.shape == (2, T, 37)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))


def test_quantize_all_covers_attention_head_dense_ffn_and_ties_the_embedding():
    model = _lm(moe_every=2)  # block 0 dense FFN, block 1 MoE
    q = quantize(copy.deepcopy(model), bits=4, group_size=32)
    b0, b1 = q.blocks
    for m in (b0.attn.qkv, b0.attn.out, b0.ffn.w_in, b0.ffn.w_out, b1.attn.qkv, q.head):
        assert isinstance(m, QuantizedLinear)
    assert isinstance(q.embed, QuantizedEmbedding) and q.embed.weight is q.head.weight
    assert isinstance(b1.ffn.router.weight, nn.Parameter)  # the router stays float
    ids = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        got = q(ids).logits
        want = _dequantized_copy(model, q)(ids).logits
        torch.testing.assert_close(q.embed(ids), _dequantized_copy(model, q).embed(ids))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    experts_only = quantize(copy.deepcopy(model), bits=8, scope="experts")
    assert type(experts_only.blocks[0].attn.qkv) is not QuantizedLinear
    assert type(experts_only.embed) is nn.Embedding


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_untied_embedding_table_is_quantized_as_its_own(bits, group):
    """Scope "all" quantizes an untied table apart from the head: its rows are the
    table quantized alone (quantize_tensor of the [V, D] table, dequantized: an
    independent reference), looked up in fp32 and bf16; embeddings=False and scope
    "experts" keep it float, untouched."""
    model = _lm(tie_embeddings=False)
    q = quantize(copy.deepcopy(model), bits=bits, group_size=group)
    assert isinstance(q.embed, QuantizedEmbedding) and isinstance(q.head, QuantizedLinear)
    assert q.embed.weight is not q.head.weight
    table = model.embed.weight.detach()
    want = dequantize_NK(quantize_tensor(table.T[None].contiguous(), bits, group), 0, 1)[0]
    ids = torch.tensor([[0, 5, 255], [17, 17, 3]])
    assert torch.equal(q.embed(ids), want[ids])
    assert not torch.equal(want, table)  # the rows are the quantized table's, not the float's
    assert torch.equal(q.to(torch.bfloat16).embed(ids), want[ids].to(torch.bfloat16))
    for kw in (dict(embeddings=False), dict(scope="experts")):
        f = quantize(copy.deepcopy(model), bits=bits, group_size=group, **kw)
        assert type(f.embed) is nn.Embedding and torch.equal(f.embed.weight, table)
    with pytest.raises(QuantizationError, match="embeddings='no' is not allowed"):
        quantize(model, bits=8, embeddings="no")
    assert type(model.embed) is nn.Embedding


def test_only_the_token_table_is_quantized_as_an_embedding():
    """Other nn.Embedding tables (a position table, a relative-bias table of a few
    heads, whose width an int4 group would not divide) stay float and untouched."""
    model = _lm(tie_embeddings=False)
    model.pos = nn.Embedding(64, 32)
    model.blocks[0].bias_table = nn.Embedding(32, 6)
    pos, bias = model.pos.weight.detach().clone(), model.blocks[0].bias_table.weight.detach()
    q = quantize(model, bits=4, group_size=32)
    assert isinstance(q.embed, QuantizedEmbedding)
    assert type(q.pos) is nn.Embedding and torch.equal(q.pos.weight, pos)
    assert type(q.blocks[0].bias_table) is nn.Embedding
    assert torch.equal(q.blocks[0].bias_table.weight, bias)


@pytest.mark.parametrize("T", [1, 20])  # the kernel, and dequantize + matmul
def test_shared_experts_quantized(T):
    cfg = moekit.MoEConfig(dim=64, ffn_dim=32, num_experts=4, top_k=2, num_shared_experts=1,
                           shared_expert_gate=True)
    torch.manual_seed(0)
    layer = moekit.MoE(cfg).eval()
    q = quantize(copy.deepcopy(layer), bits=4, group_size=32)
    assert isinstance(q.shared.w_in, QuantizedTensor) and isinstance(q.shared.gate, nn.Parameter)
    x = torch.randn(T, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x)[0], _dequantized_copy(layer, q)(x)[0], atol=1e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("kw,match", [
    (dict(bits=8, scope="attention"), "scope='attention'"),
    (dict(bits=4, group_size=64), "shared.w_out"),  # shared hidden 48: 64 does not divide it
])
def test_bad_dense_requests_change_nothing(kw, match):
    cfg = moekit.MoEConfig(dim=64, ffn_dim=64, num_experts=4, top_k=2, num_shared_experts=1,
                           shared_ffn_dim=48)
    layer = moekit.MoE(cfg)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(QuantizationError, match=match):
        quantize(layer, **kw)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert not moekit.quant.is_quantized(layer)
    quantize(layer, bits=4, group_size=64, scope="experts")  # the experts alone are fine


@pytest.mark.parametrize("scope", ["all", "experts"])
def test_a_dense_lm_is_refused_as_dense(scope):
    """`moekit train --dense`'s model had been refused as having "no moekit Experts module
    ... nothing to quantize", which with scope 'all' (attention, head, dense FFNs) read as a
    bug; it is refused as dense, unchanged."""
    model = MoETransformer(preset("tiny", dense=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=r"the model is dense \(dense=True"):
        quantize(model, bits=8, scope=scope)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_quantized_model_generates_in_bf16():
    from moekit.inference import Engine, GenerationConfig

    model = quantize(_lm(), bits=8).to(torch.bfloat16)
    assert model.embed(torch.tensor([[3]])).dtype == torch.bfloat16
    gens, _ = Engine(model).generate([[1, 2, 3], [4]], GenerationConfig(max_new_tokens=4))
    assert [len(g.tokens) for g in gens] == [4, 4]


class _ReadsWeight(nn.Module):
    """As Jamba's Mamba mixer: ``dt_proj`` called nowhere, its weight read directly."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(64, 64)
        self.dt_proj = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dt_proj.weight @ self.in_proj(x).T).T


def test_quantize_keeps_float_a_linear_whose_weight_its_parent_reads():
    """A linear layer whose parent reads ``.weight`` (rather than calling it) stays
    nn.Linear: as a QuantizedLinear its weight, a QuantizedTensor, failed in the matmul
    (Jamba's dt_proj with scope "all"); the called sibling is quantized."""
    torch.manual_seed(0)
    model = nn.Sequential(_ReadsWeight())
    x = torch.randn(3, 64)
    want = model(x)
    moekit.quant.model.quantize_dense(model, 8)
    assert type(model[0].dt_proj) is nn.Linear
    assert isinstance(model[0].in_proj, QuantizedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=2e-2, rtol=2e-2)
