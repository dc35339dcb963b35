"""The client's connection: uvicorn's httptools protocol, plus the limits it lacks.

uvicorn with httptools (the fast stack, REFERENCE §4) bounds neither the size of a request's headers nor
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
from typing import Any, Final

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("otellama.connection")

#: Most bytes a request may spend on its request line and headers.
HEADER_LIMIT: Final = 64 * 1024
#: Seconds a refused connection is kept half-open so the client can read the answer (see ``_abort``).
LINGER: Final = 2.0

_IDLE, _HEADERS, _BODY, _DONE = range(4)


def _response(status: bytes, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class GuardedProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a header size cap, a header deadline and a body silence timeout.

    Configure with :func:`protocol`; the class itself uses the defaults (60 s, :data:`HEADER_LIMIT`).
    """

    client_timeout: float | None = 60.0
    header_limit: int = HEADER_LIMIT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _IDLE
        self._header_bytes = 0  # raw bytes while a request's headers are incomplete
        self._header_size = 0  # parsed request line and headers of the current request
        self._headers_since: float | None = None  # when the request being read started
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # --- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._headers_since = self._last_read = self.loop.time()
        self._arm(self.client_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # answered and lingering: the rest of this request is discarded unparsed
        self._last_read = now = self.loop.time()
        reading_headers = self._phase != _BODY
        if reading_headers:
            if self._headers_since is None:  # the first byte of the next request on this connection
                self._headers_since = now
                self._arm(self.client_timeout)
            self._header_bytes += len(data)
        super().data_received(data)
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

    def on_url(self, url: bytes) -> None:
        if self._closed:
            return
        self._header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._closed:
            return
        self._header_size += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        if not self._closed:
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
        cycle = self.cycle
        # A response is under way (this request's, or a pipelined predecessor's): no room for an answer.
        started = cycle is not None and (
            cycle.response_started if cycle.scope is self.scope else not cycle.response_complete
        )
        log.info("closing a connection from %s: %s", self.client and self.client[0], message)
        self._disarm()
        self._stop_request()
        if started or not self.transport.can_write_eof():
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


def protocol(client_timeout: float | None = 60.0, header_limit: int = HEADER_LIMIT) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` with these limits, for uvicorn's ``http=`` option."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"client_timeout": client_timeout, "header_limit": header_limit},
    )
