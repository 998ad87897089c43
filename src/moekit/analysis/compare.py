"""`moekit analyze CHECKPOINT --compare OTHER`: how routing changed between two
checkpoints of one training run, both routing the same tokens.

Per MoE layer: the change in load shares (largest absolute change, total variation
distance), imbalance and router entropy before and after, and routing stability: the
fraction of the routed tokens whose top-1 expert (and whose whole expert set) is the same
in both. Expert ids mean the same thing only within one training run: two runs from
different seeds may learn the same experts under other numbers.

Shape letters: T tokens, E experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moekit.analysis.collect import LayerRouting
from moekit.layer import MoE

COMPARE_FILE = "compare.json"


def moe_shape(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, experts, top-k) of each moekit.MoE layer, in order."""
    return [(n, m.config.num_experts, m.config.top_k) for n, m in model.named_modules()
            if isinstance(m, MoE)]


def check_comparable(before: nn.Module, after: nn.Module, name_before: str,
                     name_after: str, vocab: tuple[int, int]) -> None:
    """A ValueError in one line naming both checkpoints and what differs: the per-token
    decisions are compared layer by layer, expert by expert, on the same token ids."""
    a, b = moe_shape(before), moe_shape(after)
    what = None
    if vocab[0] != vocab[1]:
        what = f"vocabulary {vocab[0]} vs {vocab[1]} tokens"
    elif len(a) != len(b):
        what = f"{len(a)} vs {len(b)} MoE layers"
    else:
        for (name, e_a, k_a), (_, e_b, k_b) in zip(a, b, strict=True):
            if e_a != e_b:
                what = f"layer {name}: {e_a} vs {e_b} experts"
            elif k_a != k_b:
                what = f"layer {name}: top-{k_a} vs top-{k_b}"
            if what:
                break
    if what:
        raise ValueError(f"checkpoints {name_before!r} and {name_after!r} cannot be compared: "
                         f"{what} (compare two checkpoints of one training run)")


def stability(before: LayerRouting, after: LayerRouting) -> dict[str, float]:
    """Fractions of the routed tokens (each occurrence counts once) whose top-1 expert, and
    whose whole expert set, is the same in both checkpoints."""
    top1_a, top1_b = torch.cat(before.top1_T), torch.cat(after.top1_T)
    set_a, set_b = torch.cat(before.chosen_TE), torch.cat(after.chosen_TE)
    T = max(top1_a.numel(), 1)
    return {"same_top1": float((top1_a == top1_b).sum()) / T,
            "same_expert_set": float((set_a == set_b).all(1).sum()) / T}


def compare_layer(before: dict[str, Any], after: dict[str, Any],
                  stable: dict[str, float]) -> dict[str, Any]:
    """One layer's change, from the two analyze summaries and ``stability``."""
    share_a = torch.tensor(before["load_share"], dtype=torch.float64)
    share_b = torch.tensor(after["load_share"], dtype=torch.float64)
    diff = (share_b - share_a).abs()
    keys = ("max_over_mean", "coefficient_of_variation", "load_entropy_normalised")
    return {
        "name": before["name"], "num_experts": before["num_experts"],
        "top_k": before["top_k"], "tokens": before["tokens"],
        "load_share": {"before": before["load_share"], "after": after["load_share"]},
        "load_share_max_abs_change": float(diff.max()),
        "load_share_total_variation": 0.5 * float(diff.sum()),
        "imbalance": {k: {"before": before["imbalance"][k], "after": after["imbalance"][k]}
                      for k in keys},
        "router_entropy_nats": {"before": before["router_entropy_nats"],
                                "after": after["router_entropy_nats"]},
        "router_entropy_normalised": {"before": before["router_entropy_normalised"],
                                      "after": after["router_entropy_normalised"]},
        **stable}


def compare(before: list[LayerRouting], after: list[LayerRouting],
            summary_before: list[dict[str, Any]], summary_after: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """Per layer, ``compare_layer`` of collectors that kept decisions on the same tokens."""
    return [compare_layer(sa, sb, stability(la, lb)) for la, lb, sa, sb
            in zip(before, after, summary_before, summary_after, strict=True)]


def _entropy(pair: dict[str, Any]) -> str:
    a, b = pair["before"], pair["after"]
    return "n/a" if a is None or b is None else f"{a:.3f} -> {b:.3f}"


def quantized_note(meta: dict[str, Any]) -> str:
    """A sentence when a side is a `moekit quantize` output: what its differences mean."""
    if not any(meta[side].get("weights") for side in ("before", "after")):
        return ""
    return (" A quantized checkpoint keeps its float checkpoint's expert ids and float "
            "routers: what changes here comes from the quantized weights before each "
            "router.")


def compare_section(result: dict[str, Any]) -> list[str]:
    """The report's section for compare.json's ``result``."""
    meta = result["meta"]
    before, after = (side.get("label", f"step {side['step']}")  # compare.json before labels
                     for side in (meta["before"], meta["after"]))
    lines = [f"## Compared with {after}", "",
             f"Before: `{meta['before']['checkpoint']}` ({before}); "
             f"after: `{meta['after']['checkpoint']}` ({after}), both "
             f"routing the same {meta['tokens']:,} tokens. Load share change: the largest "
             "absolute change of one expert's share, in percentage points (pp: 25% -> 30% is 5 pp, "
             "not a relative 20%), and the total variation distance "
             "between the two load distributions (0 = same, 1 = disjoint). Same top-1 / "
             "same set: the fraction of tokens whose highest-weight expert / whose whole "
             "expert set is the same in both. Expert ids are comparable only between "
             "checkpoints of one training run." + quantized_note(meta), "",
             "| layer | max share change (pp) | TV distance | load max/mean | CV | "
             "router entropy (nats) | same top-1 | same set |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["layers"]:
        imb = c["imbalance"]
        lines.append(
            f"| {c['name']} | {100 * c['load_share_max_abs_change']:.2f} | "
            f"{c['load_share_total_variation']:.3f} | "
            f"{imb['max_over_mean']['before']:.2f} -> {imb['max_over_mean']['after']:.2f} | "
            f"{imb['coefficient_of_variation']['before']:.2f} -> "
            f"{imb['coefficient_of_variation']['after']:.2f} | "
            f"{_entropy(c['router_entropy_nats'])} | {c['same_top1']:.1%} | "
            f"{c['same_expert_set']:.1%} |")
    return [*lines, ""]
