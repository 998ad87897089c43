"""What the expert cache did: per-layer hits, bytes read, time waiting, prefetch accuracy.

The routing trace (which experts each layer step asked for, in order) is kept
so Belady's optimal hit rate at the same budget can be computed afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from moekit.config import check_positive_int, reject
from moekit.offload.policy import Key, belady, flatten


@dataclass
class LayerStats:
    requests: int = 0  # experts asked for by this layer's steps
    hits: int = 0  # of those, already in the cache, read (a prefetch's read finished)
    # of those, not hits: still being read (or queued) by prefetch when asked for, so the
    # step waited for the read (counted as hits, a hit rate of 0.92 beat Belady's 0.86)
    in_flight: int = 0
    loads: int = 0  # experts read from the store for this layer (demand + prefetch)
    bytes_loaded: int = 0
    wait_s: float = 0.0  # compute thread blocked on reads of this layer's experts
    predicted: int = 0  # experts prefetch predicted for this layer
    predicted_used: int = 0  # of those, asked for by the step that followed
    needed_after_prediction: int = 0  # experts asked for by steps that had a prediction
    # predicted experts read ahead (queued reads evicted before they started not counted),
    # and those not cached that found no room: every slot held by the step's experts (a
    # budget of one layer's top-k left prefetch doing nothing, and nothing said so)
    prefetched: int = 0
    prefetch_no_room: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


@dataclass
class OffloadStats:
    budget: int
    policy: str
    prefetch: bool
    layers: list[LayerStats]
    trace: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    expert_bytes: dict[Key, int] = field(default_factory=dict)
    # every expert's bytes when the budget holds them all (the cache takes only those), else
    # None: a 64GiB budget on a 384 MiB model was shown as "expert cache: 64.0 GiB"
    all_experts: int | None = None

    def __post_init__(self) -> None:
        # a budget of 0 or less made belady_hit_rate (and summary, to_dict) fail later
        check_positive_int("budget", self.budget)

    def total(self, name: str) -> float:
        """The sum over layers of the LayerStats counter ``name``."""
        if name not in COUNTERS:  # a typo summed to 0 with no layers, else AttributeError
            reject("name", name, f"it must be one of {', '.join(COUNTERS)}")
        return sum(getattr(s, name) for s in self.layers)

    @property
    def hit_rate(self) -> float:
        req = self.total("requests")
        return self.total("hits") / req if req else 0.0

    @property
    def in_flight_rate(self) -> float:
        """Requests that waited for a prefetch still reading their expert, of all."""
        req = self.total("requests")
        return self.total("in_flight") / req if req else 0.0

    @property
    def prefetch_precision(self) -> float:
        p = self.total("predicted")
        return self.total("predicted_used") / p if p else 0.0

    @property
    def prefetch_recall(self) -> float:
        n = self.total("needed_after_prediction")
        return self.total("predicted_used") / n if n else 0.0

    def belady_hit_rate(self) -> float:
        """Belady's MIN on this run's trace at the same byte budget (computed offline): the
        best a cache that reads an expert only when a step asks for it can do. Prefetch
        reads ahead, so a prefetching cache's hit rate can exceed it."""
        accesses = flatten(self.trace)
        if not accesses:
            return 0.0
        missing = sorted({k for k in accesses if k not in self.expert_bytes})
        if missing:  # was KeyError from inside belady
            raise ValueError(f"expert_bytes lacks the sizes of {len(missing)} experts of the "
                             f"trace, e.g. {missing[:3]}: it must hold every (layer, expert) "
                             "key the trace asks for")
        hits = belady(accesses, budget=self.budget, nbytes=self.expert_bytes.__getitem__)
        return sum(hits) / len(hits)

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "policy": self.policy, "prefetch": self.prefetch,
                "hit_rate": self.hit_rate, "belady_hit_rate": self.belady_hit_rate(),
                "in_flight_rate": self.in_flight_rate,
                "bytes_loaded": int(self.total("bytes_loaded")),
                "wait_s": self.total("wait_s"),
                "prefetch_precision": self.prefetch_precision,
                "prefetch_recall": self.prefetch_recall,
                "prefetched": int(self.total("prefetched")),
                "prefetch_no_room": int(self.total("prefetch_no_room")),
                "hit_rate_per_layer": [s.hit_rate for s in self.layers]}

    def summary(self) -> str:
        """A few lines for the end of `moekit generate`."""
        per_layer = " ".join(f"{s.hit_rate:.2f}" for s in self.layers)
        fits = ("" if self.all_experts is None else
                f" (every expert fits: {_size(self.all_experts)} at most)")
        lines = [f"expert cache: {_size(self.budget)}{fits}, {self.policy}"
                 f"{' + prefetch' if self.prefetch else ''}; hit rate {self.hit_rate:.3f} "
                 f"({_belady_label(self.prefetch)} {self.belady_hit_rate():.3f})",
                 f"  per layer: {per_layer}",
                 f"  read {_size(self.total('bytes_loaded'))} in "
                 f"{int(self.total('loads'))} expert loads; waited {self.total('wait_s'):.3f} s"]
        if self.prefetch:
            lines.append(f"  prefetch precision {self.prefetch_precision:.3f}, "
                         f"recall {self.prefetch_recall:.3f}; {self.in_flight_rate:.3f} of "
                         "requests waited for a prefetch still reading (not hits)")
            lines.append(f"  prefetch read {int(self.total('prefetched'))} experts; "
                         f"{int(self.total('prefetch_no_room'))} predicted found no room "
                         "(the budget held only the experts in use)")
        return "\n".join(lines)


COUNTERS = tuple(f.name for f in fields(LayerStats))


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _belady_label(prefetch: bool) -> str:
    """Belady's MIN reads on demand only: beside a prefetching cache's hit rate, which can
    be higher (prefetched reads that finished in time count as hits), say so."""
    if prefetch:
        return "Belady's optimum reading on demand only, which prefetch can beat:"
    return "Belady's optimum on this trace"
