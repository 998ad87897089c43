"""A patched transformers experts module's decode step in one C++ call
(``integrations.hf.experts.run_experts_topk`` -> ``decode.topk_rows``): the same bits as
the dispatch built apart and ``run_experts`` (the path before), for float and quantized
weights; close to the per-token sum of each chosen expert's SwiGLU FFN in fp64; and the
other paths (an activation the kernels do not know, weights that want a gradient) left as
they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.dispatch.plan import Dispatch
from moekit.functions import decode
from moekit.integrations.hf.experts import GluAct, run_experts, run_experts_topk
from moekit.quant.tensor import quantize_tensor

pytestmark = pytest.mark.skipif(not decode.available(), reason="no decode kernels")

E, D, F_, K = 16, 64, 32, 4


def _choice(T: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    return experts, torch.rand(T, K, generator=gen).softmax(-1)


def _dispatch(experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> Dispatch:
    """The rows sorted by expert with torch ops (a stable argsort), built apart."""
    T, _ = experts_TK.shape
    expert_S = experts_TK.reshape(-1)
    order = torch.argsort(expert_S, stable=True)
    counts = torch.bincount(expert_S, minlength=E)
    return Dispatch(token_S=torch.arange(T).repeat_interleave(K)[order],
                    weight_S=weights_TK.reshape(-1)[order], counts_E=counts,
                    offsets_E=torch.cumsum(counts, 0).to(torch.int32), assigned_E=counts)


def _weights(kind: str, gen: torch.Generator):
    w_in = torch.randn(E, D, 2 * F_, generator=gen) / D**0.5
    w_out = torch.randn(E, F_, D, generator=gen) / F_**0.5
    if kind == "bf16":
        return w_in.bfloat16(), w_out.bfloat16()
    if kind in ("int8", "int4"):
        bits = int(kind[3])
        group = 32 if bits == 4 else None
        return quantize_tensor(w_in, bits, group), quantize_tensor(w_out, bits, group)
    return w_in, w_out


def _count_calls(monkeypatch) -> list:
    calls = []
    real = decode.topk_rows
    monkeypatch.setattr(decode, "topk_rows", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_one_call_gives_the_bits_of_the_dispatch_and_run_experts(kind, T, monkeypatch):
    gen = torch.Generator().manual_seed(T)
    w_in, w_out = _weights(kind, gen)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    x = torch.randn(T, D, generator=gen).to(dtype)
    experts, weights = _choice(T, gen)
    biases = (torch.randn(E, 2 * F_, generator=gen), torch.randn(E, D, generator=gen)) \
        if kind == "fp32" else (None, None)
    act = GluAct(F.silu)
    calls = _count_calls(monkeypatch)
    with torch.inference_mode():
        got = run_experts_topk(x, experts, weights.to(dtype), E, w_in, w_out, *biases, act,
                               "auto")
        want = run_experts(x, _dispatch(experts, weights.to(dtype)), w_in, w_out, *biases,
                           act, "auto")
    assert len(calls) == 1
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_one_call_computes_each_tokens_chosen_experts():
    gen = torch.Generator().manual_seed(7)
    w_in, w_out = _weights("fp32", gen)
    x = torch.randn(5, D, generator=gen)
    experts, weights = _choice(5, gen)
    with torch.inference_mode():
        got = run_experts_topk(x, experts, weights, E, w_in, w_out, None, None,
                               GluAct(F.silu), "decode")
    want = torch.zeros(5, D, dtype=torch.float64)
    for t in range(5):
        for j in range(K):
            e = int(experts[t, j])
            gate, up = (x[t].double() @ w_in[e].double()).chunk(2)
            want[t] += weights[t, j].double() * ((F.silu(gate) * up) @ w_out[e].double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_other_activations_and_gradients_keep_their_paths(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    w_in, w_out = _weights("fp32", gen)
    x = torch.randn(2, D, generator=gen)
    experts, weights = _choice(2, gen)
    calls = _count_calls(monkeypatch)

    def act(h):  # no ``kind``: the kernels do not know it
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate) * up

    with torch.inference_mode():
        got = run_experts_topk(x, experts, weights, E, w_in, w_out, None, None, act, "decode")
        want = run_experts(x, _dispatch(experts, weights), w_in, w_out, None, None, act,
                           "decode")
    assert not calls and torch.equal(got, want)
    w_in.requires_grad_(True)
    y = run_experts_topk(x, experts, weights, E, w_in, w_out, None, None, GluAct(F.silu),
                         "auto")  # training: "auto" leaves the decode kernels
    assert not calls and y.requires_grad
