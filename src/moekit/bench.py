"""`moekit bench`: run benchmarks/bench_cpu.py (or, with ``--decode``,
benchmarks/bench_decode.py) from the source checkout.

Benchmarks live outside the package (DESIGN.md), so this command needs the
repository: with an editable install (``pip install -e .``) it finds
``benchmarks/`` next to ``src/``; from a wheel it says where it looked.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cpu.py"
DECODE_SCRIPT = SCRIPT.with_name("bench_decode.py")


def _load(script: Path = SCRIPT) -> ModuleType | None:
    if not script.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"moekit_{script.stem}", script)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(p: argparse.ArgumentParser) -> None:
    module = _load()
    if module is not None:
        module.add_arguments(p)
    p.add_argument("--decode", action="store_true",
                   help="run the decode benchmark (benchmarks/bench_decode.py) instead; "
                   "with --quick its quick mode, --threads passed on")


def run(args: argparse.Namespace) -> int:
    module = _load(DECODE_SCRIPT if args.decode else SCRIPT)
    if module is None:
        print(f"moekit bench: {SCRIPT} not found. The benchmarks ship with the source "
              "repository, not the package: clone it and `pip install -e .`, then run "
              "`moekit bench` (or `python benchmarks/bench_cpu.py`).")
        return 2
    if args.decode:
        argv = ["--threads", str(getattr(args, "threads", 2))]
        return int(module.main(argv + (["--quick"] if getattr(args, "quick", False) else [])))
    return int(module.run(args))
