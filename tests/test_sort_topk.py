"""A router's top-k choice sorted by expert in one C++ call (decode.sort_topk), as
``integrations.hf.experts.dispatch_from_topk`` does for patched transformers models: the
same rows as a stable argsort by expert (token order kept within an expert), the weights
in their own dtype, counts and int32 offsets; training (weights that want a gradient)
keeps the torch ops."""

from __future__ import annotations

import re

import pytest
import torch

from moekit.functions import decode
from moekit.integrations.hf.experts import dispatch_from_topk

pytestmark = pytest.mark.skipif(not decode.available(), reason="no decode kernels")


def _reference(experts_TK: torch.Tensor, weights_TK: torch.Tensor, E: int):
    """The sort with torch ops: a stable argsort of the token-major choices by expert."""
    T, K = experts_TK.shape
    expert_S = experts_TK.reshape(-1)
    order = torch.argsort(expert_S, stable=True)
    counts = torch.bincount(expert_S, minlength=E)
    return (torch.arange(T).repeat_interleave(K)[order], weights_TK.reshape(-1)[order],
            counts, torch.cumsum(counts, 0).to(torch.int32))


def _choice(T: int, K: int, E: int, distinct: bool, gen: torch.Generator) -> torch.Tensor:
    if distinct and T:  # a router's top-k: K different experts per token
        return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    return torch.randint(0, E, (T, K), generator=gen)  # repeats too: the sort must not care


@pytest.mark.parametrize("T,K,E", [(1, 8, 64), (7, 2, 8), (33, 8, 64), (5, 4, 4), (16, 1, 3),
                                   (0, 2, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distinct", [True, False])
def test_sort_topk_gives_a_stable_sort_by_expert(T, K, E, dtype, distinct):
    gen = torch.Generator().manual_seed(T * 100 + K * 10 + E)
    if distinct and K > E:
        pytest.skip("K distinct experts need K <= E")
    experts = _choice(T, K, E, distinct, gen)
    weights = torch.rand(T, K, generator=gen).to(dtype)
    got = decode.sort_topk(experts, weights, E)
    want = _reference(experts, weights, E)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_dispatch_from_topk_sorts_in_one_call_unless_a_gradient_is_wanted(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    experts = _choice(9, 4, 16, True, gen)
    weights = torch.rand(9, 4, generator=gen, requires_grad=True)
    calls = []
    real = decode.sort_topk
    monkeypatch.setattr(decode, "sort_topk", lambda *a: calls.append(a) or real(*a))
    slow = dispatch_from_topk(experts, weights, 16)  # grad enabled: the torch ops
    assert not calls and slow.weight_S.requires_grad
    with torch.no_grad():
        fast = dispatch_from_topk(experts, weights, 16)
    assert len(calls) == 1 and not fast.weight_S.requires_grad
    for name in ("token_S", "weight_S", "counts_E", "offsets_E", "assigned_E"):
        a, b = getattr(fast, name), getattr(slow, name).detach()
        assert a.dtype == b.dtype and torch.equal(a, b), name
    keep = torch.ones(9, 4, dtype=torch.bool)
    with torch.no_grad():
        dispatch_from_topk(experts, weights, 16, keep)  # a capacity cut: the torch ops
    assert len(calls) == 1


@pytest.mark.parametrize("bad,where", [(16, "experts_TK[1, 2]=16"), (-1, "experts_TK[1, 2]=-1")])
def test_sort_topk_names_an_expert_id_out_of_range(bad, where):
    experts = torch.zeros(3, 4, dtype=torch.long)
    experts[1, 2] = bad
    with pytest.raises(RuntimeError, match=re.escape(f"{where} is not allowed: expert ids "
                                                     "are 0..15")):
        decode.sort_topk(experts, torch.ones(3, 4), 16)


def test_sort_topk_refuses_mismatched_inputs():
    with pytest.raises(RuntimeError, match="experts_TK must be int64"):
        decode.sort_topk(torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 2), 4)
    with pytest.raises(RuntimeError, match="weights_TK must be a float tensor"):
        decode.sort_topk(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 3), 4)
