"""Enumerate parallel layouts of a cluster and rank those that fit in memory."""

from __future__ import annotations

import math
from collections.abc import Iterator

from moekit.plan.cluster import RECOMPUTE, Cluster, Layout, TrainSetup, usable_memory
from moekit.plan.cost import Plan, check_types, make_plan, memory
from moekit.plan.params import count_params
from moekit.plan.spec import ModelSpec, check_int


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(spec: ModelSpec, cluster: Cluster, setup: TrainSetup,
                      micro_batches: tuple[int, ...] = (1, 2, 4, 8)) -> Iterator[Layout]:
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


def search(spec: ModelSpec, cluster: Cluster, setup: TrainSetup,
           top: int = 10) -> list[Plan]:
    """The ``top`` layouts that fit, fastest first (ties: less memory first)."""
    check_types(spec=spec, cluster=cluster, setup=setup)
    check_int("top", top, 1)  # a negative top sliced off the last layouts instead
    counts = count_params(spec)
    cap = usable_memory(cluster, setup)
    fitting = [make_plan(spec, cluster, setup, lay, counts)
               for lay in candidate_layouts(spec, cluster, setup)
               if memory(spec, counts, setup, lay).total <= cap]
    fitting.sort(key=lambda p: (-p.time.tokens_per_s, p.memory.total))
    return fitting[:top]
