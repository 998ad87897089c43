"""An fp64 layer (``moe.double()``: gradcheck, a float64 pipeline) is exact to fp64.

The router used to cast fp64 input to fp32 (and the fused backend summed the combine
weights' gradient in fp32, the balance loss counted in fp32), so an fp64 layer's
output and gradients were only ~1e-7 accurate. Checked against the per-token oracle
in tests/reference.py, which computes in fp64 for an fp64 layer.

Shape letters: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from tests.reference import ref_moe

D, F, E = 16, 32, 4

ROUTERS = {
    # name: config overrides
    "softmax": dict(),
    "sigmoid_bias": dict(router="sigmoid", bias_update_rate=0.01),
    "switch": dict(router="switch", top_k=1),
    "expert_choice": dict(router="expert_choice"),
    "groups": dict(num_groups=2, topk_groups=1),
    "capacity": dict(capacity_factor=1.0),
    "hash": dict(router="hash", hash_vocab_size=50, z_loss_coef=0.0),
    "shared_biased": dict(num_shared_experts=1, shared_expert_gate=True, expert_bias=True),
}


def fp64_layer(over: dict, backend: str) -> MoE:
    kw = dict(dim=D, ffn_dim=F, num_experts=E, top_k=2, aux_loss_coef=0.01,
              seq_aux_loss_coef=0.0 if over.get("router") == "expert_choice" else 0.02,
              z_loss_coef=1e-3)
    kw.update(over)
    torch.manual_seed(1)
    return MoE(MoEConfig(**kw), backend=backend).double().train()


@pytest.mark.parametrize("backend", ["loop", "fused"])
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_fp64_output_and_every_gradient_match_the_oracle(name, backend):
    moe = fp64_layer(ROUTERS[name], backend)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    ids = torch.randint(0, 50, (2, 5))
    w_D = torch.linspace(-1, 1, D, dtype=torch.float64)
    params = list(moe.parameters())
    x1 = x.clone().requires_grad_()
    y, aux, _ = moe(x1, ids)
    assert y.dtype == torch.float64 and aux.dtype == torch.float64
    got = torch.autograd.grad((y * w_D).sum() + aux, [x1, *params])
    x2 = x.clone().requires_grad_()
    ref_y, ref_aux, _ = ref_moe(moe, x2, ids)
    want = torch.autograd.grad((ref_y * w_D).sum() + ref_aux, [x2, *params])
    torch.testing.assert_close(y, ref_y, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(aux, ref_aux, atol=1e-15, rtol=1e-12)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-13, rtol=1e-12)


def test_fp64_layer_passes_gradcheck():
    # the fp32 router failed this: its rounding is larger than gradcheck's eps=1e-6 steps
    moe = fp64_layer(dict(aux_loss_coef=0.0, seq_aux_loss_coef=0.0, z_loss_coef=0.0),
                     "loop")
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    # x's gradient runs through the router too (the combine weights depend on x)
    assert torch.autograd.gradcheck(lambda x_TD: moe(x_TD).output, (x,))
