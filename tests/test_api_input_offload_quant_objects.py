"""The expert cache, the offload runtime and the quantized tensors on bad input: an error
naming the argument, its value and what is allowed, raised before anything changes,
instead of a deep traceback, a silently wrong result or a closed model that runs on.

Shape letters: E experts, K input width, N output width, g group size.
"""

from __future__ import annotations

import re
import threading

import pytest
import torch

from moekit.functions import cpu_ext
from moekit.models import MoETransformer
from moekit.models.config import LMConfig
from moekit.models.generate import generate
from moekit.offload import ExpertCache, ExpertMemoryError, load_offloaded
from moekit.offload.runtime import ExpertOffload
from moekit.quant import QuantizationError, QuantizedTensor, quantize_tensor
from moekit.quant.linear import QuantizedLinear
from moekit.quant.tensor import dequantize_NK
from moekit.train.checkpoint import save_checkpoint

CFG = LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=24, num_experts=8, top_k=2,
               max_seq_len=64)
EXPERT_BYTES = (32 * 48 + 24 * 32) * 4  # w_in [D, 2F] + w_out [F, D], fp32


class Store:
    """Every expert ``size`` bytes; ``load`` returns its key."""

    def __init__(self, keys, size=10):
        self.experts = {k: None for k in keys}
        self.size = size

    def nbytes(self, key):
        return self.size

    raw_nbytes = nbytes

    def load(self, key):
        return {"key": key}

    def close(self):
        pass


def _prefetch_threads() -> int:
    return sum(t.name == "moekit-prefetch" for t in threading.enumerate())


# -- the expert cache and the offload runtime ---------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = MoETransformer(CFG).eval()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, model, torch.optim.AdamW(model.parameters()),
                    {"step": 1, "model_config": CFG.to_dict()})
    return run


@pytest.mark.parametrize("experts,prefetch", [(12, True), (2, False)])
def test_offloaded_model_used_after_close_is_refused(run_dir, experts, prefetch):
    """Was: with room to prefetch, RuntimeError "the prefetch thread is closed" from deep in
    the forward, after the cache had reserved slots for reads that never came; with a small
    budget, the step ran on, reopening the shard files close() had closed."""
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    model = load_offloaded(run_dir, experts * EXPERT_BYTES, prefetch=prefetch)
    generate(model, ids, 2, temperature=0)
    offload = model.expert_offload
    assert offload.close(timeout=5.0)
    assert offload.close(timeout=5.0)  # twice: harmless
    cache = offload.cache
    entries, loads = dict(cache.entries), cache.stats.total("loads")
    with pytest.raises(RuntimeError, match="expert cache is closed.*load the model again"):
        generate(model, ids, 2, temperature=0)
    assert cache.entries == entries and cache.stats.total("loads") == loads
    assert cache.store._fds == {}  # no shard file reopened


def test_expert_cache_get_and_prefetch_after_close():
    cache = ExpertCache(Store([(0, 0), (0, 1)]), 20, "lru", prefetch=True)
    assert cache.close(timeout=5.0)
    for call in (lambda: cache.get(0, [0]), lambda: cache.prefetch(0, [1])):
        with pytest.raises(RuntimeError, match="expert cache is closed"):
            call()
    assert cache.entries == {} and cache.stats.trace == []


@pytest.mark.parametrize("kwargs,words", [
    (dict(budget=0), "budget=0 is not allowed"),
    (dict(budget=-5), "budget=-5 is not allowed"),
    (dict(budget="1GiB"), "budget='1GiB' is not allowed"),  # was taken; // failed later
    (dict(budget=2.5e3), "budget=2500.0 is not allowed"),
    (dict(prefetch="no"), "prefetch='no' is not allowed"),  # was truthy: a thread started
    (dict(threaded="False"), "threaded='False' is not allowed"),
    (dict(num_layers=0), "num_layers=0 is not allowed"),
    (dict(num_layers=1), "num_layers=1 is not allowed: it must be at least 2"),
])
def test_expert_cache_arguments_checked_before_its_thread_starts(kwargs, words):
    threads = _prefetch_threads()
    args = dict(budget=40, policy="lru", prefetch=True, num_layers=None, threaded=True)
    with pytest.raises(ValueError, match=re.escape(words)):
        ExpertCache(Store([(0, 0), (1, 0)]), **{**args, **kwargs})
    assert _prefetch_threads() == threads


def test_a_budget_below_one_expert_is_refused_at_construction():
    """Was accepted: a cache of no slots, whose steps then ran in chunks of 0 experts
    ("range() arg 3 must not be zero" from the offload runtime)."""
    with pytest.raises(ExpertMemoryError, match=r"budget=9 is not allowed: it must be at "
                                                r"least 10 bytes, the largest expert"):
        ExpertCache(Store([(0, 0), (0, 1)], size=10), 9, "lru", prefetch=False)


@pytest.mark.parametrize("name,value", [
    ("prefetch", "no"), ("prefetch", 1), ("prefetch", None),
    ("prefetch_limit", 0), ("prefetch_limit", -1), ("prefetch_limit", 2.0),
])
def test_offload_switches_checked_at_run_time(name, value):
    """``expert_offload.prefetch = "no"`` switched prefetch on (a truthy string);
    prefetch_limit=0 turned it off and -1 silently dropped the best prediction."""
    cache = ExpertCache(Store([(0, 0)]), 10, "lru", prefetch=False)
    offload = ExpertOffload(cache, [None], prefetch=False, prefetch_limit=2)
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r} is not allowed")):
        setattr(offload, name, value)
    assert (offload.prefetch, offload.prefetch_limit) == (False, 2)  # unchanged
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r} is not allowed")):
        ExpertOffload(cache, [None], **{"prefetch": False, "prefetch_limit": 2, name: value})
    offload.prefetch, offload.prefetch_limit = True, 3  # the switch itself still works
    assert (offload.prefetch, offload.prefetch_limit) == (True, 3)
    cache.close()


# -- QuantizedTensor, dequantize ----------------------------------------------------------

FORMATS = [(8, None), (4, 32)]
KERNEL = pytest.mark.parametrize("kernel", [True, False], ids=["cpp", "torch"])


def _paths(kernel, monkeypatch):
    if kernel and cpu_ext.get_decode() is None:
        pytest.skip("decode kernels not built")
    if not kernel:  # the path of CUDA tensors, or of a CPU without the built kernels
        monkeypatch.setattr(cpu_ext, "get_decode", lambda: None)


@KERNEL
@pytest.mark.parametrize("bits,g", FORMATS)
@pytest.mark.parametrize("e0,e1", [(3, 1), (-1, None), (0, 5), (0, 2.5), (True, 2),
                                   (None, 2)])
def test_dequantize_expert_range(bits, g, e0, e1, kernel, monkeypatch):
    """Was: RuntimeError "experts 3..1 out of range" from the kernel (bfloat16: "negative
    dimension"), and on the torch path an empty tensor for (3, 1), the last expert for
    e0=-1 and the 4 experts there are for (0, 5)."""
    _paths(kernel, monkeypatch)
    q = quantize_tensor(torch.randn(4, 64, 24), bits, g)
    want = re.escape(f"e0={e0!r}, e1={4 if e1 is None else e1!r} is not allowed") + \
        r".*0 <= e0 <= e1 <= 4"
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(QuantizationError, match=want):
            q.dequantize(e0, e1, dtype=dtype)
    with pytest.raises(QuantizationError, match=want):
        dequantize_NK(q, e0, 4 if e1 is None else e1)


@pytest.mark.parametrize("bits,g", FORMATS)
def test_dequantize_into_a_wrong_buffer_on_the_torch_path(bits, g, monkeypatch):
    """Was: copy_ broadcast one expert into a buffer of two (silently), or a broadcasting
    RuntimeError that did not name ``out``; the buffer is left alone."""
    _paths(False, monkeypatch)
    q = quantize_tensor(torch.randn(4, 64, 24), bits, g)
    for bad in (torch.zeros(2, 24, 64), torch.zeros(1, 24, 63),
                torch.zeros(1, 24, 64, dtype=torch.float64),
                torch.zeros(1, 64, 24).transpose(1, 2)):
        with pytest.raises(QuantizationError, match=r"out=.* is not allowed: it must be a "
                                                    r"contiguous float32 or bfloat16 tensor "
                                                    r"of shape \[1, 24, 64\]"):
            dequantize_NK(q, 1, 2, bad)
        assert (bad == 0).all()
    buf = torch.empty(1, 24, 64, dtype=torch.bfloat16)
    assert dequantize_NK(q, 1, 2, buf).data_ptr() == buf.data_ptr()  # the allowed ones work


@pytest.mark.parametrize("experts", [[4], [-1], [0, 7]])
def test_select_expert_ids(experts):
    """Was IndexError "index out of range in self"."""
    q = quantize_tensor(torch.randn(4, 64, 24), 8)
    with pytest.raises(QuantizationError, match=re.escape(f"experts={experts!r} is not "
                                                          "allowed") + r".*\[0, 3\]"):
        q.select(experts)


def _parts(bits: int, g: int | None) -> tuple:
    q = quantize_tensor(torch.randn(4, 64, 24), bits, g)
    return q.data, q.scales, q.zeros


@pytest.mark.parametrize("make,words", [
    # int8: data [E, N, K] int8, scales [E, N] float32, no zeros, no group
    (lambda d, s, z: (d.view(torch.uint8), s, None, 8, None), "data=torch.uint8"),
    (lambda d, s, z: (d.float(), s, None, 8, None), "data=torch.float32"),
    (lambda d, s, z: (d[0], s[0], None, 8, None), "data=torch.int8 of shape (24, 64)"),
    (lambda d, s, z: (d, s.flatten(), None, 8, None), "scales=torch.float32 of shape (96,)"),
    (lambda d, s, z: (d, s[:2], None, 8, None), "scales=torch.float32 of shape (2, 24)"),
    (lambda d, s, z: (d, s.double(), None, 8, None), "scales=torch.float64"),
    (lambda d, s, z: (d, s, torch.zeros(4, 24), 8, None), "zeros=torch.float32"),
    (lambda d, s, z: (d, s, None, 8, 32), "group_size=32 is not allowed with bits=8"),
    (lambda d, s, z: (d, s, None, 3, None), "bits=3"),
    (lambda d, s, z: (d, s, None, 8, None, None), "activations=None"),
    (lambda d, s, z: (d, s, None, 8, None, "int4"), "activations='int4'"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_hand_built_int8_tensor_checked_at_construction(make, words):
    """Was accepted; the kernels then failed in a forward ("int8 w must be int8, got
    Byte"), took it (a flat scales, zeros or a group size on int8, activations="int4"), or
    ``.shape`` raised IndexError (2-D data)."""
    with pytest.raises(QuantizationError, match=re.escape(words)) as err:
        QuantizedTensor(*make(*_parts(8, None)))
    assert "is not allowed" in str(err.value)


@pytest.mark.parametrize("make,words", [
    # int4, g=32: data [E, N, K/2] uint8, scales and zeros [E, N, K/32] float32
    (lambda d, s, z: (d.view(torch.int8), s, z, 4, 32), "data=torch.int8"),
    (lambda d, s, z: (d, s, None, 4, 32), "zeros=None"),
    (lambda d, s, z: (d, s, z, 4, None), "group_size=None"),
    (lambda d, s, z: (d, s, z, 4, 64), "scales=torch.float32 of shape (4, 24, 2)"),
    (lambda d, s, z: (d, s, z[:, :, :1].contiguous(), 4, 32), "zeros=torch.float32 of "
                                                               "shape (4, 24, 1)"),
    (lambda d, s, z: (d, s.transpose(0, 1).contiguous().transpose(0, 1), z, 4, 32),
     "(strided)"),
    (lambda d, s, z: (d[:, :, :8], s, z, 4, 32), "data=torch.uint8 of shape (4, 24, 8)"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_hand_built_int4_tensor_checked_at_construction(make, words):
    with pytest.raises(QuantizationError, match=re.escape(words)) as err:
        QuantizedTensor(*make(*_parts(4, 32)))
    assert "is not allowed" in str(err.value)


@pytest.mark.parametrize("bits,g", FORMATS)
def test_well_formed_tensors_still_build(bits, g):
    q = quantize_tensor(torch.randn(4, 64, 24), bits, g, "int8" if bits == 4 else "float")
    again = QuantizedTensor(q.data, q.scales, q.zeros, bits, g, q.activations)
    assert torch.equal(again.dequantize(), q.dequantize())
    assert torch.equal(q.select([3, 1]).dequantize(), q.dequantize()[[3, 1]])
    empty = QuantizedTensor.empty(2, 64, 24, bits, g, "meta")
    assert empty.shape == (2, 64, 24)


# -- QuantizedLinear ----------------------------------------------------------------------


@pytest.mark.parametrize("bits,g,activations", [(8, None, "float"), (4, 32, "float"),
                                                (4, 32, "int8")])
@pytest.mark.parametrize("rows", [1, 4, 40, 300])  # decode kernel, GEMM, dequantized
@pytest.mark.parametrize("width", [63, 128])
def test_quantized_linear_input_width(bits, g, activations, rows, width):
    """Was a RuntimeError that depended on the path: "w_in input width 64 != x_TD width 63",
    "mat1 and mat2 shapes cannot be multiplied", or one that blamed the weight ("weight data
    must be contiguous int8 [1, 24, 128], got Char [1, 24, 64]")."""
    lin = QuantizedLinear(quantize_tensor(torch.randn(1, 64, 24), bits, g, activations))
    with torch.no_grad(), pytest.raises(ValueError, match=re.escape(
            f"x of shape ({rows}, {width}) is not allowed: its last dimension must be "
            "in_features=64")):
        lin(torch.randn(rows, width))
    with torch.no_grad(), pytest.raises(ValueError, match=re.escape("x of shape ()")):
        lin(torch.tensor(1.0))  # was IndexError
    with torch.no_grad():
        assert lin(torch.randn(2, 3, 64)).shape == (2, 3, 24)


def test_quantized_linear_construction():
    q = quantize_tensor(torch.randn(2, 64, 24), 8)
    with pytest.raises(QuantizationError, match=re.escape("weight=QuantizedTensor(2, 64, 24) "
                                                          "is not allowed")):
        QuantizedLinear(q)  # was taken: a projection of two experts
    with pytest.raises(QuantizationError, match=re.escape("weight=Tensor(1, 64, 24)")):
        QuantizedLinear(torch.randn(1, 64, 24))
    with pytest.raises(QuantizationError, match=re.escape("bias of shape (23,)")):
        QuantizedLinear(q.select([0]), torch.zeros(23))
    lin = QuantizedLinear(q.select([1]), torch.zeros(24))
    assert (lin.in_features, lin.out_features) == (64, 24)
