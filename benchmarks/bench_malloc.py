"""`moekit train` tokens/s with and without tune_malloc, in alternating fresh processes.

Each round runs the trainer twice, ``MOEKIT_TUNE_MALLOC=0`` (glibc's defaults)
then on, for ``--steps`` steps of the default model with no evaluation or
checkpoint in between, and reads the last logged tokens/s (the trainer's running
average) from metrics.jsonl. Prints each pair and the median ratio.

    python benchmarks/bench_malloc.py --rounds 3 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def tokens_per_s(tuned: bool, steps: int, extra: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["MOEKIT_TUNE_MALLOC"] = "1" if tuned else "0"
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "moekit.cli", "train", "--steps", str(steps),
                        "--eval-every", str(10 * steps), "--save-every", str(10 * steps),
                        "--no-progress", "--out", out, *extra],
                       env=env, check=True, capture_output=True)
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"][-1]["tokens_per_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("train_args", nargs="*", help="more `moekit train` flags, after --")
    args = p.parse_args(argv)
    ratios = []
    for i in range(args.rounds):
        off = tokens_per_s(False, args.steps, args.train_args)
        on = tokens_per_s(True, args.steps, args.train_args)
        ratios.append(on / off)
        print(f"round {i + 1}: glibc defaults {off:,.0f} tok/s, tune_malloc {on:,.0f} tok/s, "
              f"x{on / off:.3f}", flush=True)
    print(f"median tune_malloc / defaults: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
