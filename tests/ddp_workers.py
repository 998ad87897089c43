"""Process bodies for tests/test_ddp_balance.py (plain DistributedDataParallel on gloo).

Every rank builds every rank's micro-batches from seeded generators, so each can count
the whole step's routing itself: the independent reference for ``load`` and the bias.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moekit import MoE, MoEConfig, attach_bias_update, update_all_biases
from tests.dist_workers import init

E, K, RATE = 4, 2, 0.1


def _routed_counts(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Tokens per expert by the DeepSeek-V3 rule: top-k of sigmoid(x W^T) + bias."""
    with torch.no_grad():
        scores_TE = torch.sigmoid(x_TD @ moe.router.weight.t()) + moe.router.expert_bias
        return torch.bincount(scores_TE.topk(K, dim=-1).indices.reshape(-1),
                              minlength=E).float()


def ddp_bias_steps(rank: int, world: int, port: int, how: str) -> dict:
    """Two steps of two micro-batches under DDP's defaults (buffers broadcast before
    every forward, no no_sync); the bias update ``how``: "update_all_biases" (no group),
    "group" (update_all_biases over the world group) or "hook" (attach_bias_update).
    Returns the first error found, or None."""
    init(rank, world, port)
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, ffn_dim=4, num_experts=E, top_k=K, router="sigmoid",
                        bias_update_rate=RATE)).train()
    ddp = DistributedDataParallel(moe)
    opt = torch.optim.SGD(moe.parameters(), lr=0.0)  # lr 0: the gate stays the reference's
    if how == "hook":
        attach_bias_update(opt, moe)
    gens = [torch.Generator().manual_seed(100 * r + 1) for r in range(world)]
    bias_E = torch.zeros(E)
    error = None
    for step in range(2):
        xs = [[torch.randn(16, 8, generator=g) for _ in range(2)] for g in gens]
        mine_E = sum(_routed_counts(moe, x) for x in xs[rank])
        total_E = sum(_routed_counts(moe, x) for xr in xs for x in xr)
        for x in xs[rank]:
            ddp(x).output.square().sum().backward()
        if error is None and moe.router.load.tolist() != mine_E.tolist():
            error = f"step {step}: load {moe.router.load.tolist()} != {mine_E.tolist()}"
        opt.step()
        if how != "hook":
            update_all_biases(moe, group=dist.group.WORLD if how == "group" else None)
        bias_E += RATE * torch.sign(total_E.mean() - total_E)
        if error is None and moe.router.expert_bias.tolist() != bias_E.tolist():
            error = f"step {step}: bias {moe.router.expert_bias.tolist()} != {bias_E.tolist()}"
    dist.destroy_process_group()
    return {"error": error}


def ddp_group_after_destroy(rank: int, world: int, port: int) -> dict:
    """One DDP forward, then: a deepcopy and a pickled copy of the router must not carry
    DDP's group; after destroy_process_group() and a fresh init_process_group,
    update_bias must not all-reduce over the dead group (here each rank's new world is
    itself alone) but step from the local load."""
    import copy
    import pickle

    init(rank, world, port)
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, ffn_dim=4, num_experts=E, top_k=K, router="sigmoid",
                        bias_update_rate=RATE)).train()
    x_TD = torch.randn(16, 8, generator=torch.Generator().manual_seed(100 * rank + 1))
    DistributedDataParallel(moe)(x_TD).output.sum().backward()
    out = {"copy": copy.deepcopy(moe.router)._ddp.group,
           "pickled": pickle.loads(pickle.dumps(moe.router))._ddp.group,
           "kept": moe.router._ddp.group is not None}
    load_E = moe.router.load.clone()
    dist.destroy_process_group()
    init(0, 1, port + 1 + rank)
    try:
        moe.router.update_bias()
        out["error"] = None
    except Exception as exc:  # noqa: BLE001 - the report names it
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["bias"] = moe.router.expert_bias.tolist()
    out["want"] = (RATE * torch.sign(load_E.mean() - load_E)).tolist()
    dist.destroy_process_group()
    return out
