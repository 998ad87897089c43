"""The one benchmark harness: machine description, malloc control, A/B timing, peak memory.

Timing: warm up, then alternate candidate and baseline (A B A B ...) in one
process and report the median of the per-pair ratios; on a shared machine a
single absolute time means little, a ratio measured pair by pair does.

Memory: each variant runs once in a fresh subprocess; growth is the peak
resident set of one forward+backward minus the resident set before it (the
peak is reset first through /proc/self/clear_refs so set-up does not count;
``resource.getrusage(...).ru_maxrss`` where that is not possible).

malloc: glibc's default hands large blocks back to the kernel on free, so
every step page-faults its activations in again (about a quarter of the CPU
time at T=4096 in our first measurements). ``use_malloc("tuned")`` re-executes
the process with MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_
set, before torch is imported; the output always says which was used.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TUNED_MALLOC = {
    "MALLOC_MMAP_MAX_": "0",  # no mmap'd blocks: freed memory stays in the heap
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # never give the heap top back
    "MALLOC_TOP_PAD_": str(1 << 30),  # grow the heap 1 GiB at a time
}


def use_malloc(mode: str) -> str:
    """Make the process run under ``mode`` ("tuned" or "default"); returns its description.

    Re-executes the interpreter when the environment has to change (glibc reads
    these variables once, at start-up).
    """
    if mode not in ("tuned", "default"):
        raise ValueError(f"malloc={mode!r} is not allowed: use 'tuned' or 'default'")
    want = TUNED_MALLOC if mode == "tuned" else {}
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    env.update(want)
    if any(os.environ.get(k) != env.get(k) for k in TUNED_MALLOC):
        os.execve(sys.executable, restart_argv(), env)
    return malloc_description()


def restart_argv() -> list[str]:
    """The command line that started this process, for ``os.execve``. ``sys.argv`` would
    lose ``-m``: ``python -m moekit.cli bench --decode`` restarted as the script
    ``.../moekit/cli.py``, which put ``src/moekit`` first on the path, where moekit's own
    ``kernels`` package hid the ``kernels`` package transformers imports."""
    return [sys.executable, *sys.orig_argv[1:]]


def check_flags(threads: object, reps: object, out: object) -> None:
    """The flags every benchmark here shares: ``--threads`` and ``--reps`` positive ints,
    ``--out`` None (the default under results/) or a JSON file path that can be written.
    ValueError naming the flag, its value and what is allowed; call it before anything
    is built, timed or written (and before ``use_malloc``, which may re-execute)."""
    from moekit.config import check_positive_int

    check_positive_int("--threads", threads)
    check_positive_int("--reps", reps)
    if out is not None:
        check_out_file("--out", out)


def check_out_file(flag: str, out: object) -> None:
    """``out`` names a file this process can create or overwrite: not empty, not a
    directory, no file in its path, its nearest existing folder writable."""
    from moekit.config import check_writable_folder, reject

    if not isinstance(out, (str, os.PathLike)) or str(out) == "":
        reject(flag, out, "it must name a JSON file")
    path = Path(out)
    if path.is_dir():
        reject(flag, str(out), "it is a directory; name a JSON file")
    check_writable_folder(flag, out, list(path.parents))
    if path.exists() and not os.access(path, os.W_OK):
        reject(flag, str(out), "the file is not writable")


def malloc_description() -> str:
    preload = os.environ.get("LD_PRELOAD")
    if preload:
        return f"LD_PRELOAD={preload}"
    tuned = [f"{k}={os.environ[k]}" for k in TUNED_MALLOC if k in os.environ]
    return "glibc " + (" ".join(tuned) if tuned else "defaults")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


# the /proc/cpuinfo flags that choose moekit's CPU kernels (the "cpu" name alone, on a VM
# often "Intel(R) Xeon(R) Processor", does not tell an Ice Lake from a Sapphire Rapids)
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_id() -> str:
    """"family F model M stepping S: <flags of KERNEL_FLAGS present>" from /proc/cpuinfo's
    first processor, or "unknown" (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return "unknown"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return (f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')} "
            f"stepping {fields.get('stepping', '?')}: "
            + " ".join(f for f in KERNEL_FLAGS if f in flags))


def machine() -> dict:
    """The benchmark's machine: versions, threads, CPU, malloc, load and its compute now
    (``compute_probe``, at the threads the benchmark set)."""
    import torch

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_id": cpu_id(),
        "cpus_online": os.cpu_count(),
        "malloc": malloc_description(),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "compute": compute_probe(),
    }


PROBE_N = 1024  # the compute probe's square fp32 GEMM: 2^30 multiply-adds


def compute_probe(reps: int = 5, n: int = PROBE_N) -> dict:
    """torch's [n, n] @ [n, n] fp32 GEMM in GMAC/s (median of ``reps``) on 1 thread and on
    the benchmark's threads, with torch's thread count restored: the machine's compute at
    that moment, as the read bandwidth is its memory.

    On a VM both move. The same Ice Lake Xeon VM type gave 55-60 / 104 GMAC/s (1 / 2
    threads, 2048^3; its two vCPUs then shared one core) one session, and 72 / 149 then
    48 / 109 (1024^3) within the next (2026-12-07), while the read bandwidth stayed at
    21-24 GB/s. Rows bound by instructions (int8 / int4 at batch 16, the int4 step at batch
    1, prefill) move with the first, rows bound by the bandwidth with the second."""
    import torch

    threads = torch.get_num_threads()
    a, b = torch.randn(n, n), torch.randn(n, n)

    def rate(t: int) -> float:
        torch.set_num_threads(t)
        a @ b  # warm up at this thread count
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return n**3 / statistics.median(times) / 1e9

    try:
        one, every = rate(1), rate(threads)
    finally:
        torch.set_num_threads(threads)
    return {"gemm_n": n, "threads": threads, "gemm_gmacs_1_thread": round(one, 1),
            "gemm_gmacs": round(every, 1)}


def compute_phrase(probe: dict) -> str:
    """The probe as one header phrase."""
    text = f"fp32 GEMM {probe['gemm_gmacs_1_thread']:.0f} GMAC/s on 1 thread"
    if probe["threads"] > 1:
        text += f", {probe['gemm_gmacs']:.0f} on {probe['threads']}"
    return text


@dataclass
class Step:
    """One training step of a layer: ``forward()`` returns the output, ``backward(y)`` ends it."""

    forward: Callable[[], object]
    backward: Callable[[object], None]


def time_step(step: Step) -> tuple[float, float]:
    """(forward seconds, backward seconds) of one step."""
    t0 = time.perf_counter()
    y = step.forward()
    t1 = time.perf_counter()
    step.backward(y)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def compare(a: Step, b: Step, reps: int, warmup: int = 1) -> dict:
    """Alternate a and b; medians of each one's times and of the per-pair ratios a / b."""
    for _ in range(warmup):
        time_step(a)
        time_step(b)
    ta, tb = [], []
    for i in range(reps):
        # swap the order every pair so neither side always runs on a warmer cache
        if i % 2:
            tb.append(time_step(b))
            ta.append(time_step(a))
        else:
            ta.append(time_step(a))
            tb.append(time_step(b))
    out = {"reps": reps}
    for j, part in enumerate(("fwd", "bwd")):
        out[f"a_{part}_ms"] = 1e3 * _median([t[j] for t in ta])
        out[f"b_{part}_ms"] = 1e3 * _median([t[j] for t in tb])
        out[f"ratio_{part}"] = _median([x[j] / y[j] for x, y in zip(ta, tb, strict=True)])
    out["a_total_ms"] = 1e3 * _median([sum(t) for t in ta])
    out["b_total_ms"] = 1e3 * _median([sum(t) for t in tb])
    out["ratio_total"] = _median([sum(x) / sum(y) for x, y in zip(ta, tb, strict=True)])
    return out


def time_alone(a: Step, reps: int, warmup: int = 1) -> dict:
    """Medians of one variant's times (for a variant too slow to pair with a baseline often)."""
    for _ in range(warmup):
        time_step(a)
    ts = [time_step(a) for _ in range(reps)]
    return {"reps": reps, "a_fwd_ms": 1e3 * _median([t[0] for t in ts]),
            "a_bwd_ms": 1e3 * _median([t[1] for t in ts]),
            "a_total_ms": 1e3 * _median([sum(t) for t in ts])}


# -- peak memory in a fresh process -----------------------------------------------

def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mib(reset: bool) -> float:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_growth_mib(script: str, builder: str, kwargs: dict, timeout: float = 900) -> float:
    """Peak RSS growth (MiB) of one step of ``builder(**kwargs)`` from ``script``, fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--peak", script, builder, json.dumps(kwargs)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _peak_main(script: str, builder: str, kwargs_json: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_target", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    step = getattr(mod, builder)(**json.loads(kwargs_json))
    import torch

    # start the BLAS and OpenMP pools first: their one-time buffers are no layer's activations
    (torch.ones(64, 64, requires_grad=True) @ torch.ones(64, 64)).sum().backward()
    import gc

    gc.collect()
    before = _rss_mib()
    reset = _reset_peak()
    time_step(step)
    print(f"{max(0.0, _peak_mib(reset) - before):.1f}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peak":
        _peak_main(*sys.argv[2:5])
    else:
        sys.exit("usage: harness.py --peak SCRIPT BUILDER KWARGS_JSON (used by the benchmarks)")


def run_ranks(worker: Callable[..., None], world: int, args, tag: str) -> dict:
    """Run ``worker(rank, world, port, args, out_file)`` in ``world`` spawned processes
    (a free local port for their process group) and return the JSON a rank wrote to
    ``out_file`` with ``write_json`` (whole or not at all).

    ``out_file`` lies in a new directory of this run's own (``mkdtemp``), removed
    afterwards, where the ranks may keep other files too (``Path(out_file).parent``):
    the fixed ``/tmp/moekit_<tag>_<port>.json`` had let a run read what an earlier run
    with the same port left there, or a file a rank killed mid-write had cut short. A
    rank that exits with an error raises RuntimeError naming it, before anything is
    read."""
    import multiprocessing as mp
    import shutil
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix=f"moekit_{tag}_"))
    try:
        out_file = str(work / "result.json")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, world, port, args, out_file))
                 for r in range(world)]
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join()
        failed = [f"rank {r} exited with status {pr.exitcode}"
                  for r, pr in enumerate(procs) if pr.exitcode != 0]
        if failed:
            raise RuntimeError(f"{tag}: {'; '.join(failed)} (its error is printed above); "
                               "no results")
        if not Path(out_file).is_file():
            raise RuntimeError(f"{tag}: every rank exited without an error, but none wrote "
                               "the results")
        return json.loads(Path(out_file).read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_bandwidths(reps: int = 5, clock: Callable[[], float] = time.perf_counter
                    ) -> dict[str, float | None]:
    """Bytes/s of a 1 GiB fp32 ``sum`` from 4 KiB pages ("4k") and from huge pages ("huge"),
    ``moekit.bandwidth.read_bandwidths``."""
    from moekit.bandwidth import read_bandwidths as measure

    return measure(reps, clock)


def read_bandwidth(reps: int = 5) -> float:
    """The memory read bandwidth the decode benchmarks divide their bytes by: the faster of
    ``read_bandwidths`` (moekit's engines read their weights from huge pages)."""
    from moekit.bandwidth import read_bandwidth as measure

    return measure(reps)


def write_json(path: str | os.PathLike, obj: object, **dump_kwargs) -> Path:
    """``obj`` as JSON in ``path``, whole or not at all: a run killed while writing its
    results in place left a truncated JSON. moekit's ``write_whole``: a file beside it,
    fsynced, renamed into place, the folder fsynced. Imported here, not at the top, so
    importing the harness still loads no torch (``use_malloc`` may re-execute first)."""
    from moekit.train.rundir import write_whole

    path = Path(path)
    write_whole(path, json.dumps(obj, **dump_kwargs))
    return path


def run_and_write(name: str, args, run: Callable[..., list[dict]]) -> Path:
    """``run(args)``'s rows, between two read-bandwidth measurements, written as JSON
    (machine, command, seconds, the bandwidths, the arguments, the rows) to ``args.out``
    or results/<name>_<UTC time>.json; prints the bandwidths and the path."""
    t0 = time.perf_counter()
    bandwidth = [read_bandwidth()]
    rows = run(args)
    bandwidth.append(read_bandwidth())
    print(f"read bandwidth {bandwidth[0] / 1e9:.1f} / {bandwidth[-1] / 1e9:.1f} GB/s "
          "(start / end)")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"{name}_{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"machine": machine(), "command": " ".join(sys.argv),
                     "seconds": round(time.perf_counter() - t0, 1),
                     "read_bandwidth_Bps": bandwidth, "args": vars(args), "rows": rows},
               indent=1)
    print(f"wrote {out}")
    return out


def pairs_main(argv, doc: str, name: str, reps: int, run: Callable[..., list[dict]],
               add: Callable | None = None, check: Callable | None = None) -> int:
    """``main`` of a paired generation benchmark (``name``.py): --reps, --new-tokens,
    --out and what ``add(parser)`` adds, checked (with ``check(args)``, which raises
    ValueError) before anything runs, then ``run_and_write``."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--reps", type=int, default=reps, help="alternating pairs per case")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--out", help=f"JSON file (default: results/{name}_<time>.json)")
    if add is not None:
        add(p)
    args = p.parse_args(argv)
    try:
        if args.reps < 1 or args.new_tokens < 2:
            raise ValueError(f"--reps={args.reps} / --new-tokens={args.new_tokens} are not "
                             "allowed: at least 1 pair and 2 new tokens")
        if check is not None:
            check(args)
    except ValueError as e:
        print(f"{name}.py: error: {e}", file=sys.stderr)
        return 2
    run_and_write(name, args, run)
    return 0
