"""How waiting groups join a ``Batcher``'s running batch (``batcher.py``'s docstring tells
the whole story): cohorts of groups prefilled together in a cache of their own (``Fill``),
whole or in chunks, their first tokens, the room made in the shared cache and the join;
and the kept conversations (``Prefix``) that a continuation prefills from.

``Joining`` is a mixin of ``Batcher``: its methods read and write the batcher's state
(``cache``, ``model``, ``_waiting``, ``_filling``, ``_seqs``, ``_next``, ``_ends``,
``_prefixes``, ``prefix_entries``, ``prefill_s``) and call its ``_take``, ``_finish`` and
``_fail``.

Shape letters: U a cohort's distinct prompts, L the longest of them (left-padded), R a
group's rows, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.inference.engine import left_padded
from moekit.models.generate import sample_next
from moekit.models.transformer import StaticKVCache

if TYPE_CHECKING:
    from moekit.inference.batcher import Group


@dataclass(eq=False)
class Fill:
    """Groups prefilling together (a cohort): their own cache, their distinct prompts
    left-padded [U, L], the positions done, each group's sequences' rows; at the end the
    sequences that go on, with their first tokens."""

    groups: list[Group]
    cache: StaticKVCache
    ids_UL: Tensor
    rows: list[list[int]]
    pos: int = 0
    logits_UV: Tensor | None = None  # the last chunk's
    # after the first tokens: (group, sequence, its row here, its first token) of each
    # sequence that goes on
    joining: list[tuple[Group, int, int, int]] = field(default_factory=list)


@dataclass
class Prefix:
    ids: list[int]
    k: list[Tensor]  # per layer [J, n, Dh]
    v: list[Tensor]


class Joining:
    """``Batcher``'s joining steps (a mixin: see the module docstring)."""

    def _admit(self) -> None:
        """Prefill the waiting groups in order, those that come together in one forward
        (``_cohort``; their rows held for them from the first chunk), and join them as soon
        as they fit. With nothing running, whole prompts; else their chunks go with the
        decode steps (``_decode``)."""
        while True:
            fill = self._filling
            if fill is None:
                fill = self._filling = self._cohort()
                if fill is None:
                    return
            try:
                if fill.pos < fill.ids_UL.shape[1]:
                    if self._seqs:
                        return  # its chunks go with the decode steps
                    self._prefill(fill)
                    self._first_tokens(fill)
                    if not fill.groups:  # every sequence stopped at its first token
                        self._filling = None
                        continue
                d = self._room(fill)
                if d is None:
                    return  # it waits for the running sequences' slots
                self._filling = None
                self._join(fill, d)
            except Exception as e:  # noqa: BLE001 (those groups fail, the rest go on)
                self._filling = None
                self._fail(fill.groups, e)

    def _cohort(self) -> Fill | None:
        """The next waiting groups to prefill together, or None (the first does not fit
        the free rows): the first, and those after it that fit the rows while the left
        padding stays at most the prompts' own tokens; a prompt that continues a kept
        conversation alone. Their distinct prompts (a prompt once for its samples) in a
        cache of their own."""
        free = self.cache.batch - len(self._seqs)
        if not self._waiting or len(self._waiting[0].ids) > free:
            return None
        groups = [self._waiting.popleft()]
        free -= len(groups[0].ids)
        distinct = dict.fromkeys(tuple(p) for p in groups[0].ids)
        hit = self._prefix_for(groups[0].ids[0]) if len(groups[0].ids) == 1 else None
        while hit is None and self._waiting and len(self._waiting[0].ids) <= free:
            g = self._waiting[0]
            if len(g.ids) == 1 and self._prefix_for(g.ids[0]) is not None:
                break  # it prefills alone, after these
            more = {**distinct, **dict.fromkeys(tuple(p) for p in g.ids)}
            width = max(len(p) for p in more)
            if len(more) * width > 2 * sum(len(p) for p in more):
                break  # too much padding
            distinct = more
            groups.append(self._waiting.popleft())
            free -= len(g.ids)
        prompts = list(distinct)
        c, cfg = self.cache, self.model.config
        into = StaticKVCache(cfg.num_layers, len(prompts), cfg.kv_heads,
                             max(len(p) for p in prompts), cfg.head_size, c.k[0].dtype,
                             c.k[0].device)
        index = {p: u for u, p in enumerate(prompts)}
        rows = [[index[tuple(p)] for p in g.ids] for g in groups]
        return Fill(groups, into, self._prefill_ids(groups[0], hit, prompts, into), rows)

    def _prefill(self, fill: Fill) -> None:
        """The rest of a cohort's prefill, alone (nothing else runs)."""
        t0 = time.perf_counter()
        fill.logits_UV = self.model.infer(fill.ids_UL[:, fill.pos:], fill.cache)
        fill.pos = fill.ids_UL.shape[1]
        self._charge(fill, time.perf_counter() - t0)

    def _charge(self, fill: Fill, seconds: float) -> None:
        """A cohort's forward of ``seconds``: counted once in the batcher's total, split
        among its groups by their prompt tokens, so that a sum over groups (a request's in
        ``moekit serve``, a run's in ``moekit generate``) counts it once too."""
        self.prefill_s += seconds
        tokens = [sum(len(p) for p in g.ids) for g in fill.groups]
        total = sum(tokens)
        for g, n in zip(fill.groups, tokens, strict=True):
            g.prefill_s += seconds * n / total  # (no group left: no share to give)

    def _first_tokens(self, fill: Fill) -> None:
        """Each group's first tokens, from its rows' logits with its own generator; the
        groups whose every sequence stopped with it finish and leave the cohort."""
        went_on = []
        for g, rows in zip(fill.groups, fill.rows, strict=True):
            logits_RV = fill.logits_UV[torch.tensor(rows)]
            tokens_R = sample_next(logits_RV, g.config.temperature, g.config.top_k,
                                   g.config.top_p, g.generator)
            g.joined = time.perf_counter()
            stopped = self._take(g, list(range(len(g.ids))), tokens_R, logits_RV)
            for i in sorted(stopped):
                self._remember(g, i, fill.cache, rows[i])
            if len(stopped) < len(g.ids):
                went_on.append(g)
                fill.joining += [(g, i, rows[i], tok) for i, tok in enumerate(tokens_R.tolist())
                                 if i not in stopped]
            else:
                self._finish(g)
        fill.groups = went_on
        fill.logits_UV = None

    def _room(self, fill: Fill) -> int | None:
        """The shift of the running rows that lets the cohort's sequences join now, or
        None (they wait)."""
        c = self.cache
        if not self._seqs:
            return 0
        L = max(len(p) for g in fill.groups for p in g.ids)
        N = max(g.config.max_new_tokens for g in fill.groups)
        lo = max(-int(c.pad_B[:c.rows].min()), L - c.length)
        hi = min(c.max_len - (N - 1) - c.length, c.max_len - max(self._ends))
        return lo if lo <= hi else None

    def _join(self, fill: Fill, d: int) -> None:
        """The prefilled cohort's sequences that go on join the shared cache."""
        c = self.cache
        if not self._seqs:  # nothing running: the cohort's rows alone
            c.rows, c.length = 0, max(len(p) for g in fill.groups for p in g.ids)
        elif d:
            c.shift(d)
            self._ends = [e + d for e in self._ends]
        parts = fill.joining
        c.join(fill.cache, torch.tensor([row for _, _, row, _ in parts], dtype=torch.long),
               [len(g.ids[i]) for g, i, _, _ in parts])
        for g, i, _, token in parts:
            self._seqs.append((g, i))
            self._next.append(token)
            self._ends.append(c.length + g.config.max_new_tokens - 1)

    def _prefill_ids(self, group: Group, hit: tuple[Prefix, int] | None,
                     prompts: list[tuple[int, ...]], cache: StaticKVCache) -> Tensor:
        """``prompts`` left-padded [U, L] with ``cache`` reset for them; with ``hit`` (the
        group's one prompt continues a kept prefix): only its rest, the prefix's keys and
        values copied in (the prefix is then the most recently used)."""
        if hit is None:
            return left_padded(prompts, cache)
        entry, n = hit
        self._prefixes.remove(entry)
        self._prefixes.appendleft(entry)
        cache.reset(torch.zeros(1, dtype=torch.long, device=cache.slots_M.device))
        for dst, src in zip((*cache.k, *cache.v), (*entry.k, *entry.v), strict=True):
            dst[0, :, :n] = src[:, :n]
        cache.length = group.reused = n
        return torch.tensor([group.ids[0][n:]], device=cache.slots_M.device)

    def _prefix_for(self, prompt: list[int]) -> tuple[Prefix, int] | None:
        """The kept prefix sharing the most leading ids with ``prompt`` and how many (at
        least one id left to prefill: its logits), or None."""
        best, most = None, 0
        for entry in self._prefixes:
            n, top = 0, min(len(entry.ids), len(prompt) - 1)
            while n < top and entry.ids[n] == prompt[n]:
                n += 1
            if n > most:
                best, most = entry, n
        return None if best is None else (best, most)

    def _remember(self, group: Group, i: int, cache: StaticKVCache, row: int) -> None:
        """Keep a finished single-sequence group's keys and values (prompt and the tokens
        fed back) for a continuation."""
        if not self.prefix_entries or len(group.ids) != 1:
            return
        held = group.ids[i] + group.gens[i].tokens[:-1]  # the last token was not fed back
        start = int(cache.pad_B[row])
        stop = start + len(held)
        self._prefixes.appendleft(Prefix(held, [t[row, :, start:stop].clone() for t in cache.k],
                                         [t[row, :, start:stop].clone() for t in cache.v]))
        while len(self._prefixes) > self.prefix_entries:
            self._prefixes.pop()
