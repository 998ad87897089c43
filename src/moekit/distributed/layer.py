"""The expert-parallel MoE layer: replicated routing, experts split over EP ranks.

Shape letters: T tokens on this rank, D hidden, E experts, El = E / ep local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.dispatch.plan import Dispatch
from moekit.distributed import dispatcher as dsp
from moekit.distributed.mesh import ExpertParallelMesh
from moekit.experts.experts import Experts, SharedExperts
from moekit.layer import MoE, MoEOutput
from moekit.routing.router import Router
from moekit.routing.stats import RoutingStats, routing_stats

DISPATCHERS = ("all_to_all", "all_to_all_dedup", "all_gather")
# dropless only, not chunked: no capacity buffers, no overlap of pairs with experts
DEDUP = "all_to_all_dedup"


@dataclass(frozen=True)
class ExpertParallelStats(RoutingStats):
    """RoutingStats plus this rank's forward communication for the layer call (bytes).

    Backward sends the same amounts again (the transposed collectives).
    """

    comm_bytes_sent: Tensor
    comm_bytes_received: Tensor
    comm_bytes_moved: Tensor  # on behalf of this rank's tokens: rows out + results back
    comm_bytes_ideal: Tensor  # the same for exactly the routed rows owned elsewhere
    comm_meta_bytes: Tensor  # routing metadata sent (counts, ids, weights)
    comm_padding_rows: Tensor  # rows sent that carry no token (capacity buffers;
    # all_gather: rows padding every rank's tokens to the largest rank's T)


def local_experts_config(cfg: MoEConfig, num_local: int) -> MoEConfig:
    """What the local Experts module needs: the expert shape, El experts."""
    return MoEConfig(dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_experts=num_local, top_k=1,
                     activation=cfg.activation, expert_bias=cfg.expert_bias,
                     swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha)


def is_expert_parameter(p: nn.Parameter) -> bool:
    """Expert weights are split over EP ranks: reduce their gradients over dp only."""
    return bool(getattr(p, "_moekit_expert", False))


class ExpertParallelMoE(MoE):
    """``moekit.MoE`` with its experts split over the mesh's "ep" dimension.

    Same call and outputs as ``MoE`` (the output on each rank is what ``MoE``
    with the same weights gives for that rank's tokens, whose number may differ
    between ranks; a capacity is each rank's own, ``capacity(T)`` of its T);
    ``stats`` gains the communication counters. Build one from a full layer with ``from_moe`` (or
    ``moekit.distributed.parallelize`` for a whole model).

    ``equal_tokens_per_rank=True`` promises that every call holds the same T on every
    rank of the "ep" group (fixed batch x sequence, as the trainer's batches are). Capacity
    mode with the all-to-all dispatchers then takes every rank's C to be its own and skips
    the exchange of the capacities: no collective but the two exchanges of rows, no host
    sync. The promise is checked once, by that exchange at the layer's first capacity-mode
    call (a ValueError on every rank); a later call with another T on some rank cannot be
    detected without the exchange the promise skips: gloo then aborts the process that
    receives more rows than it expected ("Received data size doesn't match expected size"),
    NCCL may hang until the collective timeout or read the wrong rows. Dropless calls and
    the all_gather dispatcher exchange their sizes either way (their row counts depend on
    the routing, and each syncs on them).
    """

    def __init__(self, config: MoEConfig, mesh: ExpertParallelMesh, backend: str = "auto",
                 dispatcher: str = "all_to_all", overlap_chunks: int = 1,
                 equal_tokens_per_rank: bool = False) -> None:
        nn.Module.__init__(self)
        _validate(config, mesh, dispatcher, overlap_chunks)
        if not isinstance(equal_tokens_per_rank, bool):
            raise ValueError(f"equal_tokens_per_rank={equal_tokens_per_rank!r} is not allowed: "
                             "it must be True or False")
        self.config, self.mesh = config, mesh
        self.dispatcher, self.overlap_chunks = dispatcher, overlap_chunks
        self.equal_tokens_per_rank = equal_tokens_per_rank
        self._equal_tokens_checked = False  # the promise's one check ran (first call)
        self.num_local = config.num_experts // mesh.ep
        self.expert_start = mesh.ep_rank * self.num_local
        self.router = Router(config)
        self.experts = Experts(local_experts_config(config, self.num_local), backend)
        for p in self.experts.parameters():
            p._moekit_expert = True  # type: ignore[attr-defined]
        self.shared = SharedExperts(config) if config.num_shared_experts else None

    @classmethod
    def from_moe(cls, moe: MoE, mesh: ExpertParallelMesh, **kwargs) -> ExpertParallelMoE:
        """Shard a full layer: keep this rank's experts, copy everything else."""
        if not isinstance(moe, MoE) or isinstance(moe, ExpertParallelMoE):
            raise ValueError(f"moe={type(moe).__name__} is not allowed: it must be a full "
                             "moekit.MoE layer (not already expert-parallel)")
        ep_moe = cls(moe.config, mesh, backend=moe.experts.backend, **kwargs)
        ep_moe.to(device=moe.experts.w_in.device)
        lo, hi = ep_moe.expert_start, ep_moe.expert_start + ep_moe.num_local
        state = {k: (v[lo:hi] if k.startswith("experts.") else v)
                 for k, v in moe.state_dict().items()}
        with torch.no_grad():  # parameters take the source's dtypes; fp32 buffers stay fp32
            for name, p in ep_moe.named_parameters():
                p.data = p.data.to(state[name].dtype)
        ep_moe.load_state_dict(state)
        return ep_moe

    def infer(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """Generation goes through the exchange too (this rank holds only its experts),
        routed as ``MoE.infer`` routes: a token-choice layer with a capacity factor runs
        dropless, so a rank's tokens are not dropped by what the other ranks sent."""
        x_TD, ids_T = self._checked(x, token_ids)
        dispatch, capacity = self._infer_dispatch(x_TD, ids_T)
        y_TD, _ = self._exchange(x_TD, dispatch, capacity)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(x.shape)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> MoEOutput:
        x_TD, routed, dispatch, capacity = self.route(x, token_ids)
        T = x_TD.shape[0]
        y_TD, comm = self._exchange(x_TD, dispatch, capacity)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        base = routing_stats(routed.plan, dispatch, T, routed.z_loss, routed.aux_loss)
        stats = ExpertParallelStats(
            **{f: getattr(base, f) for f in base.__dataclass_fields__},
            comm_bytes_sent=comm.sent, comm_bytes_received=comm.received,
            comm_bytes_moved=comm.moved, comm_bytes_ideal=comm.ideal,
            comm_meta_bytes=comm.meta, comm_padding_rows=comm.padding_rows)
        return MoEOutput(y_TD.view(x.shape), routed.aux_loss, stats)

    def _experts_fn(self, x_RD: Tensor, local: Dispatch) -> Tensor:
        return self.experts(x_RD, local)

    def _exchange(self, x_TD: Tensor, d: Dispatch,
                  capacity: int | None) -> tuple[Tensor, dsp.CommBytes]:
        E, comm = self.config.num_experts, self.mesh.ep_comm
        if self.dispatcher == "all_gather":
            return dsp.all_gather_exchange(x_TD, d, self._experts_fn, comm, E)
        if capacity is not None:
            return dsp.padded_all_to_all(x_TD, d, self._experts_fn, comm, E, capacity,
                                         self._known_capacities(x_TD, capacity))
        if self.overlap_chunks > 1:
            from moekit.distributed.overlap import chunked_all_to_all

            return chunked_all_to_all(x_TD, d, self._experts_fn, comm, E, self.overlap_chunks)
        if self.dispatcher == DEDUP:
            return dsp.dedup_all_to_all(x_TD, d, self._experts_fn, comm, E)
        return dsp.dropless_all_to_all(x_TD, d, self._experts_fn, comm, E)

    def _known_capacities(self, x_TD: Tensor, C: int) -> list[int] | None:
        """Every ep rank's C under ``equal_tokens_per_rank`` (this rank's, P times), after
        the first call checked the promise; None (padded_all_to_all exchanges them) without."""
        if not self.equal_tokens_per_rank:
            return None
        comm = self.mesh.ep_comm
        if not self._equal_tokens_checked:
            check_equal_tokens(dsp.exchange_sizes([x_TD.shape[0], C], comm, x_TD.device))
            self._equal_tokens_checked = True
        return [C] * comm.size

    @torch.no_grad()
    def update_bias(self, rate: float | None = None, group=None) -> None:
        """Aux-loss-free bias step from the loads summed over all ranks (same on every rank)."""
        if group is not None:
            self.router.update_bias(rate, group)
            return
        comm = self.mesh.world  # a dead peer: CollectiveTimeoutError, not gloo's own error
        self.router.update_bias(rate, reduce=lambda load: comm.run(
            "all_reduce of the router's expert loads", dist.all_reduce, load,
            group=comm.group))


def check_equal_tokens(sizes: list[list[int]]) -> None:
    """Every ep rank's [T, C] (the same list on every rank, so each raises alike)."""
    if len({tuple(s) for s in sizes}) > 1:
        raise ValueError(
            f"equal_tokens_per_rank=True is not allowed for these inputs: the ranks of the "
            f"'ep' group hold T={[T for T, _ in sizes]} tokens (capacities "
            f"C={[C for _, C in sizes]}), and it promises the same T on every rank; pass "
            "equal_tokens_per_rank=False (the default), which exchanges the capacities at "
            "every call")


def _validate(cfg: MoEConfig, mesh: ExpertParallelMesh, dispatcher: str,
              overlap_chunks: int) -> None:
    if not isinstance(cfg, MoEConfig):
        raise ValueError(f"config={type(cfg).__name__} is not allowed: it must be a "
                         "moekit.MoEConfig")
    if not isinstance(mesh, ExpertParallelMesh):
        raise ValueError(f"mesh={type(mesh).__name__} is not allowed: it must be the "
                         "ExpertParallelMesh that moekit.distributed.init_mesh(dp, ep) returns")
    if cfg.num_experts % mesh.ep:
        raise ValueError(f"ep={mesh.ep} is not allowed for num_experts={cfg.num_experts}: "
                         "ep must divide num_experts (each EP rank holds num_experts / ep "
                         "experts)")
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher={dispatcher!r} is not allowed: it must be one of "
                         f"{', '.join(DISPATCHERS)}")
    if isinstance(overlap_chunks, bool) or not isinstance(overlap_chunks, int) \
            or overlap_chunks < 1:
        raise ValueError(f"overlap_chunks={overlap_chunks!r} is not allowed: it must be a "
                         "positive int (1 = no overlap)")
    check_dedup(dispatcher, cfg.capacity_factor, overlap_chunks)


def check_dedup(dispatcher: str, capacity_factor: float | None, overlap_chunks: int,
                prefix: str = "") -> None:
    """all_to_all_dedup sends exactly the (token, rank) pairs: no capacity buffers and no
    chunked overlap. ``prefix``: "--" names the CLI's flags."""
    if dispatcher != DEDUP:
        return
    name = (lambda n: prefix + n.replace("_", "-")) if prefix else (lambda n: n)
    if capacity_factor is not None:
        raise ValueError(f"{name('dispatcher')}={DEDUP!r} is not allowed with "
                         f"{name('capacity_factor')}={capacity_factor!r}: it is dropless (capacity "
                         "mode sends fixed [E, C, D] buffers; use 'all_to_all')")
    if overlap_chunks != 1:
        raise ValueError(f"{name('dispatcher')}={DEDUP!r} is not allowed with "
                         f"{name('overlap_chunks')}={overlap_chunks}: its exchange is not "
                         "chunked (use 'all_to_all' to overlap)")
