"""Token dispatchers for expert parallelism: send routed rows to the rank that owns
their expert, run the local experts, send the results back, combine.

Shape letters: T tokens on this rank, D hidden, E experts, El = E / P local
experts, P expert-parallel ranks, S routed rows on this rank (sorted by expert),
R rows received by this rank, C capacity per expert.

Four exchanges, all differentiable:
- ``dropless_all_to_all``: one small all-to-all of per-expert counts, then
  ``all_to_all_single`` with uneven splits carrying exactly the routed rows.
  The split sizes must be Python lists (torch's API, gloo and NCCL alike), so
  this costs one host synchronisation per layer call (one ``tolist`` of the
  counts); nothing else in the path syncs.
- ``dedup_all_to_all``: the same count exchange (one host sync), then each token
  once per rank that owns any of its experts instead of once per routed expert (the
  dispatch DeepEP runs): the receiving rank copies it to its experts' rows, weights
  their outputs and sums them, and sends one row back per (token, rank) pair. A
  token's K rows become at most min(K, P) pairs; where routing is group-limited and
  the groups are whole ranks, at most topk_groups.
- ``padded_all_to_all`` (capacity mode): GShard-style fixed [E, C, D] buffers; the
  padding is reported. Capacity is per rank, as GShard's groups: each rank's C is
  ``capacity(T)`` of its own T, and its own tokens compete for those C rows per
  expert (what one process gives on that rank's tokens alone). One small all-gather
  of every rank's C (one host sync) sizes the exchange, so ranks may hold different T;
  a caller that knows every rank's C (``ExpertParallelMoE(equal_tokens_per_rank=True)``)
  passes them and the call makes no collective but the two exchanges, and no host sync.
- ``all_gather_exchange``: all-gather the tokens and routing, compute the
  local experts for every rank's tokens, reduce-scatter the partial outputs.
  Simple, for small P. One small all-gather of every rank's (T, S) first (one host
  sync): the collectives run on rows padded to the largest T and S, sliced after.

The last two exchanged no sizes before, and ranks with different T (a variable-length
batch, an epoch's last batch) aborted inside gloo ("Received data size doesn't match
expected size") or made the peer report a dead rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.dispatch.plan import Dispatch
from moekit.distributed import functional as fn
from moekit.distributed.mesh import Comm

# experts(x_RD, local_dispatch) -> y_RD: the local Experts module's forward.
ExpertsFn = Callable[[Tensor, Dispatch], Tensor]


@dataclass(frozen=True)
class CommBytes:
    """Forward traffic of one layer call on this rank (backward sends the same again).

    All in bytes of row payload that crosses ranks (the slice a rank keeps for
    itself is not counted). ``sent``/``received``: everything this rank sends
    and receives (dispatch + combine). ``moved``: the traffic on behalf of this
    rank's own tokens (its rows out, their results back); ``ideal``: the same
    for exactly the routed rows whose expert lives on another rank, so
    ``moved / ideal`` is 1.00 for the dropless all-to-all (below 1 for the
    deduplicated one, a row per (token, rank) pair). ``meta``: routing
    metadata (counts, ids, weights). ``padding_rows``: rows sent that carry no
    token (capacity mode).
    """

    sent: Tensor
    received: Tensor
    moved: Tensor
    ideal: Tensor
    meta: Tensor
    padding_rows: Tensor


def _local_dispatch(expert_R: Tensor, counts_El: Tensor) -> Dispatch:
    """A Dispatch that sorts received rows by local expert and scatters results back in place."""
    order_R = torch.argsort(expert_R, stable=True)
    return Dispatch(token_S=order_R,
                    weight_S=torch.ones(order_R.shape[0], device=order_R.device),
                    counts_E=counts_El, offsets_E=torch.cumsum(counts_El, 0).to(torch.int32),
                    assigned_E=counts_El)


def run_experts(experts: ExpertsFn, x_RD: Tensor, expert_R: Tensor,
                 counts_El: Tensor) -> Tensor:
    if x_RD.shape[0] == 0:  # grouped_mm's backward rejects 0 rows (torch 2.13); keep
        return x_RD * 0  # the graph so the combine's backward collective runs here too
    return experts(x_RD, _local_dispatch(expert_R, counts_El))


def _combine(y_SD: Tensor, d: Dispatch, T: int) -> Tensor:
    y_SD = y_SD * d.weight_S[: y_SD.shape[0]].to(y_SD.dtype)[:, None]
    return y_SD.new_zeros(T, y_SD.shape[1]).index_add_(0, d.token_S[: y_SD.shape[0]], y_SD)


def _nbytes(rows, x: Tensor) -> Tensor:
    return torch.as_tensor(rows, dtype=torch.float64) * (x.shape[1] * x.element_size())


def _zero() -> Tensor:
    return torch.zeros((), dtype=torch.float64)


def exchange_sizes(sizes: list[int], comm: Comm, device: torch.device) -> list[list[int]]:
    """Every rank's ``sizes`` (host ints such as T, S or C), by rank: one small all-gather
    and one host sync. Collectives sized by these lists then agree on every rank."""
    local = torch.tensor(sizes, dtype=torch.long, device=device)
    return fn.all_gather_tensor(local, comm).view(comm.size, len(sizes)).tolist()


def _exchange_counts(counts_PEl: Tensor, comm: Comm) -> tuple[Tensor, list[int], list[int]]:
    """Counts from every source for my experts [P, El], and both split lists (one sync)."""
    P = counts_PEl.shape[0]
    recv_PEl = fn.all_to_all_start(counts_PEl, None, None, comm)[0]
    splits = torch.stack([counts_PEl.sum(1), recv_PEl.sum(1)]).tolist()  # the host sync
    assert len(splits[0]) == P
    return recv_PEl, splits[0], splits[1]


def dropless_all_to_all(x_TD: Tensor, d: Dispatch, experts: ExpertsFn, comm: Comm,
                        num_experts: int) -> tuple[Tensor, CommBytes]:
    """Send exactly the routed rows (uneven splits), compute, send back, combine."""
    P, me = comm.size, comm.rank
    El = num_experts // P
    recv_PEl, send, recv = _exchange_counts(d.counts_E.view(P, El), comm)
    x_SD = x_TD.index_select(0, d.token_S)  # rows sorted by expert = grouped by owner rank
    x_RD = fn.all_to_all(x_SD, recv, send, comm)
    expert_R = torch.arange(El, device=x_TD.device).repeat(P).repeat_interleave(
        recv_PEl.reshape(-1), output_size=x_RD.shape[0])
    y_RD = run_experts(experts, x_RD, expert_R, recv_PEl.sum(0))
    y_SD = fn.all_to_all(y_RD, send, recv, comm)
    out, back = sum(send) - send[me], sum(recv) - recv[me]  # my rows out, others' rows back
    both = _nbytes(out + back, x_TD)
    stats = CommBytes(sent=both, received=both, moved=_nbytes(2 * out, x_TD),
                      ideal=_nbytes(2 * out, x_TD),
                      meta=torch.tensor(float((P - 1) * El * 8), dtype=torch.float64),
                      padding_rows=_zero())
    return _combine(y_SD, d, x_TD.shape[0]), stats


def dedup_all_to_all(x_TD: Tensor, d: Dispatch, experts: ExpertsFn, comm: Comm,
                     num_experts: int) -> tuple[Tensor, CommBytes]:
    """Send each token once per destination rank (Q (token, rank) pairs, sorted by rank
    then token), expand to the routed rows there, send back one weighted sum per pair."""
    P, me, T, D = comm.size, comm.rank, x_TD.shape[0], x_TD.shape[1]
    El = num_experts // P
    S = d.token_S.shape[0]  # dropless: every routed row is kept
    dest_S = torch.arange(num_experts, device=x_TD.device).repeat_interleave(
        d.counts_E, output_size=S) // El
    # the pairs as a [P, T] mask, not torch.unique / bincount / torch.tensor(list): each of
    # those syncs with the host on CUDA (an output sized by the data, or a blocking copy)
    key_S = dest_S * T + d.token_S
    hit_PT = torch.zeros(P * T, dtype=torch.bool, device=x_TD.device).index_fill_(
        0, key_S, True).view(P, T)
    pairs_P = hit_PT.sum(1)
    # each row's pair, numbered within its destination's slice of the pairs
    slot_S = (hit_PT.cumsum(1) - 1).view(-1).index_select(0, key_S)
    counts_PX = torch.cat([d.counts_E.view(P, El), pairs_P[:, None].to(d.counts_E.dtype)], 1)
    recv_PX = fn.all_to_all_start(counts_PX, None, None, comm)[0]
    recv_PEl = recv_PX[:, :El]
    send, recv, send_q, recv_q = torch.stack(  # the host sync
        [counts_PX[:, :El].sum(1), recv_PEl.sum(1), pairs_P, recv_PX[:, El]]).tolist()
    # pairs sorted by rank then token: Q = sum(send_q) is known on the host now
    token_Q = torch.nonzero_static(hit_PT.view(-1), size=sum(send_q)).squeeze(1) % max(T, 1)
    x_QD = fn.all_to_all(x_TD.index_select(0, token_Q), recv_q, send_q, comm)
    slot_R = fn.all_to_all_start(slot_S, recv, send, comm)[0]
    w_R = fn.all_to_all(d.weight_S[:, None], recv, send, comm)
    R = slot_R.shape[0]
    # the received pairs are numbered per source: add each source's offset
    starts_P = torch.cumsum(recv_PX[:, El], 0) - recv_PX[:, El]
    slot_R = slot_R + starts_P.repeat_interleave(recv_PEl.sum(1), output_size=R)
    expert_R = torch.arange(El, device=x_TD.device).repeat(P).repeat_interleave(
        recv_PEl.reshape(-1), output_size=R)
    y_RD = run_experts(experts, x_QD.index_select(0, slot_R), expert_R, recv_PEl.sum(0))
    y_RD = y_RD * w_R.to(y_RD.dtype)
    y_QD = y_RD.new_zeros(x_QD.shape[0], D).index_add(0, slot_R, y_RD)
    y_QD = fn.all_to_all(y_QD, send_q, recv_q, comm)
    out, back = sum(send_q) - send_q[me], sum(recv_q) - recv_q[me]
    both = _nbytes(out + back, x_TD)
    remote_rows = sum(send) - send[me]
    stats = CommBytes(sent=both, received=both, moved=_nbytes(2 * out, x_TD),
                      ideal=_nbytes(2 * remote_rows, x_TD),
                      meta=torch.tensor(float((P - 1) * (El + 1) * 8 + remote_rows * (8 + 4)),
                                        dtype=torch.float64),
                      padding_rows=_zero())
    return y_QD.new_zeros(T, D).index_add(0, token_Q, y_QD), stats


def _slots(d: Dispatch, num_experts: int, C: int) -> Tensor:
    """Each sorted row's slot in the [E*C] buffer (dropped rows -> the dump slot E*C)."""
    expert_S = _row_experts(d, d.num_rows)
    rows = torch.arange(d.num_rows, device=expert_S.device)
    starts_E = torch.cat([d.offsets_E.new_zeros(1), d.offsets_E]).long()
    return torch.where(expert_S < num_experts,
                       expert_S.clamp_max(num_experts - 1) * C + rows - starts_E[expert_S],
                       num_experts * C)


def padded_all_to_all(x_TD: Tensor, d: Dispatch, experts: ExpertsFn, comm: Comm,
                      num_experts: int, C: int, C_P: list[int] | None = None
                      ) -> tuple[Tensor, CommBytes]:
    """Capacity mode: fixed [E, C, D] buffers; rank p sends El * C_p rows to every rank.

    ``C_P``: every rank's C, by rank, where the caller knows them; None exchanges them
    (one small all-gather and one host sync). Wrong ones are a collective mismatch."""
    P, me, D = comm.size, comm.rank, x_TD.shape[1]
    El = num_experts // P
    if C_P is None:
        C_P = [c for (c,) in exchange_sizes([C], comm, x_TD.device)]  # the host sync
    send, recv = [El * C] * P, [El * c for c in C_P]
    slot_S = _slots(d, num_experts, C)
    x_SD = x_TD.index_select(0, d.token_S)
    buf_XD = x_SD.new_zeros(num_experts * C + 1, D).index_copy(0, slot_S, x_SD)
    x_RD = fn.all_to_all(buf_XD[:-1], recv, send, comm)  # per source p: [El, C_p, D]
    local_El = torch.arange(El, device=x_TD.device)
    expert_R = torch.cat([local_El.repeat_interleave(c) for c in C_P])  # host ints: no sync
    counts_El = torch.full((El,), sum(C_P), dtype=torch.long, device=x_TD.device)
    y_RD = run_experts(experts, x_RD, expert_R, counts_El)
    y_XD = fn.all_to_all(y_RD, send, recv, comm)
    y_SD = torch.cat([y_XD, y_XD.new_zeros(1, D)]).index_select(0, slot_S)
    kept_P = d.counts_E.view(P, El).sum(1).double()
    remote_kept = kept_P.sum() - kept_P[me]
    out_rows = El * C * (P - 1)  # my buffers to the other ranks; theirs come back
    both = _nbytes(out_rows + sum(recv) - recv[me], x_TD)  # + their buffers, sent back
    stats = CommBytes(sent=both, received=both, moved=_nbytes(2 * out_rows, x_TD),
                      ideal=2 * remote_kept * (D * x_TD.element_size()),
                      meta=torch.tensor(float((P - 1) * 8), dtype=torch.float64),  # C
                      padding_rows=out_rows - remote_kept)
    return _combine(y_SD, d, x_TD.shape[0]), stats


def _pad_rows(t: Tensor, rows: int, value: float = 0) -> Tensor:
    """``t`` with rows appended up to ``rows`` (differentiable; no copy when none)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), value)])


def all_gather_exchange(x_TD: Tensor, d: Dispatch, experts: ExpertsFn, comm: Comm,
                        num_experts: int) -> tuple[Tensor, CommBytes]:
    """All-gather tokens and routing, run my experts on every rank's rows, reduce-scatter.

    Every rank's rows are padded to the largest T (tokens) and S (rows) first: the
    collectives take one size on every rank. Padded rows have expert E (nobody's)."""
    P, me, T = comm.size, comm.rank, x_TD.shape[0]
    El = num_experts // P
    S = d.token_S.shape[0]
    sizes = exchange_sizes([T, S], comm, x_TD.device)  # a host sync
    Tm, Sm = max(t for t, _ in sizes), max(s for _, s in sizes)
    x_PTD, w_PS = fn.all_gather([_pad_rows(x_TD, Tm), _pad_rows(d.weight_S, Sm)], comm)
    w_PS = w_PS.view(P, Sm)
    token_PS = fn.all_gather_tensor(_pad_rows(d.token_S, Sm), comm).view(P, Sm)
    expert_PS = fn.all_gather_tensor(_pad_rows(_row_experts(d, S), Sm, num_experts),
                                     comm).view(P, Sm)
    token_PS = token_PS + torch.arange(P, device=x_TD.device)[:, None] * Tm
    mine_PS = (expert_PS >= me * El) & (expert_PS < (me + 1) * El)
    idx = mine_PS.reshape(-1).nonzero().squeeze(1)  # host sync: the number of my rows
    expert_R = expert_PS.reshape(-1)[idx] - me * El
    order = torch.argsort(expert_R, stable=True)
    idx, expert_R = idx[order], expert_R[order]
    counts_El = torch.zeros(El, dtype=torch.long, device=x_TD.device).index_add_(
        0, expert_R, torch.ones_like(expert_R))
    local = Dispatch(token_S=token_PS.reshape(-1)[idx], weight_S=w_PS.reshape(-1)[idx],
                     counts_E=counts_El, offsets_E=torch.cumsum(counts_El, 0).to(torch.int32),
                     assigned_E=counts_El)
    y_PTD = experts(x_PTD, local) if idx.numel() else x_PTD * 0 + 0 * w_PS.sum()
    y_TD = fn.reduce_scatter(y_PTD, comm)[:T]
    kept_E = d.counts_E.view(P, El).sum(1).double()
    remote = kept_E.sum() - kept_E[me]
    # my Tm rows to P-1 ranks, partial sums back; padding: my rows past T in the gather,
    # the rows past each other rank's T in the slices of partial sums I send it
    payload = _nbytes(2 * (P - 1) * Tm, x_TD)
    pad = (P - 1) * (Tm - T) + sum(Tm - t for p, (t, _) in enumerate(sizes) if p != me)
    stats = CommBytes(sent=payload, received=payload, moved=payload,
                      ideal=2 * remote * (x_TD.shape[1] * x_TD.element_size()),
                      meta=torch.tensor(float((P - 1) * (Sm * (4 + 8 + 8) + 16)),  # + T, S
                                       dtype=torch.float64),
                      padding_rows=torch.tensor(float(pad), dtype=torch.float64))
    return y_TD, stats


def _row_experts(d: Dispatch, S: int) -> Tensor:
    """Expert of each sorted row; dropped rows (past offsets_E[-1]) get E."""
    rows = torch.arange(S, device=d.offsets_E.device, dtype=d.offsets_E.dtype)
    return torch.searchsorted(d.offsets_E, rows, right=True)
