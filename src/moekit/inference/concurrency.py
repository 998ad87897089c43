"""Objects that serve one call at a time (an ``Engine``, a ``Batcher``: each holds one KV
cache; a KV cache itself, one forward at a time) refuse a second call while one runs,
instead of letting both write the cache."""

from __future__ import annotations

import threading


class ConcurrentUseError(RuntimeError):
    """An ``Engine`` or ``Batcher`` was called while a call of it was still running (on
    another thread, or from the running call's own callback): each holds one KV cache
    and serves one call at a time. Give each thread its own Engine (they may share the
    model), or feed one Batcher from one thread (``moekit serve``'s ``Service`` does).
    Also raised by a forward on a ``StaticKVCache`` / ``KVCache`` another forward is
    writing (``model.infer(ids, cache)`` from two threads): give each its own cache."""


class OneCall:
    """Refuses a call of an object that serves one call at a time while another runs,
    with ``ConcurrentUseError`` (``message``), rather than letting two calls write one
    KV cache (three threads on one Engine failed with "batch of 2 sequences is not
    allowed: the cache is set up for rows=1", the other thread's reset having resized
    it). The cost: one uncontended lock a call."""

    def __init__(self, message: str) -> None:
        self.message = message
        self._lock = threading.Lock()
        self.owner: int | None = None  # the thread in the running call

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise ConcurrentUseError(self.message)
        self.owner = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self.owner = None
        self._lock.release()

    def __getstate__(self) -> str:
        # a copy (copy.deepcopy of a KV cache, pickle) is a new object no call is inside;
        # a shallow copy.copy shares this one, as it shares the cache's tensors
        return self.message

    def __setstate__(self, message: str) -> None:
        self.__init__(message)

    def check_thread(self) -> None:
        """For calls that may come beside a running one from its own thread (a callback)
        but not from another thread."""
        owner = self.owner
        if owner is not None and owner != threading.get_ident():
            raise ConcurrentUseError(self.message)
