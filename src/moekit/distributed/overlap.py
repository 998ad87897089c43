"""Dropless all-to-all in chunks, so one chunk's exchange overlaps another's experts.

The T tokens are cut into n chunks. Chunk c+1's dispatch and chunk c-1's
combine are in flight (async ``all_to_all_single``) while chunk c's experts
run; in backward the same Functions launch the gradient exchanges early and
wait late. One small count exchange and one host sync cover all chunks.
Shape letters as in dispatcher.py; n chunks.

Async collectives must be issued in the same order on every rank. Forward
issues them in program order. In backward, autograd's CPU engine runs ready
nodes by decreasing sequence number, i.e. creation order, and every rank
creates the collective nodes in the same order; only the expert subgraphs
between them differ (a rank with no rows has a shorter one), so the gradient
all-to-alls are issued in the same order everywhere.

Measured on the 2-core dev box (README): no gain on gloo, since the loopback
transfer is CPU work competing with the experts (1.09x the step time at
D=512, F=64, where the exchange is 46% of the step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.dispatch.plan import Dispatch
from moekit.distributed import functional as fn
from moekit.distributed.dispatcher import CommBytes, ExpertsFn, run_experts
from moekit.distributed.mesh import Comm


def _chunk_counts(d: Dispatch, T: int, n: int, E: int) -> tuple[Tensor, Tensor]:
    """Reorder rows chunk-major (expert order kept inside a chunk); counts [n, E]."""
    expert_S = torch.arange(E, device=d.token_S.device).repeat_interleave(
        d.counts_E, output_size=d.num_rows)
    chunk_S = d.token_S * n // max(T, 1)
    order_S = torch.argsort(chunk_S, stable=True)
    counts_nE = torch.zeros(n * E, dtype=torch.long, device=d.token_S.device).index_add_(
        0, chunk_S * E + expert_S, torch.ones_like(expert_S)).view(n, E)
    return order_S, counts_nE


def chunked_all_to_all(x_TD: Tensor, d: Dispatch, experts: ExpertsFn, comm: Comm,
                       num_experts: int, n: int) -> tuple[Tensor, CommBytes]:
    P, me, T = comm.size, comm.rank, x_TD.shape[0]
    El = num_experts // P
    order_S, counts_nE = _chunk_counts(d, T, n, num_experts)
    send_PnEl = counts_nE.view(n, P, El).transpose(0, 1).contiguous()
    recv_PnEl = fn.all_to_all_start(send_PnEl, None, None, comm)[0]
    host = torch.stack([send_PnEl.sum(2), recv_PnEl.sum(2)]).tolist()  # the one host sync
    send_nP = [[host[0][p][c] for p in range(P)] for c in range(n)]
    recv_nP = [[host[1][p][c] for p in range(P)] for c in range(n)]
    token_S, weight_S = d.token_S[order_S], d.weight_S[order_S]
    x_parts = x_TD.index_select(0, token_S).split([sum(s) for s in send_nP])
    local_E = torch.arange(El, device=x_TD.device).repeat(P)

    def launch(c: int):
        return fn.all_to_all_async(x_parts[c], recv_nP[c], send_nP[c], comm)

    inflight, backs = launch(0), []
    for c in range(n):
        nxt = launch(c + 1) if c + 1 < n else None
        x_RD = fn.all_to_all_wait(inflight[0], recv_nP[c], send_nP[c], comm, inflight[1])
        expert_R = local_E.repeat_interleave(recv_PnEl[:, c].reshape(-1),
                                             output_size=x_RD.shape[0])
        y_RD = run_experts(experts, x_RD, expert_R, recv_PnEl[:, c].sum(0))
        backs.append((fn.all_to_all_async(y_RD, send_nP[c], recv_nP[c], comm), c))
        inflight = nxt
    y_SD = torch.cat([fn.all_to_all_wait(out, send_nP[c], recv_nP[c], comm, pending)
                      for (out, pending), c in backs])
    y_SD = y_SD * weight_S.to(y_SD.dtype)[:, None]
    y_TD = y_SD.new_zeros(T, y_SD.shape[1]).index_add_(0, token_S, y_SD)
    out_rows = sum(sum(s) - s[me] for s in send_nP)
    back_rows = sum(sum(r) - r[me] for r in recv_nP)
    row = x_TD.shape[1] * x_TD.element_size()
    both = torch.tensor(float((out_rows + back_rows) * row), dtype=torch.float64)
    mine = torch.tensor(float(2 * out_rows * row), dtype=torch.float64)
    stats = CommBytes(sent=both, received=both, moved=mine, ideal=mine,
                      meta=torch.tensor(float((P - 1) * n * El * 8), dtype=torch.float64),
                      padding_rows=torch.zeros((), dtype=torch.float64))
    return y_TD, stats
