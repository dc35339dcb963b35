"""An httpx transport of our own: HTTP/1.1 on asyncio protocols, parsed by httptools.

httpx stays the client API (and the seam that opentelemetry-instrumentation-httpx hooks), but its default
transport spends most of a token stream in connection-pool bookkeeping: measured 7-10x slower than the limit
on this stack (docs/reference.md §4). aiohttp's client relays at near line rate but spends as much CPU per
request as the rest of the proxy together, in machinery a proxy does not use (timeout objects, tracing
signals, URL objects, cookie and auto-header handling), and a chain of stream reader, async generators and
futures per chunk. Here one ``asyncio.Protocol`` per upstream connection feeds httptools' response parser (the
parser uvicorn uses for the client side) and hands each read straight to whoever awaits the body. Measured
with bench/proxy_bench.py's load (telemetry off), against aiohttp's client: half the proxy's CPU per tiny
non-streamed request, about a quarter less per paced token.

One module for one noun, the upstream HTTP/1.1 client: the connection protocol, the response stream and the
pool share each connection's exchange state (whether it is parked, reusable or failed), which splitting them
apart would turn into a public interface.

What a transparent proxy needs, and so what this does:

- The request goes out as given: the target verbatim (``extensions["target"]``: httpx.URL would resolve
  ``/api/blobs/../x``), the headers exactly as the request holds them (nothing added: no User-Agent, no
  Accept, no cookies), the body streamed with flow control so a many-GB blob upload stays in bounded
  memory.
- Responses framed by Content-Length, chunked encoding or the connection's close; none for HEAD, 1xx,
  204 and 304. The response may come before Ollama read the request body: it reaches the caller all the
  same, and if the body was still going out the connection is closed, not reused.
- Closing a response before its end closes the socket: that is how Ollama learns to stop generating.
- Keep-alive: a fully read response returns its connection to a pool per (host, port), reused newest first
  and closed after ``keepalive_expiry`` seconds idle. No connection limit (Ollama enforces its own
  parallelism and answers 503 when full; a proxy that queued would hide that).
- A pooled connection the upstream closed while idle is skipped. If it closes just as a request goes out
  and no byte of a response came, the request is retried once on a new connection only when that is safe
  in the way Go's and aiohttp's clients judge it: the method is idempotent (GET, HEAD, OPTIONS, TRACE,
  PUT, DELETE) and the body is in memory. A POST is never sent twice.
- Timeouts only as configured: connect, and read (silence while waiting for the headers or the next
  chunk). The default is no read timeout: a model load sends nothing for minutes.

httpx's exception tree, as the proxy maps it::

    TransportError
     ├── TimeoutException
     │    ├── ConnectTimeout ........ no TCP connection within the connect timeout -> 502
     │    └── ReadTimeout ........... Ollama silent longer than the read timeout   -> 504
     ├── NetworkError
     │    ├── ConnectError .......... refused, unreachable, DNS                    -> 502
     │    └── ReadError ............. reset while reading                          -> 502
     └── ProtocolError
          └── RemoteProtocolError ... Ollama closed before answering / bad HTTP    -> 502
               └── BadResponse ...... an answer otellama will not relay           -> 502, saying why
                    ├── HeadTooLarge ....... response head over RESPONSE_HEAD_LIMIT
                    └── UnexpectedSwitch ... a 101 Switching Protocols nobody asked for

Ollama is untrusted like any client: its response head is bounded as the request head is (64 KiB; nginx
answers 502 "upstream sent too big header" at its 4-8 KiB proxy_buffer_size). The bound matters for time
as much as memory: httptools joins the fragments of a header value with ``bytes +=``, so a value spread over
many reads costs time quadratic in its length (measured: 16 MB in 64 KiB reads, 1.7 s of CPU; 32 MB, 6.8 s),
and a header that never ends would hold the event loop. Bytes are counted only until the head is complete:
a body chunk costs nothing more.

An exception raised by the request body's own stream (the client left mid-upload) propagates unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any, Final

import httptools
import httpx

#: Response bytes buffered for a consumer that is not reading before the upstream socket stops being read.
READ_HIGH_WATER: Final = 128 * 1024
#: Largest response head accepted from upstream: status line and headers, with any 1xx interim heads before
#: it. Past it the exchange fails with :class:`HeadTooLarge` and the connection is closed.
RESPONSE_HEAD_LIMIT: Final = 64 * 1024
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_CRLF: Final = b"\r\n"


class _Stale(httpx.RemoteProtocolError):
    """The connection closed before a single byte of the response: the request may not have been seen."""


class BadResponse(httpx.RemoteProtocolError):
    """The upstream answered something otellama will not relay; the message says what, for the client."""


class HeadTooLarge(BadResponse):
    """The upstream's response head passed :data:`RESPONSE_HEAD_LIMIT` (or never ended)."""

    def __init__(self) -> None:
        super().__init__(f"upstream sent too big header (over {RESPONSE_HEAD_LIMIT // 1024} KiB)")


class UnexpectedSwitch(BadResponse):
    """The upstream answered ``101 Switching Protocols``, which otellama never asks for (it forwards no
    ``Upgrade``): what follows is not HTTP, and a 101 with a body is no response to relay."""

    def __init__(self) -> None:
        super().__init__("upstream answered 101 Switching Protocols to a request that asked for no upgrade")


class _Connection(asyncio.Protocol):
    """One upstream HTTP/1.1 connection, carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False  # the socket is gone (or going): never reused
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._head_request = False
        self._received = False  # any byte of the current response
        self._interim = False  # a 1xx response is being parsed: skipped
        self._framed = False  # Content-Length or Transfer-Encoding: the body does not end at EOF
        self._head_size = 0  # the head's exact size so far, as parsed (interim heads included)
        self._head_bytes = 0  # received while the head is incomplete (interim heads included)
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.request_sent = False  # the whole request body went out
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self._read_timeout: float | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but has its interface.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.complete:
            self.close()  # bytes nobody asked for: this connection's framing can no longer be trusted
            return
        if self.headers_done:  # the body: nothing but the parser per chunk
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self._fail(httpx.RemoteProtocolError(f"invalid HTTP response from upstream: {exc}"))
                self.close()
            return
        self._received = True
        self._head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # after a 101, which on_headers_complete already failed
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP response from upstream: {exc}"))
        # This read may hold body bytes after the head: only a head still incomplete is measured here
        # (one that completed is measured exactly, in on_headers_complete).
        if not self.headers_done and self._head_bytes > RESPONSE_HEAD_LIMIT:
            self._fail(HeadTooLarge())
        if self._error is not None:
            self._parser = None  # nothing more is parsed: the exchange has failed
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost says what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._parser is not None and not self.complete:
            if self.headers_done and not self._framed and exc is None:
                self.complete = True  # a body delimited by the connection's close (not a reset) ends
            elif not self._received:
                self._fail(_Stale("Server disconnected without sending a response."))
            elif exc is not None:
                self._fail(httpx.ReadError(str(exc) or type(exc).__name__))
            elif self.headers_done:
                self._fail(httpx.RemoteProtocolError("peer closed connection without sending complete body"))
            else:
                self._fail(httpx.RemoteProtocolError("peer closed connection in the response headers"))
        self._wake()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)  # the body writer sees `closed` and stops

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- httptools callbacks ----------------------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self.reason += status  # called once per fragment when the status line spans reads

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        self._head_size += len(self.reason) + 15  # "HTTP/1.1 200 " and CRLF, and the blank line
        if self._head_size > RESPONSE_HEAD_LIMIT:
            self._fail(HeadTooLarge())
            return
        if status == 101:
            self._fail(UnexpectedSwitch())
            return
        if 100 <= status < 200:
            self._interim = True  # 100 Continue and friends: the real response follows
            return
        self.status = status
        self.headers_done = True
        if self._head_request:
            self.complete = True  # a HEAD response's Content-Length describes a body that is never sent
            self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()  # the client reads slower than Ollama writes
        self._wake()

    def on_message_complete(self) -> None:
        assert self._parser is not None
        if self._interim:
            self._interim = False
            self.headers, self.reason, self._framed = [], b"", False
            return
        if not self.complete:
            self.complete = True
            self.keep_alive = self._parser.should_keep_alive()
            self._wake()

    # --- used by the transport --------------------------------------------------------------------------
    def begin(self, head_request: bool, read_timeout: float | None) -> None:
        """Reset for a new exchange (with a fresh parser: a HEAD response leaves one expecting a body)."""
        self._read_timeout = read_timeout
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = head_request
        self._received = self._interim = self._framed = False
        self._head_bytes = self._head_size = 0
        self.status, self.reason, self.headers = 0, b"", []
        self.headers_done = self.complete = self.keep_alive = self.request_sent = False
        self._error = _Stale("connection closed before the request") if self.closed else None
        self.writer = None

    def park(self) -> None:
        """Idle in the pool: any byte from now on is unexpected (see data_received)."""
        self.idle_since = self.loop.time()
        self._parser = None
        # The caller may have stopped reading a response that had all arrived (its client left): what it
        # left unread must not become the start of the next response on this connection.
        self._chunks.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain

    async def wait_headers(self) -> None:
        while not self.headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """Everything received since the last call, waiting for something; ``b""`` at the end of the body."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def fail_request(self, exc: BaseException) -> None:
        """The request body could not be sent (its stream raised): the exchange ends with ``exc``."""
        if not self.complete:
            self._fail(exc)
        self.close()

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.request_sent and not self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()

    async def _wait(self) -> None:
        waiter = self._waiter = self.loop.create_future()
        timeout = self._read_timeout
        if timeout is None:
            await waiter
            return
        timer = self.loop.call_later(timeout, self._timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(httpx.ReadTimeout("no data from upstream within the read timeout"))

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def _send_body(conn: _Connection, stream: httpx.AsyncByteStream, chunked: bool) -> None:
    try:
        async for chunk in stream:
            if conn.closed:
                return  # the upstream answered and hung up without reading the rest: nothing left to do
            if not chunk:
                continue
            conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
        conn.request_sent = True
    except Exception as exc:  # the body's source failed (the client left): the exchange ends with it
        conn.fail_request(exc)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, conn: _Connection, transport: HttpTransport, key: tuple[str, int]) -> None:
        self._conn = conn
        self._transport = transport
        self._key = key
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = self._conn.read
        while chunk := await read():
            yield chunk  # whatever arrived in one read: one Ollama token is one chunk, with no waiting

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn.reusable():
            self._transport._release(self._key, conn)
        else:
            conn.close()  # mid-body, the only way to tell Ollama to stop generating


class HttpTransport(httpx.AsyncBaseTransport):
    """Send httpx requests over pooled HTTP/1.1 connections (see the module docstring for what it keeps).

    Its connections belong to the event loop that opened them: one transport per loop, closed with
    :meth:`aclose` before that loop ends (as the app does at shutdown).
    """

    def __init__(self, *, keepalive_expiry: float = 60.0) -> None:
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        read_timeout: float | None = timeout.get("read")
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        key = (url.host, url.port or (443 if scheme == "https" else 80))
        method = request.method
        # httpcore's extension: the target exactly as the client wrote it (httpx.URL resolves "." and "..").
        target: bytes = request.extensions.get("target") or url.raw_path
        lines = [b"%b %b HTTP/1.1\r\n" % (method.encode("ascii"), target)]
        lines.extend(b"%b: %b\r\n" % pair for pair in request.headers.raw)
        lines.append(_CRLF)
        try:
            body: bytes | None = request.content
        except httpx.RequestNotRead:
            body = None
        head = b"".join(lines)

        loop = asyncio.get_running_loop()
        retry = body is not None and method in _IDEMPOTENT
        while True:
            conn = self._pooled(key, loop)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key, scheme == "https", timeout.get("connect"), request, loop)
            conn.begin(method == "HEAD", read_timeout)
            try:
                if body is not None:
                    conn.write(head + body)
                    conn.request_sent = True
                else:
                    conn.write(head)
                    chunked = any(
                        k.lower() == b"transfer-encoding" and b"chunked" in v.lower()
                        for k, v in request.headers.raw
                    )
                    stream: Any = request.stream
                    conn.writer = loop.create_task(_send_body(conn, stream, chunked))
                await conn.wait_headers()
            except _Stale:
                conn.close()
                if reused and retry:
                    retry = False  # once: a second stale connection in a row means something else is wrong
                    continue
                raise
            except BaseException:
                conn.close()  # cancelled or failed before the response: Ollama must stop too
                raise
            break
        return httpx.Response(
            status_code=conn.status,
            headers=conn.headers,
            stream=_ResponseStream(conn, self, key),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason},
        )

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    # --- the pool -------------------------------------------------------------------------------------------
    def _pooled(self, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> _Connection | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        oldest = loop.time() - self._keepalive_expiry
        while conns:
            conn = conns.pop()  # newest first: the rest age out instead of all staying half-used
            if not conn.closed and conn.idle_since > oldest:
                return conn
            conn.close()
        return None

    def _release(self, key: tuple[str, int], conn: _Connection) -> None:
        conn.park()
        self._idle.setdefault(key, []).append(conn)
        if self._sweep is None:
            self._sweep = conn.loop.call_later(self._keepalive_expiry, self._expire, conn.loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep = None
        oldest = loop.time() - self._keepalive_expiry
        for key, conns in list(self._idle.items()):
            kept = [c for c in conns if not c.closed and c.idle_since > oldest]
            for conn in conns:
                if conn.closed or conn.idle_since <= oldest:
                    conn.close()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle:
            self._sweep = loop.call_later(self._keepalive_expiry, self._expire, loop)

    async def _connect(
        self,
        key: tuple[str, int],
        tls: bool,
        connect_timeout: float | None,
        request: httpx.Request,
        loop: asyncio.AbstractEventLoop,
    ) -> _Connection:
        context: ssl.SSLContext | None = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        host, port = key
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), host, port, ssl=context), connect_timeout
            )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout("connect timeout", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(_reason(exc), request=request) from exc
        return conn


def _reason(exc: OSError) -> str:
    # "Connection refused", not "[Errno 111] Connect call failed ('127.0.0.1', 11434)".
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return str(exc)
    return os.strerror(exc.errno)
