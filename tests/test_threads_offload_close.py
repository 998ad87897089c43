"""Closing an offloaded model's expert cache while another thread runs it.

A forward is held inside one MoE layer's step (an event in the cache's ``get``, so the
step has begun and its experts are not yet read); ``expert_offload.close()`` is called
from another thread. ``close`` must wait for that step, never closing under it, and no
step may start after it: the forward fails at its next MoE layer with the closed
cache's error (or, held in its last MoE layer, completes with the logits it computes
alone). Before, close went ahead at once and the step failed with whichever error it
met first: "the expert store is closed" (a read), a PrefetchError wrapping it (a
prefetch close had cancelled) or "the expert cache is closed" (its next chunk).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moekit.offload import load_offloaded
from tests import test_threads as threads_base
from tests.test_threads import EXPERT_BYTES

run_dir = threads_base.run_dir  # the same module-scoped checkpoint fixture

IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
CLOSED = "expert cache is closed"


class HeldForward:
    """``model(IDS)`` on a thread, held inside MoE layer ``held``'s step until
    ``release()``; ``events`` records the end of that step and of ``close``."""

    def __init__(self, model, held: int) -> None:
        self.model, self.offload = model, model.expert_offload
        self.inside, self.resume = threading.Event(), threading.Event()
        self.events: list[str] = []
        self.result: list = []  # the logits, or what the forward raised
        cache, offload = self.offload.cache, self.offload
        get, run = cache.get, offload._run

        def held_get(layer, experts, first=True):
            if layer == held and first and not self.inside.is_set():
                self.inside.set()
                self.resume.wait(10)
            return get(layer, experts, first)

        def recorded_run(layer, *args):
            out = run(layer, *args)
            if layer == held:
                self.events.append("step ended")
            return out

        cache.get, offload._run = held_get, recorded_run
        self.thread = threading.Thread(target=self._forward)
        self.thread.start()
        assert self.inside.wait(10), "the forward never reached the held step"

    def _forward(self) -> None:
        try:
            with torch.inference_mode():
                self.result.append(self.model(IDS).logits)
        except BaseException as e:  # noqa: BLE001 - checked by the test
            self.result.append(e)

    def close_on_thread(self, timeout: float | None) -> tuple[threading.Thread, list]:
        got: list = []

        def close() -> None:
            got.append(self.offload.close(timeout=timeout))
            self.events.append("close returned")
        th = threading.Thread(target=close)
        th.start()
        return th, got

    def release(self) -> None:
        self.resume.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _reference(run_dir) -> torch.Tensor:
    model = load_offloaded(run_dir, 8 * EXPERT_BYTES, prefetch=False)
    with torch.inference_mode():
        out = model(IDS).logits
    assert model.expert_offload.close(timeout=5.0)
    return out


@pytest.mark.parametrize("experts,prefetch", [(2, False), (12, True)])
@pytest.mark.parametrize("held", [1, 2], ids=["middle-layer", "last-layer"])
def test_close_waits_for_the_step_another_thread_runs(run_dir, experts, prefetch, held):
    want = _reference(run_dir)
    model = load_offloaded(run_dir, experts * EXPERT_BYTES, prefetch=prefetch)
    offload = model.expert_offload
    fwd = HeldForward(model, held)
    closer, returned = fwd.close_on_thread(timeout=10.0)
    while not offload.cache.closing:  # close has begun: it waits for the step
        time.sleep(0.01)
    closer.join(0.3)
    waited = closer.is_alive()
    files_open = offload.cache.store._fds != {}
    with pytest.raises(RuntimeError, match=CLOSED), torch.inference_mode():
        model(IDS)  # a step of another forward, meanwhile: refused, not queued
    fwd.release()
    closer.join(10)
    assert waited and files_open, "close did not wait for the running step"
    assert returned == [True]
    assert fwd.events == ["step ended", "close returned"]
    (got,) = fwd.result
    if held == 2:  # its last MoE layer: the forward completes, as it computes alone
        assert isinstance(got, torch.Tensor), got
        assert torch.equal(got, want)
    else:  # its next MoE layer's step is refused, with the closed cache's error
        assert isinstance(got, RuntimeError) and CLOSED in str(got), got
    _assert_closed_model(model)


def test_a_step_outlasting_close_timeout_closes_the_cache_as_it_ends(run_dir):
    model = load_offloaded(run_dir, 12 * EXPERT_BYTES, prefetch=True)
    offload = model.expert_offload
    fwd = HeldForward(model, 1)
    with pytest.warns(RuntimeWarning, match="a layer step is still running on another "
                                            "thread; the cache closes as that step ends"):
        assert offload.close(timeout=0.2) is False
    cache = offload.cache
    assert not cache.closed and cache.store._fds != {}  # nothing closed under the step
    assert cache.loader.thread.is_alive()
    with pytest.raises(RuntimeError, match=CLOSED), torch.inference_mode():
        model(IDS)  # no other step starts
    fwd.release()
    assert fwd.events == ["step ended"]
    (got,) = fwd.result
    assert isinstance(got, RuntimeError) and CLOSED in str(got), got
    _assert_closed_model(model)  # closed by the step as it ended
    assert offload.close(timeout=5.0)  # and again: harmless


def _assert_closed_model(model) -> None:
    cache = model.expert_offload.cache
    assert cache.closed and cache.store._fds == {}  # the shard files closed
    assert cache.loader is None or not cache.loader.thread.is_alive()
    entries, loads = dict(cache.entries), cache.stats.total("loads")
    with pytest.raises(RuntimeError, match=CLOSED), torch.inference_mode():
        model(IDS)
    assert cache.entries == entries and cache.stats.total("loads") == loads


@pytest.mark.parametrize("timeout", [None, 0.5])
def test_close_inside_a_step_on_its_own_thread_raises(run_dir, timeout):
    """``close`` called by a callback inside a layer step, on the thread running that
    step, waited for the step it was part of: timeout=None hung for ever; 0.5 stalled,
    then warned of a step "on another thread". It must raise at once, change nothing,
    and leave the model running (with the reference's logits) and closable afterwards.
    The forward runs on a daemon thread joined with a deadline, so a hang fails."""
    want = _reference(run_dir)
    model = load_offloaded(run_dir, 12 * EXPERT_BYTES, prefetch=True)
    offload = model.expert_offload
    cache = offload.cache
    get = cache.get

    def closing_get(layer, experts, first=True):
        cache.get = get  # once: the callback of the first step only
        offload.close(timeout=timeout)
        return get(layer, experts, first)

    cache.get = closing_get
    result: list = []

    def forward() -> None:
        try:
            with torch.inference_mode():
                result.append(model(IDS).logits)
        except BaseException as e:  # noqa: BLE001 - checked below
            result.append(e)

    th = threading.Thread(target=forward, daemon=True)
    th.start()
    th.join(5.0)
    assert not th.is_alive(), "close() inside the step waited for that step (hung)"
    (got,) = result
    assert isinstance(got, RuntimeError), got
    assert "called inside a layer step on the thread that runs that step" in str(got)
    assert not cache.closing and not cache.closed and cache.loader.thread.is_alive()
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, want)
    assert offload.close(timeout=5.0)
    _assert_closed_model(model)
