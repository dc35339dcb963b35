"""An httpx transport that moves bytes with aiohttp.

httpx stays the client API (and the seam that opentelemetry-instrumentation-httpx hooks), but its default
transport spends most of a token stream in connection-pool bookkeeping: measured 7-10x slower than the
limit on this stack (REFERENCE §4). aiohttp's client relays the same stream at near line rate.

We write the ~100 lines ourselves rather than take ``httpx-aiohttp`` because a proxy needs what that
package gets wrong for it: its exception map turns "connection refused" into ``ConnectTimeout`` (a 504
where Ollama is simply down), it keeps aiohttp's cookie jar (one user's cookies would reach the next),
and it lets aiohttp add ``User-Agent``/``Accept`` headers the client never sent.

httpx's exception tree, as the proxy maps it::

    TransportError
     ├── TimeoutException
     │    ├── ConnectTimeout ........ no TCP connection within the connect timeout -> 502
     │    └── ReadTimeout ........... Ollama silent longer than the read timeout   -> 504
     └── NetworkError
          ├── ConnectError .......... refused, unreachable, DNS                    -> 502
          └── ReadError ............. reset or closed while reading                -> 502
    RemoteProtocolError ............. Ollama closed before answering / bad HTTP    -> 502
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx
import yarl

# aiohttp fills these in when a request lacks them; a transparent proxy forwards only what the client sent.
_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@contextlib.contextmanager
def _mapped_errors(request: httpx.Request) -> Iterator[None]:
    # Order matters: aiohttp's timeout errors are also ClientConnectionErrors.
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timeout", request=request) from exc
    except (aiohttp.SocketTimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timeout", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        # "Connection refused", not aiohttp's "Cannot connect to host ... ssl:default [...]".
        reason = os.strerror(exc.errno) if exc.errno else str(exc.os_error)
        raise httpx.ConnectError(reason, request=request) from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise httpx.RemoteProtocolError(str(exc) or "server disconnected", request=request) from exc
    except aiohttp.ClientResponseError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, aiohttp.ClientError) as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped_errors(self._request):
            # iter_any yields whatever arrived, so one Ollama token is one chunk with no waiting.
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # back to the keep-alive pool
        else:
            # Closing the socket is the only way to tell Ollama to stop generating.
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Send httpx requests over one shared aiohttp session.

    No connection limit (Ollama enforces its own parallelism and answers 503 when full; a proxy that
    queued would hide that), no cookies, no decompression, no redirects.
    """

    def __init__(self, *, keepalive_expiry: float = 60.0) -> None:
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: an aiohttp session belongs to the event loop that first uses it.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self._keepalive_expiry)
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=_AUTO_HEADERS,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        data: bytes | httpx.AsyncByteStream | None
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() != b"transfer-encoding"  # aiohttp frames the body itself
        ]
        try:
            data = request.content or None
        except httpx.RequestNotRead:
            data = request.stream  # type: ignore[assignment]
        url = str(request.url)
        target = request.extensions.get("target")
        if target is not None:
            # httpcore's extension: the request target exactly as the client wrote it (httpx.URL has
            # already resolved "." and ".." segments, which would forward /api/blobs/../x as /x).
            url = f"{request.url.scheme}://{request.url.netloc.decode('ascii')}{target.decode('latin-1')}"
        with _mapped_errors(request):
            response = await self._get_session().request(
                request.method,
                # encoded=True: yarl would otherwise re-quote, e.g. turn %2F into / in the query.
                yarl.URL(url, encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=timeout.get("connect"), sock_read=timeout.get("read")
                ),
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
