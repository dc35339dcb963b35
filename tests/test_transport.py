"""The upstream transport on its own, against raw-socket upstreams that say exactly what a test needs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from otellama.proxy.transport import HttpTransport

Reader, Writer = asyncio.StreamReader, asyncio.StreamWriter
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class RawUpstream:
    """A TCP server running ``script`` on each connection; it keeps every request head it read."""

    def __init__(self, script: Callable[[RawUpstream, Reader, Writer], Awaitable[None]]) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.hung_up = 0  # connections that ended with EOF from otellama's side
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _handle(self, reader: Reader, writer: Writer) -> None:
        self.connections += 1
        try:
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def request(self, reader: Reader) -> bytes:
        """Read one request (head, and a body framed by Content-Length or chunked); return its head."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            body = b""
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readexactly(2)
        else:
            length = 0
            for line in lower.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
        self.bodies.append(body)
        return head

    async def wait_hang_up(self, reader: Reader) -> None:
        while await reader.read(65536):
            pass
        self.hung_up += 1

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


Serve = Callable[[Callable[[RawUpstream, Reader, Writer], Awaitable[None]]], Awaitable[RawUpstream]]


@pytest.fixture
async def raw() -> AsyncIterator[Serve]:
    made: list[RawUpstream] = []

    async def make(script: Callable[[RawUpstream, Reader, Writer], Awaitable[None]]) -> RawUpstream:
        made.append(RawUpstream(script))
        return await made[-1].start()

    yield make
    for upstream in made:
        await upstream.close()


@pytest.fixture
async def transport() -> AsyncIterator[HttpTransport]:
    transport = HttpTransport()
    yield transport
    await transport.aclose()


async def answer_all(up: RawUpstream, reader: Reader, writer: Writer, response: bytes = OK) -> None:
    while True:
        await up.request(reader)
        writer.write(response)
        await writer.drain()


async def eventually(condition: Callable[[], bool], limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def request(method: str, url: str, **options: object) -> httpx.Request:
    return httpx.Request(method, url, **options)  # type: ignore[arg-type]


async def fetch(transport: HttpTransport, req: httpx.Request) -> tuple[httpx.Response, bytes]:
    response = await transport.handle_async_request(req)
    try:
        body = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
    finally:
        await response.aclose()
    return response, body


async def test_the_request_goes_out_verbatim_with_nothing_added(raw: Serve, transport: HttpTransport) -> None:
    up = await raw(answer_all)
    req = request(
        "POST",
        up.url + "/api/blobs/x",
        headers=[(b"Host", b"ollama:11434"), (b"X-Odd-Case", b"kept"), (b"content-length", b"5")],
        content=b"hello",
        extensions={"target": b"/api/blobs/../x?a=%2F&b"},  # httpx.URL would have resolved the ".."
    )
    response, body = await fetch(transport, req)
    assert (response.status_code, body) == (200, b"ok")
    assert up.heads == [
        b"POST /api/blobs/../x?a=%2F&b HTTP/1.1\r\nHost: ollama:11434\r\nX-Odd-Case: kept\r\n"
        b"content-length: 5\r\n\r\n"
    ]
    assert up.bodies == [b"hello"]


async def test_a_fully_read_response_leaves_its_connection_for_the_next(
    raw: Serve, transport: HttpTransport
) -> None:
    up = await raw(answer_all)
    for _ in range(5):
        _, body = await fetch(transport, request("GET", up.url + "/api/tags"))
        assert body == b"ok"
    assert up.connections == 1


@pytest.mark.parametrize(
    ("response", "body"),
    [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", b""),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n", b""),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok", b"ok"),
    ],
)
async def test_framed_responses_keep_the_connection(
    raw: Serve, transport: HttpTransport, response: bytes, body: bytes
) -> None:
    async def script(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        writer.write(response)
        await answer_all(up, reader, writer)

    up = await raw(script)
    _, got = await fetch(transport, request("GET", up.url + "/"))
    assert got == body
    _, got = await fetch(transport, request("GET", up.url + "/"))
    assert got == b"ok"
    assert up.connections == 1


async def test_an_unread_rest_of_a_response_does_not_leak_into_the_next(
    raw: Serve, transport: HttpTransport
) -> None:
    async def script(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"3\r\ntwo\r\n0\r\n\r\n")  # all of it arrives, but the reader has stopped
        await answer_all(up, reader, writer)

    up = await raw(script)
    response = await transport.handle_async_request(request("GET", up.url + "/api/generate"))
    async for chunk in response.stream:  # type: ignore[union-attr]
        assert chunk == b"one"
        await asyncio.sleep(0.2)  # the client left; meanwhile the response completed
        break
    await response.aclose()
    _, body = await fetch(transport, request("GET", up.url + "/"))
    assert body == b"ok"
    assert up.connections == 1  # complete, so reused: minus what was left unread


async def test_a_head_response_has_no_body_whatever_its_content_length(
    raw: Serve, transport: HttpTransport
) -> None:
    async def script(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\ncontent-type: text/plain\r\n\r\n")
        await answer_all(up, reader, writer)

    up = await raw(script)
    response, body = await fetch(transport, request("HEAD", up.url + "/"))
    assert (response.status_code, body, response.headers["content-length"]) == (200, b"", "1234")
    _, body = await fetch(transport, request("GET", up.url + "/"))
    assert body == b"ok"
    assert up.connections == 1


async def test_a_body_delimited_by_the_close_ends_there(raw: Serve, transport: HttpTransport) -> None:
    async def script(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")

    up = await raw(script)
    _, body = await fetch(transport, request("GET", up.url + "/"))
    assert body == b"all of it"


async def test_a_streamed_body_goes_out_chunked_or_by_its_length(
    raw: Serve, transport: HttpTransport
) -> None:
    up = await raw(answer_all)

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"ab", b"", b"cde"):
            yield part

    await fetch(transport, request("POST", up.url + "/", content=parts()))
    await fetch(transport, request("POST", up.url + "/", content=parts(), headers={"content-length": "5"}))
    assert up.bodies == [b"abcde", b"abcde"]
    assert b"Transfer-Encoding: chunked" in up.heads[0]
    assert b"transfer-encoding" not in up.heads[1].lower()
    assert up.connections == 1


async def test_an_answer_before_the_body_was_read_reaches_the_caller(
    raw: Serve, transport: HttpTransport
) -> None:
    async def refuse(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the digest is wrong, the body is not wanted
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 6\r\n\r\nbad!!!")
        await writer.drain()
        await up.wait_hang_up(reader)

    up = await raw(refuse)
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 1 << 16
            yield b"x" * (1 << 16)

    response, body = await fetch(
        transport, request("POST", up.url + "/api/blobs/sha256:0", content=endless())
    )
    assert (response.status_code, body) == (400, b"bad!!!")
    assert sent < 64 << 20  # flow control: the upload waited for a reader that never came
    # The unread request can never be finished: its connection is closed, not reused.
    assert await eventually(lambda: up.hung_up == 1)


async def test_closing_a_response_early_closes_the_socket(raw: Serve, transport: HttpTransport) -> None:
    async def stream(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\ntoken\r\n")
        await writer.drain()
        await up.wait_hang_up(reader)

    up = await raw(stream)
    response = await transport.handle_async_request(request("POST", up.url + "/api/generate", content=b"{}"))
    async for chunk in response.stream:  # type: ignore[union-attr]
        assert chunk == b"token"
        break
    await response.aclose()  # how Ollama learns the client left
    assert await eventually(lambda: up.hung_up == 1, limit=0.1)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_the_upstream_going_away_mid_body_is_an_error(
    raw: Serve, transport: HttpTransport, how: str
) -> None:
    async def dies(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.close()

    up = await raw(dies)
    response = await transport.handle_async_request(request("GET", up.url + "/"))
    received = b""
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        async for chunk in response.stream:  # type: ignore[union-attr]
            received += chunk
    await response.aclose()
    assert received == b"partial"


async def test_connection_refused_is_a_connect_error_in_words(transport: HttpTransport) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpx.ConnectError, match=r"^Connection refused$"):
        await transport.handle_async_request(request("GET", f"http://127.0.0.1:{port}/"))


async def test_connect_timeout(transport: HttpTransport) -> None:
    # A listener whose backlog is full leaves further connects unanswered (SYNs dropped).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        fillers = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(listener.getsockname())
                fillers.append(filler)
            started = time.monotonic()
            req = request("GET", url, extensions={"timeout": {"connect": 0.2, "read": None}})
            with pytest.raises(httpx.ConnectTimeout):
                await transport.handle_async_request(req)
            assert time.monotonic() - started < 2
        finally:
            for filler in fillers:
                filler.close()


async def test_read_timeout_only_when_configured(raw: Serve, transport: HttpTransport) -> None:
    async def slow(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        await asyncio.sleep(0.5)  # a model load
        writer.write(OK)
        await writer.drain()
        await up.wait_hang_up(reader)

    up = await raw(slow)
    impatient = request("GET", up.url + "/", extensions={"timeout": {"connect": 5, "read": 0.1}})
    with pytest.raises(httpx.ReadTimeout):
        await transport.handle_async_request(impatient)
    patient = request("GET", up.url + "/", extensions={"timeout": {"connect": 5, "read": None}})
    _, body = await fetch(transport, patient)
    assert body == b"ok"


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("DELETE", True), ("POST", False)])
async def test_a_keep_alive_connection_closed_by_the_upstream_is_retried_only_when_safe(
    raw: Serve, transport: HttpTransport, method: str, retried: bool
) -> None:
    async def one_then_drop(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        writer.write(OK)
        await writer.drain()
        if up.connections == 1:
            # Keep-alive said yes, then the upstream closed as the next request arrived (its idle timeout
            # firing at the wrong moment): it read the request, so nothing tells us it did not act on it.
            await up.request(reader)
        else:
            await answer_all(up, reader, writer)

    up = await raw(one_then_drop)
    await fetch(transport, request(method, up.url + "/", content=b"{}"))
    second = request(method, up.url + "/", content=b"{}")
    if retried:
        _, body = await fetch(transport, second)
        assert body == b"ok"
        assert up.connections == 2
    else:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(transport, second)  # a POST /api/generate or /api/pull is never sent twice
        assert up.connections == 1


async def test_a_connection_the_upstream_closed_while_idle_is_not_used(
    raw: Serve, transport: HttpTransport
) -> None:
    async def one_per_connection(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        writer.write(OK)  # keep-alive by HTTP/1.1's default, but the server closes after all
        await writer.drain()

    up = await raw(one_per_connection)
    await fetch(transport, request("POST", up.url + "/", content=b"{}"))
    await asyncio.sleep(0.05)  # the FIN has arrived
    _, body = await fetch(transport, request("POST", up.url + "/", content=b"{}"))
    assert body == b"ok"
    assert up.connections == 2


async def test_idle_connections_expire(raw: Serve) -> None:
    async def script(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        writer.write(OK)
        await writer.drain()
        await up.wait_hang_up(reader)

    up = await raw(script)
    transport = HttpTransport(keepalive_expiry=0.1)
    try:
        await fetch(transport, request("GET", up.url + "/"))
        assert await eventually(lambda: up.hung_up == 1)
    finally:
        await transport.aclose()


async def test_a_reader_slower_than_the_upstream_holds_the_upstream_back(
    raw: Serve, transport: HttpTransport
) -> None:
    size, block = 256 << 20, b"x" * (1 << 16)
    written = 0

    async def fast(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        nonlocal written
        await up.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        while written < size:
            writer.write(block)
            await writer.drain()
            written += len(block)

    up = await raw(fast)
    response = await transport.handle_async_request(request("GET", up.url + "/api/pull"))
    await asyncio.sleep(0.5)  # a client that reads nothing for a while
    assert written < 64 << 20  # kernel buffers and our 128 KiB, not the whole body
    received = 0
    async for chunk in response.stream:  # type: ignore[union-attr]
        received += len(chunk)
    await response.aclose()
    assert received == size


async def test_a_reset_is_no_end_for_a_body_delimited_by_the_close(
    raw: Serve, transport: HttpTransport
) -> None:
    async def resets(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    up = await raw(resets)
    response = await transport.handle_async_request(request("GET", up.url + "/"))
    with pytest.raises(httpx.ReadError):
        async for chunk in response.stream:  # type: ignore[union-attr]
            assert chunk == b"partial"
    await response.aclose()


#: A self-signed certificate for 127.0.0.1, valid until 2126 (tests/tls/README.md says how it was made).
TLS = Path(__file__).with_name("tls")


async def test_an_https_upstream_is_verified_and_kept_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = TLS / "cert.pem", TLS / "key.pem"
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    up = RawUpstream(answer_all)
    server = await asyncio.start_server(up._handle, "127.0.0.1", 0, ssl=server_context)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/tags"
    try:
        untrusting = HttpTransport()  # the system's CAs only: a self-signed upstream is refused
        with pytest.raises(httpx.ConnectError):
            await fetch(untrusting, request("GET", url))
        await untrusting.aclose()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # what an operator does for a private CA
        trusting = HttpTransport()
        for _ in range(2):
            response, body = await fetch(trusting, request("GET", url))
            assert (response.status_code, body) == (200, b"ok")
        await trusting.aclose()
        assert up.connections == 1  # one TLS connection for both (the refused handshake got no further)
        assert all(head.startswith(b"GET /api/tags HTTP/1.1\r\n") for head in up.heads)
    finally:
        server.close()
        await server.wait_closed()


# --- what an upstream cannot make the transport do ---------------------------------------------------------
async def send_head_then_wait(up: RawUpstream, reader: Reader, writer: Writer, head: bytes) -> int:
    """Answer with ``head`` in 64 KiB writes (until otellama hangs up); the bytes that went out."""
    await up.request(reader)
    sent = 0
    try:
        for start in range(0, len(head), 65536):
            writer.write(head[start : start + 65536])
            await writer.drain()
            sent += min(65536, len(head) - start)
        await up.wait_hang_up(reader)
    except ConnectionError:
        up.hung_up += 1  # closed with our bytes unread: a reset, not a FIN
    return sent


def header_block(size: int) -> bytes:
    """A response head of about ``size`` bytes, in 1 KiB headers."""
    line = b"x-filler: " + b"f" * 1012 + b"\r\n"
    return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + line * (size // len(line)) + b"\r\nok"


async def test_a_response_head_over_64_kib_is_refused_and_its_connection_closed(
    raw: Serve, transport: HttpTransport
) -> None:
    def answering(size: int) -> Callable[[RawUpstream, Reader, Writer], Awaitable[None]]:
        async def script(up: RawUpstream, reader: Reader, writer: Writer) -> None:
            await send_head_then_wait(up, reader, writer, header_block(size))

        return script

    # A big head under the limit (a proxy's cookies, a CDN's headers) is fine...
    response, body = await fetch(transport, request("GET", (await raw(answering(60 * 1024))).url + "/"))
    assert (response.status_code, body, len(response.headers.get_list("x-filler"))) == (200, b"ok", 60)
    # ...a 2 MB one is not: it fails as bad HTTP from the upstream (the proxy answers 502), and says why.
    up = await raw(answering(2 * 1024 * 1024))
    with pytest.raises(httpx.RemoteProtocolError, match=r"upstream sent too big header \(over 64 KiB\)"):
        await transport.handle_async_request(request("GET", up.url + "/"))
    assert await eventually(lambda: up.hung_up == 1)


async def test_a_header_that_never_ends_fails_at_once_in_bounded_memory(
    raw: Serve, transport: HttpTransport
) -> None:
    # httptools joins the fragments of a header value with bytes +=, so a value spread over many reads
    # costs time quadratic in its length: 32 MB in 64 KiB reads took 7 s of CPU, 226 MB froze the proxy.
    sent: list[int] = []

    async def endless(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        head = b"HTTP/1.1 200 OK\r\nx-endless: " + b"a" * (64 * 1024 * 1024)
        sent.append(await send_head_then_wait(up, reader, writer, head))

    up = await raw(endless)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError, match="64 KiB"):
        await asyncio.wait_for(transport.handle_async_request(request("GET", up.url + "/")), 10)
    assert time.monotonic() - started < 1
    assert await eventually(lambda: up.hung_up == 1)
    # What the upstream got out before the hang-up: the limit plus what the socket buffers held.
    assert sent[0] < 16 * 1024 * 1024


async def test_interim_responses_count_towards_the_head_limit(raw: Serve, transport: HttpTransport) -> None:
    async def chatty(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await send_head_then_wait(up, reader, writer, b"HTTP/1.1 100 Continue\r\n\r\n" * 100_000 + OK)

    up = await raw(chatty)
    with pytest.raises(httpx.RemoteProtocolError, match="64 KiB"):
        await asyncio.wait_for(transport.handle_async_request(request("GET", up.url + "/")), 10)


async def test_an_unrequested_switch_of_protocols_is_a_protocol_error(
    raw: Serve, transport: HttpTransport
) -> None:
    # otellama never asks for an upgrade (Upgrade is hop-by-hop and not forwarded): a 101 is not HTTP it
    # can relay, so it must not reach the client as a 101 with a body.
    async def switches(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await send_head_then_wait(
            up,
            reader,
            writer,
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\nxx",
        )

    up = await raw(switches)
    with pytest.raises(httpx.RemoteProtocolError, match="101 Switching Protocols"):
        await transport.handle_async_request(request("GET", up.url + "/"))
    assert await eventually(lambda: up.hung_up == 1)


async def test_a_reason_phrase_split_across_reads_is_kept_whole(raw: Serve, transport: HttpTransport) -> None:
    async def split(up: RawUpstream, reader: Reader, writer: Writer) -> None:
        await up.request(reader)
        for part in (b"HTTP/1.1 200 All ", b"Good\r\ncontent-length: 2\r\n\r\nok"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)
        await up.wait_hang_up(reader)

    up = await raw(split)
    response, _ = await fetch(transport, request("GET", up.url + "/"))
    assert response.extensions["reason_phrase"] == b"All Good"
