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

The parts: ``moekit.inference.request`` reads and checks a body (``RequestError``),
``moekit.inference.service`` generates (``Service``), ``moekit.inference.response``
shapes the answers, ``moekit.inference.http_server`` is the HTTP layer (``Handler``,
``make_server``); this module is the command (``add_arguments``, ``run``, ``Stopper``)
and re-exports the names callers import from it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from moekit.inference.batcher import PREFILL_CHUNK
from moekit.inference.http_server import (
    DEFAULT_REQUEST_TIMEOUT_S,
    check_request_timeout,
    make_server,
)
from moekit.inference.request import RequestError
from moekit.inference.response import parse_tool_calls
from moekit.inference.service import DEFAULT_MAX_SEQUENCES, DEFAULT_PARALLEL, Service
from moekit.inference.text import TokenizerText

# (the names other code and the tests import from here)
__all__ = ["RequestError", "Service", "Stopper", "add_arguments", "make_server",
           "parse_tool_calls", "run"]

SHUTDOWN_S = 5.0  # how long a stopping server waits for its handlers to finish answering
DEFAULT_CONTEXT = 4096  # tokens a request may use unless --context says otherwise


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
    from moekit.errors import exit_code
    from moekit.malloc import tune_malloc
    from moekit.train.checkpoint import CheckpointError
    from moekit.train.generate_cli import close_offload

    tune_malloc()
    try:
        key = _checked_key(args)
        model, service, server = _build(args, key)
    except (ValueError, CheckpointError, OSError) as e:  # OSError: the port is taken
        print(f"moekit serve: error: {e}", file=sys.stderr)
        return exit_code(e)
    _announce(service, server, key)
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


def _checked_key(args: argparse.Namespace) -> str | None:
    """The numeric flags checked (a ValueError naming the flag); the API key (--api-key,
    else MOEKIT_API_KEY; None: none)."""
    from moekit.config import check_positive_int

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
    return key


def _build(args: argparse.Namespace, key: str | None):
    """(the model, its ``Service``, the bound HTTP server) of the checkpoint."""
    from moekit.inference.text import text_for
    from moekit.train.generate_cli import load_for_generation

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
    return model, service, make_server(service, args.host, args.port, key,
                                       args.request_timeout)


def _announce(service: Service, server, key: str | None) -> None:
    """What is served where, on stderr; a warning where anyone may reach it."""
    host, port = server.server_address[:2]
    print(f"moekit serve: {service.name} on http://{host}:{port}/v1 (completions"
          + (", chat completions" if isinstance(service.text, TokenizerText) else "")
          + f"); context {service.context} tokens, {service.parallel} sequences at "
          f"once (KV cache up to {service.kv_bytes() / 2**20:.1f} MiB in "
          f"{str(service.batcher.cache.k[0].dtype).removeprefix('torch.')}, kept conversations "
          f"up to {service.batcher.prefix_bytes / 2**20:.1f} MiB)"
          + ("; API key required" if key else "") + "; Ctrl-C or SIGTERM stops",
          file=sys.stderr, flush=True)
    if key is None and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"moekit serve: warning: listening on {host} without --api-key: anyone who "
              "can reach this port can use the model", file=sys.stderr, flush=True)
