"""`moekit serve`'s generation side: ``Service`` holds the model, its text and a
``Batcher``; it checks requests (``moekit.inference.request``) and runs them together,
on the thread in ``Service.work`` (the server's main thread) or on the caller's, and
answers with the choices, usage and timings (``moekit.inference.response``); also what
``GET /metrics`` reports."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import torch

from moekit.inference.batcher import PREFILL_CHUNK, Batcher, Group, sequence_seed
from moekit.inference.engine import (
    Generation,
    routes_across_rows,
    token_logprobs,
)
from moekit.inference.request import Request, parse_request, reject_field
from moekit.inference.response import Choice, merged_stats, timing_fields, until_tool_call
from moekit.inference.text import ByteText, TokenizerText, cut_stream, cut_text, finish_reason

# sequences (prompts x n) one request may ask for unless --max-sequences says otherwise:
# lm-evaluation-harness' batches and n <= 64 fit; each sequence costs its prefill and a
# Generation held until the answer
DEFAULT_MAX_SEQUENCES = 2048
CLIENT_POLL_S = 0.25  # how often a waiting handler looks whether its client went away
# a sequence's new text and, with logprobs, its tokens' entries (Service.generate)
OnText = Callable[[int, str, "list[tuple] | None"], bool]
MAX_PARALLEL = 256  # sequences decoded together (--parallel)
DEFAULT_PARALLEL = 4  # as llama-server's slots


class _Job:
    """A request handed to the thread in ``Service.work``: its pieces of text come back
    through ``out`` ((i, (piece, entries)), then ("done", result) or ("error", exception))."""

    def __init__(self, request: Request, streams: bool) -> None:
        self.request = request
        self.streams = streams
        self.out: queue.Queue = queue.Queue()
        self.gone = False  # the client went away: set by the handler's thread
        self.groups: list[Group] = []  # in the batcher (set by the thread in work)
        self.cancelled = False  # its groups cancelled (once: the client went away)
        self.ended = 0  # groups[:ended] are done (``over``: each group looked at once)
        self.answered = False  # its result (or error) is in ``out``

    def over(self) -> bool:
        """Whether every group is done (amortized O(1) a call, checked every step)."""
        while self.ended < len(self.groups) and self.groups[self.ended].done:
            self.ended += 1
        return self.ended == len(self.groups)


class ShuttingDownError(Exception):
    """The server stops (SIGTERM or Ctrl-C) before this request's answer: a whole answer
    gets HTTP 503, a stream an error chunk and ``[DONE]``."""


class ClientGoneError(Exception):
    """``Service.generate``'s client went away before the answer: its sequences were
    cancelled (nothing to send)."""


class Service:
    """A model, its text and a ``Batcher``: what the HTTP handler calls. Requests run
    together, up to ``parallel`` sequences decoded per step: on the thread in ``work``
    where one runs, else one at a time on the caller's, under ``lock``."""

    def __init__(self, model, text: ByteText | TokenizerText, name: str,
                 context: int | None = None, parallel: int = DEFAULT_PARALLEL,
                 prefill_chunk: int = PREFILL_CHUNK,
                 kv_cache_dtype: torch.dtype | str | None = None,
                 max_sequences: int = DEFAULT_MAX_SEQUENCES) -> None:
        limit = model.config.max_seq_len
        if context is not None and (isinstance(context, bool) or not isinstance(context, int)
                                    or not 1 <= context <= limit):
            reject_field("context", context, f"it must be an int in [1, max_seq_len={limit}]")
        if isinstance(parallel, bool) or not isinstance(parallel, int) \
                or not 1 <= parallel <= MAX_PARALLEL:
            reject_field("parallel", parallel, f"it must be an int in [1, {MAX_PARALLEL}]")
        if parallel > 1 and routes_across_rows(model):
            reject_field("parallel", parallel, "it must be 1 for an expert-choice model: expert "
                    "choice routes over every token of a call, so one request's tokens "
                    "would change which experts another's get (serve it with --parallel 1)")
        self.context = limit if context is None else context  # prompt + new tokens
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) \
                or prefill_chunk < 1:
            reject_field("prefill_chunk", prefill_chunk, "it must be an int >= 1")
        if isinstance(max_sequences, bool) or not isinstance(max_sequences, int) \
                or max_sequences < 1:
            reject_field("max_sequences", max_sequences, "it must be an int >= 1")
        self.max_sequences = max_sequences  # prompts x n of one request
        self.model = model
        # a finished conversation per row kept for its next turn
        self.batcher = Batcher(model, parallel, self.context, prefix_entries=parallel,
                               prefill_chunk=prefill_chunk, kv_cache_dtype=kv_cache_dtype)
        self.text = text
        self.name = name
        self.lock = threading.Lock()
        self._jobs: queue.Queue | None = None
        # a request handed to work() is queued under it; where work() has ended (the
        # server stopping) none is taken
        self._submit = threading.Lock()
        self._closed = False
        # what /metrics counts (written by the thread that generates)
        self.counts = dict.fromkeys(("requests", "failed", "cancelled", "prompt_tokens",
                                     "completion_tokens"), 0)

    @property
    def parallel(self) -> int:
        return self.batcher.cache.batch

    def kv_bytes(self) -> int:
        """The shared KV cache's bytes (every row; resident as its slots fill)."""
        return self.batcher.kv_bytes

    def metrics(self) -> str:
        """``GET /metrics``: counters and gauges in Prometheus' text format (as vLLM's and
        llama-server's)."""
        b, c = self.batcher, self.batcher.cache
        rows = [("requests_total", "counter", "requests answered", self.counts["requests"]),
                ("requests_failed_total", "counter", "requests whose generation failed",
                 self.counts["failed"]),
                ("requests_cancelled_total", "counter", "requests stopped because their "
                 "client went away", self.counts["cancelled"]),
                ("prompt_tokens_total", "counter", "prompt tokens of answered requests",
                 self.counts["prompt_tokens"]),
                ("generated_tokens_total", "counter", "tokens generated for answered "
                 "requests", self.counts["completion_tokens"]),
                ("decode_steps_total", "counter", "decode steps run", b.decode_steps),
                ("sequences_running", "gauge", "sequences decoding now", b.running),
                ("requests_waiting", "gauge", "requests (groups) waiting to decode",
                 b.waiting),
                ("kv_cache_used_ratio", "gauge", "share of the shared KV cache's slots "
                 "the running sequences span", b.running * c.length / (c.batch * c.max_len)),
                ("kv_cache_bytes", "gauge", "bytes of the shared KV cache, every slot (in "
                 "its dtype, --kv-cache-dtype; resident as its slots fill)", b.kv_bytes),
                *_expert_cache_rows(getattr(b.model, "expert_offload", None))]
        return "".join(f"# HELP moekit_{name} {doc}\n# TYPE moekit_{name} {kind}\n"
                       f"moekit_{name} {value}\n" for name, kind, doc, value in rows)

    def work(self, stop: threading.Event) -> None:
        """Run every generation on this thread until ``stop`` is set (the thread that
        loaded the model: see the module docstring): take the requests that came, then
        one step of the batch."""
        with self._submit:
            self._jobs, self._closed = queue.Queue(), False
        live: list[_Job] = []  # the requests in the batcher
        try:
            while not stop.is_set():
                for job in live:  # a client that went away: its sequences stop
                    if job.gone and not job.cancelled:
                        job.cancelled = True
                        self._cancel(job.groups)
                live = [j for j in live if not j.over()]
                idle = not (self.batcher.running or self.batcher.waiting)
                try:
                    job = self._jobs.get(timeout=0.1) if idle else self._jobs.get_nowait()
                except queue.Empty:
                    job = None
                if job is not None:
                    self._start(job)
                    live.append(job)
                elif not idle:
                    self.batcher.step()
        finally:
            self._stopped(live)

    def _stopped(self, live: list[_Job]) -> None:
        """work() ends: the requests not answered (running or queued) end with
        ``ShuttingDownError``; later ones are refused with it."""
        with self._submit:
            self._closed = True
            jobs, self._jobs = self._jobs, None
        while True:
            try:
                live.append(jobs.get_nowait())
            except queue.Empty:
                break
        for job in live:
            if not job.answered:
                job.answered = True
                job.out.put(("error", ShuttingDownError("the server is shutting down")))

    def _start(self, job: _Job) -> None:
        def on_text(i: int, piece: str, entries: list[tuple] | None) -> bool:
            job.out.put((i, (piece, entries)))
            return not job.gone

        def done(result: tuple | BaseException) -> None:
            job.answered = True
            job.out.put(("error", result) if isinstance(result, BaseException)
                        else ("done", result))

        try:
            job.groups = self._open(job.request, on_text if job.streams else None, done)
        except Exception as e:  # noqa: BLE001 (handed to the request's thread)
            done(e)

    def parse(self, body: object, chat: bool) -> Request:
        """The request ``body`` checked (every field before anything runs)."""
        return parse_request(body, chat, self.text, self.model, self.context,
                             self.max_sequences)

    def generate(self, request: Request, on_text: OnText | None = None,
                 client_gone: Callable[[], bool] | None = None
                 ) -> tuple[list[Choice], dict, dict]:
        """The choices, the usage and the timings (``timing_fields``). ``on_text(i, piece,
        entries)`` gets each sequence's new text as it is produced (what the answer holds:
        cut before a stop string) and, with ``request.logprobs``, the (token,
        log-probability, most likely tokens) entries of the tokens since the last piece
        (else None; the last call may have an empty piece: tokens whose text was cut),
        on the caller's thread; where it returns False (the client is gone) every
        sequence stops. With the thread in ``work``, ``client_gone()`` is asked every
        ``CLIENT_POLL_S`` while the answer is not done: once it says True the request's
        sequences are cancelled (waiting ones never prefilled) and ``ClientGoneError`` is
        raised."""
        with self._submit:
            if self._closed:
                raise ShuttingDownError("the server is shutting down")
            jobs = self._jobs
            if jobs is not None:
                job = _Job(request, on_text is not None)
                jobs.put(job)
        if jobs is None:  # no thread in work(): run it here, alone
            out: list = []
            with self.lock:
                for group in self._open(request, on_text, out.append):
                    self.batcher.run(group)
            if isinstance(out[0], BaseException):
                raise out[0]
            return out[0]
        polled = False  # whether client_gone said so
        while True:
            try:
                kind, value = job.out.get(timeout=CLIENT_POLL_S)
            except queue.Empty:
                if client_gone is not None and not job.gone and client_gone():
                    job.gone = polled = True
                continue
            if kind == "done":
                if polled:
                    raise ClientGoneError("the client went away")
                return value
            if kind == "error":
                raise value
            if not job.gone and not on_text(kind, *value):
                job.gone = True

    def _open(self, request: Request, on_text: OnText | None,
              done: Callable[[tuple | BaseException], None]) -> list[Group]:
        """Submit ``request`` to the batcher (its groups; none where nothing is generated:
        an echoed prompt scored); ``done`` gets ``generate``'s result, or the exception,
        once it ends."""
        return _Submission(self, request, on_text, done).submit()

    def _cancel(self, groups) -> None:
        """Cancel ``groups`` (``Batcher.cancel``: those done are left alone)."""
        for g in list(groups):
            self.batcher.cancel(g)

    def _result(self, request: Request, gens: list[Generation], stats, start: float
                ) -> tuple[list[Choice], dict, dict]:
        text, stops = self.text, request.stops
        # each prompt scored once, not once per sample (request.ids repeats it n times)
        scored = [self._score_prompt(p, request.logprobs or 0)
                  for p in request.ids[::request.n]] \
            if request.echo and request.logprobs is not None else None
        seconds = time.perf_counter() - start
        choices = []
        for i, (p, g) in enumerate(zip(request.ids, gens, strict=True)):
            whole = text.decode_after(p, g.tokens)
            new = cut_text(whole, stops, False)
            logprobs = None
            if request.logprobs is not None:
                logprobs = ([] if scored is None else scored[i // request.n]) + list(
                    zip(g.tokens, g.logprobs, g.top_logprobs, strict=True))
            choices.append(Choice(text.decode(p) + new if request.echo else new,
                                  finish_reason(g.finish_reason, whole, stops),
                                  len(g.tokens), logprobs))
        completion = sum(c.tokens for c in choices)
        prompt = sum(len(p) for p in request.ids[::request.n])
        return choices, {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}, timing_fields(stats, seconds)

    @torch.inference_mode()
    def _score_prompt(self, ids: list[int], top: int) -> list[tuple]:
        """(token, log-probability given the tokens before it, the ``top`` most likely
        there) for each prompt token; the first has none (None, None)."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            logits = model(torch.tensor([ids])).logits[0, :-1]
        finally:
            model.train(was_training)
        chosen, tops = token_logprobs(logits, torch.tensor(ids[1:]), top)
        return [(ids[0], None, None), *zip(ids[1:], chosen, tops, strict=True)]


class _Submission:
    """One request in the batcher (``Service._open``): its sequences' streamed text, its
    groups as they end, and its answer (``done``) once all are done or one failed."""

    def __init__(self, service: Service, request: Request, on_text: OnText | None,
                 done: Callable[[tuple | BaseException], None]) -> None:
        self.service, self.request, self.on_text, self.done = service, request, on_text, done
        text, stops = service.text, request.stops
        self.start = time.perf_counter()
        # the streamed text of each sequence (none to build for a whole answer)
        self.emits = [] if on_text is None else [
            cut_stream(text.stream(p), stops, keep_stop=False) for p in request.ids]
        if request.tools:
            self.emits = [until_tool_call(e) for e in self.emits]
        self.gone = False  # on_text said the client went away
        self.by_text = text.stop_in_text(stops)
        # with logprobs: each sequence's tokens not yet sent with a piece of text
        self.pending: list[list[tuple]] | None = None if request.logprobs is None else [
            [] for _ in request.ids]
        self.groups: dict[int, Group] = {}  # by their first sequence's index
        self.ended: dict[int, Group] = {}
        self.starts = range(0)  # the groups' first sequences (submit sets them)
        self.failed = False  # a group failed: the request was answered with its error

    def submit(self) -> list[Group]:
        """The request's groups, submitted. More sequences than rows: groups of at most
        --parallel, the j-th (j > 0) drawing from a generator of its own
        (sequence_seed(seed, j)); answered once all are done."""
        request = self.request
        if request.config is None:  # echo with max_tokens 0: the prompts scored alone
            self._finish([Generation(prompt=p, logprobs=[], top_logprobs=[])
                          for p in request.ids], None)
            return []
        size = self.service.parallel
        self.starts = range(0, len(request.ids), size)
        try:
            for j, o in enumerate(self.starts):  # (no step runs before submit returns)
                self.groups[o] = self.service.batcher.submit(
                    request.ids[o:o + size], request.config if j == 0 else
                    dataclasses.replace(request.config,
                                        seed=sequence_seed(request.config.seed, j)),
                    on_token=None if self.on_text is None else (
                        lambda i, t, o=o: self._on_token(o, i, t)),
                    stop_when=lambda i, t, o=o: self._stop_when(o + i, t),
                    logprobs=request.logprobs, on_done=lambda g, o=o: self._part_done(o, g))
        except BaseException:  # the groups queued before it would run for no answer
            self.failed = True
            self.service._cancel(self.groups.values())
            raise
        return list(self.groups.values())

    def _counted(self, result: tuple | BaseException) -> None:
        """``done``, counted for /metrics."""
        counts = self.service.counts
        if isinstance(result, BaseException):
            counts["failed"] += 1
        else:
            usage = result[1]
            # (a failed streamed send may stop the sequences before a cancel does)
            cancelled = self.gone or any(c.finish_reason == "cancelled" for c in result[0])
            counts["cancelled" if cancelled else "requests"] += 1
            counts["prompt_tokens"] += usage["prompt_tokens"]
            counts["completion_tokens"] += usage["completion_tokens"]
        self.done(result)

    def _send(self, i: int, piece: str) -> None:
        entries = None if self.pending is None else self.pending[i]
        if (piece or entries) and not self.gone:
            if self.pending is not None:
                self.pending[i] = []
            if not self.on_text(i, piece, entries):
                self.gone = True

    def _on_token(self, o: int, i: int, tok: int) -> None:
        if self.pending is not None:  # the batcher recorded them before calling this
            g = self.groups[o].gens[i]
            self.pending[o + i].append((tok, g.logprobs[-1], g.top_logprobs[-1]))
        self._send(o + i, self.emits[o + i](tok))

    def _stop_when(self, i: int, tokens: list[int]) -> bool:
        return self.gone or (self.by_text is not None
                             and self.by_text(self.request.ids[i], tokens))

    def _finish(self, gens: list[Generation], stats) -> None:
        try:
            if self.on_text is not None:
                for i in range(len(gens)):
                    self._send(i, self.emits[i](None))
            self._counted(self.service._result(self.request, gens, stats, self.start))
        except Exception as e:  # noqa: BLE001 (answered as the generation's failure)
            self._counted(e)

    # O(1) per group: a flag, not a scan of the groups ended so far (the scan made
    # cancelling 12,800 groups take 11.4 s, every other request waiting)
    def _part_done(self, o: int, g: Group) -> None:
        self.ended[o] = g
        if self.failed:
            return
        if g.error is not None:
            self.failed = True
            # the request is answered with this error: its other groups stop as a
            # gone client's do (they went on prefilling and decoding for no one)
            self.service._cancel(self.groups.values())
            self._counted(g.error)
        elif len(self.ended) == len(self.starts):
            self._finish([gen for o in self.starts for gen in self.ended[o].gens],
                         merged_stats([self.ended[o].stats for o in self.starts]))


def _expert_cache_rows(offload) -> list[tuple[str, str, str, float]]:
    """/metrics rows of an offloaded model's expert cache (--expert-memory); none for a
    resident model. Its statistics had been printed only when the server stopped."""
    if offload is None:
        return []
    st, cache = offload.stats, offload.cache
    return [("expert_cache_requests_total", "counter", "experts the MoE layers asked the "
             "expert cache for", st.total("requests")),
            ("expert_cache_hits_total", "counter", "of those, found cached (read and ready)",
             st.total("hits")),
            ("expert_cache_loads_total", "counter", "experts read from the checkpoint "
             "(on demand and prefetched)", st.total("loads")),
            ("expert_cache_read_bytes_total", "counter", "bytes read from the checkpoint "
             "for them", st.total("bytes_loaded")),
            ("expert_cache_wait_seconds_total", "counter", "seconds steps waited for "
             "expert reads", st.total("wait_s")),
            ("expert_cache_used_bytes", "gauge", "bytes of the experts cached now",
             cache.used),
            ("expert_cache_budget_bytes", "gauge", "the expert cache's budget "
             "(--expert-memory)", cache.budget)]
