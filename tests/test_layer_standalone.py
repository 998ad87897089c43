"""The MoE layer dropped into a user's own code: torch.compile of a hash layer.

Shape letters: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import pytest
import torch

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

