"""The MoE layer dropped into a user's own code: torch.compile of a hash layer, and a
quantized layer asked for a gradient.

Shape letters: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moekit
from moekit import MoE, MoEConfig
from tests.reference import ref_moe

D, F, E, V = 16, 32, 4, 50


def test_hash_layer_compiles_fullgraph_and_matches_eager():
    # the layer read the token ids' range on the host: fullgraph=True failed with
    # "Could not guard on data-dependent expression" for every hash layer
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=2, router="hash",
                        hash_vocab_size=V), backend="grouped_mm")
    x = torch.randn(2, 6, D)
    ids = torch.randint(0, V, (2, 6))
    compiled = torch.compile(lambda x, ids: moe(x, ids).output, fullgraph=True,
                             backend="aot_eager")
    params = [moe.experts.w_in, moe.experts.w_out]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = compiled(x1, ids)
    ref_y, _, _ = ref_moe(moe, x2, ids)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-4)
    got = torch.autograd.grad(y.square().sum(), [x1, *params])
    want = torch.autograd.grad(ref_y.square().sum(), [x2, *params])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    # an id out of range still raises, from the traced assert
    with pytest.raises(RuntimeError, match=r"outside \[0, hash_vocab_size=50\)"):
        compiled(x, ids.masked_fill(ids == ids[0, 0], V))


def quantized_layer(**over) -> MoE:
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=64, ffn_dim=128, num_experts=4, top_k=2, **over))
    return moekit.quantize(moe, bits=4, group_size=32)


def test_quantized_layer_refuses_to_drop_the_router_gradient():
    # x without requires_grad, the router's weight with it: the decode backend checked
    # x and the expert weights only, so the output came back without a grad_fn and the
    # router silently got no gradient
    moe = quantized_layer()
    assert moe.router.weight.requires_grad
    with pytest.raises(RuntimeError, match="have no backward: run the model under "
                                           r"torch.no_grad\(\)"):
        moe(torch.randn(3, 5, 64))


def test_quantized_layer_inference_mode_equals_no_grad():
    moe = quantized_layer(num_shared_experts=1, router="sigmoid")
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        a = moe(x).output
    with torch.inference_mode():
        b = moe(x).output
    assert torch.equal(a, b)
    frozen = copy.deepcopy(moe).requires_grad_(False)  # nothing to train: runs with grad on
    assert torch.equal(frozen(x).output, a)


@pytest.mark.parametrize("backend", ["loop", "fused"])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_fp16_layer_on_cpu_trains_against_the_oracle(router, backend):
    # .half() on CPU is supported (grouped_mm refuses fp16 by name): output, aux loss and
    # every gradient within fp16 rounding of the fp32 oracle
    from tests.test_layer import build, check_against_reference

    moe, x, _ = build((2, 7), 5, 2, torch.float16, backend=backend, router=router,
                      capacity_factor=1.0)
    check_against_reference(moe, x, None, atol=2e-3, rtol=5e-3, train=True)


def test_four_dim_and_transposed_x_route_each_token_as_the_oracle():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=2, seq_aux_loss_coef=0.02))
    x4 = torch.randn(2, 3, 5, D)
    x_t = torch.randn(D, 7).t()  # a non-contiguous [7, D] view
    for x in (x4, x_t):
        y, aux, _ = moe(x)
        ref_y, ref_aux, _ = ref_moe(moe, x)
        torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(aux, ref_aux, atol=1e-6, rtol=1e-5)
