"""The expert cache: experts held within a byte budget, read on demand or ahead of time.

One pool for all layers, not a per-layer split: a layer whose router spreads
tokens over many experts gets more room than a layer that keeps reusing a few,
and the user sets one number. Layers are visited in a fixed cycle, so a global
LRU behaves like a per-layer LRU with an equal share when layers are alike, and
shifts room to the layers that need it when they are not.

All bookkeeping (admission, eviction, statistics) happens on the caller's
thread, in program order, so evictions are the same run to run (and hits, but for
a request that finds its prefetch still reading: that one is counted apart, as
``in_flight``); the prefetch thread only reads bytes into buffers the caller
already reserved.

The bytes live in one buffer of ``budget`` bytes cut into slots of the largest
expert (``SlotArena``): a read goes into the slot its expert was admitted to,
so the cache is the only copy and its memory never exceeds the budget. (With a
fresh tensor per read, the freed 3 MiB blocks stayed in glibc's heaps, the
prefetch thread's among them: peak RSS rose well past budget + non-expert
weights at the OLMoE-shaped benchmark.) A slot is reused only once its read has
finished, and never while the step that fetched it may still compute on it.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.config import check_bool, check_non_negative, check_positive_int, reject
from moekit.errors import CheckpointError
from moekit.offload.policy import LFU, Key, make_policy
from moekit.offload.stats import LayerStats, OffloadStats
from moekit.offload.store import ExpertMemoryError, ExpertStore, mib, size_at_least


class PrefetchError(RuntimeError):
    """A read on the prefetch thread failed; raised in the thread that runs the model."""


class Loader:
    """One background thread that runs ``fn(key)`` for submitted keys, in order."""

    def __init__(self, fn) -> None:
        self._fn = fn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self.thread = threading.Thread(target=self._run, name="moekit-prefetch", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[tuple[Any, Future]]) -> None:
        """Queue ``fn(item)`` into each ``(item, future)``, as one batch: one wake-up of the
        thread per step, not per expert (each wake-up cost the compute thread ~1 ms of
        GIL hand-off on the loaded 2-core box)."""
        if self._closing.is_set():
            raise RuntimeError("the prefetch thread is closed")
        if jobs:
            self._queue.put(list(jobs))

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            for item, fut in batch:
                self._one(item, fut)

    def _one(self, item: Any, fut: Future) -> None:
        if self._closing.is_set():  # closing: drop what has not started
            fut.cancel()
            return
        if not fut.set_running_or_notify_cancel():  # cancelled: the caller read it itself
            return
        try:
            fut.set_result(self._fn(item))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            fut.set_exception(e)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop after the read in progress; True when the thread has ended."""
        self._closing.set()
        self._queue.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()


@dataclass
class Entry:
    value: Any  # the loaded tensors, or a Future while the prefetch thread reads them
    nbytes: int
    slot: int | None = None  # its SlotArena slot (None: the store allocated it)


class SlotArena:
    """``count`` slots of ``slot_bytes`` in one uint8 buffer (pages touched on first use)."""

    def __init__(self, slot_bytes: int, count: int) -> None:
        self.slot_bytes = slot_bytes
        self.buf_B = torch.empty(slot_bytes * count, dtype=torch.uint8)
        self.free = list(range(count - 1, -1, -1))

    @property
    def count(self) -> int:
        return self.buf_B.numel() // self.slot_bytes

    def take(self) -> int:
        return self.free.pop()

    def give(self, slot: int) -> None:
        self.free.append(slot)

    def view(self, slot: int) -> Tensor:
        return self.buf_B[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]


class ExpertCache:
    """Experts keyed ``(layer, expert)`` within ``budget`` bytes.

    ``get(layer, experts)`` returns their tensors (reading the missing ones on
    this thread, waiting for ones the prefetch thread is reading); ``prefetch``
    reserves room and queues reads. ``policy`` is "lru" or "lfu". One caller thread at
    a time (besides its own prefetch thread): ``run_step`` (``ExpertOffload.run``) holds
    ``step_lock`` around each layer step's ``get`` calls and the compute on what they
    return, and ``close`` takes it too, so it never closes under a step.
    """

    def __init__(self, store: ExpertStore, budget: int, policy: str = "lru",
                 prefetch: bool = True, num_layers: int | None = None,
                 threaded: bool = True) -> None:
        layers = 1 + max((k[0] for k in store.experts), default=-1)
        _check_cache_args(store, budget, prefetch, num_layers, threaded, layers)
        self.store, self.budget = store, budget
        self.policy = make_policy(policy)
        self.closed = False
        # held for a whole layer step (run_step) and by close(); closing: close() was
        # called, so no step starts; _step_closes: close() gave up waiting for the step
        # that runs, which closes the cache as it ends
        self.step_lock = threading.Lock()
        self.closing = self._step_closes = False
        # the thread whose step holds step_lock: close() on that thread would wait for
        # the step it runs inside (the lock is not reentrant), so it refuses instead
        self._step_thread: int | None = None
        self.entries: dict[Key, Entry] = {}
        self.used = 0
        self.stats = OffloadStats(budget, policy, prefetch,
                                  [LayerStats() for _ in range(num_layers or layers)])
        self._predicted: dict[int, set[int]] = {}
        self._step_predicted: dict[int, set[int] | None] = {}  # the step's, per layer
        self._pending: list[Future] = []
        self._pinned: set[Key] = set()  # the last get's keys: a step may still compute on them
        slot_bytes = getattr(store, "slot_bytes", None)  # stores that read into a buffer
        # no more slots than there are experts: a budget above the model's experts (64GiB
        # for a 12 MiB model) allocated the whole budget, and failed to where it exceeded
        # what the machine could map
        self.arena = (SlotArena(slot_bytes, min(budget // slot_bytes, len(store.experts)))
                      if slot_bytes else None)
        self.loader = Loader(self._load) if (prefetch and threaded) else None
        everything = sum(store.nbytes(k) for k in store.experts)
        if budget >= everything:
            self.stats.all_experts = everything

    def _load(self, item: tuple[Key, int | None]) -> Any:
        key, slot = item
        if slot is None:
            return self.store.load(key)
        return self.store.load(key, self.arena.view(slot))

    @property
    def capacity(self) -> int:
        """Experts (of the largest size) the budget holds at once."""
        if self.arena is not None:
            return self.arena.count
        return self.budget // max(self.store.nbytes(k) for k in self.store.experts)

    # -- admission and eviction -------------------------------------------------------

    def _admit(self, key: Key, protected: set[Key]) -> bool:
        """Make room for ``key``; False when even evicting all unprotected keys is not enough."""
        need = self.store.nbytes(key)
        while self.used + need > self.budget or (self.arena is not None
                                                 and not self.arena.free):
            out = self.policy.victim(protected | self._pinned)
            if out is None:
                return False
            self._evict(out)
        return True

    def _evict(self, key: Key) -> None:
        entry = self.entries.pop(key)
        self.used -= entry.nbytes
        self.policy.remove(key)
        if isinstance(entry.value, Future):
            if entry.value.cancel():  # queued, never read
                s = self.stats.layers[key[0]]
                s.loads -= 1
                s.prefetched -= 1
                s.bytes_loaded -= self.store.raw_nbytes(key)
            else:  # being read into the slot: let it finish before the slot is reused
                wait_futures([entry.value])
        if entry.slot is not None:
            self.arena.give(entry.slot)

    def _slot(self) -> int | None:
        return None if self.arena is None else self.arena.take()

    def _insert(self, key: Key, value: Any, slot: int | None = None) -> None:
        nbytes = self.store.nbytes(key)
        self.entries[key] = Entry(value, nbytes, slot)
        self.used += nbytes
        self.policy.insert(key)
        layer_stats = self.stats.layers[key[0]]
        layer_stats.loads += 1
        layer_stats.bytes_loaded += self.store.raw_nbytes(key)

    # -- demand --------------------------------------------------------------------

    def get(self, layer: int, experts: list[int], first: bool = True) -> list[Any]:
        """The tensors of ``experts`` of ``layer`` (sorted ids), in that order; ``first``:
        the first (or only) chunk of a layer step, False for the step's further chunks."""
        if self.closed:
            self._raise_closed()
        self.raise_failures()
        keys = [(layer, e) for e in experts]
        self._record(layer, experts, first)
        protected = set(keys)
        self._pinned = set()  # the previous step (or chunk) is done with its experts
        out = []
        for key in keys:
            if isinstance(self.policy, LFU):
                self.policy.count(key)
            entry = self.entries.get(key)
            if entry is not None:
                # a prefetch still reading is waited for, not a hit (the one count that
                # depends on the prefetch thread's timing)
                reading = isinstance(entry.value, Future) and not entry.value.done()
                if reading:
                    self.stats.layers[layer].in_flight += 1
                else:
                    self.stats.layers[layer].hits += 1
                self.policy.touch(key)
                out.append(self._wait(key, entry, layer))
                continue
            out.append(self._miss(layer, key, protected))
        self._pinned = protected
        return out

    def _miss(self, layer: int, key: Key, protected: set[Key]) -> Any:
        """Read ``key`` on this thread into its slot (or, past the budget, a fresh buffer)."""
        admitted = self._admit(key, protected)
        slot = self._slot() if admitted else None
        t0 = time.perf_counter()
        try:
            value = self._read(key, slot)
        finally:
            self.stats.layers[layer].wait_s += time.perf_counter() - t0
        if admitted:
            self._insert(key, value, slot)
        else:  # a step that touches more than the budget holds: used, not kept
            self.stats.layers[layer].loads += 1
            self.stats.layers[layer].bytes_loaded += self.store.raw_nbytes(key)
        return value

    def _read(self, key: Key, slot: Any) -> Any:
        """Read ``key`` into ``slot``; the slot goes back to the arena if the read fails."""
        try:
            return self._load((key, slot))
        except BaseException:
            if slot is not None:
                self.arena.give(slot)
            raise

    def _record(self, layer: int, experts: list[int], first: bool) -> None:
        s = self.stats.layers[layer]
        s.requests += len(experts)
        self.stats.trace.append((layer, tuple(experts)))
        for e in experts:
            self.stats.expert_bytes.setdefault((layer, e), self.store.nbytes((layer, e)))
        # the prediction holds for every chunk of the step (it was popped by the first:
        # a predicted expert in a later chunk counted as unused, that chunk's experts as
        # not needed, and a chunked prefill's precision and recall came out wrong)
        if first:
            self._step_predicted[layer] = self._predicted.pop(layer, None)
        predicted = self._step_predicted.get(layer)
        if predicted is not None:
            s.needed_after_prediction += len(experts)
            s.predicted_used += len(predicted.intersection(experts))

    def _wait(self, key: Key, entry: Entry, layer: int) -> Any:
        """The entry's tensors; a prefetch still queued is read here instead (waiting for
        the thread to reach it cost a thread hand-off per expert on the loaded 2-core box)."""
        if isinstance(entry.value, Future):
            t0 = time.perf_counter()
            fut = entry.value
            try:
                entry.value = self._load((key, entry.slot)) if fut.cancel() else fut.result()
            except CheckpointError:  # the bytes are bad, not the read: named as they are
                raise
            except BaseException as e:
                raise PrefetchError(f"prefetching an expert of layer {layer} failed: {e}") from e
            finally:
                self.stats.layers[layer].wait_s += time.perf_counter() - t0
        return entry.value

    # -- prefetch ------------------------------------------------------------------

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Reserve room for ``experts`` of ``layer`` and read the missing ones ahead of use."""
        if self.closed:
            self._raise_closed()
        self.raise_failures()
        self._predicted[layer] = set(experts)
        self.stats.layers[layer].predicted += len(experts)
        protected = {(layer, e) for e in experts}
        queued = []
        for e in experts:
            key = (layer, e)
            if key in self.entries:
                continue
            if not self._admit(key, protected):
                self.stats.layers[layer].prefetch_no_room += 1
                continue
            self.stats.layers[layer].prefetched += 1
            slot = self._slot()
            if self.loader is None:  # synchronous prefetch (deterministic timing, tests)
                self._insert(key, self._read(key, slot), slot)
            else:
                fut: Future = Future()
                self._insert(key, fut, slot)
                queued.append(((key, slot), fut))
        if queued:
            self.loader.submit(queued)
            self._pending.extend(fut for _, fut in queued)

    def raise_failures(self) -> None:
        """Raise, here, the first error of a prefetch read (even one evicted unused)."""
        still = []
        for fut in self._pending:
            if not fut.done():
                still.append(fut)
            elif not fut.cancelled() and fut.exception() is not None:
                self._pending = []
                if isinstance(fut.exception(), CheckpointError):  # (as _wait raises it)
                    raise fut.exception()
                raise PrefetchError(f"a prefetch read failed: {fut.exception()}") \
                    from fut.exception()
        self._pending = still

    def run_step(self, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``: one layer step (its ``get`` calls and the compute on what they
        return) with ``step_lock`` held, so no other thread's step evicts its experts and
        ``close`` waits for it. Refused once ``close`` is called (RuntimeError "the expert
        cache is closed", before anything changes); a step ``close`` gave up waiting for
        closes the cache as it ends. Per step: the lock the steps already took, and a flag."""
        if self.closing:  # (not queued behind the step close waits for)
            self._raise_closed()
        with self.step_lock:
            if self.closing:
                self._raise_closed()
            self._step_thread = threading.get_ident()
            try:
                return step(*args)
            finally:
                self._step_thread = None
                if self._step_closes and not self.closed:
                    self._close_now(None)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop the prefetch thread and close the shard files, waiting at most ``timeout``
        seconds in all (None: as long as it takes); True when both are done.

        Threads: a layer step running on another thread (``run_step``: a forward or decode
        step of the offloaded model) is waited for, never closed under, and no step starts
        once close is called: it raises RuntimeError "the expert cache is closed", so a
        forward running on another thread fails at its next MoE layer (one held in its
        last MoE layer completes). (Before, close went ahead under the step, which then failed with
        whichever error it met first: the closed store's, the closed cache's or a
        PrefetchError.) A step that outlasts ``timeout``: close returns False with a
        RuntimeWarning and the step closes the cache as it ends. Likewise a prefetch read
        that outlasts it: False, a RuntimeWarning, and the files stay open for that read,
        which closes them as it ends (closing them under it failed the read or filled the
        slot with another file's bytes). Closing twice is harmless; ``get`` and
        ``prefetch`` after it raise a RuntimeError before anything changes.

        Called inside a layer step on the thread that runs it (a hook or callback during
        the step) it raises RuntimeError before anything changes: it would wait for the
        step it is part of (timeout=None hung for ever; a finite timeout stalled that
        long, then warned of a step "on another thread")."""
        if timeout is not None:
            check_non_negative("timeout", timeout)
        if self._step_thread == threading.get_ident():
            raise RuntimeError(
                f"expert cache close(timeout={timeout}) was called inside a layer step on "
                "the thread that runs that step (a hook or callback during the step): "
                "close waits for the step in progress, which cannot end while close "
                "waits; call close() after the forward returns, or from another thread")
        t0 = time.monotonic()
        self.closing = True
        if not self.step_lock.acquire(timeout=-1 if timeout is None else timeout):
            self._step_closes = True
            # the step may have ended between the two: then nobody else would close it
            if not self.step_lock.acquire(blocking=False):
                warnings.warn(f"expert cache close(timeout={timeout}): a layer step is still "
                              "running on another thread; the cache closes as that step "
                              "ends, and no other step starts", RuntimeWarning, stacklevel=2)
                return False
        try:
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
            return self._close_now(left, timeout)
        finally:
            self.step_lock.release()

    def _close_now(self, timeout: float | None, given: float | None = None) -> bool:
        """Stop the prefetch thread (within ``timeout``) and close the store; no step runs.
        ``given``: close()'s timeout, for the warning."""
        self.closed = True
        stopped = True if self.loader is None else self.loader.close(timeout)
        self.store.close()  # a store with a read in progress closes its files after it
        if not stopped:
            warnings.warn(f"expert cache close(timeout={given}): the prefetch thread is "
                          "still reading an expert; it stops after that read, and the "
                          "shard files are closed when that read ends", RuntimeWarning,
                          stacklevel=3)
        return stopped

    @staticmethod
    def _raise_closed() -> None:
        # was: a step after close() reopened the shard files behind the closed store, or
        # failed deep in a forward ("the prefetch thread is closed") with reads reserved
        raise RuntimeError("the expert cache is closed: expert_offload.close() (on this "
                           "thread or another) stops its prefetch thread and closes its "
                           "shard files, and no MoE layer step runs after it; load the "
                           "model again to run it")


def _check_cache_args(store: ExpertStore, budget: int, prefetch: bool,
                      num_layers: int | None, threaded: bool, layers: int) -> None:
    """ExpertCache's arguments, before its buffer is allocated or its thread started."""
    check_positive_int("budget", budget)
    largest = max((store.nbytes(k) for k in store.experts), default=0)
    if budget < largest:  # no slot: nothing cached, and every step read in chunks of 0
        raise ExpertMemoryError(f"budget={budget} is not allowed: it must be at least "
                                f"{largest} bytes, the largest expert (one must fit)")
    check_bool("prefetch", prefetch)
    check_bool("threaded", threaded)
    if num_layers is not None:
        check_positive_int("num_layers", num_layers)
        if num_layers < layers:
            reject("num_layers", num_layers, f"it must be at least {layers}, the layers "
                   "the store holds experts of")


def check_budget(budget: int, layer_need: dict[int, int], given: int | str | None = None
                 ) -> None:
    """ExpertMemoryError when one layer's active experts (bytes per layer) exceed ``budget``;
    ``given`` is the budget as the caller wrote it ("1KiB"), named in the message (it had
    said only "expert_memory=1024 bytes", whatever was typed, and no size that would do)."""
    layer, need = max(layer_need.items(), key=lambda kv: kv[1])
    if need > budget:
        shown = budget if given is None else given
        raise ExpertMemoryError(
            f"expert_memory={shown!r} ({budget:,} bytes, {mib(budget)}) is too small: MoE "
            f"layer {layer} needs {need:,} bytes ({mib(need)}) to hold the top-k experts one "
            f"token uses at once; give at least {need:,} bytes, e.g. {size_at_least(need)}")
