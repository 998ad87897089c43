"""`moekit bench`: run benchmarks/bench_cpu.py from the source checkout.

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


def _load() -> ModuleType | None:
    if not SCRIPT.is_file():
        return None
    spec = importlib.util.spec_from_file_location("moekit_bench_cpu", SCRIPT)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(p: argparse.ArgumentParser) -> None:
    module = _load()
    if module is not None:
        module.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    module = _load()
    if module is None:
        print(f"moekit bench: {SCRIPT} not found. The benchmarks ship with the source "
              "repository, not the package: clone it and `pip install -e .`, then run "
              "`moekit bench` (or `python benchmarks/bench_cpu.py`).")
        return 2
    return int(module.run(args))
