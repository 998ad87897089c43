"""int4 experts with int8 activations in the 16-output order (``layout="o16"``).

Oracles: the layout's definition written out with explicit index loops (byte 4 o + t of
vector 4 c + j in each 16 outputs' span is NK byte 16 c + 4 j + t of output o; scales and
zeros [K/g][16]); the W4A8 definition in float64 (``tests.test_quant_a8``: activations
rounded per block of 32, the dequantized weights' product, within the fp32 summation
bound; down_combine's is in tests/test_quant_a8.py); and the same weights in NK order
through the same kernels. Also what must not
change: files and state_dicts hold NK, loads convert, a move off the CPU returns to NK,
bad layouts are refused before anything changes.

Shape letters: E experts, K input width, N output width, T tokens, g group size.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import moekit
from moekit.errors import CheckpointError
from moekit.functions import cpu_ext
from moekit.functions import decode as decode_fn
from moekit.inference import sorted_rows
from moekit.models.config import preset
from moekit.models.transformer import MoETransformer, StaticKVCache
from moekit.quant import QuantizationError, QuantizedTensor, quantize, quantize_tensor
from moekit.quant import io as qio
from moekit.quant.layout import from_o16, to_o16
from moekit.quant.model import o16_kernel_here, set_expert_layout
from moekit.train.checkpoint import check_model_fits
from tests.test_quant import _lm
from tests.test_quant_a8 import _check, round_a8

needs_kernel = pytest.mark.skipif(cpu_ext.get_decode() is None, reason="decode kernels not built")


def _w4a8(E: int, K: int, N: int, g: int, seed: int) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    return quantize_tensor(torch.randn(E, K, N, generator=gen), 4, g, activations="int8")


def _o16(qt: QuantizedTensor) -> QuantizedTensor:
    return copy.deepcopy(qt).set_layout("o16")


def test_o16_order_is_the_documented_permutation():
    E, N, K, g = 2, 32, 96, 32
    qt = _w4a8(E, K, N, g, 0)
    o = _o16(qt)
    nk, od = qt.data, o.data
    for e in range(E):
        for b in range(N // 16):
            span = od[e, 16 * b:16 * b + 16].reshape(-1)  # the 16 outputs' bytes
            for c in range(K // 32):
                for j in range(4):
                    for oo in range(16):
                        for t in range(4):
                            assert span[(4 * c + j) * 64 + 4 * oo + t] == \
                                nk[e, 16 * b + oo, 16 * c + 4 * j + t]
            sspan = o.scales[e, 16 * b:16 * b + 16].reshape(-1)
            zspan = o.zeros[e, 16 * b:16 * b + 16].reshape(-1)
            for gi in range(K // g):
                for oo in range(16):
                    assert sspan[16 * gi + oo] == qt.scales[e, 16 * b + oo, gi]
                    assert zspan[16 * gi + oo] == qt.zeros[e, 16 * b + oo, gi]
    for part in (qt.data, qt.scales, qt.zeros):
        assert torch.equal(from_o16(to_o16(part)), part)
    assert all(torch.equal(a, b) for a, b in zip(o.parts_nk(), (qt.data, qt.scales, qt.zeros),
                                                 strict=True))
    assert torch.equal(o.dequantize(), qt.dequantize())
    assert torch.equal(o.dequantize(1, 2, dtype=torch.bfloat16),
                       qt.dequantize(1, 2, dtype=torch.bfloat16))
    assert torch.equal(o.select([1, 0]).dequantize(), qt.select([1, 0]).dequantize())
    assert o.select([1]).layout == "o16" and "layout=o16" in repr(o)


def test_to_o16_into_out_writes_the_new_tensors_bytes_in_place():
    """``to_o16(t, out=)`` (the expert cache's encode: straight into the slot) gives
    ``out`` itself holding ``to_o16(t)``, a part of another dtype converted as copy_
    converts; an out of another shape or strided is refused before anything is written."""
    qt = _w4a8(2, 64, 32, 32, 7)
    for part in (qt.data, qt.scales, qt.zeros):
        out = torch.full_like(part, 3)
        assert to_o16(part, out=out) is out and torch.equal(out, to_o16(part))
    out = torch.zeros(qt.scales.shape, dtype=torch.float64)
    to_o16(qt.scales, out=out)
    assert torch.equal(out, to_o16(qt.scales).double())
    for bad in (torch.zeros(2, 32, 4), torch.zeros(2, 2, 32).transpose(1, 2)):
        keep = bad.clone()
        with pytest.raises(ValueError, match="out of shape .* is not allowed"):
            to_o16(qt.scales, out=bad)
        assert torch.equal(bad, keep)


@needs_kernel
# 160 and 96: chunks past the last block of 128 inputs
@pytest.mark.parametrize("K,g", [(1024, 64), (384, 128), (160, 32), (96, 32)])
@pytest.mark.parametrize("T", [1, 3, 9, 20])  # 9, 20: passes of 8 rows and a rest
def test_o16_gate_up_matches_definition_and_nk(K, g, T):
    E, N, topk = 5, 80, 3  # N / 16 = 5 blocks of outputs
    qt = _w4a8(E, K, N, g, K + g + T)
    o = _o16(qt)
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, K, generator=gen) * torch.rand(T, 1, generator=gen) * 4
    x[0, :32] = 0  # a block of zeros: scale 0
    w, idx = torch.rand(T, E, generator=gen).topk(topk, dim=-1)
    d = sorted_rows(idx, w, E)
    ext = cpu_ext.get_decode()
    args = (x, d.token_S, d.offsets_E)
    h = ext.gate_up(*args, *decode_fn.wargs(o), None, 0, 0.0, 1.0)
    h_nk = ext.gate_up(*args, *decode_fn.wargs(qt), None, 0, 0.0, 1.0)
    assert decode_fn.wargs(o)[3] == 49 and decode_fn.wargs(qt)[3] == 48
    W = qt.dequantize().double()
    e_S = torch.repeat_interleave(torch.arange(E), d.counts_E)
    rows = round_a8(x)[d.token_S]
    want = torch.einsum("sk,skn->sn", rows, W[e_S])
    mag = torch.einsum("sk,skn->sn", rows.abs(), W[e_S].abs())
    _check(h, want, mag, K)
    _check(h_nk, want, mag, K)


@needs_kernel
def test_o16_plain_loops_match_the_vnni_kernel():
    """MOEKIT_CPU_ISA=generic (the plain loops that read the order on CPUs without VNNI)
    gives what the definition gives, in a process of its own (the ISA is read once)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from tests.test_quant_o16 import _w4a8, _o16\n"
        "from tests.test_quant_a8 import _check, round_a8\n"
        "from moekit.functions import cpu_ext, decode as d\n"
        "from moekit.inference import sorted_rows\n"
        "ext = cpu_ext.get_decode(); assert ext.isa() == 'generic'\n"
        "assert not ext.int4_o16_vnni()\n"
        "qt = _w4a8(3, 160, 48, 32, 1); x = torch.randn(5, 160)\n"
        "r = sorted_rows(torch.tensor([[0], [2], [1], [2], [0]]), torch.ones(5, 1), 3)\n"
        "h = ext.gate_up(x, r.token_S, r.offsets_E, *d.wargs(_o16(qt)), None, 0, 0.0, 1.0)\n"
        "W = qt.dequantize().double()[r.token_S.new_tensor([0, 0, 1, 2, 2])]\n"
        "rows = round_a8(x)[r.token_S]\n"
        "_check(h, torch.einsum('sk,skn->sn', rows, W), "
        "torch.einsum('sk,skn->sn', rows.abs(), W.abs()), 160)\n"
        "print('ok')\n")
    env = {**__import__("os").environ, "MOEKIT_CPU_ISA": "generic"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_kernel
def test_o16_prefill_one_call_is_bitwise_the_nk_call():
    """swiglu_experts_q_out packs o16 weights (bits 49) into the same GEMM blocks as NK."""
    ext = cpu_ext.get()
    if ext is None or not ext.int8_activations_gemm_ok():
        pytest.skip("prefill's int8-activation GEMM needs AVX-512 VNNI")
    E, D, F, T = 4, 256, 96, 40
    wi, wo = _w4a8(E, D, 2 * F, 32, 1), _w4a8(E, F, D, 32, 2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=gen)
    w, idx = torch.rand(T, E, generator=gen).topk(2, dim=-1)
    d = sorted_rows(idx, w, E)
    outs = []
    for a, b, bits in ((wi, wo, 4), (_o16(wi), _o16(wo), 49)):
        S = d.token_S.numel()
        out = torch.zeros(T, D)
        ext.swiglu_experts_q_out(x, d.token_S.long(), d.weight_S.float(), a.data, a.scales,
                                 a.zeros, b.data, b.scales, b.zeros, bits, 32,
                                 d.offsets_E.tolist(), torch.empty(S, F), torch.empty(S, D),
                                 out, True)
        outs.append(out)
    assert outs[0].abs().max() > 0 and torch.equal(outs[0], outs[1])
    with pytest.raises(RuntimeError, match="bits=49 .* needs a8=True"):
        ext.swiglu_experts_q_out(x, d.token_S.long(), d.weight_S.float(), *_o16(wi).parts_nk(),
                                 *_o16(wo).parts_nk(), 49, 32, d.offsets_E.tolist(),
                                 torch.empty(S, F), torch.empty(S, D), out, False)


def _logits(model, ids):
    with torch.inference_mode():
        cache = StaticKVCache.for_model(model, ids.shape[0], 32)
        cache.reset()
        first = model.infer(ids, cache)  # prefill: many rows
        return first, model.infer(ids[:, -1:], cache)  # a decode step


@needs_kernel
def test_model_quantized_in_o16_decodes_like_nk():
    if not o16_kernel_here():
        pytest.skip("the o16 kernel needs AVX-512 VNNI")
    torch.manual_seed(0)  # K = 128 and 96: a full block and a tail
    model = MoETransformer(preset("tiny", dim=128, ffn_dim=96)).eval()
    a = quantize(copy.deepcopy(model), bits=4, group_size=32, activations="int8")
    b = quantize(copy.deepcopy(model), bits=4, group_size=32, activations="int8", layout="nk")
    ex = a.blocks[0].ffn.experts
    assert ex.w_in.layout == ex.w_out.layout == "o16"
    assert all(q.layout == "nk" for n, q in a.named_modules()
               if isinstance(q, QuantizedTensor) and ".experts." not in n)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    for got, want in zip(_logits(a, ids), _logits(b, ids), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    sa, sb = a.state_dict(), b.state_dict()  # state_dicts hold NK
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sb)


@needs_kernel
def test_checkpoint_holds_nk_written_one_tensor_at_a_time_and_loads_into_o16(tmp_path,
                                                                            monkeypatch):
    """The file is byte for byte the NK model's; the save never asks for the NK parts of a
    whole tensor stack at once (``parts_nk``: state_dict's copies of every expert), each
    part converted as it is written; loading takes o16 again, the same logits."""
    if not o16_kernel_here():
        pytest.skip("the o16 kernel needs AVX-512 VNNI")
    model = _lm()
    a = quantize(copy.deepcopy(model), bits=4, group_size=32, activations="int8")
    b = quantize(copy.deepcopy(model), bits=4, group_size=32, activations="int8", layout="nk")
    nk_out = qio.save_quantized(b, tmp_path / "nk")
    with monkeypatch.context() as m:
        m.setattr(QuantizedTensor, "parts_nk", lambda self: pytest.fail("parts_nk asked for"))
        out = qio.save_quantized(a, tmp_path / "o16")
    assert (out / qio.MODEL_FILE).read_bytes() == (nk_out / qio.MODEL_FILE).read_bytes()
    loaded = qio.load_quantized(out)
    assert loaded.blocks[0].ffn.experts.w_in.layout == a.blocks[0].ffn.experts.w_in.layout \
        == "o16"
    ids = torch.randint(0, 256, (2, 9))
    for got, ref in zip(_logits(loaded, ids), _logits(a, ids), strict=True):
        assert torch.equal(got, ref)


def _count_nk_copies(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the o16 parts ``QuantizedTensor.parts_nk`` (state_dict's NK copies)
    converts from here on."""
    import moekit.quant.tensor as qtensor

    calls: list[tuple[int, ...]] = []
    real = qtensor.from_o16

    def counted(t):
        calls.append(tuple(t.shape))
        return real(t)

    monkeypatch.setattr(qtensor, "from_o16", counted)
    return calls


def _o16_lm(seed: int = 0):
    return quantize(_lm(seed), bits=4, group_size=32, activations="int8", layout="o16")


def test_moe_load_state_dict_checks_o16_shapes_without_nk_copies(monkeypatch):
    """MoE.load_state_dict's check before any write (check_state_dict) compares names and
    shapes: it took state_dict()'s NK copy of every o16 expert, twice the experts' memory
    (6 conversions here: data, scales, zeros of w_in and w_out). It still refuses a
    mismatch before anything is written, and loads what fits."""
    model = _o16_lm()
    moe = model.blocks[0].ffn
    assert moe.experts.w_in.layout == "o16"
    sd = {k: v.clone() for k, v in _o16_lm(1).blocks[0].ffn.state_dict().items()}  # NK
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    calls = _count_nk_copies(monkeypatch)
    bad = {**sd, "experts.w_in.scales": sd["experts.w_in.scales"][:, :16]}
    with pytest.raises(ValueError, match=r"experts\.w_in\.scales: \("):
        moe.load_state_dict(bad)
    moe.load_state_dict(sd)
    assert calls == []
    monkeypatch.undo()
    after = moe.state_dict()
    assert moe.experts.w_in.layout == "o16"
    assert all(torch.equal(after[k], sd[k]) for k in sd)
    assert not all(torch.equal(after[k], before[k]) for k in sd)  # another model's: loaded


def test_check_model_fits_reads_o16_shapes_without_nk_copies(monkeypatch):
    """check_model_fits (checkpoint loads' names-and-shapes check) took state_dict()'s NK
    copy of every o16 expert; it still names a mismatch."""
    model = _o16_lm()
    tensors = model.state_dict()
    calls = _count_nk_copies(monkeypatch)
    check_model_fits(model, tensors, Path("ckpt"))
    key = "blocks.0.ffn.experts.w_out.data"
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        check_model_fits(model, {**tensors, key: tensors[key][:, :8]}, Path("ckpt"))
    assert calls == []


def test_bench_decode_weight_bytes_of_o16_experts_without_nk_copies(monkeypatch):
    """bench_decode's bytes-per-step count reads byte sizes only: it took state_dict()'s
    NK copy of every o16 expert (and then skipped them by name); the counts are the NK
    model's."""
    from moekit import bench

    decode_script = bench._load(bench.DECODE_SCRIPT)
    if decode_script is None:
        pytest.skip("benchmarks/ is not in this checkout")
    args = {"bits": 4, "group_size": 32, "activations": "int8"}
    want = decode_script.weight_bytes(quantize(_lm(), **args, layout="nk"))
    model = _o16_lm()
    calls = _count_nk_copies(monkeypatch)
    assert decode_script.weight_bytes(model) == want
    assert calls == []


def test_load_state_dict_into_o16_converts_and_leaves_bad_shapes_to_torch():
    qt = _w4a8(3, 64, 32, 32, 5)
    other = _w4a8(3, 64, 32, 32, 6)
    o = _o16(qt)
    bad = {**other.state_dict(), "data": other.data[:, :16]}  # torch's error, not a view's
    with pytest.raises(RuntimeError, match="size mismatch for data"):
        o.load_state_dict(bad)
    o.load_state_dict(other.state_dict())
    assert o.layout == "o16" and torch.equal(o.dequantize(), other.dequantize())
    assert torch.equal(o.data, to_o16(other.data))


def test_load_state_dict_of_other_dtypes_into_o16_as_into_nk():
    """Parts of the buffers' shape in another dtype (bf16 scales, int8 bytes) are
    converted as torch converts them for an NK tensor, then permuted: they were copied
    into the o16 buffers unpermuted (only a part of the buffer's dtype was converted)."""
    qt, other = _w4a8(3, 64, 32, 32, 5), _w4a8(3, 64, 32, 32, 6)
    for sd in ({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in other.state_dict().items()},
               {**other.state_dict(), "data": other.data.view(torch.int8)}):
        nk, o = copy.deepcopy(qt), _o16(qt)
        nk.load_state_dict(sd)
        o.load_state_dict(sd)
        assert o.layout == "o16" and o.scales.dtype == torch.float32
        assert torch.equal(o.dequantize(), nk.dequantize())


def test_a_move_off_the_cpu_returns_to_nk():
    qt = _w4a8(2, 64, 32, 32, 3)
    o = _o16(qt).to("meta")
    assert o.layout == "nk" and o.data.device.type == "meta"
    o = _o16(qt)
    assert o.to(torch.bfloat16).layout == "o16"  # a dtype change moves nothing


@pytest.mark.parametrize("kw,match", [
    (dict(layout="vnni"), "layout='vnni' is not allowed"),
    (dict(layout="o16", activations="float"), "layout='o16' is not allowed for"),
    (dict(layout="o16", bits=8), "layout='o16' is not allowed for"),
])
def test_bad_layout_requests_change_nothing(kw, match):
    model = _lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"bits": 4, "group_size": 32, "activations": "int8", **kw}
    if args["bits"] == 8:
        args["group_size"] = None
    with pytest.raises(QuantizationError, match=match):
        quantize(model, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not moekit.quant.model.is_quantized(model)
    if kw.get("layout") == "vnni":
        return
    q = quantize(model, **{**args, "layout": "nk"})
    with pytest.raises(QuantizationError, match=match):
        set_expert_layout(q, "o16")
    assert all(m.layout == "nk" for m in q.modules() if isinstance(m, QuantizedTensor))
    with pytest.raises(QuantizationError, match="layout='o16' is not allowed with bits=8"):
        QuantizedTensor(*quantize_tensor(torch.randn(1, 32, 16), 8).parts_nk(), 8, None,
                        activations="int8", layout="o16")


def test_hf_patched_experts_take_o16_and_generate_like_nk():
    transformers = pytest.importorskip("transformers")
    if cpu_ext.get_decode() is None or not o16_kernel_here():
        pytest.skip("the o16 kernel needs AVX-512 VNNI")
    from moekit.integrations import hf
    from tests import hf_models

    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(**{**hf_models.COMMON, "intermediate_size": 32,
                                      "num_experts": 8, "num_experts_per_tok": 2})
    original = transformers.OlmoeForCausalLM(cfg).eval()
    models = []
    for layout in ("o16", "nk"):
        m = hf.apply(copy.deepcopy(original))
        moekit.quantize(m, bits=4, group_size=32, activations="int8", layout=layout)
        models.append(m)
    layouts = {q.layout for q in models[0].modules() if isinstance(q, QuantizedTensor)}
    assert "o16" in layouts
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = [m.generate(ids, max_new_tokens=4, do_sample=False) for m in models]
        logits = [m(ids).logits for m in models]
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


@needs_kernel
def test_offloaded_model_of_an_o16_model_caches_o16_and_decodes_like_the_resident(tmp_path):
    """The expert cache holds what the resident model holds (the file's NK bytes put in the
    16-output order as read): an offloaded W4A8 model decoded with the NK kernels and gave
    other logits than the resident one, which set_expert_layout had put in o16."""
    if not o16_kernel_here():
        pytest.skip("the o16 kernel needs AVX-512 VNNI")
    from moekit.models.config import LMConfig
    from moekit.offload import load_offloaded

    torch.manual_seed(0)
    cfg = LMConfig(dim=64, num_layers=2, num_heads=2, ffn_dim=32, num_experts=8, top_k=2,
                   max_seq_len=64)
    qio.save_quantized(quantize(MoETransformer(cfg).eval(), bits=4, group_size=32,
                                activations="int8"), tmp_path / "q")
    resident = qio.load_quantized(tmp_path / "q")
    assert resident.blocks[0].ffn.experts.w_in.layout == "o16"
    model = load_offloaded(tmp_path / "q", "1GiB", prefetch=False)
    try:
        parts = model.expert_offload.cache.get(0, [3])[0]
        assert parts["w_in"].layout == parts["w_out"].layout == "o16"
        w_in = resident.blocks[0].ffn.experts.w_in
        assert torch.equal(parts["w_in"].data[0], w_in.data[3])
        assert torch.equal(parts["w_in"].scales[0], w_in.scales[3])
        ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
        for got, want in zip(_logits(model, ids), _logits(resident, ids), strict=True):
            assert torch.equal(got, want)
    finally:
        model.expert_offload.close()


@needs_kernel
@pytest.mark.parametrize("F", [40, 24])  # 2F a multiple of 16, F not: up's tiles start mid-block
def test_o16_gate_up_glu_tiles_not_aligned_to_16_outputs(F):
    """A GLU gate_up reads up's columns F.. in tiles that start inside a block of 16
    outputs: the same values as the plain projection's, the activation applied."""
    E, K, T = 4, 64, 7
    o = _o16(_w4a8(E, K, 2 * F, 32, F))
    gen = torch.Generator().manual_seed(F)
    x = torch.randn(T, K, generator=gen)
    w, idx = torch.rand(T, E, generator=gen).topk(2, dim=-1)
    d = sorted_rows(idx, w, E)
    ext = cpu_ext.get_decode()
    h = ext.gate_up(x, d.token_S, d.offsets_E, *decode_fn.wargs(o), None, 0, 0.0, 1.0)
    glu = ext.gate_up(x, d.token_S, d.offsets_E, *decode_fn.wargs(o), None,
                      decode_fn.ACT_CODES["swiglu"], 0.0, 1.0)
    # (h itself is checked against the definition above; the kernel's silu rounds apart
    # from torch's by a few ulps, a misplaced column by the weights' size)
    torch.testing.assert_close(glu, torch.nn.functional.silu(h[:, :F]) * h[:, F:],
                               rtol=1e-5, atol=1e-5)


def test_hf_patched_prefill_runs_the_one_call_on_o16_like_nk(monkeypatch):
    """A prefill past the kernels' rows (8 experts: 96 rows) takes swiglu_experts_q_out
    with the o16 weights (bits 49): the same logits as the NK model's, bitwise."""
    transformers = pytest.importorskip("transformers")
    if cpu_ext.get_decode() is None or not o16_kernel_here() or not decode_fn.int8_gemm_here():
        pytest.skip("the o16 kernel and the int8-activation GEMM need AVX-512 VNNI")
    from moekit.integrations import hf
    from tests import hf_models

    calls, real = [], decode_fn.quantized_experts_into
    monkeypatch.setattr(decode_fn, "quantized_experts_into",
                        lambda *a: calls.append(a[-1].layout) or real(*a))
    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(**{**hf_models.COMMON, "intermediate_size": 32,
                                      "num_experts": 8, "num_experts_per_tok": 2})
    original = transformers.OlmoeForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    logits = []
    for layout in ("o16", "nk"):
        m = moekit.quantize(hf.apply(copy.deepcopy(original)), bits=4, group_size=32,
                            activations="int8", layout=layout)
        with torch.inference_mode():
            logits.append(m(ids).logits)
    assert calls == ["o16"] * 2 + ["nk"] * 2  # both layers, each model
    assert torch.equal(logits[0], logits[1])
