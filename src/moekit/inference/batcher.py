"""Continuous batching: sequences join a running batch between steps and leave it as
they stop, so concurrent requests share each decode step's weight reads.

    batcher = Batcher(model, rows=4, context=2048)
    group = batcher.submit([[100, 101, 32]], GenerationConfig(max_new_tokens=64))
    while not group.done:
        batcher.step()
    group.gens[0].tokens

A ``Group`` is one request: its prompts (a prompt repeated once per sample), its config,
its own generator and callbacks. Each ``step()`` first lets waiting groups join, in the
order they came, while they fit, then decodes one token for every running sequence (one
``DecodePlan`` call, or ``model.infer`` where the plan does not take the step).

How a group joins: its distinct prompts are prefilled (left-padded to the longest, as
``Engine`` prefills a batch; a prompt once for all its samples), with those of the groups
waiting behind it that fit the free rows (one forward for them all, while the padding
stays at most their own tokens), in a cache of their own, and their keys and values are
copied into free rows of the shared cache, right-aligned with the sequences already
there (``StaticKVCache.join``). Every row shares the cache's
length; a row's rotary positions count from its own first slot (``pad_B``), so it
computes what it computes alone. Where the prompt is longer than the filled slots, or
the rows' first slots have moved on, all rows shift together (``StaticKVCache.shift``:
one copy of the filled slots) so that each running sequence's last slot (its join
length + max_new_tokens - 1) still fits in the cache; a group that cannot fit waits (and
the groups after it). The shared cache has ``2 * context`` slots per row (``context``
with one row), so sequences of the whole context can join one another. While sequences
run, a joining prefill goes ``prefill_chunk`` prompt tokens per step (padding counted;
its rows held for it), carried by the step (``MoETransformer.infer_pair``: one pass, the
experts read once for both), so a long prompt delays each running sequence's next token
by a chunk, not by the whole prompt; with nothing running, prompts prefill whole.

Tokens: a group's rows are picked together, by the argmax or by ``sample_next`` with its
generator over its own rows' logits, so a seeded request draws what it would draw alone,
whatever else runs beside it; the logits themselves are those of a batched step, where
the kernels' blocking (rows per expert, the int8 path's row thresholds) may round them
differently from a step of the request alone. One group running picks its tokens inside
the plan's call, as ``Engine`` does.

``prefix_entries`` keeps that many finished single-sequence conversations' keys and values
(most recent first): a prompt that starts with one of them prefills only the rest (a
chat continued turn by turn).

The joining steps (cohorts, their prefill, the join, the kept conversations) are
``Joining``'s, in ``batcher_join.py``; ``Batcher`` keeps the requests' bookkeeping and the
decode step.

Shape letters: R running rows, L a joining group's longest prompt, V vocabulary.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.config import MAX_SEED, check_int_range, check_positive_int, reject
from moekit.inference.batcher_join import Fill, Joining, Prefix
from moekit.inference.concurrency import OneCall
from moekit.inference.decode_plan import DecodePlan
from moekit.inference.engine import (
    Generation,
    GenerationConfig,
    GenerationStats,
    OnToken,
    Prompt,
    Stops,
    StopWhen,
    checked_options,
    checked_prompts,
    record_logprobs,
)
from moekit.models.generate import sample_next
from moekit.models.transformer import MoETransformer, StaticKVCache
from moekit.models.transformer import kv_cache_dtype as kv_dtype_of

PREFILL_CHUNK = 512  # prompt tokens prefilled per step while sequences decode


def sequence_seed(seed: int, i: int) -> int:
    """The seed of the i-th generator drawn from ``seed`` (``moekit generate
    --prompts-file``'s sequence i; ``moekit serve``'s i-th group of a request with more
    sequences than rows). The first is ``seed`` itself, so that one prompt draws the same
    text alone (``--prompt``, ``Engine``), first in a file, or through ``--jsonl``: it had
    drawn from seed * 1,000,003, another text for the same prompt and seed. The others
    start past every seed below 1,000,003: with seed * 1,000,003 + i, --seed 0's sequence
    i was --seed i's sequence 0 (one text shared by the samples of two seeds)."""
    return seed if i == 0 else ((seed + 1) * 1_000_003 + i) % MAX_SEED


@dataclass(eq=False)
class Group:
    """One request's sequences in a ``Batcher`` (``submit`` makes it). ``on_token(i,
    tok)`` sees sequence i's tokens as they are chosen; ``stop_when(i, tokens)`` stops it
    where it returns True; ``on_done(group)`` runs once every sequence has stopped (or
    the group failed: ``error``). Read ``gens`` and ``stats`` once ``done``."""

    ids: list[list[int]]
    config: GenerationConfig
    generator: torch.Generator
    on_token: OnToken | None = None
    stop_when: StopWhen | None = None
    logprobs: int | None = None
    on_done: Callable[[Group], None] | None = None
    gens: list[Generation] = field(default_factory=list)
    stats: GenerationStats | None = None
    error: BaseException | None = None
    done: bool = False
    # set as it runs
    prefill_s: float = 0.0  # its share of its cohort's prefill forwards (``Batcher._charge``)
    reused: int = 0
    steps: int = 0
    joined: float = 0.0  # perf_counter when its prefill ended
    stops: Stops | None = None
    cancelled: bool = False  # ``Batcher.cancel``: its rows leave at the next step


class Batcher(Joining):
    """Generates for groups of sequences that come and go (see the module docstring).

    ``rows``: sequences decoded together at most; ``context``: prompt + new tokens of a
    sequence at most (default the model's max_seq_len); ``prefix_entries``: finished
    conversations whose keys and values are kept for a continuation; ``prefill_chunk``:
    prompt tokens prefilled per step while sequences decode. The model is put in eval
    mode and must not change while the batcher serves it (its ``DecodePlan`` holds the
    weights). ``kv_cache_dtype``: the shared cache's keys and values (``moekit.models.
    kv_cache.kv_cache_dtype``: default the activations'). Not thread-safe: call
    ``submit`` and ``step`` from one thread (``moekit serve``'s main thread); a ``step``
    while another runs, or a ``submit`` from another thread during a step, raises
    ``ConcurrentUseError`` (a callback of the step may submit).
    """

    def __init__(self, model: MoETransformer, rows: int = 1, context: int | None = None,
                 prefix_entries: int = 0, prefill_chunk: int = PREFILL_CHUNK,
                 kv_cache_dtype: torch.dtype | str | None = None) -> None:
        if not isinstance(model, MoETransformer):
            reject("model", type(model).__name__, "it must be a moekit MoETransformer")
        kv = kv_dtype_of(model, kv_cache_dtype)
        check_positive_int("rows", rows)
        limit = model.config.max_seq_len
        if context is not None:
            check_int_range("context", context, 1, limit)
        check_int_range("prefix_entries", prefix_entries, 0, 1 << 20)
        check_positive_int("prefill_chunk", prefill_chunk)
        self.prefill_chunk = prefill_chunk
        self.model = model.eval()
        self.context = limit if context is None else context
        cfg = model.config
        self.cache = StaticKVCache(cfg.num_layers, rows, cfg.kv_heads,
                                   self.context if rows == 1 else 2 * self.context,
                                   cfg.head_size, kv, model.norm.weight.device, lazy=True)
        self.cache.rows = 0
        self.plan = DecodePlan.build(model)
        self._dropless = all(b.ffn.config.capacity_factor is None
                             for b in model.blocks if b.is_moe)
        self.prefix_entries = prefix_entries
        self._prefixes: deque[Prefix] = deque()
        self._waiting: deque[Group] = deque()
        self._filling: Fill | None = None  # the groups whose prompts are prefilling
        # row r of the cache decodes sequence _seqs[r] = (group, index); _next[r] is the
        # token it feeds next; _ends[r] the cache length by which it has stopped
        self._seqs: list[tuple[Group, int]] = []
        self._next: list[int] = []
        self._ends: list[int] = []
        self.decode_steps = 0  # steps that decoded (prefills not counted)
        # seconds of the forwards that carried prompt tokens, each counted once (a decode
        # step that carried a chunk too: all of it, and it is one of prefill_steps); the
        # groups' prefill_s add up to it
        self.prefill_s = 0.0
        self.prefill_steps = 0
        self._one_call = OneCall("Batcher.step is already running (on another thread, or "
                                 "this call comes from its callback): a Batcher is fed and "
                                 "stepped from one thread (moekit serve's Service does it "
                                 "for requests of many threads)")

    @property
    def kv_bytes(self) -> int:
        """Bytes of the shared KV cache (allocated at construction)."""
        return sum(t.nbytes for t in (*self.cache.k, *self.cache.v))

    @property
    def prefix_bytes(self) -> int:
        """Bytes the kept conversations may hold at most (``prefix_entries`` of the whole
        context)."""
        c = self.cache
        return self.kv_bytes // (c.batch * c.max_len) * self.context * self.prefix_entries

    @property
    def running(self) -> int:
        """Sequences decoding now."""
        return len(self._seqs)

    @property
    def waiting(self) -> int:
        """Groups waiting to join (those prefilling included)."""
        return len(self._waiting) + (0 if self._filling is None else len(self._filling.groups))

    def check(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[int]]:
        """The prompts' ids after the errors ``submit`` would raise, before anything runs."""
        ids = checked_prompts(self.model, prompts, config)
        if len(ids) > self.cache.batch:
            reject("prompts", f"{len(ids)} sequences", f"a group may hold at most "
                   f"rows={self.cache.batch} sequences (prompts x samples)")
        longest = max(len(p) for p in ids)
        if longest + config.max_new_tokens > self.context:
            reject("max_new_tokens", config.max_new_tokens, f"a prompt of {longest} tokens + "
                   f"max_new_tokens must fit the context of {self.context} tokens (use at "
                   f"most {max(self.context - longest, 0)})")
        return ids

    def submit(self, prompts: Sequence[Prompt], config: GenerationConfig | None = None,
               generator: torch.Generator | None = None, on_token: OnToken | None = None,
               stop_when: StopWhen | None = None, logprobs: int | None = None,
               on_done: Callable[[Group], None] | None = None) -> Group:
        """Queue a group (see ``Group``); it joins at a coming ``step``. Arguments as
        ``Engine.generate``'s; every error is raised here, before it is queued."""
        self._one_call.check_thread()
        cfg = checked_options(config, generator, stop_when, logprobs)
        if on_done is not None and not callable(on_done):
            reject("on_done", on_done, "it must be None or a callable (group) -> None")
        ids = self.check(prompts, cfg)
        gen = torch.Generator().manual_seed(cfg.seed) if generator is None else generator
        group = Group(ids, cfg, gen, on_token, stop_when, logprobs, on_done,
                      gens=[Generation(prompt=p) for p in ids], stops=Stops(cfg))
        if logprobs is not None:
            for g in group.gens:
                g.logprobs, g.top_logprobs = [], []
        self._waiting.append(group)
        return group

    def step(self) -> bool:
        """Prefill and join waiting groups (with sequences running, ``prefill_chunk``
        prompt tokens at most), then decode one token for every running sequence.
        Returns whether anything is left to do (running or waiting)."""
        with self._one_call, torch.inference_mode():
            self._reap()  # (their rows free for the waiting groups)
            self._admit()
            self._reap()  # (one that just joined: no step for it)
            if self._seqs:
                try:
                    self._decode()
                except Exception as e:  # noqa: BLE001 (every group in the step fails)
                    fill, self._filling = self._filling, None
                    self._fail(list(dict.fromkeys(g for g, _ in self._seqs))
                               + ([] if fill is None else fill.groups), e)
        return bool(self._seqs or self._waiting or self._filling)

    def cancel(self, group: Group) -> None:
        """Stop ``group`` (its client went away): waiting, it leaves the queue now; running,
        its sequences leave at the next step (being prefilled, as it joins, with its first
        tokens). Its sequences still going end with ``finish_reason`` "cancelled" and the
        tokens they have; ``on_done`` runs as for any group. A group already done is left
        alone."""
        if not isinstance(group, Group):
            reject("group", type(group).__name__, "it must be a Group that submit returned")
        if group.done or group.cancelled:
            return
        group.cancelled = True
        if group in self._waiting:
            self._waiting.remove(group)
            self._end_cancelled(group, range(len(group.gens)))

    def _end_cancelled(self, group: Group, going) -> None:
        """Finish a cancelled group; its sequences ``going`` (indices) had not stopped."""
        for i in going:
            group.gens[i].finish_reason = "cancelled"
        if not group.joined:
            group.joined = time.perf_counter()
        self._finish(group)

    def _reap(self) -> None:
        """Drop the rows of cancelled groups and end those groups."""
        rows = {r for r, (g, _) in enumerate(self._seqs) if g.cancelled}
        if not rows:
            return
        going: dict[Group, list[int]] = {}
        for r in sorted(rows):
            g, i = self._seqs[r]
            going.setdefault(g, []).append(i)
        self._drop(rows)
        for g, seqs in going.items():
            self._end_cancelled(g, seqs)

    def run(self, group: Group) -> Group:
        """Step until ``group`` is done (and anything submitted before it)."""
        while not group.done:
            self.step()
        return group
    # -- decoding ----------------------------------------------------------------------

    def _decode(self) -> None:
        c = self.cache
        self.decode_steps += 1
        groups = list(dict.fromkeys(g for g, _ in self._seqs))
        rows_of = {g: [r for r, (h, _) in enumerate(self._seqs) if h is g] for g in groups}
        ids_R1 = torch.tensor(self._next, device=c.slots_M.device)[:, None]
        fill = self._filling
        if fill is not None and fill.pos < fill.ids_UL.shape[1]:
            logits_RV = self._mixed(ids_R1, fill)
            self._pick(groups, rows_of, None, logits_RV)
            if fill.pos == fill.ids_UL.shape[1]:
                try:
                    self._first_tokens(fill)
                except Exception as e:  # noqa: BLE001 (those groups fail, the rest go on)
                    self._filling = None
                    self._fail(fill.groups, e)
                else:
                    if not fill.groups:
                        self._filling = None
            return
        # the plan picks the tokens inside its call where one rule picks them all: every
        # row greedy, or one group's sampling; else (or for log-probabilities) its logits
        greedy = all(g.config.temperature == 0 for g in groups)
        logits = any(g.logprobs is not None for g in groups) or (
            not greedy and len(groups) > 1)
        sample = None
        if not greedy and not logits:
            g = groups[0]
            sample = (g.config.temperature, g.config.top_k or 0,
                      1.0 if g.config.top_p is None else g.config.top_p, g.generator)
        out = None if self.plan is None else self.plan.step(
            ids_R1, c, greedy and not logits, sample)
        logits_RV = None
        if out is None:
            logits_RV = self.model.infer(ids_R1, c)
        elif logits or out.dim() == 2:
            logits_RV, out = out, None
        self._pick(groups, rows_of, out, logits_RV)

    def _mixed(self, ids_R1: Tensor, fill: Fill) -> Tensor:
        """A decode step that carries the next ``prefill_chunk`` tokens of the cohort's
        prefill (padding counted): one pass, the experts read once for both
        (``MoETransformer.infer_pair``; two where the experts have a capacity). The decode
        rows' logits."""
        t0 = time.perf_counter()
        U, W = fill.ids_UL.shape
        n = min(W - fill.pos, max(1, self.prefill_chunk // U))
        chunk = fill.ids_UL[:, fill.pos:fill.pos + n]
        if self._dropless:
            logits_RV, fill.logits_UV = self.model.infer_pair(ids_R1, self.cache, chunk,
                                                              fill.cache)
        else:  # an expert's capacity counts the step's tokens: the two apart
            fill.logits_UV = self.model.infer(chunk, fill.cache)
            logits_RV = self.model.infer(ids_R1, self.cache)
        fill.pos += n
        self.prefill_steps += 1
        self._charge(fill, time.perf_counter() - t0)
        return logits_RV

    def _pick(self, groups: list[Group], rows_of: dict, out: Tensor | None,
              logits_RV: Tensor | None) -> None:
        """Each group's tokens of this step (``out``: picked by the plan; else from
        ``logits_RV``), appended; the rows that stopped leave."""
        stopped: set[int] = set()
        for g in groups:
            rows = rows_of[g]
            g.steps += 1
            if out is not None:
                tokens_S = out.index_select(0, torch.tensor(rows)) if len(groups) > 1 else out
                logits_SV = None
            else:
                logits_SV = logits_RV[rows] if len(groups) > 1 else logits_RV
                tokens_S = sample_next(logits_SV, g.config.temperature, g.config.top_k,
                                       g.config.top_p, g.generator)
            seqs = [self._seqs[r][1] for r in rows]
            done = self._take(g, seqs, tokens_S, logits_SV)
            for r, tok in zip(rows, tokens_S.tolist(), strict=True):
                self._next[r] = tok
                if self._seqs[r][1] in done:
                    stopped.add(r)
        if stopped:
            self._leave(stopped)

    def _take(self, group: Group, seqs: list[int], tokens_S: Tensor,
              logits_SV: Tensor | None) -> set[int]:
        """Append each sequence's new token; the sequences that stop with it."""
        if group.logprobs is not None:
            record_logprobs([group.gens[s] for s in seqs], logits_SV, tokens_S, group.logprobs)
        stops, stopped = group.stops, set()
        for s, tok in zip(seqs, tokens_S.tolist(), strict=True):
            gen = group.gens[s]
            gen.tokens.append(tok)
            if group.on_token is not None:
                group.on_token(s, tok)
            if stops.hit(gen.tokens) or (group.stop_when is not None
                                         and group.stop_when(s, gen.tokens)):
                gen.finish_reason = "stop"
                stopped.add(s)
            elif len(gen.tokens) == group.config.max_new_tokens:
                stopped.add(s)
        return stopped

    def _leave(self, stopped: set[int]) -> None:
        """Drop the stopped rows; finish the groups left with none; compact the cache once
        the rows' first slots have moved past half of it."""
        c = self.cache
        for r in sorted(stopped):
            g, i = self._seqs[r]
            self._remember(g, i, c, r)
        gone = {self._seqs[r][0] for r in stopped}
        self._drop(stopped)
        still = {g for g, _ in self._seqs}
        for g in gone - still:
            self._finish(g)
        if not self._seqs:
            return
        first = int(c.pad_B[:c.rows].min())
        if first and 2 * first >= c.length:
            c.shift(-first)
            self._ends = [e - first for e in self._ends]

    def _drop(self, rows: set[int]) -> None:
        """Take ``rows`` out of the batch: the cache's rows and the sequences' records (the
        cache empty once none is left)."""
        c = self.cache
        keep = [r for r in range(len(self._seqs)) if r not in rows]
        c.keep_rows(torch.tensor(keep, dtype=torch.long, device=c.slots_M.device))
        self._seqs = [self._seqs[r] for r in keep]
        self._next = [self._next[r] for r in keep]
        self._ends = [self._ends[r] for r in keep]
        if not self._seqs:
            c.length = 0

    def _finish(self, group: Group) -> None:
        gens = group.gens
        group.stats = GenerationStats(
            sequences=len(gens), prompt_tokens=sum(len(p) for p in group.ids),
            new_tokens=sum(len(g.tokens) for g in gens), decode_steps=group.steps,
            prefill_s=group.prefill_s, decode_s=time.perf_counter() - group.joined,
            reused_tokens=group.reused)
        group.done = True
        if group.on_done is not None:
            group.on_done(group)

    def _fail(self, groups: list[Group], error: BaseException) -> None:
        """End ``groups`` with ``error`` (their rows dropped)."""
        drop = {r for r, (g, _) in enumerate(self._seqs) if g in groups}
        if drop:
            self._drop(drop)
        for g in groups:
            g.error, g.done = error, True
            if g.on_done is not None:
                g.on_done(g)
