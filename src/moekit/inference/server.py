"""`moekit serve`: a checkpoint behind an OpenAI-compatible HTTP API.

    moekit serve --checkpoint runs/train-int4 --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "def ", "max_tokens": 32}'

Endpoints: ``POST /v1/completions`` (a prompt or a list of prompts: text, or token ids
as lists of ints), ``POST /v1/chat/completions`` (messages rendered by the tokenizer's
chat template: a converted checkpoint's), ``GET /v1/models`` (and ``/v1/models/{id}``),
``GET /health``, ``GET
/metrics`` (Prometheus' text format: requests, tokens, decode steps, running and waiting
sequences, KV cache use). Both POSTs stream with ``"stream": true`` (server-sent events,
``data: [DONE]`` last; ``stream_options.include_usage`` adds a usage chunk). Fields as
OpenAI's API reads them: ``max_tokens`` (completions: 16; chat: the rest of the served
context; ``max_completion_tokens`` too), ``temperature`` (1.0; 0 greedy), ``top_p``,
``top_k`` (an extension, as vLLM's), ``stop`` (a string or a list: the text ends before
it), ``seed`` (random where absent), ``n`` (samples per prompt), ``stream``,
``logprobs`` (completions: the N most likely tokens too, N <= 20; chat: ``logprobs:
true`` and ``top_logprobs``: each token's log-probability under the model, before
temperature and top-k / top-p; streamed chunks carry those of the tokens their text came
from), ``echo`` (completions: the prompt first in the text and, with ``logprobs``, its
tokens' log-probabilities, the first one null; ``max_tokens: 0`` then scores the prompt
alone, as lm-evaluation-harness asks).
Chat completions take ``tools`` (rendered by the chat template) and answer a reply's
``<tool_call>`` blocks (the Hermes format Qwen's templates ask for) as ``tool_calls``
(``parse_tool_calls``; streamed: the text before the first call as it is produced, the
calls in one ``tool_calls`` delta once the reply is done). Fields that would change the
answer in ways moekit does not implement (penalties, ``logit_bias``, ``best_of``,
``suffix``, ...) are refused by name unless they hold their no-op value; the ``model``
field is not checked (one model is served).

Requests are batched continuously (``Batcher``): up to ``--parallel`` sequences (every
request's prompts x samples) decode together, each step one token for each of them; a
request joins between steps once its prompt is prefilled and leaves as its sequences
stop, so concurrent clients share the weight reads of each step; one request may ask for
at most ``--max-sequences`` sequences (prompts x n; 400 past it). A conversation
continued from a finished single-sequence request prefills only its new tokens (the last
``--parallel`` conversations are kept). A client that disconnects, streamed or not, has
its sequences cancelled (``Batcher.cancel``; one waiting for a row is never prefilled):
the handler looks every ``CLIENT_POLL_S`` (a client that shuts down its sending side
after the request counts as gone, as a closed connection reads the same). Where one
group of a request fails, the request is answered with its error and its other groups
are cancelled alike. ``--api-key`` (or ``MOEKIT_API_KEY``) makes every /v1/ request
carry ``Authorization: Bearer KEY`` (401 otherwise). A body comes with its
Content-Length or chunked (``http_body``: 16 MiB at most). Bad input gets HTTP 400 with
an OpenAI-style error naming the field, before anything is generated. SIGTERM or Ctrl-C
stops the server between decode steps: no new requests; those not answered end (HTTP
503, or a stream's error chunk then ``data: [DONE]``), the handler threads are joined
(``SHUTDOWN_S`` at most) and the process exits 0; a second signal exits at once
(``Stopper``).

``moekit serve`` runs the generations on its main thread (``Service.work``), the HTTP
handlers on others: torch's OpenMP regions ran 3-6x slower from a second thread once the
main thread had run any (a 128-token generation of a small model: 37-50 ms on the main
thread, 210-290 ms from a handler thread; 2,000 small matmuls 79-93 ms against 237-255
ms; `/tmp` scripts, the Intel VM, 2026-12-06).
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import json
import math
import os
import queue
import secrets
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import torch

from moekit.config import MAX_SEED, is_number_in, reject
from moekit.inference.batcher import PREFILL_CHUNK, Batcher, Group, sequence_seed
from moekit.inference.engine import (
    MAX_LOGPROBS,
    ContextLengthError,
    Generation,
    GenerationConfig,
    GenerationStats,
    checked_prompts,
    routes_across_rows,
    token_logprobs,
)
from moekit.inference.http_body import BodyError, DeadlineReader, read_body
from moekit.inference.text import ByteText, TokenizerText, cut_stream, cut_text, token_label

MAX_BODY = 16 << 20  # bytes of a request body
MAX_N = 64  # samples per prompt
# sequences (prompts x n) one request may ask for unless --max-sequences says otherwise:
# lm-evaluation-harness' batches and n <= 64 fit; each sequence costs its prefill and a
# Generation held until the answer
DEFAULT_MAX_SEQUENCES = 2048
SHUTDOWN_S = 5.0  # how long a stopping server waits for its handlers to finish answering
CLIENT_POLL_S = 0.25  # how often a waiting handler looks whether its client went away
# seconds from a request's first byte for all of it (line, headers, body) to arrive before
# the connection closes with 408, and an idle keep-alive connection's wait for its next
# request (--request-timeout); the response is written with no timeout
DEFAULT_REQUEST_TIMEOUT_S = 60.0
# a sequence's new text and, with logprobs, its tokens' entries (Service.generate)
OnText = Callable[[int, str, "list[tuple] | None"], bool]
MAX_PARALLEL = 256  # sequences decoded together (--parallel)
DEFAULT_PARALLEL = 4  # as llama-server's slots
DEFAULT_CONTEXT = 4096  # tokens a request may use unless --context says otherwise
# fields that change nothing at these values (clients send them by default)
NO_OP = {"presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
         "repetition_penalty": (None, 1, 1.0), "best_of": (None, 1), "logit_bias": (None, {}),
         "suffix": (None, ""), "response_format": (None, {"type": "text"}),
         "parallel_tool_calls": (None, True, False)}
READ = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
        "top_p", "top_k", "stop", "seed", "n", "stream", "stream_options", "user", "logprobs",
        "top_logprobs", "echo", "tools", "tool_choice"}
# the POST paths (whether chat) and the GET ones (and /v1/models/{id})
POSTS = {"/v1/completions": False, "/v1/chat/completions": True}
GETS = ("/health", "/v1/health", "/metrics", "/v1/models")
# what a message may carry besides its role and content (the chat template reads them)
MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name")


class RequestError(ValueError):
    """A request the server refuses (HTTP 400), naming the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _reject(param: str, value: object, allowed: str) -> None:
    raise RequestError(param, f"{param}={value!r} is not allowed: {allowed}")


def _number(body: dict, name: str, default, kind: type, low: float, high: float | None = None):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (
        kind is float or isinstance(value, int)) and value >= low and (high is None
                                                                        or value <= high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        _reject(name, value, f"it must be {'a number' if kind is float else 'an integer'} "
                f"{bound}")
    return kind(value)


def _strings(name: str, value: object, allow_empty: bool) -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(s, str) and (s or allow_empty) for s in items):
        _reject(name, value, "it must be a string or a non-empty list of strings"
                + ("" if allow_empty else ", none of them empty"))
    return items


def _prompts(text: ByteText | TokenizerText, value: object) -> list[list[int]]:
    """``prompt`` as token ids: a string, a list of strings, a list of token ids or a list
    of such lists (as OpenAI's API takes them)."""
    def ids(x: object) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x)

    if ids(value):
        return [value]
    if isinstance(value, list) and value and all(ids(x) for x in value):
        return value
    if isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        _reject("prompt", value, "a list of token-id lists must hold non-empty lists of ints")
    return [text.encode(p) for p in _strings("prompt", value, False)]


def _content(i: int, content: object) -> str:
    """A message's text: a string, or a list of text parts (as newer clients send); none
    (an assistant's message that only calls tools) is empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    _reject(f"messages[{i}].content", content, "it must be a string or a list of "
            "{\"type\": \"text\", \"text\": ...} parts")


@dataclass(frozen=True)
class Request:
    """A checked request: the prompts' ids (each repeated n times), the generation config,
    the stop strings, and how to answer."""

    chat: bool
    ids: list[list[int]]
    n: int
    config: GenerationConfig | None  # None: echo with max_tokens 0 (the prompt scored)
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # the most likely tokens per position; None: none asked
    echo: bool = False
    tools: bool = False  # the reply's tool calls parsed (chat with tools)


@dataclass
class Choice:
    text: str
    finish_reason: str
    tokens: int
    # with logprobs: per token (the echoed prompt's first), its id, log-probability
    # (None: the prompt's first token) and the most likely (id, log-probability) there
    logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] | None = None


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
            _reject("context", context, f"it must be an int in [1, max_seq_len={limit}]")
        if isinstance(parallel, bool) or not isinstance(parallel, int) \
                or not 1 <= parallel <= MAX_PARALLEL:
            _reject("parallel", parallel, f"it must be an int in [1, {MAX_PARALLEL}]")
        if parallel > 1 and routes_across_rows(model):
            _reject("parallel", parallel, "it must be 1 for an expert-choice model: expert "
                    "choice routes over every token of a call, so one request's tokens "
                    "would change which experts another's get (serve it with --parallel 1)")
        self.context = limit if context is None else context  # prompt + new tokens
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) \
                or prefill_chunk < 1:
            _reject("prefill_chunk", prefill_chunk, "it must be an int >= 1")
        if isinstance(max_sequences, bool) or not isinstance(max_sequences, int) \
                or max_sequences < 1:
            _reject("max_sequences", max_sequences, "it must be an int >= 1")
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
        if not isinstance(body, dict):
            _reject("body", type(body).__name__, "it must be a JSON object")
        unknown = sorted(k for k in body if k not in READ and k not in NO_OP)
        if unknown:
            _reject(unknown[0], body[unknown[0]], "moekit serve does not read this field")
        other = "prompt" if chat else "messages"  # the other endpoint's
        if other in body:
            _reject(other, body[other], f"{other} is for /v1/{'' if chat else 'chat/'}"
                    f"completions; this endpoint takes {'messages' if chat else 'prompt'}")
        for key, values in NO_OP.items():
            if key in body and not any(type(body[key]) is type(v) and body[key] == v
                                       for v in values):
                _reject(key, body[key], "moekit serve supports only its no-op value"
                        + ("s " if len(values) > 1 else " ")
                        + ", ".join(json.dumps(v) for v in values))
        text = self.text
        if chat:
            if not isinstance(text, TokenizerText):
                raise RequestError("messages", "chat completions need a tokenizer with a chat "
                                   "template (a converted checkpoint's); this model reads "
                                   "UTF-8 bytes: use /v1/completions")
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                _reject("messages", messages, "it must be a non-empty list of objects with "
                        "a \"role\" and a \"content\"")
            convo = [{"role": m["role"], "content": _content(i, m.get("content")),
                      **{k: m[k] for k in MESSAGE_KEYS if k in m}}
                     for i, m in enumerate(messages)]
            tools = _tools(body)
            try:
                prompts = [text.encode_messages(convo, tools)]
            except ValueError as e:
                raise RequestError("messages", str(e)) from None
        else:
            for key in ("tools", "tool_choice"):
                if body.get(key) is not None:
                    _reject(key, body[key], "tools are for chat completions")
            tools = None
            prompts = _prompts(text, body.get("prompt"))
        n = _number(body, "n", 1, int, 1, MAX_N)
        if len(prompts) * n > self.max_sequences:
            raise RequestError("n" if n > 1 else "prompt", (
                f"{len(prompts)} prompts x n={n} = {len(prompts) * n} sequences is more "
                f"than one request may ask for here, {self.max_sequences} (moekit serve "
                "--max-sequences): send fewer prompts or samples per request"))
        logprobs, echo = _logprob_fields(body, chat)
        longest = max(len(p) for p in prompts)
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        default = max(self.context - longest, 1) if chat else 16
        max_tokens = _number(body, name, default, int, 0 if echo else 1)
        self._check_context(longest, max_tokens, name, body.get(name) is not None,
                            "messages" if chat else "prompt")
        stop = body.get("stop")  # [] as none, as OpenAI's and vLLM's
        stops = () if stop is None or stop == [] else tuple(_strings("stop", stop, False))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            _reject("stream", stream, "it must be true or false")
        if stream and echo:
            _reject("echo", True, "moekit serve echoes prompts only with stream false")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False),
                                                           bool):
            _reject("stream_options", options, "it must be an object whose include_usage is "
                    "true or false")
        seed = body.get("seed")
        try:
            config = GenerationConfig(
                max_new_tokens=max(max_tokens, 1),
                temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
                top_k=_number(body, "top_k", None, int, 1),
                top_p=_number(body, "top_p", None, float, 0.0, 1.0),
                stop_ids=text.stop_ids, stop_sequences=text.stop_sequences(stops),
                seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed)
            try:
                checked_prompts(self.model, prompts, config)  # (its errors index the prompts)
            except ContextLengthError:  # (checked above: echo's max_tokens 0 fills it all)
                if max_tokens:
                    raise
        except ValueError as e:  # the config's and the engine's errors, in the API's names
            message = str(e).replace("max_new_tokens", name).replace("prompts[", "prompt[")
            raise RequestError(_param(message, name), message) from None
        ids = [p for p in prompts for _ in range(n)]
        return Request(chat, ids, n, config if max_tokens else None, stops, stream,
                       options.get("include_usage", False), logprobs, echo, bool(tools))

    def _check_context(self, longest: int, new: int, name: str, sent: bool,
                       field: str) -> None:
        """Refuse a request past the served context: naming the prompt's field where the
        prompt alone leaves no room (for a new token; with echo and ``max_tokens: 0``, for
        itself), else ``name`` (the field that asks for ``new`` tokens)."""
        limit = self.model.config.max_seq_len
        where = (f"the served context of {self.context} tokens (moekit serve --context)"
                 if self.context < limit else f"the model's context, max_seq_len={limit}")
        room = self.context - longest
        if room < min(new, 1):
            raise RequestError(field, (
                f"{field}: a prompt of {longest} tokens is longer than {where}" if not new
                else f"{field}: a prompt of {longest} tokens leaves no room in {where} for "
                "a new token: send a shorter prompt"))
        if new > room:
            default = "" if sent else f" ({name} was not sent: {new} is its default)"
            if self.context < limit:
                _reject(name, new, f"a prompt of {longest} tokens + {name} must fit the "
                        f"served context of {self.context} tokens (moekit serve --context; "
                        f"use at most {room}){default}")
            _reject(name, new, f"generating past the model's context, max_seq_len={limit} "
                    f"(a prompt of {longest} tokens leaves room for at most {room}){default}")

    def generate(self, request: Request, on_text: OnText | None = None,
                 client_gone: Callable[[], bool] | None = None
                 ) -> tuple[list[Choice], dict, dict]:
        """The choices, the usage and the timings (``_timings``). ``on_text(i, piece,
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
        text, stops = self.text, request.stops
        start = time.perf_counter()

        def counted(result: tuple | BaseException) -> None:  # done, counted for /metrics
            if isinstance(result, BaseException):
                self.counts["failed"] += 1
            else:
                usage = result[1]
                # (a failed streamed send may stop the sequences before a cancel does)
                cancelled = gone or any(c.finish_reason == "cancelled" for c in result[0])
                self.counts["cancelled" if cancelled else "requests"] += 1
                self.counts["prompt_tokens"] += usage["prompt_tokens"]
                self.counts["completion_tokens"] += usage["completion_tokens"]
            done(result)

        # the streamed text of each sequence (none to build for a whole answer)
        emits = [] if on_text is None else [cut_stream(text.stream(p), stops, keep_stop=False)
                                            for p in request.ids]
        if request.tools:
            emits = [_until_tool_call(e) for e in emits]
        gone = False
        by_text = text.stop_when(stops)
        # with logprobs: each sequence's tokens not yet sent with a piece of text
        pending: list[list[tuple]] | None = None if request.logprobs is None else [
            [] for _ in request.ids]
        groups: dict[int, Group] = {}  # by their first sequence's index

        def send(i: int, piece: str) -> None:
            nonlocal gone
            entries = None if pending is None else pending[i]
            if (piece or entries) and not gone:
                if pending is not None:
                    pending[i] = []
                if not on_text(i, piece, entries):
                    gone = True

        def on_token(o: int, i: int, tok: int) -> None:
            if pending is not None:  # the batcher recorded them before calling this
                g = groups[o].gens[i]
                pending[o + i].append((tok, g.logprobs[-1], g.top_logprobs[-1]))
            send(o + i, emits[o + i](tok))

        def stop_when(i: int, tokens: list[int]) -> bool:
            return gone or (by_text is not None and by_text(i, tokens))

        def finish(gens: list[Generation], stats) -> None:
            try:
                if on_text is not None:
                    for i in range(len(gens)):
                        send(i, emits[i](None))
                counted(self._result(request, gens, stats, start))
            except Exception as e:  # noqa: BLE001 (answered as the generation's failure)
                counted(e)

        if request.config is None:  # echo with max_tokens 0: the prompts scored alone
            finish([Generation(prompt=p, logprobs=[], top_logprobs=[]) for p in request.ids],
                   None)
            return []
        # more sequences than rows: groups of at most --parallel, the j-th (j > 0) drawing
        # from a generator of its own (sequence_seed(seed, j)); answered once all are done
        size = self.parallel
        starts = range(0, len(request.ids), size)
        ended: dict[int, Group] = {}
        failed = False  # a group failed: the request was answered with its error

        # O(1) per group: a flag, not a scan of the groups ended so far (the scan made
        # cancelling 12,800 groups take 11.4 s, every other request waiting)
        def part_done(o: int, g: Group) -> None:
            nonlocal failed
            ended[o] = g
            if failed:
                return
            if g.error is not None:
                failed = True
                # the request is answered with this error: its other groups stop as a
                # gone client's do (they went on prefilling and decoding for no one)
                self._cancel(groups.values())
                counted(g.error)
            elif len(ended) == len(starts):
                finish([gen for o in starts for gen in ended[o].gens],
                       _merged([ended[o].stats for o in starts]))

        try:
            for j, o in enumerate(starts):  # (no step runs before submit returns)
                groups[o] = self.batcher.submit(
                    request.ids[o:o + size], request.config if j == 0 else
                    dataclasses.replace(request.config,
                                        seed=sequence_seed(request.config.seed, j)),
                    on_token=None if on_text is None else (
                        lambda i, t, o=o: on_token(o, i, t)),
                    stop_when=lambda i, t, o=o: stop_when(o + i, t),
                    logprobs=request.logprobs, on_done=lambda g, o=o: part_done(o, g))
        except BaseException:  # the groups queued before it would run for no answer
            failed = True
            self._cancel(groups.values())
            raise
        return list(groups.values())

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
            new = cut_text(text.decode_after(p, g.tokens), stops, False)
            logprobs = None
            if request.logprobs is not None:
                logprobs = ([] if scored is None else scored[i // request.n]) + list(
                    zip(g.tokens, g.logprobs, g.top_logprobs, strict=True))
            choices.append(Choice(text.decode(p) + new if request.echo else new,
                                  g.finish_reason, len(g.tokens), logprobs))
        completion = sum(c.tokens for c in choices)
        prompt = sum(len(p) for p in request.ids[::request.n])
        return choices, {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}, _timings(stats, seconds)

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


def _tools(body: dict) -> list[dict] | None:
    """The request's function tools for the chat template (None: none, or
    ``tool_choice: "none"``); "required" or a named function is not supported."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        _reject("tool_choice", choice, "moekit serve supports \"auto\" and \"none\" (the "
                "model decides; nothing forces a call)")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        _reject("tools", tools, "it must be a list of {\"type\": \"function\", \"function\": "
                "{\"name\": ..., \"parameters\": ...}}")
    return None if choice == "none" else tools


def _until_tool_call(emit: Callable[[int | None], str]) -> Callable[[int | None], str]:
    """A streamed reply to a request with tools: its text before the first
    ``<tool_call>``, trailing whitespace held (the parsed content strips it); what is left,
    and the calls, the handler sends once the whole reply is parsed (``_stream``)."""
    cut = cut_stream(emit, ("<tool_call>",), keep_stop=False)
    held = ""

    def out(t: int | None) -> str:
        nonlocal held
        if t is None:
            return ""
        text = held + cut(t)
        body = text.rstrip()
        held = text[len(body):]
        return body

    return out


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text outside tool calls, the calls) of a reply that writes each call as
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes format Qwen's
    chat templates ask for); a block that is not such JSON stays in the text."""
    calls, kept, at = [], [], 0
    while (start := text.find("<tool_call>", at)) >= 0:
        end = text.find("</tool_call>", start)
        if end < 0:
            break
        try:
            call = json.loads(text[start + len("<tool_call>"):end])
        except json.JSONDecodeError:
            call = None
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            args = call.get("arguments", {})
            calls.append({"id": "call_" + secrets.token_hex(12), "type": "function",
                          "function": {"name": call["name"], "arguments": args
                                       if isinstance(args, str) else json.dumps(args)}})
            kept.append(text[at:start])
        else:
            kept.append(text[at:end + len("</tool_call>")])
        at = end + len("</tool_call>")
    kept.append(text[at:])
    return "".join(kept).strip() if calls else text, calls


def _merged(stats: list[GenerationStats]) -> GenerationStats:
    """The stats of a request's groups as one: counts and prefill time summed; its decode
    time and steps the longest group's."""
    longest = max(stats, key=lambda s: s.decode_s)
    return GenerationStats(
        sequences=sum(s.sequences for s in stats), prompt_tokens=sum(s.prompt_tokens
                                                                     for s in stats),
        new_tokens=sum(s.new_tokens for s in stats), decode_steps=longest.decode_steps,
        prefill_s=sum(s.prefill_s for s in stats), decode_s=longest.decode_s,
        reused_tokens=sum(s.reused_tokens for s in stats))


def _timings(stats, seconds: float) -> dict:
    """Where a request's time went (as llama-server's ``timings``): the engine's prefill
    and decode, the prompt tokens its cache already held, tokens per second of decode."""
    if stats is None:  # the prompts scored, nothing generated
        return {"seconds": seconds}
    return {"seconds": seconds, "prompt_tokens": stats.prompt_tokens,
            "cached_tokens": stats.reused_tokens, "prefill_ms": 1e3 * stats.prefill_s,
            "new_tokens": stats.new_tokens, "decode_ms": 1e3 * stats.decode_s,
            "decode_tokens_per_s": stats.decode_steps / max(stats.decode_s, 1e-9),
            "tokens_per_s": stats.new_tokens / max(seconds, 1e-9)}


def _logprob_fields(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(how many most likely tokens to give per position, None: no log-probabilities;
    echo): completions' ``logprobs: N`` and ``echo``, chat's ``logprobs: true`` and
    ``top_logprobs: N``."""
    if chat:
        if body.get("echo") not in (None, False):
            _reject("echo", body["echo"], "chat completions do not echo (completions do)")
        wants = body.get("logprobs")
        if wants is not None and not isinstance(wants, bool):
            _reject("logprobs", wants, "for chat completions it must be true or false (how "
                    "many likely tokens: top_logprobs)")
        top = _number(body, "top_logprobs", None, int, 0, MAX_LOGPROBS)
        if top is not None and not wants:
            _reject("top_logprobs", top, "it needs logprobs: true")
        return (top or 0) if wants else None, False
    if body.get("top_logprobs") is not None:
        _reject("top_logprobs", body["top_logprobs"], "completions take logprobs: N (chat "
                "completions take top_logprobs)")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        _reject("echo", echo, "it must be true or false")
    return _number(body, "logprobs", None, int, 0, MAX_LOGPROBS), echo


def _param(message: str, max_name: str) -> str:
    """The request field a config or engine error is about."""
    for field, param in ((max_name, max_name), ("temperature", "temperature"),
                         ("top_k", "top_k"), ("top_p", "top_p"), ("seed", "seed"),
                         ("stop", "stop"), ("prompt[", "prompt")):
        if field in message:
            return param
    return "body"


def _answer(service: Service, request: Request, rid: str, created: int,
            choices: list[Choice], usage: dict) -> dict:
    head = {"id": rid, "created": created, "model": service.name}
    token = _labeller(service)
    if request.chat:
        out = []
        for i, c in enumerate(choices):
            message = _message(c.text, request.tools)
            out.append({"index": i, "message": message, "finish_reason": "tool_calls"
                        if "tool_calls" in message else c.finish_reason,
                        "logprobs": None if c.logprobs is None
                        else _chat_logprobs(c.logprobs, token)})
        return {**head, "object": "chat.completion", "usage": usage, "choices": out}
    return {**head, "object": "text_completion", "usage": usage, "choices": [
        {"index": i, "text": c.text, "finish_reason": c.finish_reason,
         "logprobs": None if c.logprobs is None
         else _completion_logprobs(c.logprobs, token)[0]}
        for i, c in enumerate(choices)]}


def _labeller(service: Service) -> Callable[[int], tuple[str, bytes]]:
    """A token id's label (its text, or ``bytes:\\xNN`` for part of a character) and bytes."""
    def token(t: int) -> tuple[str, bytes]:
        raw = service.text.token_bytes(t)
        return token_label(raw), raw

    return token


def _chat_logprobs(entries: list[tuple], token: Callable[[int], tuple[str, bytes]]) -> dict:
    """Chat's ``logprobs`` object: each token's entry with the most likely tokens there."""
    return {"refusal": None, "content": [
        {**_token_entry(*token(t), lp),
         "top_logprobs": [_token_entry(*token(u), v) for u, v in top]}
        for t, lp, top in entries]}


def _message(text: str, tools: bool) -> dict:
    """A chat reply: its text, and with tools the calls it writes (their text taken out;
    content null where nothing else is left, as OpenAI's)."""
    content, calls = parse_tool_calls(text) if tools else (text, [])
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": content or None, "tool_calls": calls}


def _token_entry(label: str, raw: bytes, logprob: float) -> dict:
    return {"token": label, "logprob": logprob, "bytes": list(raw)}


def _completion_logprobs(entries: list[tuple], token: Callable[[int], tuple[str, bytes]],
                         at: int = 0) -> tuple[dict, int]:
    """The legacy completions ``logprobs`` object: tokens, their log-probabilities, the
    most likely tokens at each (a dict by token label) and each token's offset in the
    text (``at`` + the tokens' own texts before it; a part of a character counts 0); and
    the offset after the last (a stream's next chunk starts there)."""
    labels = [token(t)[0] for t, _, _ in entries]
    offsets = []
    for label in labels:
        offsets.append(at)
        at += 0 if label.startswith("bytes:") else len(label)
    return {"tokens": labels, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {token(u)[0]: v for u, v in top}
                             for _, _, top in entries],
            "text_offset": offsets}, at


def _chunk(request: Request, head: dict, i: int, piece: str | None,
           finish: str | None = None, logprobs: dict | None = None) -> dict:
    if request.chat:
        delta = {} if piece is None else {"content": piece}
        return {**head, "object": "chat.completion.chunk", "choices": [
            {"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
    return {**head, "object": "text_completion", "choices": [
        {"index": i, "text": piece or "", "finish_reason": finish, "logprobs": logprobs}]}


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


class Handler(BaseHTTPRequestHandler):
    """The HTTP side: routes, JSON bodies, server-sent events."""

    service: Service  # set on the subclass make_server builds
    api_key: str | None = None  # where set, /v1/ requests must carry it as a bearer token
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S  # (make_server sets it)
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.rfile = DeadlineReader(self.rfile, self.connection)

    def handle_one_request(self) -> None:
        """One request, as BaseHTTPRequestHandler's, its line, headers and body held to
        ``request_timeout`` seconds from its first byte: a client that stalls or trickles
        part-way gets 408 and the connection closes, freeing this thread (before, a
        client that stalled held the thread until shutdown, and one that sent a byte now
        and then, until it stopped). A keep-alive connection idle that long between
        requests closes as quietly. The timeout is for reading only: ``send_response``
        clears it, so a slow-reading but live client of a stream is not cut (a socket
        timeout applies to sends too)."""
        self.rfile.stop()
        self.connection.settimeout(self.request_timeout)
        try:
            if not self.rfile.peek(1):  # the client closed between requests
                self.close_connection = True
                return
        except OSError:  # idle past the timeout (TimeoutError), or reset: nothing to answer
            self.close_connection = True
            return
        self.rfile.start(self.request_timeout)  # a request began: all of it by then
        # (for a 408 before they are read)
        self.command, self.request_version, self.requestline = "", "HTTP/1.1", ""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.parse_request():  # (its error answered)
                return
        except TimeoutError:
            self._timed_out("the request line and headers")
            return
        method = getattr(self, f"do_{self.command}", None)
        if method is None:
            self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})")
            return
        method()
        self.wfile.flush()

    def send_response(self, code: int, message: str | None = None) -> None:
        if code != 408:  # the request is read: the answer's writes wait as long as needed
            self.rfile.stop()
            self.connection.settimeout(None)
        super().send_response(code, message)

    def _timed_out(self, what: str) -> None:
        """408 for a request whose ``what`` did not arrive within ``request_timeout``;
        the connection closes (a client gone silent may not read it: a short write,
        still under the timeout, that may fail)."""
        self.close_connection = True
        self.log_message("%s", f"408: {what} did not arrive within {self.request_timeout:g} s")
        try:
            self._error(408, f"{what} did not arrive within {self.request_timeout:g} s "
                        "(moekit serve --request-timeout)")
        except OSError:
            pass

    @property
    def route(self) -> str:
        """The request's path without its query string (``/v1/models?x=1``: /v1/models)."""
        return urlsplit(self.path).path

    def _allowed(self) -> str | None:
        """The methods the path takes (an Allow header), None where no such path."""
        path = self.route
        if path in POSTS:
            return "POST, OPTIONS"
        if path in GETS or path.startswith("/v1/models/"):
            return "GET, HEAD, OPTIONS"
        return None

    def _authorized(self) -> bool:
        """Whether the request may go on (a 401 answered where not): with an API key,
        every /v1/ path and /metrics need "Authorization: Bearer KEY" (/health does
        not)."""
        if self.api_key is None or not (self.route.startswith("/v1/")
                                        or self.route == "/metrics"):
            return True
        # the scheme is case-insensitive (RFC 7235: "bearer KEY" too)
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              self.api_key.encode()):
            return True
        self.close_connection = True
        self._error(401, "this server needs an API key: send \"Authorization: Bearer KEY\" "
                    "(moekit serve --api-key)")
        return False

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (readable with nothing to read; a
        next request it already sent is not a close)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"moekit serve: {self.address_string()} {format % args}\n")

    def _send(self, status: int, data: bytes, kind: str, headers: dict | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # (its headers as GET's, no body)
            self.wfile.write(data)

    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _error(self, status: int, message: str, param: str | None = None,
               headers: dict | None = None) -> None:
        kind = "invalid_request_error" if status == 400 else HTTPStatus(status).phrase
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param,
                                           "code": None}}, headers)

    def _model(self) -> dict:
        return {"id": self.service.name, "object": "model", "created": 0,
                "owned_by": "moekit"}

    def do_GET(self) -> None:
        if not self._authorized():
            return
        path = self.route
        if path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        elif path == "/metrics":
            self._send(200, self.service.metrics().encode(), "text/plain; version=0.0.4")
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self._model()]})
        elif path.startswith("/v1/models/"):  # OpenAI's models.retrieve
            name = unquote(path.removeprefix("/v1/models/"))
            if name == self.service.name:
                self._send_json(200, self._model())
            else:
                self._error(404, f"no such model: {name!r} (this server serves "
                            f"{self.service.name!r})", "model")
        elif path in POSTS:
            self._error(405, f"{path} takes POST", headers={"Allow": "POST, OPTIONS"})
        else:
            self._error(404, f"no such path: {path}")

    do_HEAD = do_GET

    def do_OPTIONS(self) -> None:
        """The methods a path takes (no CORS: the server sends no CORS headers)."""
        allow = self._allowed()
        if allow is None:
            self._error(404, f"no such path: {self.route}")
            return
        self.send_response(204)
        self.send_header("Allow", allow)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _not_allowed(self) -> None:
        """PUT, DELETE, PATCH: 405 with the path's Allow header (404 where no such path);
        the connection closes (a body is not read)."""
        self.close_connection = True
        allow = self._allowed()
        if allow is None:
            self._error(404, f"no such path: {self.route}")
        else:
            self._error(405, f"{self.command} is not allowed on {self.route}: it takes "
                        f"{allow}", headers={"Allow": allow})

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def do_POST(self) -> None:
        if not self._authorized():
            return
        path = self.route
        # answered before the body is read: the connection closes after the answer (its
        # unread body would be read as the next request)
        if path not in POSTS:  # a GET path (405 with its Allow header) or none (404)
            self._not_allowed()
            return
        try:  # by its Content-Length, or chunked
            raw = read_body(self.headers, self.rfile, MAX_BODY)
        except TimeoutError:  # the client stalled part-way through its body
            self._timed_out("the request body")
            return
        except BodyError as e:  # (the rest of the body unread: the connection closes)
            self.close_connection = True
            self._error(e.status, str(e), "body")
            return
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._error(400, f"the body is not JSON: {e}", "body")
            return
        try:
            request = self.service.parse(body, POSTS[path])
        except RequestError as e:
            self._error(400, str(e), e.param)
            return
        rid = ("chatcmpl-" if request.chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if not request.stream:
            try:
                choices, usage, timings = self.service.generate(
                    request, client_gone=self._client_gone)
            except ClientGoneError:
                self.close_connection = True
                return
            except ShuttingDownError as e:
                self.close_connection = True
                self._error(503, str(e))
                return
            except Exception as e:  # noqa: BLE001 (the server answers and keeps serving)
                self._error(500, f"the generation failed: {type(e).__name__}: {e}")
                return
            self._send_json(200, {**_answer(self.service, request, rid, created, choices,
                                            usage), "timings": timings})
            self._log_timings(timings)
        else:
            self._stream(request, {"id": rid, "created": created, "model": self.service.name})

    def _stream(self, request: Request, head: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(payload: dict | str) -> bool:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            try:
                self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()
                return True
            except OSError:  # the client went away
                return False

        if request.chat:  # the role first, as OpenAI's stream starts
            for i in range(len(request.ids)):
                chunk = _chunk(request, head, i, None)
                chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                if not send(chunk):
                    return
        token = _labeller(self.service)
        offsets = [0] * len(request.ids)  # completions: each sequence's text_offset so far
        # with tools: each sequence's pieces so far (the parsed reply's rest follows them)
        sent = [[] for _ in request.ids] if request.tools else None

        def on_text(i: int, piece: str, entries: list[tuple] | None) -> bool:
            if sent is not None:
                sent[i].append(piece)
            logprobs = None
            if entries is not None and request.chat:
                logprobs = _chat_logprobs(entries, token)
            elif entries is not None:
                logprobs, offsets[i] = _completion_logprobs(entries, token, offsets[i])
            return send(_chunk(request, head, i, piece, logprobs=logprobs))

        try:
            choices, usage, timings = self.service.generate(request, on_text,
                                                            self._client_gone)
        except ClientGoneError:
            return
        except Exception as e:  # noqa: BLE001 (the stream ends with the error, as vLLM's)
            message = str(e) if isinstance(e, ShuttingDownError) else \
                f"the generation failed: {type(e).__name__}: {e}"
            if send({"error": {"message": message, "type": "server_error", "param": None,
                               "code": None}}):
                send("[DONE]")
            return
        for i, c in enumerate(choices):
            finish = c.finish_reason
            if request.tools:  # the rest of the content, then the calls (one delta)
                message = _message(c.text, True)
                content = message["content"] or ""
                streamed = "".join(sent[i])
                if content.startswith(streamed) and len(content) > len(streamed):
                    send(_chunk(request, head, i, content[len(streamed):]))
                if "tool_calls" in message:
                    chunk = _chunk(request, head, i, None)
                    chunk["choices"][0]["delta"] = {"tool_calls": [
                        {"index": k, **call} for k, call in enumerate(message["tool_calls"])]}
                    send(chunk)
                    finish = "tool_calls"
            send(_chunk(request, head, i, None, finish))
        if request.include_usage:
            send({**head, "object": _chunk(request, head, 0, None)["object"], "choices": [],
                  "usage": usage})
        send("[DONE]")
        self._log_timings(timings)

    def _log_timings(self, t: dict) -> None:
        if "new_tokens" not in t:
            return
        sys.stderr.write(
            f"moekit serve: {t['new_tokens']} new tokens in {t['seconds']:.2f} s "
            f"({t['tokens_per_s']:.1f} tokens/s; prefill {t['prefill_ms']:.0f} ms of "
            f"{t['prompt_tokens']} prompt tokens, {t['cached_tokens']} held in the cache; "
            f"decode {t['decode_tokens_per_s']:.1f} steps/s)\n")


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that knows its handler threads and their connections, so
    that a shutdown can end them (``end_connections``)."""

    daemon_threads = True
    # connections the kernel queues until accept(): socketserver's default 5 reset
    # clients of a burst (40 concurrent completions to a tiny model: 14-24 of 40 got
    # ConnectionResetError) while generation on the main thread slows the accepting
    # thread; the kernel caps it at net.core.somaxconn
    request_queue_size = 1024

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._live: dict[threading.Thread, socket.socket] = {}
        self._live_lock = threading.Lock()

    def process_request_thread(self, request, client_address) -> None:
        me = threading.current_thread()
        with self._live_lock:
            self._live[me] = request
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._live.pop(me, None)

    def end_connections(self, timeout: float) -> None:
        """Shut every connection's reading side (an idle keep-alive connection's thread
        wakes and ends; one answering still writes its answer) and join their threads,
        ``timeout`` seconds for all."""
        with self._live_lock:
            live = dict(self._live)
        for sock in live.values():
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:  # already closed
                pass
        end = time.monotonic() + timeout
        for thread in live:
            thread.join(max(0.0, end - time.monotonic()))


class Stopper:
    """``moekit serve``'s SIGINT and SIGTERM handler. The first signal sets ``stop``: the
    server stops between decode steps and shuts down (the requests not answered end with
    an error, the threads are joined, exit status 0). A second one exits at once, status
    128 + its number, stdout and stderr flushed (``exit_now``: ``os._exit``, which leaves
    out the interpreter's teardown). It raised KeyboardInterrupt, which, landing in the
    shutdown (5 of 6 double Ctrl-Cs here), ended the process with a traceback, status -2,
    the joins and closes after it skipped, and so left threads running into the
    teardown, where a thread inside a torch call aborts the process ("terminate called
    without an active exception")."""

    def __init__(self, exit_now: Callable[[int], object] | None = None) -> None:
        self.stop = threading.Event()
        self._exit_now = exit_now

    def __call__(self, signum: int, frame: object = None) -> None:
        name = signal.Signals(signum).name
        if not self.stop.is_set():
            print(f"moekit serve: {name}: stopping (a second one: exit at once)",
                  file=sys.stderr, flush=True)
            self.stop.set()
            return
        print(f"moekit serve: {name} again: exiting now", file=sys.stderr, flush=True)
        sys.stdout.flush()
        (self._exit_now or os._exit)(128 + signum)


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None,
                request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> _Server:
    """The HTTP server of ``service`` (bound; ``serve_forever()`` runs it; port 0: any);
    with ``api_key``, /v1/ requests must carry it as a bearer token; ``request_timeout``:
    seconds a request may take to arrive from its first byte (Handler.handle_one_request)."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        _reject("api_key", api_key, "it must be a non-empty string")
    check_request_timeout("request_timeout", request_timeout)
    handler = type("MoekitHandler", (Handler,), {"service": service, "api_key": api_key,
                                                 "request_timeout": float(request_timeout)})
    return _Server((host, port), handler)


def check_request_timeout(name: str, value: object) -> None:
    """A positive, finite number of seconds; a ValueError naming ``name`` otherwise."""
    if not is_number_in(value, 0, math.inf, low_open=True):
        reject(name, value, "it must be a positive, finite number of seconds")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.train.generate_cli import add_kv_cache_argument, add_model_arguments

    add_model_arguments(p, huge_pages=True)  # a server runs long: worth its seconds
    add_kv_cache_argument(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None,
                   help="the model's id in responses and /v1/models (default: the "
                   "checkpoint directory's name)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require \"Authorization: Bearer KEY\" on /v1/ requests (default: "
                   "the MOEKIT_API_KEY environment variable; none: no authentication)")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="most tokens (prompt + new) a sequence may use (default: the "
                   "model's max_seq_len, at most 4096)")
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, metavar="N",
                   help="sequences decoded together, across requests (default "
                   f"{DEFAULT_PARALLEL}; the KV cache holds N x 2 x --context tokens, "
                   "resident as they fill; a request of more sequences, prompts x n, runs "
                   "in groups of N)")
    p.add_argument("--max-sequences", type=int, default=DEFAULT_MAX_SEQUENCES, metavar="N",
                   help="most sequences (prompts x n) one request may ask for (default "
                   f"{DEFAULT_MAX_SEQUENCES}; more is refused with HTTP 400 naming the "
                   "field)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="TOKENS",
                   help="prompt tokens prefilled per step while other sequences decode "
                   f"(default {PREFILL_CHUNK}: a long prompt delays their next token by a "
                   "chunk's time, not the whole prompt's)")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                   metavar="SECONDS",
                   help="how long a request (its line, headers, body) may take to arrive "
                   "from its first byte: a client that stalls or trickles part-way gets 408 "
                   "and its connection closes, as does a keep-alive connection idle this "
                   "long (default "
                   f"{DEFAULT_REQUEST_TIMEOUT_S:g}; answers, streams included, are written "
                   "with no timeout)")


def run(args: argparse.Namespace) -> int:
    from moekit.config import check_positive_int
    from moekit.inference.text import text_for
    from moekit.malloc import tune_malloc
    from moekit.train.checkpoint import CheckpointError
    from moekit.train.generate_cli import close_offload, load_for_generation

    tune_malloc()
    try:
        if args.threads is not None:
            check_positive_int("--threads", args.threads)
        check_positive_int("--prefill-chunk", args.prefill_chunk)
        check_positive_int("--max-sequences", args.max_sequences)
        check_request_timeout("--request-timeout", args.request_timeout)
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port={args.port} is not allowed: it must be in [0, 65535]")
        key = args.api_key if args.api_key is not None else os.environ.get("MOEKIT_API_KEY")
        if key is not None and not key.strip():
            raise ValueError(f"--api-key={key!r} is not allowed: it must be a non-empty "
                             "string (leave it out, and MOEKIT_API_KEY unset, for none)")
        text = text_for(args.checkpoint, args.tokenizer)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model = load_for_generation(args)
        name = args.model_name or Path(args.checkpoint).resolve().name
        context = args.context if args.context is not None else min(
            model.config.max_seq_len, DEFAULT_CONTEXT)
        try:
            service = Service(model, text, name, context, args.parallel, args.prefill_chunk,
                              args.kv_cache_dtype, args.max_sequences)
        except RequestError as e:
            raise ValueError(f"--{e}") from None
        server = make_server(service, args.host, args.port, key, args.request_timeout)
    except (ValueError, CheckpointError, OSError) as e:
        print(f"moekit serve: error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"moekit serve: {name} on http://{host}:{port}/v1 (completions"
          + (", chat completions" if isinstance(text, TokenizerText) else "")
          + f"); context {service.context} tokens, {service.parallel} sequences at "
          f"once (KV cache up to {service.kv_bytes() / 2**20:.1f} MiB in "
          f"{str(service.batcher.cache.k[0].dtype).removeprefix('torch.')}, kept conversations "
          f"up to {service.batcher.prefix_bytes / 2**20:.1f} MiB)"
          + ("; API key required" if key else "") + "; Ctrl-C or SIGTERM stops",
          file=sys.stderr, flush=True)
    if key is None and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"moekit serve: warning: listening on {host} without --api-key: anyone who "
              "can reach this port can use the model", file=sys.stderr, flush=True)
    stopper = Stopper()
    before = {s: signal.signal(s, stopper) for s in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=server.serve_forever, daemon=True)
    http.start()
    try:  # the generations on this thread, the requests on the server's
        service.work(stopper.stop)  # (between steps it sees stop; what runs then: an error)
    finally:
        server.shutdown()  # no new connections
        http.join()
        # the answers written (a stream's error chunk and [DONE]), idle connections
        # closed, their threads joined: a thread still running at exit died with
        # "terminate called without an active exception"
        server.end_connections(SHUTDOWN_S)
        server.server_close()
        close_offload(model)
        for s, handler in before.items():
            signal.signal(s, handler)
    return 0

