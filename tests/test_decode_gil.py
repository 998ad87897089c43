"""The decode kernels' entries run without the GIL: while one thread is inside gate_up,
down_combine or topk_experts, another Python thread keeps running (a server's thread
beside a patched transformers model, the expert cache's prefetch).

How it is seen: a worker thread calls the kernel on a problem that takes tens of ms a
call while the main thread spins, noting the longest time between two of its loop
iterations. Holding the GIL, a call would stall the main thread for the whole call."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from moekit.functions import decode
from moekit.functions.cpu_ext import get_decode

pytestmark = pytest.mark.skipif(not decode.available(), reason="no decode kernels")

E, D, F_, K, T = 4, 256, 1024, 2, 384
SPEC = ("swiglu", 0.0, 1.0)


def _longest_stall(call) -> tuple[float, float]:
    """(the main thread's longest gap between loop iterations, the longest call) while a
    worker runs ``call`` three times."""
    calls: list[float] = []
    done = threading.Event()

    def work() -> None:
        try:
            for _ in range(3):
                t0 = time.perf_counter()
                call()
                calls.append(time.perf_counter() - t0)
        finally:
            done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        stall, last = 0.0, time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            stall, last = max(stall, now - last), now
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(calls) == 3
    return stall, max(calls)


def _problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=gen)
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=gen).softmax(-1)
    w_in = torch.randn(E, D, 2 * F_, generator=gen) / D**0.5
    w_out = torch.randn(E, F_, D, generator=gen) / F_**0.5
    return x, experts, weights, w_in, w_out


def _assert_lets_threads_run(call, shortest: float) -> None:
    """A kernel that held the GIL would stall the main thread for its whole call in every
    round; the OS may deschedule the main thread too on a loaded machine (a full test run
    beside other jobs saw a 24 ms stall during 47 ms calls that release it), so up to
    three rounds, one of which must show the main thread running."""
    seen = []
    for _ in range(3):
        stall, took = _longest_stall(call)
        assert took > shortest, f"the call took {took * 1e3:.1f} ms: too short to tell"
        if stall < took / 2:
            return
        seen.append(f"{stall * 1e3:.1f} ms during calls of up to {took * 1e3:.1f} ms")
    raise AssertionError(f"the main thread stalled in every round: {'; '.join(seen)}")


def test_topk_experts_lets_python_threads_run():
    x, experts, weights, w_in, w_out = _problem()
    _assert_lets_threads_run(
        lambda: decode.topk_rows(x, experts, weights, E, w_in, w_out, None, None, SPEC), 0.01)


def test_gate_up_and_down_combine_let_python_threads_run():
    x, experts, weights, w_in, w_out = _problem()
    ext = get_decode()
    s = ext.sort_topk(experts, weights, E)
    h = ext.gate_up(x, s[0], s[3], w_in, None, None, 0, 0, None, 1, 0.0, 1.0)
    # down_combine into 4 D outputs: with D's, 2.7-5.5 ms a call on the AMX VM, against
    # the 5 ms this needs to tell ("too short to tell" once in a full run)
    w_out = torch.randn(E, F_, 4 * D, generator=torch.Generator().manual_seed(1)) / F_**0.5
    out = torch.empty(T, 4 * D)
    for call in (lambda: ext.gate_up(x, s[0], s[3], w_in, None, None, 0, 0, None, 1, 0.0, 1.0),
                 lambda: ext.down_combine(h, s[0], s[1], s[3], w_out, None, None, 0, 0, None,
                                          out)):
        _assert_lets_threads_run(call, 0.005)
