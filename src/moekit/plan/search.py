"""Enumerate parallel layouts of a cluster and rank those that fit in memory."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import fields
from typing import Any, NoReturn

from moekit.plan.cluster import RECOMPUTE, Cluster, Layout, TrainSetup, usable_memory
from moekit.plan.cost import Plan, check_dispatcher, check_types, make_plan, memory
from moekit.plan.params import count_params
from moekit.plan.spec import ModelSpec, check_choice, check_int, fail

MICRO_BATCHES = (1, 2, 4, 8)
LAYOUT_FIELDS = tuple(f.name for f in fields(Layout))
# why a value of each field can be missing from the layouts searched
SEARCH_RULES = {
    "dp": "dp * tp * pp = num_gpus",
    "tp": "tp divides num_gpus and num_heads and is at most gpus_per_node",
    "pp": "pp divides num_gpus and is at most the number of layers",
    "ep": "ep divides both dp and num_experts",
    "zero": "ZeRO stages 0-3",
    "recompute": f"one of {', '.join(RECOMPUTE)}",
    "micro_batch": "global_batch is a multiple of dp * micro_batch",
}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(spec: ModelSpec, cluster: Cluster, setup: TrainSetup,
                      micro_batches: tuple[int, ...] = MICRO_BATCHES) -> Iterator[Layout]:
    """tp within a node and dividing the heads; pp up to the layer count; ep dividing
    both dp and the expert count; every ZeRO stage, with and without recomputation."""
    N = cluster.num_gpus
    tps = [t for t in divisors(min(N, cluster.gpus_per_node))
           if N % t == 0 and (not spec.num_heads or spec.num_heads % t == 0)]
    for tp in tps:
        for pp in divisors(N // tp):
            if pp > spec.total_layers:
                continue
            dp = N // (tp * pp)
            for ep in divisors(math.gcd(dp, spec.num_experts)):
                for mb in micro_batches:
                    if setup.global_batch % (dp * mb):
                        continue
                    for zero in range(4):
                        for rc in RECOMPUTE:
                            yield Layout(dp=dp, tp=tp, pp=pp, ep=ep, zero=zero,
                                         recompute=rc, micro_batch=mb)


def check_fixed(fixed: Any) -> dict[str, Any]:
    """``fixed`` as a dict of Layout fields, each value one a Layout accepts."""
    if fixed is None:
        return {}
    if not isinstance(fixed, Mapping):
        fail("fixed", fixed, "it must be a dict of Layout fields to the values the "
             f"searched layouts must have ({', '.join(LAYOUT_FIELDS)})")
    for name, value in fixed.items():
        if name not in LAYOUT_FIELDS:
            fail("fixed", name, f"its keys must be Layout fields: {', '.join(LAYOUT_FIELDS)}")
        if name == "zero":
            if isinstance(value, bool) or value not in (0, 1, 2, 3):
                fail("zero", value, "it must be 0, 1, 2 or 3")
        elif name == "recompute":
            check_choice("recompute", value, RECOMPUTE)
        else:
            check_int(name, value, 1)
    return dict(fixed)


def _no_layout_matches(fixed: dict[str, Any], candidates: list[Layout],
                       cluster: Cluster, setup: TrainSetup) -> NoReturn:
    """Raise, naming the fixed field (or the combination) that no candidate layout has."""
    where = f"no layout searched on num_gpus={cluster.num_gpus} has it"
    if not candidates and "micro_batch" in fixed:
        fail("micro_batch", fixed["micro_batch"], f"{where}: global_batch="
             f"{setup.global_batch} is not a multiple of dp * micro_batch for any dp")
    for name, value in fixed.items():
        seen = sorted({getattr(lay, name) for lay in candidates}, key=str)
        if value not in seen:
            fail(name, value, f"{where} (the searched layouts have {name} = "
                 f"{', '.join(map(str, seen))}: {SEARCH_RULES[name]})")
    given = " ".join(f"{name}={value}" for name, value in fixed.items())
    fail("layout", given, f"no layout searched on num_gpus={cluster.num_gpus} has all "
         f"of these together ({'; '.join(SEARCH_RULES[name] for name in fixed)})")


def search(spec: ModelSpec, cluster: Cluster, setup: TrainSetup, top: int = 10,
           fixed: Mapping[str, Any] | None = None) -> list[Plan]:
    """The ``top`` layouts that fit, fastest first (ties: less memory first).

    ``fixed`` restricts the search to layouts with those Layout field values, e.g.
    ``{"tp": 8, "zero": 1}``; a value no searched layout has raises ValueError naming
    it (a restriction is never dropped in silence). A fixed ``micro_batch`` replaces
    the micro-batches searched (1, 2, 4, 8)."""
    check_types(spec=spec, cluster=cluster, setup=setup)
    check_dispatcher(spec, setup)
    check_int("top", top, 1)  # a negative top sliced off the last layouts instead
    fixed = check_fixed(fixed)
    mbs = (fixed["micro_batch"],) if "micro_batch" in fixed else MICRO_BATCHES
    candidates = list(candidate_layouts(spec, cluster, setup, mbs))
    chosen = [lay for lay in candidates
              if all(getattr(lay, name) == value for name, value in fixed.items())]
    if fixed and not chosen:
        _no_layout_matches(fixed, candidates, cluster, setup)
    counts = count_params(spec)
    cap = usable_memory(cluster, setup)
    fitting = [make_plan(spec, cluster, setup, lay, counts)
               for lay in chosen if memory(spec, counts, setup, lay).total <= cap]
    fitting.sort(key=lambda p: (-p.time.tokens_per_s, p.memory.total))
    return fitting[:top]
