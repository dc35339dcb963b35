"""Forwarding: one request in from the client, the same request out to Ollama, its bytes back as they come.

This is the only module that talks to the network client. It is a plain ASGI app so that nothing sits
between an upstream chunk and the client's socket but one ``send``. What the proxy saw of an exchange is
collected into an :class:`~otellama.exchange.Exchange`; the recorder is told when it begins and gets it
back through its :class:`~otellama.exchange.Recording` after the last byte went out. Telemetry hooks in
there and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
import orjson
from starlette.types import Message, Receive, Scope, Send

from otellama.exchange import CANCELLED, ERROR, Exchange, Recorder, Recording
from otellama.proxy.connection import REFUSED_WITH
from otellama.proxy.errors import SHUTDOWN, classify_failure, error_body, json_headers
from otellama.proxy.hosts import Host, HostPool
from otellama.proxy.router import (
    MODEL_PATHS,
)
from otellama.settings import Upstream

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 hop-by-hop headers, plus Host (rewritten: Ollama answers 403 to a Host it does not know).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Never copied from the request: the hop-by-hop headers, and Host, which is set to the upstream's.
_NOT_FORWARDED = _HOP_BY_HOP | {b"host"}
# Connection tokens that name no header still present once the hop-by-hop ones are gone.
_CONNECTION_OPTIONS = _HOP_BY_HOP | {b"close"}
# A request carrying one of these needs a closer look: Connection may name more headers to drop (RFC 9110
# §7.6.1), Transfer-Encoding may name a coding other than chunked. Most requests carry neither.
_CLOSER_LOOK = frozenset({b"connection", b"transfer-encoding"})
# ... unless they say what nearly every client says, which names no header and no coding to refuse.
_PLAIN = frozenset(
    (name, value)
    for name, values in ((b"connection", (b"keep-alive", b"close")), (b"transfer-encoding", (b"chunked",)))
    for plain in values
    for value in (plain, plain.title(), plain.upper())
)
#: Request bodies up to this size are kept for telemetry to parse after the response; larger ones are
#: forwarded all the same and the record says the body was not parsed.
BODY_CAPTURE_LIMIT = 1 << 20

# Methods that define a body: sent "Content-Length: 0" when it is empty, as httpx does (RFC 9110 §8.6).
_LENGTH_REQUIRED = frozenset({"POST", "PUT", "PATCH"})

#: Seconds after its request body before an exchange starts watching for the client to leave: what that
#: adds to closing Ollama's request, at most, when the client leaves early (the promise is 100 ms).
WATCH_DELAY = 0.02

_T = TypeVar("_T")


class _ClientGone(Exception):
    """The client disconnected; raised inside the request-body stream to abort the upload."""


class Proxy:
    """The ASGI app that forwards every request to Ollama."""

    def __init__(
        self,
        upstream: Upstream,
        transport: httpx.AsyncBaseTransport,
        *,
        timeout: httpx.Timeout,
        recorder: Recorder | None = None,
        pool: HostPool | None = None,
    ) -> None:
        self.upstream = upstream
        #: The hosts behind otellama: just ``upstream`` unless several were configured (then it is the first).
        self.pool = pool or HostPool((upstream,), poll_interval=5.0)
        # httpx's transport interface, without AsyncClient.send on top: a proxy needs none of its cookie,
        # auth and redirect handling, which cost ~50 µs a request (bench/proxy_bench.py).
        self.transport = transport
        self.recorder = recorder
        self._timeout = {"connect": timeout.connect, "read": timeout.read, "write": None, "pool": None}
        # The upstream's address as parts: a request target only ever supplies the path (see Host.url).
        self._only = self.pool.hosts[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        exchange = Exchange(
            method=scope["method"],
            path=path,
            query=scope["query_string"],
            request_headers=scope["headers"],
            started_at=time.time(),
            t_start=time.perf_counter(),
        )
        raw_path: bytes = scope.get("raw_path") or path.encode()
        if not raw_path.startswith(b"/"):
            # uvicorn hands absolute form over as its path already; what is left is asterisk form ("*", or
            # "*@host:port/x", which a URL parser reads as user info and a host). Only "OPTIONS *" means
            # something, to the server itself: answered as Go's net/http (Ollama's server) answers it.
            if exchange.method == "OPTIONS" and raw_path == b"*" and not exchange.query:
                await self._answer(exchange, send, 200, b"", [(b"content-length", b"0")])
            else:
                message = "otellama: the request target must be a path starting with '/'"
                await self._refuse(exchange, send, 400, message)
            return
        task = asyncio.current_task()
        assert task is not None
        state = RelayState()
        headers: list[tuple[bytes, bytes]] = []
        closer_look = False
        for header in scope["headers"]:  # the hot path: one loop, tuples reused, ~half a comprehension
            if header[0] in _NOT_FORWARDED:
                closer_look = closer_look or (header[0] in _CLOSER_LOOK and header not in _PLAIN)
            else:
                headers.append(header)
        if closer_look:
            if not _chunked_only(scope["headers"]):
                # nginx's answer: a coding otellama would have to undo (or drop silently) is not one it has.
                message = "otellama: a request Transfer-Encoding other than plain 'chunked' is not supported"
                await self._refuse(exchange, send, 501, message)
                return
            headers = _drop_named(scope["headers"], headers)
        await self._forward(scope, receive, send, exchange, raw_path, headers, state, task)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        raw_path: bytes,
        headers: list[tuple[bytes, bytes]],
        state: RelayState,
        task: asyncio.Task[Any],
    ) -> None:
        """Send the request, its headers already filtered, to the one upstream and relay the answer."""
        headers.append((b"host", self._only.host_header))

        first = await receive()
        if first["type"] == "http.disconnect":
            return  # gone before it sent a body: nothing reached Ollama, nothing to record
        body: bytes = first.get("body", b"")
        content = self._content(body, first.get("more_body", False), receive, exchange, state, task)
        recording = guarded(self.recorder.begin, exchange) if self.recorder is not None else None
        target = raw_path + (b"?" + exchange.query if exchange.query else b"")
        state.host = self._only
        self._only.started(None)
        opening = self._open(exchange.method, target, headers, content)
        await self._exchange(scope, send, exchange, state, task, recording, opening)

    def _content(
        self,
        body: bytes,
        more: bool,
        receive: Receive,
        exchange: Exchange,
        state: RelayState,
        task: asyncio.Task[Any],
    ) -> bytes | AsyncIterator[bytes]:
        """The request body to send: ``body`` itself when it is whole (and kept for the record), else a
        stream of it and the rest still to come. Once the body is in, the client is watched for leaving."""
        if more:
            return self._body_stream(body, receive, exchange, state, task)
        exchange.request_size = len(body)
        exchange.request_body = body
        state.watch(receive, task)
        return body

    async def _open(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        content: bytes | AsyncIterator[bytes],
    ) -> httpx.Response:
        request = self._request(self._only, method, target, headers, content)
        return await self.transport.handle_async_request(request)

    async def _exchange(
        self,
        scope: Scope,
        send: Send,
        exchange: Exchange,
        state: RelayState,
        task: asyncio.Task[Any],
        recording: Recording | None,
        opening: Awaitable[httpx.Response],
    ) -> None:
        """Open the upstream response, relay it, and end the exchange however it ends (recorded, always)."""
        response: httpx.Response | None = None
        try:
            response = await opening
            exchange.t_headers = time.perf_counter()
            await self._relay(response, exchange, send, state, recording)
        except asyncio.CancelledError:
            task.uncancel()  # handled here: the exchange ends now, either way
            if state.client_gone:
                _client_left(exchange, scope)
            else:
                # Nobody but the server cancels a request: it is stopping and the grace period ran out.
                await self._fail(SHUTDOWN, exchange, send, state)
        except (httpx.TransportError, _ClientGone) as exc:
            if state.client_gone or isinstance(exc, _ClientGone):
                _client_left(exchange, scope)
            else:
                await self._fail(exc, exchange, send, state, state.upstream)
        except Exception as exc:  # a bug of ours: the traceback goes to our log, never to the client
            log.exception("%s %s failed inside otellama", exchange.method, exchange.path)
            await self._fail(exc, exchange, send, state)
        finally:
            state.stop_watching()
            if response is not None:
                await _close(response, state)
            if state.host is not None:
                state.host.ended(state.model, exchange.status)
                if exchange.status == 200 and exchange.path in MODEL_PATHS:
                    state.host.served = True
            exchange.t_end = time.perf_counter()
            # Recorded whatever happened: a request that began is never missing from the log.
            if recording is not None:
                guarded(recording.finish, exchange)

    def _request(
        self,
        host: Host,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        content: bytes | AsyncIterator[bytes],
    ) -> httpx.Request:
        url = host.url(target)
        # httpx.URL drops "." and ".." segments: the target goes verbatim in httpcore's extension.
        extensions = {"timeout": self._timeout, "target": host.prefix + target}
        if not isinstance(content, bytes):
            return httpx.Request(method, url, headers=headers, content=content, extensions=extensions)
        # A body already in memory (nearly every request): given as content=, httpx encodes it and builds
        # the headers twice, ~8 µs. Framed here as httpx would frame it, and handed over already read.
        if (content or method in _LENGTH_REQUIRED) and not any(k == b"content-length" for k, _ in headers):
            headers.append((b"content-length", b"%d" % len(content)))
        request = httpx.Request(
            method, url, headers=headers, stream=httpx.ByteStream(content), extensions=extensions
        )
        request.read()
        return request

    async def _relay(
        self,
        response: httpx.Response,
        exchange: Exchange,
        send: Send,
        state: RelayState,
        recording: Recording | None,
    ) -> None:
        raw = response.headers.raw
        headers: list[tuple[bytes, bytes]] = []
        named = False
        for header in raw:
            name = header[0].lower()
            if name in _HOP_BY_HOP:
                named = named or (name == b"connection" and header[1].lower() not in _CONNECTION_OPTIONS)
            else:
                headers.append(header)
        if named:
            headers = _drop_named(raw, headers)
        exchange.status = response.status_code
        exchange.response_headers = headers
        observe = guarded(recording.observe, exchange) if recording is not None else None
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        state.response_started = True
        size = chunks = 0
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        try:
            # The transport's stream itself, not aiter_raw(), which only counts and re-chunks (for a
            # chunk_size we never set) in one more async generator per chunk.
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                now = time.perf_counter()
                if not chunks:
                    exchange.t_first_byte = now
                size += len(chunk)
                chunks += 1
                if observe is not None:
                    observe(chunk, now)  # must not raise: StreamObserver.feed never does
        finally:
            exchange.response_size, exchange.chunks = size, chunks
        state.finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _refuse(self, exchange: Exchange, send: Send, status: int, message: str) -> None:
        """Answer ``status`` in the API's error shape before anything reached Ollama, and record it.

        The request body is left unread (it may be large, or framed in a way otellama does not trust):
        the connection closes after the answer, as nginx closes after its own 400 and 501.
        """
        exchange.outcome, exchange.error, exchange.error_type = ERROR, message, str(status)
        log.info("refused %s %r: %s", exchange.method, exchange.path[:200], message)
        body = error_body(exchange.path, message)
        await self._answer(exchange, send, status, body, json_headers(body, (b"connection", b"close")))

    async def _answer(
        self, exchange: Exchange, send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Answer a request otellama handles itself, recorded like any exchange (it reached the proxy)."""
        recording = guarded(self.recorder.begin, exchange) if self.recorder is not None else None
        exchange.status = status
        exchange.response_headers = headers
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            exchange.response_size = len(body)
            exchange.t_end = time.perf_counter()
            if recording is not None:
                guarded(recording.finish, exchange)

    async def _fail(
        self,
        exc: BaseException,
        exchange: Exchange,
        send: Send,
        state: RelayState,
        upstream: Upstream | None = None,
    ) -> None:
        status, message, error_type = classify_failure(exc, upstream or self.upstream)
        exchange.outcome, exchange.error, exchange.error_type = ERROR, message, error_type
        log.warning("%s %s: %s", exchange.method, exchange.path, message)
        if state.finished:
            return  # the response was already complete: nothing left to say
        if not state.response_started:
            body = error_body(exchange.path, message)
            exchange.status = status
            state.finished = True
            await send({"type": "http.response.start", "status": status, "headers": json_headers(body)})
            await send({"type": "http.response.body", "body": body})
            return
        ctype = exchange.response_header(b"content-type") or b""
        if ctype.startswith(b"application/x-ndjson"):
            # Mid-stream, Ollama itself reports errors as one more NDJSON line; clients already handle it.
            state.finished = True
            line = orjson.dumps({"error": message}) + b"\n"
            await send({"type": "http.response.body", "body": line, "more_body": False})
            return
        # Any other body cannot say "error" after its status went out: returning without finishing the
        # response makes uvicorn cut the connection, so the client sees a truncated body, not a whole one.

    async def _body_stream(
        self, first: bytes, receive: Receive, exchange: Exchange, state: RelayState, task: asyncio.Task[Any]
    ) -> AsyncIterator[bytes]:
        kept: list[bytes] | None = [first]
        size = len(first)
        state.body_sent = True
        yield first
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                state.client_gone = True
                raise _ClientGone()
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if kept is not None:
                if size <= BODY_CAPTURE_LIMIT:
                    kept.append(chunk)
                else:
                    kept = None
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                break
        exchange.request_size = size
        exchange.request_body = b"".join(kept) if kept is not None else None
        state.watch(receive, task)


def _chunked_only(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request's Transfer-Encoding, if any, is exactly "chunked" (the only coding relayed)."""
    codings = [
        coding.strip().lower()
        for name, value in headers
        if name == b"transfer-encoding"
        for coding in value.split(b",")
        if coding.strip()
    ]
    return not codings or codings == [b"chunked"]


def _drop_named(raw: list[tuple[bytes, bytes]], kept: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``kept`` without the headers that ``raw``'s Connection headers name (RFC 9110 §7.6.1): options meant
    for this hop only, such as ``Connection: close, X-Secret``, stop here in both directions."""
    named = {
        token.strip().lower()
        for name, value in raw
        if name.lower() == b"connection"
        for token in value.split(b",")
    } - _CONNECTION_OPTIONS  # the usual "keep-alive" and "close" name nothing that is still there
    named.discard(b"")
    if not named:
        return kept
    return [header for header in kept if header[0].lower() not in named]


def _client_left(exchange: Exchange, scope: Scope) -> None:
    exchange.outcome, exchange.error_type = CANCELLED, CANCELLED
    refused: tuple[int, str] | None = scope.get(REFUSED_WITH)
    if refused is None:
        exchange.error = "client disconnected"
    else:  # otellama's connection cut a client too slow to send its body, after answering it itself
        exchange.status, exchange.error = refused


def guarded(call: Callable[[Exchange], _T], exchange: Exchange) -> _T | None:
    """``call(exchange)``, or None if it raised (and was logged)."""
    try:
        return call(exchange)
    except Exception:  # telemetry never touches the response
        log.exception("telemetry failed for %s %s", exchange.method, exchange.path)
        return None


async def _close(response: httpx.Response, state: RelayState) -> None:
    try:
        await response.aclose()
    except asyncio.CancelledError:
        # The disconnect watcher fired while we were already tidying up: the cancellation was for us.
        if not state.client_gone:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        await response.aclose()


class RelayState:
    """Per-request flags shared between the relay and the disconnect watcher."""

    __slots__ = (
        "_timer",
        "_watcher",
        "body_sent",
        "client_gone",
        "finished",
        "host",
        "model",
        "response_started",
        "upstream",
    )

    def __init__(self) -> None:
        self.host: Host | None = None  # the host the request is open on (its in-flight count holds it)
        self.model: str | None = None  # the model key it was routed by
        self.upstream: Upstream | None = None  # the host the last failure came from, for its message
        self.client_gone = False
        self.body_sent = False  # a streamed request body began going to a host: it can go nowhere else
        self.response_started = False
        self.finished = False  # the last body message is being sent; a disconnect now is the normal end
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None

    def watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        """Once the body is in, the only thing ``receive`` can still say is that the client left.

        The watcher task starts only if the exchange is still running after :data:`WATCH_DELAY`: most
        non-streamed requests are over by then, and a timer costs a fifth of a task. A client that left
        meanwhile is seen at once when it starts (``receive`` then returns ``http.disconnect`` at once).
        """
        self._timer = asyncio.get_running_loop().call_later(WATCH_DELAY, self._start, receive, task)

    def _start(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self._timer = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive, task))

    async def _watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        message: Message = await receive()
        while message["type"] != "http.disconnect":
            message = await receive()
        if not self.finished:
            self.client_gone = True
            task.cancel()  # Ollama stops generating only when its own request is closed

    def stop_watching(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        # A finished response wakes the watcher (the server answers its receive() with http.disconnect,
        # as it does when the client leaves), and it ends by itself. Cancelling it instead would leave a
        # CancelledError whose traceback holds the watcher's frames, and through them this state and the
        # request's task: a cycle only a full garbage collection frees, which made the collections of a
        # thousand streams long (RELIABILITY.md, "The event loop's tail").
        if self._watcher is not None and not self.finished:
            self._watcher.cancel()
