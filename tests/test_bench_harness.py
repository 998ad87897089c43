"""The benchmarks' compute probe: the machine's fp32 GEMM rate on 1 thread and on the run's
threads, recorded beside the read bandwidth (a VM's compute moves within a session as its
bandwidth does), and bench_decode's warning when it moved during a run."""

from __future__ import annotations

import pytest
import torch

from moekit import bench

CPU = bench._load()
DECODE = bench._load(bench.DECODE_SCRIPT)
pytestmark = pytest.mark.skipif(CPU is None or DECODE is None,
                                reason="benchmarks/ is not in this checkout")


def test_compute_probe_times_one_thread_then_all_and_restores_the_count(monkeypatch):
    harness = CPU.harness
    before = torch.get_num_threads()
    asked: list[int] = []
    real = torch.set_num_threads

    def record(n: int) -> None:
        asked.append(n)
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", record)
    probe = harness.compute_probe(reps=1, n=64)
    assert asked == [1, before, before]  # 1 thread, the run's threads, then restored
    assert torch.get_num_threads() == before
    assert probe["threads"] == before and probe["gemm_n"] == 64
    assert probe["gemm_gmacs_1_thread"] > 0 and probe["gemm_gmacs"] > 0


def test_the_machine_description_holds_the_probe():
    info = CPU.harness.machine()
    assert info["compute"]["threads"] == info["threads"] == torch.get_num_threads()
    assert info["compute"]["gemm_gmacs"] > 0


def test_cpu_id_reads_family_model_and_the_kernel_flags(monkeypatch, tmp_path):
    harness = CPU.harness
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu family\t: 6\nmodel\t\t: 106\nstepping\t: 6\n"
                    "flags\t\t: fpu avx2 avx512f avx512_vnni sse\n\nprocessor\t: 1\n"
                    "model\t\t: 999\nflags\t\t: amx_int8\n")
    real = harness.Path
    monkeypatch.setattr(harness, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    # the first processor only, and only the flags that choose kernels, in KERNEL_FLAGS order
    assert harness.cpu_id() == "family 6 model 106 stepping 6: avx2 avx512f avx512_vnni"
    monkeypatch.setattr(harness, "Path", lambda p: tmp_path / "absent")
    assert harness.cpu_id() == "unknown"


def test_compute_phrase_names_the_rates_it_measured():
    phrase = CPU.harness.compute_phrase
    assert phrase({"threads": 1, "gemm_gmacs_1_thread": 71.6, "gemm_gmacs": 71.6}) == \
        "fp32 GEMM 72 GMAC/s on 1 thread"
    assert phrase({"threads": 2, "gemm_gmacs_1_thread": 48.5, "gemm_gmacs": 109.4}) == \
        "fp32 GEMM 48 GMAC/s on 1 thread, 109 on 2"


def test_bench_decode_warns_when_the_compute_moved_during_the_run():
    note = DECODE.compute_note
    start = {"threads": 2, "gemm_gmacs_1_thread": 72.0, "gemm_gmacs": 149.0}
    assert note(start, dict(start, gemm_gmacs=140.0)) == ""  # within BW_SPREAD
    moved = note(start, dict(start, gemm_gmacs=109.0))
    assert "149" in moved and "109" in moved and "instructions" in moved
    assert note(dict(start, gemm_gmacs=109.0), start) != ""  # either direction


def test_a_restart_keeps_how_the_process_was_started(tmp_path):
    """use_malloc re-executes the interpreter: with ``python -m`` it must restart the
    module, not its file as a script (which put src/moekit first on sys.path, where
    moekit's own ``kernels`` package hid the one transformers imports)."""
    import subprocess
    import sys
    from pathlib import Path

    harness_dir = Path(CPU.harness.__file__).parent
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(
        f"import sys\nsys.path.insert(0, {str(harness_dir)!r})\nimport harness\n"
        "print(repr(harness.restart_argv()))\n")
    out = subprocess.run([sys.executable, "-m", "probe_pkg.main", "bench", "--decode"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert eval(out) == [sys.executable, "-m", "probe_pkg.main", "bench", "--decode"]


def test_results_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A run killed as it wrote its JSON left a truncated file (written in place); now a
    kill before the rename leaves the earlier results as they were and no temporary."""
    import json
    import os
    import re

    out = tmp_path / "results.json"
    CPU.harness.write_json(out, {"rows": [1]}, indent=1)
    assert json.loads(out.read_text()) == {"rows": [1]}
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (
        synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        CPU.harness.write_json(out, {"rows": [2]})
    assert json.loads(out.read_text()) == {"rows": [1]}
    assert os.listdir(tmp_path) == ["results.json"]
    # the data, before the rename: one temporary of results.json (this process as its
    # writer, then mkstemp's 8 characters)
    from moekit.train.temps import writer_mark
    assert len(synced) == 1 and re.fullmatch(
        re.escape(str(tmp_path / f".results.json.tmp{writer_mark()}")) + r"[a-z0-9_]{8}\.json",
        synced[0])


RANK_WORKERS = '''
import json
import os
from pathlib import Path


def writes(rank, world, port, args, out_file):
    if rank == 0:
        from moekit.train.rundir import write_whole
        (Path(out_file).parent / "runs").mkdir()  # a rank's own files may go beside it
        write_whole(Path(out_file), json.dumps({"world": world, "args": args, "port": port}))


def killed_mid_write(rank, world, port, args, out_file):
    if rank == 0:
        with open(out_file, "w") as f:
            f.write('{"times": [1.0, ')
            f.flush()
            os._exit(9)


def writes_nothing(rank, world, port, args, out_file):
    pass
'''


@pytest.fixture
def rank_workers(tmp_path, monkeypatch):
    """Worker functions the spawned ranks import, and a private temporary directory in
    which ``run_ranks`` makes its own."""
    import importlib
    import tempfile

    (tmp_path / "rank_workers_h3.py").write_text(RANK_WORKERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return importlib.import_module("rank_workers_h3"), scratch


def test_run_ranks_reads_what_rank_0_wrote_then_removes_its_directory(rank_workers):
    """The ranks wrote to /tmp/moekit_<tag>_<port>.json, which stayed after the run."""
    workers, scratch = rank_workers
    res = CPU.harness.run_ranks(workers.writes, 2, {"rounds": 3}, "probe")
    assert res["world"] == 2 and res["args"] == {"rounds": 3} and res["port"] > 0
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("worker,error", [
    ("killed_mid_write", r"probe: rank 0 exited with status 9 .*no results"),
    ("writes_nothing", r"probe: every rank exited without an error, but none wrote"),
])
def test_run_ranks_refuses_a_run_without_whole_results(rank_workers, worker, error):
    """A rank killed mid-write had left a cut JSON that the parent then read (a
    JSONDecodeError); one that wrote nothing let the parent read a file an earlier run
    with the same port had left, or fail with FileNotFoundError."""
    workers, scratch = rank_workers
    with pytest.raises(RuntimeError, match=error):
        CPU.harness.run_ranks(getattr(workers, worker), 2, None, "probe")
    assert list(scratch.iterdir()) == []
