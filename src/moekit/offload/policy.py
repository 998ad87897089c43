"""Eviction policies for the expert cache, and Belady's optimal policy offline.

A key is ``(layer, expert)``. The online policies see accesses one at a time;
Belady sees the whole recorded trace and evicts the key used farthest in the
future, the upper bound any online policy can reach on that trace.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from moekit.config import check_non_negative, check_positive_int, reject

Key = tuple[int, int]


class LRU:
    """Evict the key whose last use is oldest (an insert counts as a use)."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Key) -> None:
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        del self._order[key]

    def victim(self, protected: set[Key]) -> Key | None:
        return next((k for k in self._order if k not in protected), None)


class LFU:
    """Evict the cached key used least often; ties go to the least recently used.

    Counts survive eviction ("perfect" LFU): an expert's popularity is a property
    of the router, so a popular expert evicted once keeps its rank when it returns.
    Only demand accesses count; a prefetch is not a use.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._lru = LRU()
        self.counts: dict[Key, int] = {}

    def insert(self, key: Key) -> None:
        self._lru.insert(key)

    def touch(self, key: Key) -> None:
        self._lru.touch(key)

    def count(self, key: Key) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def remove(self, key: Key) -> None:
        self._lru.remove(key)

    def victim(self, protected: set[Key]) -> Key | None:
        best, best_count = None, None
        for k in self._lru._order:  # oldest first, so ties keep the least recent
            if k in protected:
                continue
            c = self.counts.get(k, 0)
            if best_count is None or c < best_count:
                best, best_count = k, c
        return best


POLICIES = {"lru": LRU, "lfu": LFU}


def make_policy(name: str) -> LRU | LFU:
    if name not in POLICIES:
        raise ValueError(f"policy={name!r} is not allowed: it must be one of "
                         f"{', '.join(POLICIES)}")
    return POLICIES[name]()


def flatten(trace: Iterable[tuple[int, Sequence[int]]]) -> list[Key]:
    """A step trace [(layer, experts), ...] as the access sequence [(layer, expert), ...]."""
    return [(layer, e) for layer, experts in trace for e in experts]


def simulate(policy: LRU | LFU, accesses: Sequence[Key], capacity: int) -> list[bool]:
    """Replay ``accesses`` through ``policy`` with room for ``capacity`` keys; hit per access."""
    # capacity 0 or -1 was KeyError: None (no victim), 1.5 was taken as 2, "2" a TypeError
    check_positive_int("capacity", capacity)
    if not all(callable(getattr(policy, m, None)) for m in ("insert", "touch", "remove",
                                                            "victim")):
        reject("policy", policy, "it must be a policy object such as LRU() or LFU() "
               "(make_policy(name) builds one by name)")
    cached: set[Key] = set()
    hits = []
    for key in accesses:
        if isinstance(policy, LFU):
            policy.count(key)
        if key in cached:
            policy.touch(key)
            hits.append(True)
            continue
        hits.append(False)
        while len(cached) >= capacity:
            out = policy.victim({key})
            policy.remove(out)
            cached.discard(out)
        policy.insert(key)
        cached.add(key)
    return hits


def belady(accesses: Sequence[Key], capacity: int | None = None,
           nbytes: Callable[[Key], int] | None = None, budget: int | None = None) -> list[bool]:
    """Belady's MIN on the access sequence: hit per access.

    On a miss the key is loaded and used; then, while the cache is over its room,
    the key (the new one included) whose next use is farthest goes. With equal
    sizes (``capacity`` keys) this is optimal; with ``nbytes`` and a byte
    ``budget`` it is the same rule, a close upper-bound heuristic for mixed sizes.
    """
    if (capacity is None) == (budget is None):
        raise ValueError("belady needs exactly one of capacity= (keys) or budget= (bytes)")
    # capacity 0 or budget 0 missed every access, -1 failed in max() of an empty cache,
    # 1.5 was taken as 2, budget without nbytes was "'NoneType' object is not callable"
    if budget is None:
        check_positive_int("capacity", capacity)
        if nbytes is not None:  # was ignored: the sizes did not count
            reject("nbytes", nbytes, "it is used with budget= (bytes), not with capacity= "
                   "(keys); pass budget= instead")
        size, room = (lambda k: 1), capacity
    else:
        check_positive_int("budget", budget)
        if not callable(nbytes):
            reject("nbytes", nbytes, "with budget= it must be a function from a key to its "
                   "size in bytes")
        sizes: dict[Key, int] = {}
        for key in accesses:  # each distinct key's size once, checked (a negative one
            if key not in sizes:  # made room that was not there)
                sizes[key] = nbytes(key)
                check_non_negative(f"nbytes({key!r})", sizes[key])
        size, room = sizes.__getitem__, budget
    never = len(accesses)
    next_use = [never] * len(accesses)
    last: dict[Key, int] = {}
    for i in range(len(accesses) - 1, -1, -1):
        next_use[i] = last.get(accesses[i], never)
        last[accesses[i]] = i
    cache: dict[Key, int] = {}  # key -> position of its next use
    used, hits = 0, []
    for i, key in enumerate(accesses):
        hits.append(key in cache)
        if key not in cache:
            used += size(key)
        cache[key] = next_use[i]
        while used > room:
            out = max(cache, key=lambda k: (cache[k], k == key))
            used -= size(out)
            del cache[out]
    return hits
