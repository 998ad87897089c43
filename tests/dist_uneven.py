"""Expert parallelism with a different number of tokens on each rank: code that runs
inside the gloo workers of tests/test_distributed_uneven.py.

What the layer promises with T_r tokens on rank r: each rank's output is what one
process gives on that rank's tokens alone. Capacity is per rank (GShard's groups): rank
r's C_r = capacity(T_r), and only its own tokens compete for those C_r rows per expert.
Each check compares the output and every gradient (input and parameters) with
``moekit.MoE`` run on each rank's tokens in turn, and with the per-token oracle
(tests/reference.py, which shares no routing, capacity or dispatch code with moekit).
Shape letters: T tokens, D hidden, E experts.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist

from moekit import MoE
from moekit.distributed import ExpertParallelMoE, init_mesh, reduce_gradients
from tests import dist_workers as W
from tests.reference import ref_moe

ATOL, RTOL = W.TOLERANCE[torch.float32]


@dataclasses.dataclass(frozen=True)
class Case:
    dispatcher: str = "all_to_all"
    capacity_factor: float | None = None
    router: str = "softmax"
    overlap_chunks: int = 1
    skewed: bool = False  # full_layer's routing: the last rank's experts get no token
    drop_policy: str = "position"
    T_ranks: tuple[int, ...] = (5, 9)

    @property
    def E(self) -> int:
        return 4 if self.router == "expert_choice" else 6


CASES = {
    "a2a_dropless": Case(),
    "a2a_capacity": Case(capacity_factor=1.0),
    "a2a_capacity_skewed": Case(capacity_factor=1.0, skewed=True),
    "a2a_capacity_probability": Case(capacity_factor=0.75, drop_policy="probability"),
    "a2a_overlap_dropless": Case(overlap_chunks=2),
    "a2a_expert_choice": Case(capacity_factor=1.0, router="expert_choice"),
    "dedup_dropless": Case(dispatcher="all_to_all_dedup"),
    "dedup_expert_choice": Case(dispatcher="all_to_all_dedup", router="expert_choice"),
    "allgather_dropless": Case(dispatcher="all_gather"),
    "allgather_capacity": Case(dispatcher="all_gather", capacity_factor=1.0),
    "allgather_skewed": Case(dispatcher="all_gather", capacity_factor=1.0, skewed=True),
    "allgather_expert_choice": Case(dispatcher="all_gather", capacity_factor=1.0,
                                    router="expert_choice"),
    "a2a_capacity_empty_rank": Case(capacity_factor=1.0, T_ranks=(0, 9)),
    "allgather_empty_rank": Case(dispatcher="all_gather", T_ranks=(0, 9)),
    "dedup_empty_rank": Case(dispatcher="all_to_all_dedup", T_ranks=(0, 9)),
    "a2a_overlap_empty_rank": Case(overlap_chunks=2, T_ranks=(0, 9)),
}
INFER_CASES = {
    "infer_a2a_capacity": Case(capacity_factor=1.0),
    "infer_allgather_capacity": Case(dispatcher="all_gather", capacity_factor=1.0),
    "infer_a2a_expert_choice": Case(capacity_factor=1.0, router="expert_choice"),
    "infer_allgather_expert_choice": Case(dispatcher="all_gather", capacity_factor=1.0,
                                          router="expert_choice"),
    "infer_dedup": Case(dispatcher="all_to_all_dedup"),
}


def layer(case: Case) -> MoE:
    full = W.full_layer(case.E, 2, case.capacity_factor, case.router)
    if not case.skewed and full.router.expert_bias is not None:
        with torch.no_grad():  # every rank's experts get tokens; expert 0 stays popular
            full.router.expert_bias.zero_()[0] = 0.3
    moe = MoE(dataclasses.replace(full.config, drop_policy=case.drop_policy))
    moe.load_state_dict(full.state_dict())
    return moe


def data(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(T, W.D, generator=g), torch.randn(T, W.D, generator=g))
            for T in case.T_ranks]


def grads(moe, ys_auxes, xs, data_) -> dict[str, torch.Tensor]:
    """Grads of the mean over ranks of (y_r * g_r).sum() + aux_r (what reduce_gradients
    gives the parameters); each x_r's grad is that of its own rank's loss."""
    loss = sum((y * g).sum() + aux for (y, aux), (_, g) in zip(ys_auxes, data_, strict=True))
    params = dict(moe.named_parameters())
    got = torch.autograd.grad(loss / len(xs), [*params.values(), *xs], allow_unused=True)
    out = dict(zip(params, got[:len(params)], strict=True))
    out.update({f"x{r}": v * len(xs) for r, v in enumerate(got[len(params):])})
    return out


def one_process(full: MoE, data_, oracle: bool):
    """Outputs per rank and the grads, from moekit.MoE or the oracle, rank by rank."""
    moe = copy.deepcopy(full)
    xs = [x.clone().requires_grad_() for x, _ in data_]
    if oracle:
        ys_auxes = [ref_moe(moe, x)[:2] for x in xs]
    else:
        ys_auxes = [moe(x)[:2] for x in xs]
    return [y.detach() for y, _ in ys_auxes], grads(moe, ys_auxes, xs, data_)


def close(got: torch.Tensor | None, want: torch.Tensor | None) -> bool:
    got, want = [None if t is None else t.detach() for t in (got, want)]
    if want is None:  # the oracle's path does not reach it: it must be zero
        return got is None or not bool(got.abs().max() > ATOL)
    bound = ATOL + RTOL * (float(want.abs().max()) if want.numel() else 0.0)
    return got is not None and (got.numel() == 0 or float((got - want).abs().max()) <= bound)


def ep_run(full: MoE, case: Case, mesh, data_):
    rank = dist.get_rank()
    ep = ExpertParallelMoE.from_moe(full, mesh, dispatcher=case.dispatcher,
                                    overlap_chunks=case.overlap_chunks)
    x, g = data_[rank]
    x = x.clone().requires_grad_()
    out = ep(x)
    ((out.output * g).sum() + out.aux_loss).backward()
    reduce_gradients(ep, mesh)
    return ep, x, out


def parity(mesh, name: str) -> str | None:
    case, rank = CASES[name], dist.get_rank()
    full, data_ = layer(case), data(case)
    ep, x, out = ep_run(full, case, mesh, data_)
    lo, hi = ep.expert_start, ep.expert_start + ep.num_local
    refs = [("moekit.MoE", one_process(full, data_, False))]
    if 0 not in case.T_ranks:  # the oracle's switch loss divides by T
        refs.append(("the oracle", one_process(full, data_, True)))
    for who, (ys, want) in refs:
        if not close(out.output, ys[rank]):
            return f"output differs from {who}'s by {(out.output - ys[rank]).abs().max():.3g}"
        for n, p in [*ep.named_parameters(), (f"x{rank}", x)]:
            w = want[n]
            w = w[lo:hi] if n.startswith("experts.") and w is not None else w
            if not close(p.grad, w):
                return f"grad of {n} differs from {who}'s"
    return comm_check(ep, case, x.detach(), out.stats) or meaningful(full, case, data_, refs)


def comm_check(ep, case: Case, x: torch.Tensor, stats) -> str | None:
    """all_to_all: the bytes of W.check_comm, with this rank's own capacity. all_gather:
    every rank sends max(T) rows; the padding counted by hand for T = (5, 9) / (0, 9)."""
    if case.dispatcher == "all_gather":
        Tm, row = max(case.T_ranks), W.D * x.element_size()
        pad = {(5, 9): 4, (0, 9): 9}[case.T_ranks]  # (9-5) or (9-0) rows, either rank
        got = (float(stats.comm_bytes_sent), float(stats.comm_padding_rows))
        return None if got == (2 * Tm * row, pad) else f"all_gather bytes, padding {got}"
    return W.check_comm(ep, x, stats)


def meaningful(full: MoE, case: Case, data_, refs) -> str | None:
    """The check can fail: with a capacity, per-rank drops differ from the concatenated
    tokens' drops (a capacity shared by both ranks); dropless, the concatenation gives
    each rank's output (so per rank or together, one answer)."""
    if 0 in case.T_ranks:  # one rank's tokens are all the tokens
        return None
    ys = refs[0][1][0]
    xs = torch.cat([x for x, _ in data_])
    with torch.no_grad():
        together = copy.deepcopy(full)(xs).output.split(list(case.T_ranks))
    same = all(torch.allclose(a, b, atol=ATOL, rtol=RTOL)
               for a, b in zip(together, ys, strict=True))
    coupled = case.capacity_factor is not None or case.router == "expert_choice"
    if coupled and same:
        return "per-rank capacity drops what the concatenation drops: the check is weak"
    if not coupled and not same:
        return "dropless output differs from the one-process layer on all tokens"
    return None


def infer_parity(mesh, name: str) -> str | None:
    """``infer`` against the one-process layer's eval forward routed as generation
    routes (token choice dropless; expert choice with each rank's own capacity)."""
    case, rank = INFER_CASES[name], dist.get_rank()
    full = layer(case).eval()
    dropless = case.router != "expert_choice" and case.capacity_factor is not None
    cfg = dataclasses.replace(full.config, capacity_factor=None) if dropless else full.config
    want_moe = MoE(cfg)
    want_moe.load_state_dict(full.state_dict())
    x, _ = data(case)[rank]
    ep = ExpertParallelMoE.from_moe(full, mesh, dispatcher=case.dispatcher).eval()
    with torch.no_grad():
        got, want = ep.infer(x), want_moe.eval()(x).output
    if not close(got, want):
        return f"infer differs from the one-process layer by {(got - want).abs().max():.3g}"
    return None


def run(rank: int, world: int, port: int) -> dict:
    W.init(rank, world, port)
    res: dict = {}
    mesh = init_mesh(dp=1, ep=2)
    for name in CASES:
        W.check(res, name, parity, mesh, name)
    for name in INFER_CASES:
        W.check(res, name, infer_parity, mesh, name)
    dist.destroy_process_group()
    return res
