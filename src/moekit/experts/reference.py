"""The slow, obviously-correct expert path: one (token, expert) pair at a time.

Used by benchmarks as the oracle's speed and by anyone who doubts a backend.
Shape letters: T tokens, D hidden, S routed rows.
"""

from __future__ import annotations

from torch import Tensor

from moekit.dispatch.plan import Dispatch
from moekit.experts.experts import Experts


def reference_experts(experts: Experts, x_TD: Tensor, dispatch: Dispatch) -> Tensor:
    """y_TD[t] = sum over kept rows of weight * expert(x_TD[t]), row by row."""
    y_TD = x_TD.new_zeros(x_TD.shape)
    rows = []
    ends = dispatch.offsets_E.tolist()
    start = 0
    for e, end in enumerate(ends):
        rows += [(r, e) for r in range(start, end)]
        start = end
    token = dispatch.token_S.tolist()
    for r, e in rows:
        t = token[r]
        h = x_TD[t] @ experts.w_in[e]
        if experts.b_in is not None:
            h = h + experts.b_in[e]
        y = experts._act(h[None])[0] @ experts.w_out[e]
        if experts.b_out is not None:
            y = y + experts.b_out[e]
        y_TD[t] = y_TD[t] + dispatch.weight_S[r].to(y.dtype) * y
    return y_TD
