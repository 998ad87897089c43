"""Three gaps: ``benchmarks/bench_decode.py --quick`` replaced flags given with it (as
``moekit bench`` already refuses to), a list flag of either benchmark took a repeated
entry (the same measurement timed twice), and ``ExpertCache.close(timeout)`` closed the
shard files under a prefetch read still running. Each test failed before its fix.

No benchmark runs here: only their flags are parsed and checked.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import pytest
import torch

from moekit import bench
from moekit.cli import build_parser, main
from moekit.offload import ExpertCache
from moekit.offload import store as store_module
from moekit.offload.runtime import ExpertOffload
from moekit.offload.safetensors_io import TensorLoc
from moekit.offload.store import ExpertStore, Part

CPU = bench._load()
DECODE = bench._load(bench.DECODE_SCRIPT)
needs_benchmarks = pytest.mark.skipif(CPU is None or DECODE is None,
                                      reason="benchmarks/ is not in this checkout")


def _decode_checked(*argv: str) -> argparse.Namespace:
    """bench_decode.py's flags as its ``main`` resolves them (parse, then check_args)."""
    p = argparse.ArgumentParser()
    DECODE.add_arguments(p)
    return DECODE.check_args(p.parse_args(list(argv)))


@pytest.fixture
def no_run(monkeypatch) -> None:
    """A flag that passes its checks fails the test instead of starting a benchmark (they
    take minutes), and harness.use_malloc would not re-execute pytest."""
    for module in (CPU, DECODE):
        monkeypatch.setattr(module, "run", lambda args: pytest.fail(f"ran with {args}"))
    monkeypatch.setattr(bench, "_load", lambda script=bench.SCRIPT: {
        bench.SCRIPT: CPU, bench.DECODE_SCRIPT: DECODE}[script])
    for name, value in CPU.harness.TUNED_MALLOC.items():
        monkeypatch.setenv(name, value)


# -- 1. bench_decode.py --quick keeps the flags given with it ----------------------------

@needs_benchmarks
@pytest.mark.parametrize("flags, name, want", [
    (["--batches", "8"], "batches", [8, 1]),  # 1: --quick's --hf-batches, timed as well
    (["--hf-batches", "4"], "hf_batches", [4]),
    (["--reps", "5"], "reps", 5),  # was min(5, 2) = 2
    (["--new-tokens", "64"], "new_tokens", 64),  # was min(64, 16) = 16
    (["--models", "mixtral"], "models", ["mixtral"]),
    (["--variants", "int8,hf-olmoe"], "variants", ["int8", "hf-olmoe"]),
    (["--threads", "1"], "threads", 1),
])
def test_decode_quick_keeps_an_explicit_flag(flags, name, want):
    """Was: --quick replaced --batches, --hf-batches, --reps, --new-tokens, --models and
    --variants with its own choices; the flags it was not given keep its choices."""
    quick = _decode_checked("--quick")
    checked = _decode_checked("--quick", *flags)
    assert getattr(checked, name) == want
    for other in ("models", "hf_batches", "variants", "reps", "new_tokens", "threads"):
        if other != name and f"--{other.replace('_', '-')}" not in flags:
            assert getattr(checked, other) == getattr(quick, other), other


@needs_benchmarks
def test_decode_quick_and_full_defaults_unchanged():
    quick, full = _decode_checked("--quick"), _decode_checked()
    assert (quick.models, quick.batches, quick.hf_batches, quick.reps, quick.new_tokens) == (
        ["fine"], [1, 4], [1], 2, 16)
    assert quick.variants == ["bf16", "int8", "int4", "dense-active", "dense-total",
                              "hf-mixtral"]
    assert (full.models, full.batches, full.hf_batches, full.reps, full.new_tokens) == (
        ["fine", "mixtral"], [1, 4, 16, 8], [1, 8], 4, 32)
    # --quick skips transformers' peak-RSS runs; asked for by name, they run
    assert "hf-mixtral" not in quick.memory_variants
    assert _decode_checked("--quick", "--variants", "hf-olmoe").memory_variants == ["hf-olmoe"]
    assert full.memory_variants == full.variants


@needs_benchmarks
def test_moekit_bench_decode_quick_still_resolves():
    args = build_parser().parse_args(["bench", "--decode", "--quick", "--threads", "1"])
    checked = bench.check_args(args, DECODE)
    assert (checked.models, checked.batches, checked.reps, checked.threads) == (
        ["fine"], [1, 4], 2, 1)


@needs_benchmarks
def test_decode_quick_still_checks_an_explicit_flag(capsys, no_run):
    # was replaced by min(5000, 16) and ran
    assert DECODE.main(["--quick", "--new-tokens", "5000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_decode.py: error: --new-tokens=5000 is not allowed"), err


@needs_benchmarks
@pytest.mark.parametrize("flags, words", [
    (["--prompt-len", "0"], "--prompt-len=0 is not allowed: it must be a positive int <= 1023"),
    (["--prompt-len", "1000", "--new-tokens", "32"],
     "--new-tokens=32 is not allowed: it must be a positive int <= 24"),
])
def test_decode_prompt_len_leaves_room_for_the_new_tokens(capsys, no_run, flags, words):
    """The prompt and the timed tokens must fit the benchmark models' 1024 positions."""
    assert DECODE.main(flags) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"bench_decode.py: error: {words}", err
    assert _decode_checked("--prompt-len", "1000", "--new-tokens", "24").prompt_len == 1000


# -- 2. a list flag refuses a repeated entry -----------------------------------------------

@needs_benchmarks
@pytest.mark.parametrize("flags, words", [
    (["--configs", "8,4,2,8;8,4,2,16;8,4,2,8"],
     ["--configs='8,4,2,8;8,4,2,16;8,4,2,8'", "'8,4,2,8' is given twice"]),
    (["--configs", "8,4,2,8; 8,4,2,8"], ["'8,4,2,8' is given twice"]),  # same numbers
    (["--dtypes", "fp32,bf16,fp32"], ["--dtypes='fp32,bf16,fp32'", "'fp32' is given twice"]),
    (["--impls", "moekit,moekit-loop,moekit"], ["--impls=", "'moekit' is given twice"]),
])
def test_moekit_bench_refuses_a_repeated_entry(capsys, tmp_path, no_run, flags, words):
    """Was: each repeat timed the same measurement again (``--dtypes fp32,fp32`` ran every
    config twice in fp32), with no word of it."""
    out = tmp_path / "r.json"
    rc = main(["bench", "--dim", "8", "--reps", "1", "--no-memory", "--no-breakdown",
               "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("moekit bench: error: "), err
    for w in [*words, "is not allowed", "each entry must appear once"]:
        assert w in err, err
    assert not out.exists()


@needs_benchmarks
@pytest.mark.parametrize("flags, words", [
    (["--batches", "1,1,4"], ["--batches='1,1,4'", "'1' is given twice"]),
    (["--hf-batches", "8,1,8"], ["--hf-batches='8,1,8'", "'8' is given twice"]),
    (["--models", "fine,fine"], ["--models='fine,fine'", "'fine' is given twice"]),
    (["--variants", "int8,bf16,int8"], ["--variants='int8,bf16,int8'", "'int8' is given"]),
    (["--prefill-variants", "bf16,bf16"], ["--prefill-variants='bf16,bf16'", "'bf16'"]),
    (["--quick", "--batches", "4,4"], ["--batches='4,4'"]),
])
def test_decode_refuses_a_repeated_entry(capsys, no_run, flags, words):
    assert DECODE.main(flags) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("bench_decode.py: error: "), err
    for w in [*words, "is not allowed", "each entry must appear once"]:
        assert w in err, err


@needs_benchmarks
def test_distinct_entries_still_pass():
    assert _decode_checked("--batches", "4,1", "--hf-batches", "1").batches == [4, 1]
    args = build_parser().parse_args(["bench", "--configs", "8,4,2,8;8,4,2,16", "--dtypes",
                                      "bf16,fp32", "--impls", "moekit,moekit-loop"])
    checked = bench.check_args(args, CPU)
    assert checked.configs == [(8, 4, 2, 8), (8, 4, 2, 16)]
    assert checked.dtypes == ["bfloat16", "float32"]


# -- 3. close() while the prefetch thread is reading ---------------------------------------

ROWS, COLS = 4, 8  # one float32 [4, 8] tensor "w" per expert


@pytest.fixture
def shard(tmp_path) -> tuple[Path, list[torch.Tensor]]:
    """A raw shard of two experts' "w" (distinct values), one after the other."""
    experts = [torch.arange(ROWS * COLS, dtype=torch.float32).view(ROWS, COLS) + 100 * e
               for e in range(2)]
    path = tmp_path / "shard.bin"
    path.write_bytes(b"".join(t.numpy().tobytes() for t in experts))
    return path, experts


def _store(path: Path) -> ExpertStore:
    n = ROWS * COLS * 4
    return ExpertStore({(0, e): {"w": Part((ROWS, COLS), torch.float32, (TensorLoc(
        path, f"w[{e}]", e * n, n, torch.float32, (ROWS, COLS)),))} for e in range(2)})


def _held_prefetch_read(monkeypatch):
    """Make the prefetch thread's reads wait for ``release`` once ``started`` is set
    (the read of a slow disk, made deterministic)."""
    started, release = threading.Event(), threading.Event()
    real = store_module.pread_into

    def slow(buf, locs, fds):
        if threading.current_thread().name == "moekit-prefetch":
            started.set()
            release.wait(10)
        return real(buf, locs, fds)

    monkeypatch.setattr(store_module, "pread_into", slow)
    return started, release


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except OSError:
        return False


def test_close_waits_for_nothing_but_keeps_the_files_of_a_read_in_progress(shard,
                                                                           monkeypatch):
    """Was: close(timeout) gave up on the thread, then closed the shard files under its
    read: the read failed with EBADF, or (a file opened in between got the same fd
    number) filled the expert's slot with that file's bytes, silently."""
    path, experts = shard
    store = _store(path)
    fds = list(store._fds.values())
    started, release = _held_prefetch_read(monkeypatch)
    cache = ExpertCache(store, 2 * ROWS * COLS * 4, "lru", prefetch=True)
    offload = ExpertOffload(cache, [None], prefetch=True, prefetch_limit=2)
    decoy = None
    try:
        cache.prefetch(0, [1])
        fut = cache.entries[(0, 1)].value
        assert started.wait(10)
        with pytest.warns(RuntimeWarning, match=r"timeout=0.05.*still reading.*closed "
                                                r"when that read ends"):
            assert offload.close(timeout=0.05) is False  # the thread is still reading
        assert all(_same_file(fd, path) for fd in fds)  # the read's files stay open
        decoy_path = path.with_name("decoy.bin")
        decoy_path.write_bytes(b"\xff" * (4 * ROWS * COLS * 4))
        decoy = os.open(decoy_path, os.O_RDONLY)  # a freed fd number would be reused
        with pytest.raises(RuntimeError, match="expert cache is closed"):
            cache.get(0, [1])  # the model is refused after close, as before
        release.set()
        torch.testing.assert_close(fut.result(timeout=10)["w"], experts[1], rtol=0, atol=0)
        cache.loader.thread.join(10)
        assert not cache.loader.thread.is_alive()
        assert store._fds == {}  # the last read closed them
        assert not any(_same_file(fd, path) for fd in fds)
        with pytest.raises(RuntimeError, match="expert store is closed"):
            store.load((0, 0))  # no shard file reopened
        assert offload.close(timeout=1.0) is True  # twice: harmless
    finally:
        release.set()
        cache.loader.thread.join(10)
        if decoy is not None:
            os.close(decoy)
    assert not cache.loader.thread.is_alive()


def test_store_close_without_reads_closes_at_once(shard):
    path, experts = shard
    store = _store(path)
    fds = list(store._fds.values())
    torch.testing.assert_close(store.load((0, 0))["w"], experts[0], rtol=0, atol=0)
    assert store.close() is True
    assert store._fds == {} and not any(_same_file(fd, path) for fd in fds)
    assert store.close() is True  # twice: harmless


@pytest.mark.parametrize("timeout", [-1, "5", float("nan"), True])
def test_close_timeout_checked_before_closing(shard, timeout):
    """Was: a negative timeout was join(-1) (no wait), "5" a TypeError after the cache
    was already marked closed."""
    path, _ = shard
    cache = ExpertCache(_store(path), 2 * ROWS * COLS * 4, "lru", prefetch=True)
    try:
        with pytest.raises(ValueError, match=f"timeout={timeout!r} is not allowed"):
            cache.close(timeout=timeout)
        assert not cache.closed and cache.loader.thread.is_alive()
        assert cache.store._fds != {}
    finally:
        assert cache.close(timeout=5.0)
    assert not cache.loader.thread.is_alive()


@needs_benchmarks
def test_bench_cpu_run_directly_refuses_a_repeated_entry():
    """benchmarks/bench_cpu.py's own check_args refuses repeats (not only `moekit bench`)."""
    parser = argparse.ArgumentParser()
    CPU.add_arguments(parser)
    args = parser.parse_args(["--dtypes", "fp32,fp32"])
    with pytest.raises(ValueError, match=r"--dtypes='fp32,fp32' is not allowed: 'fp32' is "
                                         "given twice"):
        CPU.check_args(args)
    assert CPU.check_args(parser.parse_args(["--dtypes", "fp32,bf16"])).dtypes == [
        "float32", "bfloat16"]


def test_store_closes_the_shards_it_opened_when_a_later_one_fails(shard, tmp_path):
    """A missing second shard raised from the constructor with the first one left open."""
    path, _ = shard
    missing = tmp_path / "zz_gone.bin"  # opened after shard.bin (the files are sorted)
    n = ROWS * COLS * 4
    experts = {(0, 0): {"w": Part((ROWS, COLS), torch.float32, (TensorLoc(
                   path, "w[0]", 0, n, torch.float32, (ROWS, COLS)),))},
               (0, 1): {"w": Part((ROWS, COLS), torch.float32, (TensorLoc(
                   missing, "w[1]", 0, n, torch.float32, (ROWS, COLS)),))}}
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        ExpertStore(experts)
    assert set(os.listdir("/proc/self/fd")) <= before


def test_bench_cpu_fresh_inputs_turn_through_the_inputs():
    """--fresh-inputs: every step of a variant takes the next of its inputs (new routing);
    by default every step reuses one."""
    import torch

    shape = dict(T=6, E=2, K=1, F=4, D=8, dtype="float32", threads=1)
    before = torch.get_num_threads()
    try:
        fresh = CPU.build_step("moekit", **shape, inputs=2)
        y = [fresh.forward().detach().clone() for _ in range(3)]
        assert not torch.equal(y[0], y[1]) and torch.equal(y[0], y[2])
        reused = CPU.build_step("moekit", **shape)
        assert torch.equal(reused.forward(), reused.forward())
    finally:
        torch.set_num_threads(before)


@needs_benchmarks
def test_decode_flags_a_run_whose_bandwidth_moved():
    """The VM this was measured on read 33-65 GB/s within minutes: a run whose readings
    spread past BW_SPREAD says so (with both ends), a steady one says nothing."""
    steady = [33.0e9, 34.5e9, 35.1e9]
    assert DECODE.bandwidth_note(steady) == ""
    assert DECODE.bandwidth_note([48.4e9]) == ""  # one reading: nothing to compare
    note = DECODE.bandwidth_note([48.4e9, 35.6e9])
    assert "35.6 and 48.4 GB/s" in note and "anchor_ms" in note
    edge = 33.0e9 * DECODE.BW_SPREAD
    assert DECODE.bandwidth_note([33.0e9, edge]) == ""
    assert DECODE.bandwidth_note([33.0e9, edge * 1.01]) != ""


@needs_benchmarks
def test_decode_breakdown_variant_checked():
    assert _decode_checked("--breakdown", "--breakdown-variant", "int4").breakdown_variant == "int4"
    assert _decode_checked("--breakdown").breakdown_variant == "fp32"
    with pytest.raises(ValueError, match=r"--breakdown-variant='int3' is not allowed: it must "
                                         r"be one of fp32, bf16, int8, int4, int8a8, int4a8"):
        _decode_checked("--breakdown", "--breakdown-variant", "int3")


@needs_benchmarks
def test_decode_step_calls_times_every_call_of_the_engine(monkeypatch, capsys):
    """--step-calls times the parts of a greedy DecodePlan step (a W8A8 model): its one
    C++ call and the parts inside it, and the rest."""
    from moekit.functions import cpu_ext

    if cpu_ext.get_decode() is None:
        pytest.skip("decode kernels not built")
    monkeypatch.setitem(DECODE.SHAPES, "tiny", dict(dim=64, num_layers=2, num_heads=2,
                                                    ffn_dim=32, num_experts=4, top_k=2))
    DECODE.step_calls("tiny", 2, "int8a8", steps=3)
    out = capsys.readouterr().out
    assert "step calls: tiny int8a8 batch 2, 3 steps" in out
    for label in ("the step's one C++ call", "outside"):
        assert f"\n  {label} " in out
    for part in ("rotary rows", "embedding", "norms", "attention projections", "attend_one",
                 "router + route_sort", "experts gate_up", "experts down_combine", "LM head",
                 "argmax / sampling"):
        assert f"\n    {part} " in out  # the parts inside the call, from its own timers
    assert "bf16 conversions" not in out  # an fp32 model converts nothing


@pytest.mark.parametrize("decode", [False, True])
def test_benchmarks_not_found_is_a_runtime_failure(monkeypatch, capsys, tmp_path, decode):
    """An installed package without benchmarks/ is a missing file (exit status 1 by
    moekit.errors.exit_code and the README's "Exit status"), not a usage error: it
    exited 2, which scripts read as a bad flag."""
    monkeypatch.setattr(bench, "SCRIPT", tmp_path / "no_bench_cpu.py")
    monkeypatch.setattr(bench, "DECODE_SCRIPT", tmp_path / "no_bench_decode.py")
    assert bench.run(argparse.Namespace(decode=decode)) == 1
    err = capsys.readouterr().err
    assert "no_bench_decode.py" in err if decode else "no_bench_cpu.py" in err, err
    assert "not found" in err and "Traceback" not in err, err
