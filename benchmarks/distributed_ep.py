"""Expert parallelism on gloo/CPU: communication bytes vs ideal, and step time with and
without chunked overlap or per-rank deduplication, measured in one run.

    PYTHONPATH=src python benchmarks/distributed_ep.py --world 2 --tokens 2048

Every rank runs one thread. Step = forward + backward of one MoE layer on this
rank's tokens. Variants are alternated (A B C A B C ...) and the per-round
ratios to the non-overlapped all-to-all are reported as medians (DESIGN.md:
absolute times on this shared 2-core machine drift by 2x within minutes).
Shape letters: T tokens per rank, D hidden, F expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moekit import MoE, MoEConfig
from moekit.distributed import ExpertParallelMoE, init_mesh

VARIANTS = [  # name, capacity_factor, dispatcher, overlap_chunks
    ("all_to_all dropless", None, "all_to_all", 1),
    ("  same, identity experts (comm only)", None, "all_to_all", 1),
    ("all_to_all dropless, 2 chunks", None, "all_to_all", 2),
    ("all_to_all dropless, 4 chunks", None, "all_to_all", 4),
    ("all_to_all capacity 1.25 (padded)", 1.25, "all_to_all", 1),
    ("all_gather dropless", None, "all_gather", 1),
    ("all_to_all_dedup dropless", None, "all_to_all_dedup", 1),
]


def _step(layer: ExpertParallelMoE, x: torch.Tensor) -> tuple[float, dict]:
    start = time.perf_counter()
    out = layer(x)
    (out.output.square().mean() + out.aux_loss).backward()
    seconds = time.perf_counter() - start
    s = out.stats
    return seconds, {"moved": float(s.comm_bytes_moved), "ideal": float(s.comm_bytes_ideal),
                     "sent": float(s.comm_bytes_sent), "padding": float(s.comm_padding_rows)}


def worker(rank: int, world: int, port: int, args, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    mesh = init_mesh(dp=1, ep=world)
    layers = []
    for name, cf, dispatcher, chunks in VARIANTS:
        cfg = MoEConfig(dim=args.dim, ffn_dim=args.ffn, num_experts=args.experts,
                        top_k=args.top_k, capacity_factor=cf, num_groups=args.groups,
                        topk_groups=args.topk_groups)
        torch.manual_seed(0)
        layer = ExpertParallelMoE.from_moe(MoE(cfg), mesh, dispatcher=dispatcher,
                                           overlap_chunks=chunks)
        if "identity" in name:  # what is left to hide: routing, permutes, all-to-alls
            layer._experts_fn = lambda x_RD, d: x_RD * 1.0
        layers.append(layer)
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))
    for layer in layers:  # warm-up
        _step(layer, x)
    times = [[] for _ in layers]
    comm = [None] * len(layers)
    for _ in range(args.rounds):
        for i, layer in enumerate(layers):
            dist.barrier()
            t, comm[i] = _step(layer, x)
            times[i].append(t)
    # every rank's step time counts: the slowest rank sets the pace
    t_all = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t_all, op=dist.ReduceOp.MAX)
    c = torch.tensor([[v["moved"], v["ideal"], v["sent"], v["padding"]] for v in comm],
                     dtype=torch.float64)
    dist.all_reduce(c)
    if rank == 0:  # whole or not at all: run_ranks reads it once every rank has exited
        from harness import write_json  # benchmarks/harness.py, beside this file

        write_json(out_file, {"times": t_all.tolist(), "comm": c.tolist()})
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="T per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--groups", type=int, default=1,
                   help="group-limited routing: experts in this many groups (default 1)")
    p.add_argument("--topk-groups", type=int, default=1,
                   help="groups a token's experts may come from (default 1)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    from harness import run_ranks, write_json  # benchmarks/harness.py, beside this file

    res = run_ranks(worker, args.world, args, "ep_bench")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    print(f"moekit EP bench  torch {torch.__version__}  gloo  {args.world} ranks x 1 thread  "
          f"{cpu}  fp32  median of {args.rounds} rounds")
    groups = (f", {args.topk_groups} of {args.groups} groups" if args.groups > 1 else "")
    print(f"T={args.tokens}/rank D={args.dim} F={args.ffn} E={args.experts} K={args.top_k}"
          f"{groups} (swiglu); step = fwd+bwd of one layer; time = slowest rank")
    print(f"{'variant':36s} {'step ms':>8s} {'x base':>7s} {'(p25-p75)':>11s} "
          f"{'bytes/ideal':>11s} {'MiB sent':>9s} {'pad rows':>9s}")
    base = res["times"][0]
    rows = []
    for (name, *_), t, c in zip(VARIANTS, res["times"], res["comm"], strict=True):
        ratios = [a / b for a, b in zip(t, base, strict=True)]
        ratio = statistics.median(ratios)
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio, ratio, ratio]
        row = {"variant": name, "step_ms": 1e3 * statistics.median(t), "x_base": ratio,
               "x_base_p25": q[0], "x_base_p75": q[2],
               "bytes_over_ideal": c[0] / c[1], "mib_sent_all_ranks": c[2] / 2**20,
               "padding_rows_all_ranks": c[3]}
        rows.append(row)
        print(f"{name:36s} {row['step_ms']:8.1f} {ratio:7.2f} {q[0]:5.2f}-{q[2]:<5.2f} "
              f"{row['bytes_over_ideal']:11.2f} "
              f"{row['mib_sent_all_ranks']:9.2f} {c[3]:9.0f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, {"args": vars(args), "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
