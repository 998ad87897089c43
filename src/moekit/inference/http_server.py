"""`moekit serve`'s HTTP layer, on the standard library's server: ``Handler`` routes
requests (the two POSTs, /health, /metrics, /v1/models), reads bodies (``http_body``),
checks the API key, answers JSON or server-sent events and times out slow clients;
``_Server`` knows its connections so that a shutdown can end them; ``make_server``
builds one for a ``Service``."""

from __future__ import annotations

import hmac
import json
import math
import secrets
import select
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from moekit.config import is_number_in, reject
from moekit.inference.http_body import BodyError, DeadlineReader, read_body
from moekit.inference.request import Request, RequestError, reject_field
from moekit.inference.response import (
    TextOffsets,
    answer_payload,
    chat_logprobs,
    completion_logprobs,
    stream_chunk,
    stream_end_chunks,
    token_labeller,
)
from moekit.inference.service import ClientGoneError, Service, ShuttingDownError

MAX_BODY = 16 << 20  # bytes of a request body
# seconds from a request's first byte for all of it (line, headers, body) to arrive before
# the connection closes with 408, and an idle keep-alive connection's wait for its next
# request (--request-timeout); the response is written with no timeout
DEFAULT_REQUEST_TIMEOUT_S = 60.0
# the POST paths (whether chat) and the GET ones (and /v1/models/{id})
POSTS = {"/v1/completions": False, "/v1/chat/completions": True}
GETS = ("/health", "/v1/health", "/metrics", "/v1/models")


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
            self._send_json(200, {**answer_payload(self.service, request, rid, created, choices,
                                            usage), "timings": timings})
            self._log_timings(timings)
        else:
            self._stream(request, {"id": rid, "created": created, "model": self.service.name})

    def _stream(self, request: Request, head: dict) -> None:
        """Server-sent events: each sequence's text as it is produced (with its tokens'
        log-probabilities where asked), its last chunks, the usage where asked, [DONE]."""
        self._start_events()
        if request.chat:  # the role first, as OpenAI's stream starts
            for i in range(len(request.ids)):
                chunk = stream_chunk(request, head, i, None)
                chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                if not self._event(chunk):
                    return
        token = token_labeller(self.service)
        # completions with logprobs: each sequence's text_offset of its next token
        offsets = [] if request.chat or request.logprobs is None else [
            TextOffsets(self.service.text, p) for p in request.ids]
        # with tools: each sequence's pieces so far (the parsed reply's rest follows them)
        sent = [[] for _ in request.ids] if request.tools else None

        def on_text(i: int, piece: str, entries: list[tuple] | None) -> bool:
            if sent is not None:
                sent[i].append(piece)
            logprobs = None
            if entries is not None and request.chat:
                logprobs = chat_logprobs(entries, token)
            elif entries is not None:
                logprobs = completion_logprobs(entries, token,
                                               [offsets[i](t) for t, _, _ in entries])
            return self._event(stream_chunk(request, head, i, piece, logprobs=logprobs))

        try:
            choices, usage, timings = self.service.generate(request, on_text,
                                                            self._client_gone)
        except ClientGoneError:
            return
        except Exception as e:  # noqa: BLE001 (the stream ends with the error, as vLLM's)
            self._stream_failed(e)
            return
        for i, c in enumerate(choices):
            for chunk in stream_end_chunks(request, head, i, c, "" if sent is None
                                     else "".join(sent[i])):
                self._event(chunk)
        if request.include_usage:
            self._event({**head, "object": stream_chunk(request, head, 0, None)["object"],
                         "choices": [], "usage": usage})
        self._event("[DONE]")
        self._log_timings(timings)

    def _start_events(self) -> None:
        """A stream's headers; the connection closes after it."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _event(self, payload: dict | str) -> bool:
        """Send one server-sent event; False where the client went away."""
        data = payload if isinstance(payload, str) else json.dumps(payload)
        try:
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
            return True
        except OSError:  # the client went away
            return False

    def _stream_failed(self, e: Exception) -> None:
        """A stream's generation failed (or the server stops): an error chunk, then
        [DONE] (where the client is still there)."""
        message = str(e) if isinstance(e, ShuttingDownError) else \
            f"the generation failed: {type(e).__name__}: {e}"
        if self._event({"error": {"message": message, "type": "server_error", "param": None,
                                  "code": None}}):
            self._event("[DONE]")

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


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None,
                request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> _Server:
    """The HTTP server of ``service`` (bound; ``serve_forever()`` runs it; port 0: any);
    with ``api_key``, /v1/ requests must carry it as a bearer token; ``request_timeout``:
    seconds a request may take to arrive from its first byte (Handler.handle_one_request)."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        reject_field("api_key", api_key, "it must be a non-empty string")
    check_request_timeout("request_timeout", request_timeout)
    handler = type("MoekitHandler", (Handler,), {"service": service, "api_key": api_key,
                                                 "request_timeout": float(request_timeout)})
    return _Server((host, port), handler)


def check_request_timeout(name: str, value: object) -> None:
    """A positive, finite number of seconds; a ValueError naming ``name`` otherwise."""
    if not is_number_in(value, 0, math.inf, low_open=True):
        reject(name, value, "it must be a positive, finite number of seconds")
