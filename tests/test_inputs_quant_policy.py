"""Quantization entry points, int4 packing and the offline cache policies on bad input: an
error naming the argument, its value and what is allowed, raised before anything changes,
instead of an AttributeError, an opaque unflatten/KeyError, a silently wrong result or a
loop with nothing to evict.

Shape letters: E experts, K input width, N output width, g group size.
"""

from __future__ import annotations

import re

import pytest
import torch

import moekit
from moekit.models import MoETransformer
from moekit.models.config import LMConfig
from moekit.offload.policy import LFU, LRU, belady, simulate
from moekit.offload.stats import LayerStats, OffloadStats
from moekit.quant import QuantizationError, QuantizedTensor, quantize_tensor
from moekit.quant import io as qio
from moekit.quant.linear import QuantizedEmbedding, QuantizedLinear
from moekit.quant.model import is_quantized, quantize_dense, quantize_like, quantized_scope
from moekit.quant.tensor import dequantize_NK, pack_int4, unpack_int4

CFG = LMConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=32, num_experts=4, top_k=2,
               max_seq_len=16)
A, B, C = (0, 0), (0, 1), (0, 2)


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- the model entry points -----------------------------------------------------------------


@pytest.mark.parametrize("model", [None, "run/step_10", {"w": torch.zeros(2)}])
@pytest.mark.parametrize("call", [
    lambda m: moekit.quantize(m),
    lambda m: moekit.quantize(m, 4, 32, scope="experts"),
    lambda m: quantize_dense(m, 8),
    lambda m: quantize_like(m, 8, None),
    lambda m: is_quantized(m),
    lambda m: quantized_scope(m),
], ids=["quantize", "quantize_int4", "quantize_dense", "quantize_like", "is_quantized",
        "quantized_scope"])
def test_a_model_that_is_not_a_module_is_named(call, model):
    """Was AttributeError "'NoneType' object has no attribute 'named_modules'"."""
    with pytest.raises(QuantizationError, match=re.escape(
            f"model={type(model).__name__} is not allowed: it must be an nn.Module")):
        call(model)


def test_quantize_still_works_and_bad_bits_leave_the_model_untouched():
    model = MoETransformer(CFG)
    before = _state(model)
    with pytest.raises(QuantizationError, match="bits=3 is not allowed"):
        moekit.quantize(model, 3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert moekit.quantize(model, 4, 32) is model and is_quantized(model)
    assert quantized_scope(model) == "all"


def test_save_quantized_refuses_a_non_model_before_writing(tmp_path):
    """Was AttributeError ('modules' for None, 'config' for a quantized bare module, after
    out's parent directories had been made)."""
    out = tmp_path / "a" / "b" / "q"
    experts_only = torch.nn.Sequential(QuantizedLinear(quantize_tensor(torch.randn(1, 32, 8),
                                                                       8)))
    for model in (None, experts_only):
        with pytest.raises(QuantizationError, match=re.escape(
                f"model={type(model).__name__} is not allowed: it must be a moekit "
                "MoETransformer")):
            qio.save_quantized(model, out)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("out", [None, 5])
def test_save_quantized_names_a_bad_out(tmp_path, out):
    """Was Path's TypeError "expected str, bytes or os.PathLike object", naming nothing."""
    model = moekit.quantize(MoETransformer(CFG), 8)
    with pytest.raises(ValueError, match=re.escape(f"out={out!r} is not allowed: it must be "
                                                   "a directory path")):
        qio.save_quantized(model, out)
    with pytest.raises(ValueError, match=re.escape(f"path={out!r} is not allowed")):
        qio.load_quantized(out)
    with pytest.raises(ValueError, match=re.escape(f"path={out!r} is not allowed")):
        qio.is_quantized_checkpoint(out)
    saved = qio.save_quantized(model, tmp_path / "q")  # the allowed ones work
    assert qio.is_quantized_checkpoint(str(saved)) and is_quantized(qio.load_quantized(saved))


@pytest.mark.parametrize("kwargs,words", [
    (dict(out=None), "out=None is not allowed"),
    (dict(bits=3), "bits=3 is not allowed"),
    (dict(scope="dense"), "scope='dense' is not allowed"),
    (dict(bits=8, activations="int16"), "activations='int16' is not allowed"),
])
def test_quantize_checkpoint_checks_its_arguments_before_reading(tmp_path, kwargs, words):
    """The checkpoint is not even read (it does not exist here): out=None was Path's
    TypeError only after loading and quantizing the whole model."""
    args = dict(checkpoint=tmp_path / "missing", out=tmp_path / "q", bits=4)
    with pytest.raises(ValueError, match=re.escape(words)):
        qio.quantize_checkpoint(**{**args, **kwargs})


# -- quantize_tensor and QuantizedTensor ----------------------------------------------------


@pytest.mark.parametrize("w,words", [
    (None, "weight=NoneType is not allowed"),
    ([[[1.0]]], "weight=list is not allowed"),
    (torch.randn(2, 0, 8), "weight of shape (2, 0, 8) and dtype torch.float32 is not allowed"),
])
@pytest.mark.parametrize("bits,g", [(8, None), (4, 32)])
def test_quantize_tensor_names_a_bad_weight(w, words, bits, g):
    """Was AttributeError "'NoneType' object has no attribute 'dim'"; K = 0: IndexError
    "amax(): Expected reduction dim -1 to have non-zero size" (int8)."""
    with pytest.raises(QuantizationError, match=re.escape(words) + r".*\[E, K, N\]"):
        quantize_tensor(w, bits, g)


@pytest.mark.parametrize("args,words", [
    ((2, 64, 8, 4, None), "group_size=None is not allowed with bits=4"),  # was K // None
    ((2, 64, 8, 3, 64), "bits=3 is not allowed"),  # was a bits=4 tensor, silently
    ((2, 63, 8, 4, 64), "group_size=64 does not divide K=63"),  # was "K=62"
    ((-1, 64, 8, 8, None), "E=-1 is not allowed: it must be a positive int"),
    ((2.0, 64, 8, 8, None), "E=2.0 is not allowed"),  # was zeros()' TypeError
    ((2, 64, 0, 8, None), "N=0 is not allowed"),
])
def test_quantized_tensor_empty_checks_before_allocating(args, words):
    with pytest.raises(QuantizationError, match=re.escape(words)):
        QuantizedTensor.empty(*args)


def test_quantized_tensor_empty_still_builds_both_formats():
    q8, q4 = QuantizedTensor.empty(2, 64, 8, 8, None), QuantizedTensor.empty(2, 64, 8, 4, 32)
    assert (q8.shape, q8.bits, q4.shape, q4.group_size) == ((2, 64, 8), 8, (2, 64, 8), 32)


@pytest.mark.parametrize("experts", [
    [0.7], torch.tensor([1.9, 0.2]),  # were truncated to experts 0 and 1, 0
    torch.tensor([True, False, False, False]), [True, False],  # a mask read as ids 1, 0
    None, "a",  # were TypeErrors naming no argument
])
def test_select_takes_integer_ids_only(experts):
    q = quantize_tensor(torch.randn(4, 64, 8), 8)
    with pytest.raises(QuantizationError, match=re.escape(f"experts={experts!r} is not "
                                                          "allowed")):
        q.select(experts)


def test_select_still_takes_lists_tensors_and_nothing():
    q = quantize_tensor(torch.randn(4, 64, 8), 4, 32)
    for ids in ([2, 0], (2, 0), torch.tensor([2, 0]), torch.tensor([2, 0], dtype=torch.int32)):
        s = q.select(ids)
        assert torch.equal(s.data, q.data[[2, 0]]) and torch.equal(s.zeros, q.zeros[[2, 0]])
    assert q.select([]).shape == (0, 64, 8)


@pytest.mark.parametrize("kernel", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("dtype", ["float16", torch.int64, torch.bool, None])
def test_dequantize_dtype_must_be_floating(dtype, kernel, monkeypatch):
    """Was RuntimeError "Invalid device string: 'float16'"; an integer dtype returned the
    weights truncated to integers, silently."""
    from moekit.functions import cpu_ext

    if kernel and cpu_ext.get_decode() is None:
        pytest.skip("decode kernels not built")
    if not kernel:
        monkeypatch.setattr(cpu_ext, "get_decode", lambda: None)
    q = quantize_tensor(torch.randn(2, 64, 8), 8)
    want = re.escape(f"dtype={dtype!r} is not allowed: it must be a floating torch.dtype")
    with pytest.raises(QuantizationError, match=want):
        q.dequantize(dtype=dtype)
    with pytest.raises(QuantizationError, match=want):
        dequantize_NK(q, 0, 1, dtype=dtype)
    lin = QuantizedLinear(quantize_tensor(torch.randn(1, 64, 8), 8))
    with pytest.raises(QuantizationError, match=want):
        lin.dequantized(dtype)
    ref = q.dequantize()
    for ok in (torch.float16, torch.bfloat16, torch.float64):  # the allowed ones work
        assert torch.equal(q.dequantize(dtype=ok), ref.to(ok))


@pytest.mark.parametrize("weight,out_dtype,words", [
    (None, torch.float32, "weight=NoneType is not allowed"),
    ("stack", torch.float32, "weight=QuantizedTensor(2, 64, 8) is not allowed"),
    ("table", "float32", "out_dtype='float32' is not allowed"),  # failed in each forward
    ("table", torch.int64, "out_dtype=torch.int64 is not allowed"),  # truncated rows
])
def test_quantized_embedding_checks_at_construction(weight, out_dtype, words):
    tensors = {"stack": quantize_tensor(torch.randn(2, 64, 8), 8),
               "table": quantize_tensor(torch.randn(1, 64, 8), 8)}
    with pytest.raises(QuantizationError, match=re.escape(words)):
        QuantizedEmbedding(tensors.get(weight), out_dtype)
    emb = QuantizedEmbedding(tensors["table"], torch.bfloat16)
    assert emb(torch.tensor([[3, 5]])).dtype == torch.bfloat16


# -- pack_int4 / unpack_int4 ----------------------------------------------------------------


@pytest.mark.parametrize("q,words", [
    (torch.zeros(2, 33, dtype=torch.uint8), "q=torch.uint8 of shape (2, 33) is not allowed"),
    (torch.zeros(2, 16, dtype=torch.uint8), "q=torch.uint8 of shape (2, 16) is not allowed"),
    (torch.tensor(3), "q=torch.int64 of shape () is not allowed"),
    (torch.full((1, 32), 3.7), "q=torch.float32 of shape (1, 32) is not allowed"),  # was 3
    (torch.ones(1, 32, dtype=torch.bool), "q=torch.bool of shape (1, 32) is not allowed"),
])
def test_pack_int4_shape_and_dtype(q, words):
    """Was unflatten's "Provided sizes [-1, 32] don't multiply up", or a float silently
    truncated."""
    with pytest.raises(QuantizationError, match=re.escape(words) + ".*integer tensor.*"
                                                "multiple of 32"):
        pack_int4(q)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("value,lo,hi", [(16, 0, 16), (-1, -1, 0), (255, 0, 255)])
def test_pack_int4_values_outside_0_to_15(dtype, value, lo, hi):
    """Was silent: 16 at input 0 unpacked as 0 there and 1 at input 16 (the neighbouring
    nibble); -1 set both nibbles."""
    if dtype == torch.uint8 and value < 0:
        pytest.skip("uint8 holds no negative value")
    q = torch.zeros(2, 32, dtype=dtype)
    q[1, 0] = value
    with pytest.raises(QuantizationError, match=re.escape(
            f"q with values in [{lo}, {hi}] is not allowed: int4 values must be in 0..15")):
        pack_int4(q)


@pytest.mark.parametrize("data,words", [
    (torch.zeros(2, 15, dtype=torch.uint8), "data=torch.uint8 of shape (2, 15)"),
    (torch.full((1, 16), -1, dtype=torch.int8), "data=torch.int8 of shape (1, 16)"),
    (torch.zeros(1, 16), "data=torch.float32 of shape (1, 16)"),
    (torch.zeros(1, 16, dtype=torch.int64), "data=torch.int64 of shape (1, 16)"),
])
def test_unpack_int4_shape_and_dtype(data, words):
    """Was unflatten's error, NotImplementedError "bitwise_and_cpu" for floats, and for int8
    a sign-extended high nibble (-1 unpacked as -1, not 15)."""
    with pytest.raises(QuantizationError, match=re.escape(words) + " is not allowed: it must "
                                                "be a uint8 tensor"):
        unpack_int4(data)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_pack_int4_round_trips_every_value(dtype):
    q = torch.arange(64).remainder(16).to(dtype).reshape(1, 2, 32).repeat(3, 1, 1)
    assert torch.equal(unpack_int4(pack_int4(q)), q.to(torch.uint8))
    assert pack_int4(torch.zeros(0, 32, dtype=torch.uint8)).shape == (0, 16)


# -- simulate / belady / OffloadStats -------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, 1.5, "2", None, True])
@pytest.mark.parametrize("policy", [LRU, LFU])
def test_simulate_capacity(policy, capacity):
    """Was KeyError: None for 0 and -1 (no victim to evict), 1.5 taken as 2, TypeError
    "'>=' not supported" for "2" and None."""
    with pytest.raises(ValueError, match=re.escape(f"capacity={capacity!r} is not allowed: "
                                                   "it must be a positive int")):
        simulate(policy(), [A, B, A], capacity)


@pytest.mark.parametrize("policy", ["lru", None])
def test_simulate_policy_must_be_a_policy_object(policy):
    """Was AttributeError "'str' object has no attribute 'insert'"."""
    with pytest.raises(ValueError, match=re.escape(f"policy={policy!r} is not allowed: it "
                                                   "must be a policy object")):
        simulate(policy, [A, B, A], 2)


def test_simulate_still_works():
    assert simulate(LRU(), [A, B, C, A], 2) == [False] * 4
    assert simulate(LRU(), [A, B, A], 2) == [False, False, True]
    assert simulate(LFU(), [A, A, B, A], 1) == [False, True, False, False]
    assert simulate(LRU(), [], 1) == []


@pytest.mark.parametrize("capacity", [0, -1, 1.5, "2", True])
def test_belady_capacity(capacity):
    """Was: 0 missed every access, silently; -1 "max() arg is an empty sequence"; 1.5 taken
    as 2; "2" a TypeError."""
    with pytest.raises(ValueError, match=re.escape(f"capacity={capacity!r} is not allowed: "
                                                   "it must be a positive int")):
        belady([A, B, A], capacity=capacity)


@pytest.mark.parametrize("budget", [0, -5, 2.5, "20"])
def test_belady_budget(budget):
    """Was: 0 missed every access, silently; -5 "max() arg is an empty sequence"."""
    with pytest.raises(ValueError, match=re.escape(f"budget={budget!r} is not allowed: it "
                                                   "must be a positive int")):
        belady([A, B, A], budget=budget, nbytes=lambda k: 10)


def test_belady_nbytes():
    with pytest.raises(ValueError, match=r"nbytes=None is not allowed: with budget= it must "
                                         r"be a function"):  # was NoneType is not callable
        belady([A, B, A], budget=20)
    with pytest.raises(ValueError, match=r"nbytes=.* is not allowed: it is used with budget="):
        belady([A, B, A], capacity=1, nbytes=lambda k: 10)  # was ignored
    sizes = {A: 10, B: -10}
    with pytest.raises(ValueError, match=re.escape("nbytes((0, 1))=-10 is not allowed: it "
                                                   "must be a finite number >= 0")):
        belady([A, B, A], budget=10, nbytes=sizes.__getitem__)  # was: B made room, silently


def test_belady_still_works():
    assert belady([A, B, C, A, B], capacity=2) == [False, False, False, True, True]
    sizes = {A: 10, B: 10, C: 20}
    assert belady([A, B, C, A, B], budget=20, nbytes=sizes.__getitem__) == [
        False, False, False, True, True]
    with pytest.raises(ValueError, match="exactly one of capacity"):
        belady([A], capacity=1, budget=1, nbytes=lambda k: 1)


def _stats(**kwargs) -> OffloadStats:
    args = dict(budget=20, policy="lru", prefetch=False, layers=[LayerStats()],
                trace=[(0, (0, 1)), (0, (0,))], expert_bytes={A: 10, B: 10})
    return OffloadStats(**{**args, **kwargs})


@pytest.mark.parametrize("budget", [0, -5, "1GiB"])
def test_offload_stats_budget(budget):
    """Was taken; belady_hit_rate (and so summary, to_dict) then failed or read 0."""
    with pytest.raises(ValueError, match=re.escape(f"budget={budget!r} is not allowed")):
        _stats(budget=budget)


def test_offload_stats_belady_hit_rate_names_missing_sizes():
    """Was KeyError (0, 1) from inside belady."""
    stats = _stats(expert_bytes={A: 10})
    with pytest.raises(ValueError, match=re.escape("expert_bytes lacks the sizes of 1 experts "
                                                   "of the trace, e.g. [(0, 1)]")):
        stats.belady_hit_rate()
    assert _stats().belady_hit_rate() == pytest.approx(1 / 3)
    assert "Belady's optimum on this trace 0.333" in _stats().summary()
    # with prefetch the hit rate counts reads made ahead, which can beat demand-only MIN
    assert ("Belady's optimum reading on demand only, which prefetch can beat: 0.333"
            in _stats(prefetch=True).summary())


def test_offload_stats_total_names_an_unknown_counter():
    """Was 0 for any name with no layers, else AttributeError on LayerStats."""
    for stats in (_stats(), _stats(layers=[])):
        with pytest.raises(ValueError, match=r"name='hit' is not allowed: it must be one of "
                                             r"requests, hits"):
            stats.total("hit")
    stats = _stats(layers=[LayerStats(requests=3, hits=1), LayerStats(requests=2)])
    assert (stats.total("requests"), stats.total("hits")) == (5, 1)
