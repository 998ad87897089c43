"""A request body as ``moekit serve`` reads it: by its ``Content-Length``, or chunked
(``Transfer-Encoding: chunked``, RFC 9112 section 7.1: what curl sends for a body from
a pipe, and ``http.client`` with ``encode_chunked=True``), both held to one size limit.

Each refusal is a ``BodyError`` carrying its HTTP status: 411 where neither header
came, 400 for a malformed length or malformed chunking (a bad size line, a chunk not
followed by CRLF, a body that ends early), 413 past the limit (seen from the sizes,
before the data is read), 501 for a transfer coding other than chunked. The server
closes the connection after any of them: the rest of the body is not read.
"""

from __future__ import annotations

import re
import time
from email.message import Message
from typing import BinaryIO

SIZE_LINE = 4096  # bytes of a chunk-size line (extensions included) at most
TRAILER_LINES = 64  # trailer fields after the last chunk at most (they are read, not used)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,64}")  # int(x, 16) alone took " 1_0", "+a", "0x1"
_DIGITS = re.compile(r"[0-9]{1,20}")


class BodyError(ValueError):
    """A request body the server refuses, with the HTTP ``status`` to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def read_body(headers: Message, rfile: BinaryIO, limit: int) -> bytes:
    """The body of a request with ``headers`` from ``rfile``: 1 to ``limit`` bytes."""
    coding = headers.get("Transfer-Encoding")
    length = headers.get("Content-Length")
    if coding is not None:
        codings = [c.strip().lower() for c in coding.split(",")]
        if codings[-1] != "chunked":
            raise BodyError(400 if "chunked" in codings else 501,
                            f"Transfer-Encoding={coding!r} is not allowed: moekit serve reads "
                            "bodies sent with Content-Length or Transfer-Encoding: chunked")
        if codings != ["chunked"]:
            raise BodyError(501, f"Transfer-Encoding={coding!r} is not allowed: chunked is "
                            "the only transfer coding moekit serve decodes")
        if length is not None:  # both: which one ends the body is ambiguous (smuggling)
            raise BodyError(400, "a request body must not have both Content-Length and "
                            "Transfer-Encoding")
        body = read_chunked(rfile, limit)
        _check_size(len(body), limit)
        return body
    if length is None:
        raise BodyError(411, "a request body needs a Content-Length header (or "
                        "Transfer-Encoding: chunked)")
    if not _DIGITS.fullmatch(length.strip()):
        raise BodyError(400, f"Content-Length={length!r} is not allowed: it must be a "
                        "number of bytes")
    size = int(length)
    _check_size(size, limit)
    data = rfile.read(size)
    if len(data) < size:
        raise BodyError(400, f"the body ended after {len(data)} of its Content-Length="
                        f"{size} bytes")
    return data


def _check_size(size: int, limit: int) -> None:
    if not 0 < size <= limit:
        raise BodyError(413 if size > 0 else 400, f"the body must hold 1 to {limit} bytes, "
                        f"got {size}")


def read_chunked(rfile: BinaryIO, limit: int) -> bytes:
    """A chunked body's data (the chunks joined; extensions and trailers read and
    dropped); 413 as soon as the chunk sizes add up past ``limit``."""
    parts: list[bytes] = []
    total = 0
    while True:
        line = _line(rfile, "a chunk-size line")
        size_hex = line.split(b";", 1)[0].strip(b" \t")
        if not _HEX.fullmatch(size_hex):
            raise BodyError(400, f"malformed chunked body: the chunk-size line {line[:64]!r} "
                            "must start with the chunk's size in hexadecimal")
        size = int(size_hex, 16)
        if size == 0:
            break
        total += size
        if total > limit:
            raise BodyError(413, f"the body must hold 1 to {limit} bytes, got more (its "
                            f"chunks add up to at least {total})")
        data = rfile.read(size)
        if len(data) < size:
            raise BodyError(400, f"malformed chunked body: it ended inside a chunk ({len(data)}"
                            f" of {size} bytes)")
        if rfile.read(2) != b"\r\n":
            raise BodyError(400, f"malformed chunked body: a chunk of {size} bytes must be "
                            "followed by CRLF")
        parts.append(data)
    for _ in range(TRAILER_LINES + 1):  # trailer fields, then the empty line that ends it
        if not _line(rfile, "the trailer after the last chunk"):
            return b"".join(parts)
    raise BodyError(400, f"malformed chunked body: more than {TRAILER_LINES} trailer lines "
                    "after the last chunk")


def _line(rfile: BinaryIO, what: str) -> bytes:
    """One CRLF-ended line, without its CRLF (a bare LF is taken too, as http.server
    takes it in headers)."""
    line = rfile.readline(SIZE_LINE + 1)
    if not line.endswith(b"\n"):
        raise BodyError(400, f"malformed chunked body: {what} "
                        + (f"is longer than {SIZE_LINE} bytes" if len(line) > SIZE_LINE
                           else "is missing (the body ended early)"))
    return line.rstrip(b"\r\n")


class DeadlineReader:
    """A connection's buffered reader whose reads, between ``start(seconds)`` and
    ``stop()``, share one deadline: a request's line, headers and body must all arrive
    within it. A socket timeout alone bounds each wait for data, so a client sending a
    byte now and then (a "slowloris") held its handler thread as long as it liked. A
    read past the deadline raises TimeoutError, as the socket's own timeout does; with no
    deadline running, reads wait as the socket's timeout says.

    Each wait for data goes through ``peek`` or ``read1`` of the buffered reader (one
    wait each, the deadline armed before it), never its ``read(n)`` / ``readline``, which
    loop over waits inside one call (``readline`` takes bytes ``peek`` already buffered
    with ``read``, which does not wait)."""

    def __init__(self, rfile: BinaryIO, sock) -> None:
        self._f, self._sock = rfile, sock
        self._deadline: float | None = None

    def start(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds

    def stop(self) -> None:
        self._deadline = None

    def _arm(self) -> None:
        if self._deadline is None:
            return
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        self._sock.settimeout(left)

    def peek(self, n: int = 1) -> bytes:
        self._arm()
        return self._f.peek(n)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:  # (to the end: not used by the server)
            self._arm()
            return self._f.read()
        parts, got = [], 0
        while got < n:
            self._arm()
            data = self._f.read1(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def readline(self, limit: int = -1) -> bytes:
        line = bytearray()
        while limit < 0 or len(line) < limit:
            self._arm()
            data = self._f.peek(1)  # what is buffered, or one wait for more
            if not data:
                break
            if limit >= 0:
                data = data[:limit - len(line)]
            end = data.find(b"\n")
            line += self._f.read(end + 1 if end >= 0 else len(data))  # (buffered: no wait)
            if end >= 0:
                break
        return bytes(line)

    def __getattr__(self, name: str):  # close, closed, fileno, ...: the buffered reader's
        return getattr(self._f, name)
