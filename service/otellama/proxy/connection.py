"""The client's connection: uvicorn's httptools protocol, plus the limits it lacks.

uvicorn with httptools (fast: docs/reference.md §4) bounds neither the size of a request's headers nor
the time a client may take to send them: measured, an 8 MB header and 100,000 headers were accepted, and a
client that sends half a request line holds its connection (and its memory) forever. Slow-loris clients
would exhaust otellama's file descriptors long before Ollama saw any load. This protocol adds:

- **Header size**: at most :data:`HEADER_LIMIT` bytes from the first byte of a request to the end of its
  headers, else ``431`` and the connection is closed. Go's ``net/http``, which Ollama runs on, allows 1 MB;
  real Ollama clients send well under 1 KiB, browsers (Open WebUI) a few KiB of cookies.
- **Header time**: a request's headers must be complete within ``client_timeout`` seconds of its first
  byte (of the connection's opening, for the first request), else ``408`` and close. A connection that
  never sent a byte is simply closed. This is total time, not silence, so trickling a byte at a time does
  not help.
- **Body silence**: while a request body is still arriving, ``client_timeout`` seconds without a byte
  end the connection (``408`` if no response has started). The proxy sees the client leave, closes its
  request to Ollama and records the exchange as cancelled. Silence that is otellama's own doing (reading
  paused because Ollama is not taking the body yet) never counts.
- **Pipelined requests**: at most :data:`PIPELINE_LIMIT` requests wait behind the one being answered;
  past that, otellama stops parsing and reading the connection until answers make room. uvicorn pauses
  reading once a request is queued, but parses every request already read (a 256 KB read of minimal
  requests is 14,000 queued requests, ~2.4 KB each) and resumes reading after each answer, so one
  connection pipelining 100,000 tiny requests (3 MB) grew otellama by 234 MB. A client that pipelines is
  served in order all the same, at the pace of the answers.

Nothing here touches the wait for Ollama: once a request's body is complete, the connection may stay silent
for as long as the response takes (model loads, pulls); between requests uvicorn's keep-alive timeout
applies as before.

Built on uvicorn's ``HttpToolsProtocol`` internals (callbacks ``on_message_begin`` ... and the
per-request ``cycle``), which have been stable across uvicorn releases; tests/test_abuse.py pins the
behaviour on real sockets.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, Final

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from otellama.proxy.errors import error_body, json_headers

log = logging.getLogger(__name__)

#: Most bytes a request may spend on its request line and headers.
HEADER_LIMIT: Final = 64 * 1024
#: Seconds a refused connection is kept half-open so the client can read the answer (see ``_abort``).
LINGER: Final = 2.0
#: Most requests a connection may have queued behind the one being answered. Real Ollama clients do not
#: pipeline (httpx, Go's net/http, browsers never do; a benchmark might); one that does still gets every
#: answer in order, only no faster than otellama answers, which is all pipelining could get it anyway. 16
#: keeps the pipe full while the answers are being written, at ~40 KB of queued requests per connection.
PIPELINE_LIMIT: Final = 16
#: Scope key under which a request that otellama's connection answered itself (its body stalled: 408) gets
#: ``(status, message)``, so the app, which sees only a client that left, records what the client got.
REFUSED_WITH: Final = "otellama.refused_with"
#: Bytes handed to the parser at a time outside a body whose length is known: one piece holds at most ~110
#: minimal requests, so a full queue overshoots by that much, not by one read's 256 KB (14,000 requests).
#: Bodies of known length go in whole, so uploads (blobs of several GB) pay no per-piece cost.
FEED: Final = 2048

_IDLE, _HEADERS, _BODY, _DONE = range(4)


def _response(status: bytes, message: str) -> bytes:
    # Before the request line is whole its path is unknown: Ollama's flat error shape, as Go answers.
    body = error_body("", message)
    head = b"".join(b"%b: %b\r\n" % header for header in json_headers(body, (b"connection", b"close")))
    return b"HTTP/1.1 " + status + b"\r\n" + head + b"\r\n" + body


class _Flow(FlowControl):
    """uvicorn's flow control, except that reading stays paused while the connection's queue is full.

    uvicorn resumes reading whenever a response completes or the app asks for body bytes, queue or not:
    those resumptions go through :meth:`resume_reading`, which waits for room.
    """

    def __init__(self, transport: asyncio.Transport, protocol: GuardedProtocol) -> None:
        super().__init__(transport)
        # Weakly: the protocol holds its flow, and a cycle would outlive the connection until a garbage
        # collection (uvicorn's own protocol leaves none).
        self._protocol = weakref.ref(protocol)
        self.wanted = True  # whether uvicorn wants to read, as it last said

    def pause_reading(self) -> None:
        self.wanted = False
        super().pause_reading()

    def resume_reading(self) -> None:
        self.wanted = True
        protocol = self._protocol()
        if protocol is None or not protocol.queue_full():
            super().resume_reading()

    def hold(self) -> None:
        """Pause reading for the queue, leaving what uvicorn asked for as it was."""
        super().pause_reading()


class GuardedProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a header size cap, a header deadline, a body silence timeout and a
    bounded pipeline.

    Configure with :func:`protocol`; the class itself uses the defaults (60 s, :data:`HEADER_LIMIT`).
    """

    client_timeout: float | None = 60.0
    header_limit: int = HEADER_LIMIT
    pipeline_limit: int = PIPELINE_LIMIT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _IDLE
        self._header_bytes = 0  # raw bytes while a request's headers are incomplete
        self._header_size = 0  # parsed request line and headers of the current request
        self._headers_since: float | None = None  # when the request being read started
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._backlog = b""  # bytes read but left unparsed while the queue is full
        self._draining = False  # a parse of the backlog is scheduled
        self._body_left = 0  # body bytes of the current request still to come, by its Content-Length

    # --- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        # Before any request exists: every RequestResponseCycle is handed this one.
        self.flow = self._flow = _Flow(self.transport, self)
        self._headers_since = self._last_read = self.loop.time()
        self._arm(self.client_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._backlog = b""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # answered and lingering: the rest of this request is discarded unparsed
        if self._backlog:  # not expected (reading is paused meanwhile), but order must hold regardless
            self._backlog += data
            return
        self._feed(data)

    # --- the pipeline -----------------------------------------------------------------------------------
    def queue_full(self) -> bool:
        """Whether reading must stay paused; once there is room, schedules the backlog's parse first."""
        if len(self.pipeline) >= self.pipeline_limit:
            return True
        if not self._backlog:
            return False
        if not self._draining:
            # Not now: this runs inside uvicorn's response or receive path, which parsing would re-enter.
            self._draining = True
            self.loop.call_soon(self._drain)
        return True

    def _drain(self) -> None:
        self._draining = False
        if self._closed or self.transport.is_closing():
            return
        backlog, self._backlog = self._backlog, b""
        self._feed(backlog)
        if self._flow.wanted:
            self._flow.resume_reading()

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` a piece at a time; what follows a full queue is kept unparsed for later."""
        view, start, end = memoryview(data), 0, len(data)
        while start < end:
            if len(self.pipeline) >= self.pipeline_limit:
                self._backlog = data[start:]
                self._flow.hold()
                return
            size = max(FEED, self._body_left) if self._phase == _BODY else FEED
            self._parse(data if start == 0 and size >= end else view[start : start + size])
            start += size
            if self._closed or self.transport.is_closing():
                return
            if self._phase == _DONE and self.parser.should_upgrade():
                return  # the parser stops at an upgrade, and the connection may be a WebSocket's now

    def on_response_complete(self) -> None:
        super().on_response_complete()  # resumes reading before it takes the next request off the queue,
        if self._flow.wanted and not self._closed and not self.transport.is_closing():
            self._flow.resume_reading()  # so ask again now that there is room

    def _parse(self, data: bytes | memoryview) -> None:
        self._last_read = now = self.loop.time()
        reading_headers = self._phase != _BODY
        if reading_headers:
            if self._headers_since is None:  # the first byte of the next request on this connection
                self._headers_since = now
                self._arm(self.client_timeout)
            self._header_bytes += len(data)
        super().data_received(data)  # type: ignore[arg-type]  # httptools parses any buffer
        if self._phase == _HEADERS and self._header_bytes > self.header_limit and not self._closed:
            message = f"otellama: request headers larger than {self.header_limit} bytes"
            self._abort(b"431 Request Header Fields Too Large", message)

    # --- httptools callbacks ----------------------------------------------------------------------------
    # Once a request is refused, the rest of what is already in the parser's hands is ignored too.
    def on_message_begin(self) -> None:
        if self._closed:
            return
        super().on_message_begin()
        self._phase = _HEADERS
        self._header_size = 0
        self._body_left = 0

    def on_url(self, url: bytes) -> None:
        if self._closed:
            return
        self._header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._closed:
            return
        self._header_size += len(name) + len(value) + 4  # ": " and CRLF
        if name.lower() == b"content-length" and value.isdigit() and len(value) < 19:
            self._body_left = int(value)  # a bad or conflicting one fails the parse anyway
        super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        if not self._closed:
            self._body_left -= len(body)
            super().on_body(body)

    def on_headers_complete(self) -> None:
        if self._closed:
            return
        if self._header_size > self.header_limit:  # a header block that arrived in one read
            message = f"otellama: request headers larger than {self.header_limit} bytes"
            self._abort(b"431 Request Header Fields Too Large", message)
            return
        super().on_headers_complete()
        self._phase = _BODY
        self._headers_since = None
        self._header_bytes = 0
        self._last_read = self.loop.time()
        self._arm(self.client_timeout)

    def on_message_complete(self) -> None:
        if self._closed:
            return
        super().on_message_complete()
        self._phase = _DONE
        self._header_bytes = 0
        self._disarm()

    # --- the deadline -----------------------------------------------------------------------------------
    def _arm(self, delay: float | None) -> None:
        self._disarm()
        if delay is not None and not self._closed:
            self._timer = self.loop.call_later(max(delay, 0.0), self._check)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        timeout = self.client_timeout
        if self._closed or timeout is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._headers_since is not None:
            left = self._headers_since + timeout - now
            if left > 0:
                self._arm(left)
            elif self._phase == _HEADERS:
                message = f"request headers not received within {timeout:g} s (OTELLAMA_CLIENT_TIMEOUT)"
                self._abort(b"408 Request Timeout", f"otellama: {message}")
            elif self.cycle is not None and not self.cycle.response_complete:
                # Bytes that began no request (a stray CRLF after a body) while a response is still going:
                # nothing to time out; uvicorn's keep-alive takes over once the response is done.
                self._headers_since = None
            else:  # connected, never sent a byte
                self._close()
        elif self._phase == _BODY:
            if self.flow.read_paused:  # we are the slow side: the body is waiting for Ollama, not the client
                self._arm(timeout)
                return
            left = self._last_read + timeout - now
            if left > 0:
                self._arm(left)
            else:
                message = f"no request body bytes for {timeout:g} s (OTELLAMA_CLIENT_TIMEOUT)"
                self._abort(b"408 Request Timeout", f"otellama: {message}")

    def _abort(self, status: bytes, message: str) -> None:
        """Answer ``status`` (``b"408 Request Timeout"``) with ``message`` and close, unless a response
        already began; then just close."""
        cycle = self.cycle
        # A response is under way (this request's, or a pipelined predecessor's): no room for an answer.
        started = cycle is not None and (
            cycle.response_started if cycle.scope is self.scope else not cycle.response_complete
        )
        log.info("closing a connection from %s: %s", self.client and self.client[0], message)
        self._disarm()
        answering = not started and self.transport.can_write_eof()
        if answering and cycle is not None and cycle.scope is self.scope:
            # The app has this request and is about to see a client that left: tell it what the client got.
            self.scope[REFUSED_WITH] = (int(status[:3]), message)  # type: ignore[typeddict-unknown-key]
        self._stop_request()
        if not answering:
            self._close()
            return
        # A lingering close: closing with the client's bytes unread makes the kernel send a reset, which
        # can destroy our answer before the client reads it. Answer, stop writing, and discard what still
        # comes for a moment; the client then reads the 431/408 and closes, or we close after LINGER.
        self.transport.write(_response(status, message))
        self.transport.write_eof()
        self._closed = True
        self.loop.call_later(LINGER, self.transport.close)

    def _stop_request(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # What connection_lost will say anyway, said now, so the app writes nothing after our answer.
            cycle.disconnected = True
            cycle.message_event.set()

    def _close(self) -> None:
        self._closed = True
        self._disarm()
        self._stop_request()
        self.transport.close()


def protocol(
    client_timeout: float | None = 60.0,
    header_limit: int = HEADER_LIMIT,
    pipeline_limit: int = PIPELINE_LIMIT,
) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` with these limits, for uvicorn's ``http=`` option."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"client_timeout": client_timeout, "header_limit": header_limit, "pipeline_limit": pipeline_limit},
    )
