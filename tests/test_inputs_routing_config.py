"""Bad input to MoEConfig.capacity, the shared-expert fields and the router (hash
tables and token ids above all): a ValueError naming the argument, its value and
what is allowed, raised before any state changes.

Shape letters: T tokens, D hidden size, E experts, K experts per token, V token ids.
"""

from __future__ import annotations

import re

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.routing import Router

BASE = dict(dim=8, ffn_dim=4, num_experts=4, top_k=2)
HASH = dict(BASE, router="hash", hash_vocab_size=10)


def _raises(match: str):
    return pytest.raises(ValueError, match=re.escape(match))


# -- MoEConfig.capacity -----------------------------------------------------------------


@pytest.mark.parametrize("over", [
    dict(),  # dropless: -1 gave C = -2, 2.5 gave 5.0
    dict(capacity_factor=1.0),  # -1 gave C = 1
    dict(router="expert_choice"),  # -1 gave C = -1, True gave True
])
@pytest.mark.parametrize("num_tokens", [-1, 2.5, True, "3", None])
def test_capacity_rejects_what_is_not_a_token_count(over, num_tokens):
    cfg = MoEConfig(**BASE, **over)
    with _raises(f"num_tokens={num_tokens!r} is not allowed: it must be an int >= 0"):
        cfg.capacity(num_tokens)


@pytest.mark.parametrize("over,T,C", [
    (dict(), 0, 0), (dict(), 5, 10),
    (dict(capacity_factor=1.0), 8, 4),
    (dict(router="expert_choice"), 0, 0), (dict(router="expert_choice"), 8, 4),
])
def test_capacity_of_a_valid_count(over, T, C):
    assert MoEConfig(**BASE, **over).capacity(T) == C


def test_capacity_under_torch_compile_with_dynamic_shapes():
    cfg = MoEConfig(**BASE, capacity_factor=1.0)

    def f(x_TD):
        return x_TD.new_zeros(cfg.capacity(x_TD.shape[0]))

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="eager")
    assert compiled(torch.randn(8, 3)).shape == (4,)
    assert compiled(torch.randn(16, 3)).shape == (8,)
    # symbolic tracing without dynamo hands capacity a torch.SymInt, not an int
    from torch.fx.experimental.proxy_tensor import make_fx

    traced = make_fx(f, tracing_mode="symbolic")(torch.randn(8, 3))
    assert traced(torch.randn(24, 3)).shape == (12,)


# -- shared experts -----------------------------------------------------------------------


def test_shared_ffn_dim_without_shared_experts():
    # was ignored: MoE built no shared FFN while the planner counted a 16-wide one
    with _raises("shared_ffn_dim=16 is not allowed: it must be None when "
                 "num_shared_experts=0"):
        MoEConfig(**BASE, shared_ffn_dim=16)
    cfg = MoEConfig(**BASE, num_shared_experts=1, shared_ffn_dim=16)
    with _raises("shared_ffn_dim=16 is not allowed"):
        cfg.replace(num_shared_experts=0)


def test_shared_ffn_dim_with_shared_experts_still_builds():
    moe = MoE(MoEConfig(**BASE, num_shared_experts=1, shared_ffn_dim=16))
    assert moe.config.shared_dim == 16 and moe.shared is not None
    assert MoEConfig(**BASE, num_shared_experts=2).shared_dim == 8
    assert MoE(MoEConfig(**BASE)).shared is None


# -- hash routing: token ids ----------------------------------------------------------------


@pytest.mark.parametrize("ids,match", [
    (torch.tensor([0, 1, 10]), "token_ids_T has values in [0, 10], which is not allowed: "
                               "they must lie in [0, hash_vocab_size=10)"),  # IndexError
    (torch.tensor([0, 1, -1]), "token_ids_T has values in [-1, 1]"),  # routed as id 9
    (torch.tensor([0.0, 1.0, 2.0]), "token_ids_T.dtype=torch.float32 is not allowed"),
    (torch.tensor([True, False, True]), "token_ids_T.dtype=torch.bool is not allowed"),
    (torch.tensor([[0, 1, 2]]), "token_ids_T.shape=(1, 3) is not allowed: it must be "
                                "(T,) = (3,)"),  # "too many values to unpack"
    (torch.tensor([0, 1]), "token_ids_T.shape=(2,) is not allowed"),  # routed 2 of 3 tokens
    (torch.tensor([0, 1, 2, 3]), "token_ids_T.shape=(4,) is not allowed"),  # a 4th token
    ([0, 1, 2], "token_ids_T=list is not allowed"),
    (None, "token_ids=None is not allowed"),
])
def test_router_rejects_bad_token_ids(ids, match):
    router = Router(MoEConfig(**HASH))
    with _raises(match):
        router(torch.randn(3, 8), ids)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_router_routes_valid_token_ids(dtype):
    router = Router(MoEConfig(**HASH))
    ids_T = torch.tensor([0, 9, 3], dtype=dtype)
    plan = router(torch.randn(3, 8), ids_T).plan
    assert plan.token_S.tolist() == [0, 0, 1, 1, 2, 2]
    assert plan.expert_S.tolist() == router.hash_table[[0, 9, 3]].reshape(-1).tolist()


# -- hash routing: the table ----------------------------------------------------------------


def _table_with(entry: int) -> torch.Tensor:
    table_VK = MoE(MoEConfig(**HASH)).router.hash_table.clone()
    table_VK[0, 0] = entry
    return table_VK


@pytest.mark.parametrize("table,match", [
    # loaded silently, then "index 7 is out of bounds" inside scatter_ at the forward
    (_table_with(7), "router.hash_table has values in [0, 7], which is not allowed: "
                     "they must lie in [0, num_experts=4)"),
    (_table_with(-1), "router.hash_table has values in [-1, 3]"),
    # copy_ truncated 0.7 away without a word
    (_table_with(0).float() + 0.7, "router.hash_table.dtype=torch.float32 is not allowed"),
])
def test_load_state_dict_rejects_a_bad_hash_table(table, match):
    moe = MoE(MoEConfig(**HASH))
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    state = {k: torch.zeros_like(v) if k.startswith("experts.") else v
             for k, v in moe.state_dict().items()}
    state["router.hash_table"] = table
    with _raises(match):
        moe.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())
    with _raises(match.removeprefix("router.")):  # the router on its own
        moe.router.load_state_dict({"hash_table": table})
    assert torch.equal(moe.router.hash_table, before["router.hash_table"])


def test_load_state_dict_takes_a_valid_hash_table():
    moe = MoE(MoEConfig(**HASH))
    table_VK = torch.arange(20).view(10, 2) % 4
    state = dict(moe.state_dict(), **{"router.hash_table": table_VK.int()})
    moe.load_state_dict(state)
    assert torch.equal(moe.router.hash_table, table_VK)
    ids = torch.tensor([[1, 2, 3]])
    out = moe(torch.randn(1, 3, 8), ids)
    assert out.output.shape == (1, 3, 8)
    assert moe.router(torch.randn(3, 8), ids[0]).plan.expert_S.tolist() == [2, 3, 0, 1, 2, 3]


def test_forward_rejects_a_table_changed_after_loading():
    # an in-place edit or an assigned buffer never passes load_state_dict; on the CPU
    # the rows a batch looks up are checked (the error came from inside scatter_)
    moe = MoE(MoEConfig(**HASH))
    ids = torch.tensor([[0, 1, 2]])
    with torch.no_grad():
        moe.router.hash_table[0, 0] = 5
    with _raises("hash_table has values in [0, 5], which is not allowed: they must lie "
                 "in [0, num_experts=4)"):
        moe(torch.randn(1, 3, 8), ids)
    moe.router.hash_table = torch.zeros(10, 2)
    with _raises("hash_table.dtype=torch.float32 is not allowed"):
        moe.infer(torch.randn(1, 3, 8), ids)
    moe.router.hash_table = (torch.arange(20).view(10, 2) % 4).int()  # int32 still routes
    assert moe.router(torch.randn(3, 8), ids[0]).plan.expert_S.dtype == torch.int64


# -- the router's other arguments ----------------------------------------------------------


@pytest.mark.parametrize("cfg", ["softmax", {"dim": 8}, None])
def test_router_rejects_a_config_that_is_not_moeconfig(cfg):
    with _raises(f"cfg={type(cfg).__name__} is not allowed: it must be a moekit.MoEConfig"):
        Router(cfg)  # was AttributeError: 'str' object has no attribute 'num_experts'


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "expert_choice", "hash"])
@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 4, 8), "x_TD.shape=(2, 4, 8) is not allowed: it must be [T, dim=8]"),
    (torch.randn(4, 5), "x_TD.shape=(4, 5) is not allowed"),  # "mat1 and mat2 shapes ..."
    (torch.randn(8), "x_TD.shape=(8,) is not allowed"),
    ([[0.0] * 8], "x_TD=list is not allowed"),
])
def test_router_rejects_bad_x(router, x, match):
    over = dict(router=router, hash_vocab_size=10) if router == "hash" else dict(router=router)
    r = Router(MoEConfig(**{**BASE, **over}))
    ids = torch.zeros(4, dtype=torch.long)
    with _raises(match):
        r(x, ids)
    r.eval()
    with _raises(match):
        r.select(x, ids)


@pytest.mark.parametrize("seq_len,match", [
    (3, "seq_len=3 is not allowed: it must divide the number of tokens T=8"),  # view error
    (-2, "seq_len=-2 is not allowed: it must be an int >= 1"),  # "invalid shape dimension"
    (0, "seq_len=0 is not allowed: it must be an int >= 1"),  # silently one sequence
    (2.0, "seq_len=2.0 is not allowed"),
    (True, "seq_len=True is not allowed"),
])
def test_router_rejects_bad_seq_len(seq_len, match):
    router = Router(MoEConfig(**BASE, seq_aux_loss_coef=0.1))
    with _raises(match):
        router(torch.randn(8, 8), seq_len=seq_len)


def test_router_takes_valid_seq_len():
    router = Router(MoEConfig(**BASE, seq_aux_loss_coef=0.1))
    for L in (None, 1, 2, 8):
        assert router(torch.randn(8, 8), seq_len=L).aux_loss.isfinite()
    assert router(torch.randn(0, 8), seq_len=0).aux_loss.item() == 0  # x of shape [B, 0, D]
    moe = MoE(MoEConfig(**BASE, seq_aux_loss_coef=0.1))
    assert moe(torch.randn(2, 0, 8)).output.shape == (2, 0, 8)
    assert moe(torch.randn(3, 5, 8)).aux_loss.isfinite()
