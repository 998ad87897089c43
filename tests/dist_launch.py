"""The test side of the gloo process groups: ``launch`` runs a worker function
(tests/dist_workers.py, dist_uneven.py, ddp_workers.py) in spawned processes and returns
each rank's result; ``assert_all_ranks`` checks one of the named results on every rank.
Used by tests/test_distributed.py, test_distributed_uneven.py and test_ddp_balance.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, out_dir, args):
    result = fn(rank, world, port, *args)
    (Path(out_dir) / f"{rank}.pkl").write_bytes(pickle.dumps(result))
    # Skip interpreter teardown: with a frozen peer, gloo's destructors block on it.
    os._exit(0)


def launch(fn, world: int, tmp: Path, *args, timeout_s: float = 150,
           wait_for: int | None = None) -> dict[int, dict]:
    """Run ``fn(rank, world, port, *args)`` in ``world`` processes; results by rank.

    Waits for the first ``wait_for`` ranks (default: all), then kills the rest.
    """
    out_dir = tmp / f"out_{fn.__name__}"
    out_dir.mkdir()
    # forkserver with torch preloaded: ~0.3 s a process instead of ~5 s for "spawn", and
    # unlike "fork" the children never inherit the test process's OpenMP threads.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "moekit.distributed", "tests.dist_workers"])
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, str(out_dir), args))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs[:wait_for]:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return {int(f.stem): pickle.loads(f.read_bytes()) for f in out_dir.glob("*.pkl")}


def assert_all_ranks(results: dict[int, dict], name: str) -> None:
    for rank, res in results.items():
        assert res[name] is None, f"rank {rank}: {res[name]}"


def launch_two(fn, tmp_path_factory, name: str, timeout_s: float = 300) -> dict[int, dict]:
    """``fn`` on a 2-rank gloo world in a fresh ``name`` folder (its runs under runs/),
    both ranks' results; fails if a rank crashed."""
    tmp = tmp_path_factory.mktemp(name)
    res = launch(fn, 2, tmp, str(tmp / "runs"), timeout_s=timeout_s)
    assert sorted(res) == [0, 1], "a rank crashed; see captured stderr"
    return res
