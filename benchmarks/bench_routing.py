"""Token-choice routing: the fp64-rule selection (moekit) vs the old selection on
saturating fp32 scores, same run, A B A B pairs. Forward + backward of the router
math alone on given fp32 logits (no gate GEMM).

    PYTHONPATH=src python benchmarks/bench_routing.py [--tokens 4096 --experts 64 --top-k 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from harness import Step, compare, machine  # noqa: E402
from moekit.routing.token_choice import _select, sigmoid_topk, softmax_topk  # noqa: E402


def _old_finish(w_TK: Tensor, renormalize: bool) -> Tensor:
    return w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-20) if renormalize else w_TK


def old_softmax_topk(logits_TE, top_k, *, renormalize=True, bias_E=None, num_groups=1,
                     topk_groups=1):
    """The selection before issue 15: top-k of (fp32 probabilities + bias)."""
    probs_TE = logits_TE.softmax(-1)
    select_TE = probs_TE if bias_E is None else probs_TE + bias_E
    experts_TK = _select(select_TE, top_k, num_groups, topk_groups, "max")
    return experts_TK, _old_finish(probs_TE.gather(1, experts_TK), renormalize), probs_TE


def old_sigmoid_topk(logits_TE, top_k, *, bias_E, renormalize=True, num_groups=1,
                     topk_groups=1):
    scores_TE = logits_TE.sigmoid()
    select_TE = scores_TE if bias_E is None else scores_TE + bias_E
    experts_TK = _select(select_TE, top_k, num_groups, topk_groups, "top2_sum")
    probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    return experts_TK, _old_finish(scores_TE.gather(1, experts_TK), renormalize), probs_TE


def step(fn, logits_TE: Tensor, dw_TK: Tensor, dp_TE: Tensor, **kw) -> Step:
    def forward():
        _, w_TK, p_TE = fn(logits_TE, dw_TK.shape[1], **kw)
        return (w_TK * dw_TK).sum() + (p_TE * dp_TE).sum()

    return Step(forward, lambda y: y.backward())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--reps", type=int, default=31)
    args = p.parse_args()
    torch.set_num_threads(2)
    T, E, K = args.tokens, args.experts, args.top_k
    g = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(T, E, generator=g).requires_grad_()
    dw_TK, dp_TE = torch.randn(T, K, generator=g), torch.randn(T, E, generator=g)
    bias_E = torch.randint(-3, 4, (E,), generator=g) * 1e-3
    cases = {
        "softmax": (softmax_topk, old_softmax_topk, {}),
        "softmax+bias": (softmax_topk, old_softmax_topk, {"bias_E": bias_E}),
        "softmax G8/4": (softmax_topk, old_softmax_topk, {"num_groups": 8, "topk_groups": 4}),
        "sigmoid+bias": (sigmoid_topk, old_sigmoid_topk, {"bias_E": bias_E}),
        "sigmoid+bias G8/4": (sigmoid_topk, old_sigmoid_topk,
                              {"bias_E": bias_E, "num_groups": 8, "topk_groups": 4}),
    }
    print(json.dumps(machine()))
    print(f"routing fwd+bwd T{T} E{E} K{K}, median of {args.reps} pairs")
    print(f"{'case':20s} {'new ms':>8s} {'old ms':>8s} {'new/old':>8s}")
    for name, (new, old, kw) in cases.items():
        r = compare(step(new, logits_TE, dw_TK, dp_TE, **kw),
                    step(old, logits_TE, dw_TK, dp_TE, **kw), args.reps, warmup=3)
        print(f"{name:20s} {r['a_total_ms']:8.2f} {r['b_total_ms']:8.2f} "
              f"{r['ratio_total']:8.2f}")


if __name__ == "__main__":
    main()
