"""The cost of agreeing on a stop at every step boundary of `moekit train --nproc`.

    PYTHONPATH=src python benchmarks/stop_flag.py --world 2 --rounds 15

Each rank runs one thread. Measured in one run, on the same process group:
the stop flag's collective alone (an all_reduce MAX of one int32 on the gloo world
group, ``DistributedTrainer.agreed_stop``), and training steps of the tiny and the
small preset at ep = world with and without it, alternated (A B A B ...) and
reported as the median of the per-pair ratios (DESIGN.md: absolute times on this
shared 2-core machine drift by 2x within minutes). Time = the slowest rank.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

CASES = [  # preset, global batch, seq len (tiny: the tests' runs; small: `moekit train`)
    ("tiny", 4, 32),
    ("small", 16, 128),
]
FLAG_CALLS = 200  # flag all_reduces per timed round


def _trainer(preset_name: str, batch: int, seq: int, mesh, out: str):
    import moekit
    from moekit.models.config import preset
    from moekit.train.data import Corpus, encode
    from moekit.train.distributed import DistributedTrainer
    from moekit.train.trainer import TrainConfig

    text = (Path(moekit.__file__).parent / "layer.py").read_text() * 4
    data = encode(text)
    corpus = Corpus(data[: len(data) * 9 // 10], data[len(data) * 9 // 10:], "layer.py", 1, 1)
    tcfg = TrainConfig(steps=10_000, batch_size=batch, seq_len=seq, warmup_steps=10)
    return DistributedTrainer(preset(preset_name), tcfg, corpus,
                              f"{out}/{preset_name}", mesh, progress=False)


def _flag_seconds(trainer) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(FLAG_CALLS):
        trainer.agreed_stop(None)
    return (time.perf_counter() - start) / FLAG_CALLS


def _step_seconds(trainer, with_flag: bool) -> float:
    dist.barrier()
    start = time.perf_counter()
    trainer.step_once()
    if with_flag:
        trainer.agreed_stop(None)
    return time.perf_counter() - start


def worker(rank: int, world: int, port: int, args, out_file: str) -> None:
    from moekit.distributed import init_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    mesh = init_mesh(dp=1, ep=world)
    result: dict = {}
    for name, batch, seq in CASES:
        # the trainers' directory: beside out_file, in run_ranks' own, removed after
        trainer = _trainer(name, batch, seq, mesh, str(Path(out_file).parent / "runs"))
        for _ in range(3):  # warm-up: kernels built, allocator warm
            _step_seconds(trainer, True)
            _flag_seconds(trainer)
        flag, plain, flagged = [], [], []
        for _ in range(args.rounds):
            flag.append(_flag_seconds(trainer))
            plain.append(_step_seconds(trainer, False))
            flagged.append(_step_seconds(trainer, True))
        t = torch.tensor([flag, plain, flagged], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        result[name] = t.tolist()
    if rank == 0:  # whole or not at all: run_ranks reads it once every rank has exited
        from harness import write_json  # benchmarks/harness.py, beside this file

        write_json(out_file, result)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    from harness import cpu_model, machine, run_ranks, write_json  # benchmarks/harness.py

    res = run_ranks(worker, args.world, args, "stop_flag")

    print(f"moekit stop-flag bench  torch {torch.__version__}  gloo  {args.world} ranks x 1 "
          f"thread  {cpu_model()}  median of {args.rounds} rounds; time = slowest rank; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'preset':8s} {'flag us':>8s} {'step ms':>8s} {'step+flag ms':>13s} "
          f"{'x step':>7s} {'flag/step':>10s}")
    rows = []
    for (name, batch, seq) in CASES:
        flag, plain, flagged = res[name]
        ratio = statistics.median(b / a for a, b in zip(plain, flagged, strict=True))
        row = {"preset": name, "batch": batch, "seq_len": seq,
               "flag_us": 1e6 * statistics.median(flag),
               "step_ms": 1e3 * statistics.median(plain),
               "step_with_flag_ms": 1e3 * statistics.median(flagged), "x_step": ratio}
        row["flag_share"] = row["flag_us"] / 1e3 / row["step_ms"]
        rows.append(row)
        print(f"{name:8s} {row['flag_us']:8.1f} {row['step_ms']:8.1f} "
              f"{row['step_with_flag_ms']:13.1f} {ratio:7.3f} {row['flag_share']:10.2%}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, {"machine": machine(), "args": vars(args), "rows": rows},
                   indent=1)


if __name__ == "__main__":
    main()
