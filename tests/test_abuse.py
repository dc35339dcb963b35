"""Bad input and hostile clients: whatever arrives is forwarded untouched or refused cleanly, never both.

Request bodies otellama cannot parse pass through byte for byte (the upstream hashes what it gets); the
HTTP stack refuses ambiguous framing and oversized headers; slow clients are cut off without touching long
waits for Ollama; blob paths reach Ollama exactly as written and never reach ``/otellama/*``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import Receive, Scope, Send

from otellama.app import create_app
from otellama.proxy import connection
from otellama.settings import Settings, Upstream
from tests.conftest import VERSION_BODY, ScriptedUpstream, Seen


class HashingUpstream:
    """Hashes each request body as it streams in (a 100 MB body is never held) and answers with the hash."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.disconnects = 0
        self.lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        digest, size = hashlib.sha256(), 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                with self.lock:
                    self.disconnects += 1
                return
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen = {
            "path": scope["path"],
            "raw_path": scope["raw_path"],
            "sha256": digest.hexdigest(),
            "size": size,
            "content_type": dict(scope["headers"]).get(b"content-type"),
        }
        if scope["path"] != "/api/version":
            with self.lock:
                self.received.append(seen)
        body = orjson.dumps({"sha256": seen["sha256"], "size": size})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json; charset=utf-8")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def read_lines(path: Path, count: int, limit: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + limit  # recorded just after the client's last byte
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_bytes().splitlines()) >= count:
            break
        time.sleep(0.005)
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def eventually(predicate: Callable[[], bool], limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def guarded_proxy(
    serve: Callable[..., str], upstream_url: str, log_file: Path, client_timeout: float | None = 60.0
) -> str:
    app = create_app(Settings(upstream=Upstream.parse(upstream_url), log_file=log_file))
    return serve(app, http=connection.protocol(client_timeout))


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def exchange(url: str, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or ``wait`` passes); returns what came back."""
    with socket.create_connection(address(url)) as sock:
        sock.settimeout(wait)
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            answer += b"<still open>"
    return answer


# --- request bodies otellama cannot parse ------------------------------------------------------------------
MB = 1024 * 1024


def hundred_mb_prompt() -> Iterator[bytes]:
    yield b'{"model":"llama3.2:3b","prompt":"'
    block = b"tell me more " * (MB // 13) + b"x" * (MB % 13)
    for _ in range(100):
        yield block
    yield b'"}'


def nested() -> Iterator[bytes]:
    yield b'{"model":"m","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def one(body: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: iter([body])


HI = b'{"model":"llama3.2:3b","prompt":"hi"}'
BODIES: list[tuple[str, Callable[[], Iterator[bytes]], dict[str, str], bool]] = [
    # (case, body, headers, whether otellama could read the request)
    ("malformed JSON", one(b'{"model": "llama3.2:3b", "prompt": '), {}, False),
    ("invalid UTF-8", one(b'{"model":"llama3.2:3b","prompt":"\xff\xfe\xc3("}'), {}, False),
    ("a JSON array", one(b'["model","llama3.2:3b"]'), {}, False),
    ("100 MB prompt", hundred_mb_prompt, {}, False),
    ("100k nested arrays", nested, {}, False),
    ("deep nesting, unclosed", one(b"[" * 500_000), {}, False),
    # curl -d sends a form type and Ollama parses the JSON all the same, so otellama does too.
    ("form content type", one(HI), {"Content-Type": "application/x-www-form-urlencoded"}, True),
    ("binary content type", one(HI), {"Content-Type": "application/octet-stream"}, True),
    ("empty body", one(b""), {}, False),
]


def test_unparseable_request_bodies_are_forwarded_byte_for_byte(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    upstream = HashingUpstream()
    log_file = tmp_path / "otellama.jsonl"
    url = guarded_proxy(serve, serve(upstream), log_file)
    with httpx.Client(timeout=60) as client:
        for number, (case, body, headers, _) in enumerate(BODIES, start=1):
            digest, sizes = hashlib.sha256(), [0]

            def hashed(
                source: Iterator[bytes], digest: Any = digest, sizes: list[int] = sizes
            ) -> Iterator[bytes]:
                for piece in source:
                    digest.update(piece)
                    sizes[0] += len(piece)
                    yield piece

            # The 100 MB body is streamed: neither the client nor the upstream holds it.
            content: Any = hashed(body())
            if case != "100 MB prompt":
                content = b"".join(content)
            response = client.post(f"{url}/api/generate", content=content, headers=headers)
            assert response.status_code == 200, case
            assert response.json() == {"sha256": digest.hexdigest(), "size": sizes[0]}, case
            assert upstream.received[-1]["sha256"] == digest.hexdigest(), case
            want_type = headers.get("Content-Type")
            assert upstream.received[-1]["content_type"] == (want_type.encode() if want_type else None), case
            assert len(read_lines(log_file, number)) == number, case
    lines = read_lines(log_file, len(BODIES))
    for (case, _, _, parsed), line in zip(BODIES, lines, strict=True):
        assert line["request"]["parsed"] is parsed, case
        assert line["outcome"] == "ok" and line["status"] == 200, case
    assert sum(r["size"] for r in upstream.received) > 100 * MB


# --- framing the HTTP parser must refuse --------------------------------------------------------------------
SMUGGLING = {
    "Content-Length and Transfer-Encoding": b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /otellama/metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    "two different Content-Lengths": b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\nhello!",
    "chunked not last": b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
    b"0\r\n\r\n",
    "negative Content-Length": b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "space before colon": b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello",
    "bad chunk size": b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhi\r\n0\r\n\r\n",
    "bare LF in a header": b"POST /api/chat HTTP/1.1\r\nHost: x\r\nX-A: 1\nContent-Length: 5\r\n\r\nhello",
}


def test_ambiguous_framing_is_refused_before_anything_is_forwarded(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    upstream = ScriptedUpstream()
    url = guarded_proxy(serve, serve(upstream), tmp_path / "otellama.jsonl")
    for case, data in SMUGGLING.items():
        answer = exchange(url, data)
        assert answer.startswith(b"HTTP/1.1 400 "), (case, answer[:80])
        assert not answer.endswith(b"<still open>"), case  # the connection is closed after the 400
        assert b"gen_ai" not in answer and answer.count(b"HTTP/1.1") == 1, case  # nothing smuggled through
    assert upstream.forwarded == []
    log_file = tmp_path / "otellama.jsonl"  # created empty at start, for the exporter process to follow
    assert not log_file.exists() or log_file.read_bytes() == b""


# --- oversized headers --------------------------------------------------------------------------------------
def test_oversized_headers_are_refused_with_431(serve: Callable[..., str], tmp_path: Path) -> None:
    upstream = ScriptedUpstream()
    url = guarded_proxy(serve, serve(upstream), tmp_path / "otellama.jsonl")
    limit = connection.HEADER_LIMIT
    cases = {
        "one huge header": b"X-Big: " + b"a" * (8 * MB) + b"\r\n",
        "100 KB of headers in one read": b"X-Big: " + b"a" * 100_000 + b"\r\n",
        "100,000 headers": b"".join(b"X-%d: v\r\n" % i for i in range(100_000)),
        "a huge request line": b"",
    }
    for case, extra in cases.items():
        line = b"GET /api/tags?" + b"q" * (2 * limit) if case == "a huge request line" else b"GET /api/tags"
        started = time.monotonic()
        answer = exchange(url, line + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 "), (case, answer[:80])
        assert b'"error":"otellama: request headers larger than' in answer, case
        assert time.monotonic() - started < 2, case
    # A large but reasonable header block (a browser's cookies) still passes.
    cookie = "; ".join(f"c{i}={'v' * 60}" for i in range(200))  # ~13 KB
    assert httpx.get(f"{url}/api/tags", headers={"Cookie": cookie}).status_code == 200
    assert [seen.header(b"cookie") for seen in upstream.forwarded] == [cookie.encode()]


def test_a_closed_connection_leaves_no_reference_cycle(serve: Callable[..., str], tmp_path: Path) -> None:
    """A connection's objects are freed when it closes, by reference counting, as uvicorn's own protocol's
    are: what a cycle holds waits for a garbage collection, and the longer a connection lived the fuller
    (and longer) that collection must be."""
    url = guarded_proxy(serve, serve(ScriptedUpstream()), tmp_path / "otellama.jsonl")

    def protocols() -> int:
        return sum(isinstance(thing, connection.GuardedProtocol) for thing in gc.get_objects())

    gc.collect()
    gc.disable()  # what a cycle holds stays, so it can be counted
    try:
        for _ in range(3):
            answer = exchange(url, b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
        deadline = time.monotonic() + 2.0  # the server's loop runs connection_lost on its next turn
        while (left := protocols()) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        gc.enable()
    assert left == 0


# --- slow clients -------------------------------------------------------------------------------------------
TIMEOUT = 0.5


def test_a_silent_connection_is_closed(serve: Callable[..., str], tmp_path: Path) -> None:
    url = guarded_proxy(serve, serve(ScriptedUpstream()), tmp_path / "log.jsonl", TIMEOUT)
    started = time.monotonic()
    assert exchange(url, b"", wait=5) == b""  # nothing sent, nothing answered: just closed
    assert TIMEOUT - 0.01 <= time.monotonic() - started < TIMEOUT + 1  # libuv timers: 1 ms resolution


def test_trickled_headers_get_408_on_total_time_not_silence(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    upstream = ScriptedUpstream()
    url = guarded_proxy(serve, serve(upstream), tmp_path / "log.jsonl", TIMEOUT)
    request = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100
    with socket.create_connection(address(url)) as sock:
        started = time.monotonic()
        answer = b""
        sock.settimeout(0.05)
        for byte in request:  # a byte every 50 ms: never silent for long, never finished
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if answer:
                break
        closed_after = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    assert b"OTELLAMA_CLIENT_TIMEOUT" in answer
    assert TIMEOUT - 0.01 <= closed_after < TIMEOUT + 1
    assert upstream.forwarded == []


def test_a_stalled_body_gets_408_and_closes_the_upstream_request(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    upstream = HashingUpstream()
    log_file = tmp_path / "otellama.jsonl"
    url = guarded_proxy(serve, serve(upstream), log_file, TIMEOUT)
    with socket.create_connection(address(url)) as sock:
        sock.settimeout(5)
        sock.sendall(b"POST /api/blobs/sha256:abc HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        sock.sendall(b"x" * 100_000)  # a tenth of the promised body, then silence
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        closed_after = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    assert b"no request body bytes" in answer
    assert TIMEOUT - 0.01 <= closed_after < TIMEOUT + 1
    [line] = read_lines(log_file, 1)
    assert (line["outcome"], line["error_type"], line["endpoint"]) == (
        "cancelled",
        "cancelled",
        "/api/blobs/{digest}",
    )
    assert upstream.received == []  # Ollama never got a complete body it could mistake for the blob
    assert eventually(lambda: upstream.disconnects == 1)


def test_slow_but_steady_uploads_and_long_waits_for_ollama_are_not_cut(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    async def slow(seen: Seen, send: Send) -> None:
        if seen.path == "/api/pull":
            await asyncio.sleep(3 * TIMEOUT)  # a pull: silence far longer than the client timeout
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % len(seen.body)})

    url = guarded_proxy(serve, serve(ScriptedUpstream(slow)), tmp_path / "log.jsonl", TIMEOUT)

    def trickle() -> Iterator[bytes]:
        for _ in range(6):  # 1.2 s of upload, a piece every 0.2 s: slower in total than the timeout
            time.sleep(TIMEOUT * 0.4)
            yield b"x" * 1000

    with httpx.Client(timeout=30) as client:
        response = client.post(f"{url}/api/blobs/sha256:abc", content=trickle())
        assert (response.status_code, response.text) == (200, "6000")
        waited = client.post(f"{url}/api/pull", content=b'{"model":"m"}')
        assert (waited.status_code, waited.text) == (200, "13")
        time.sleep(2 * TIMEOUT)  # idle between requests: uvicorn's keep-alive (65 s) applies, not ours
        again = client.post(f"{url}/api/blobs/sha256:abc", content=b"y")
        assert (again.status_code, again.text) == (200, "1")
        assert again.extensions["network_stream"] is response.extensions["network_stream"]  # same connection


def test_a_stray_crlf_during_a_long_response_is_not_a_slow_request(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    async def slow_stream(seen: Seen, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )
        for _ in range(4):
            await asyncio.sleep(TIMEOUT)  # a stream that outlasts the client timeout several times
            await send({"type": "http.response.body", "body": b'{"done":false}\n', "more_body": True})
        await send({"type": "http.response.body", "body": b'{"done":true}\n'})

    url = guarded_proxy(serve, serve(ScriptedUpstream(slow_stream)), tmp_path / "log.jsonl", TIMEOUT)
    # Some clients send CRLF after a body: bytes that start no request, here while the stream runs.
    with socket.create_connection(address(url)) as sock:
        sock.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        answer = sock.recv(65536)  # the response has begun
        sock.sendall(b"\r\n")
        sock.settimeout(10)
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b'{"done":false}') == 4 and b'{"done":true}' in answer


def test_an_upload_waiting_on_ollama_is_not_timed_out(serve: Callable[..., str], tmp_path: Path) -> None:
    """Backpressure: Ollama reads the body late; otellama stops reading the client, which is not its fault."""
    upstream_reading = threading.Event()

    async def late_reader(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/api/blobs/sha256:abc":
            await asyncio.sleep(4 * TIMEOUT)  # reads nothing for 2 s while 32 MB wait
        upstream_reading.set()
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % size})

    url = guarded_proxy(serve, serve(late_reader), tmp_path / "log.jsonl", TIMEOUT)
    body = b"z" * (32 * MB)
    response = httpx.post(f"{url}/api/blobs/sha256:abc", content=body, timeout=30)
    assert (response.status_code, response.text) == (201, str(len(body)))
    assert upstream_reading.is_set()


# --- pipelining ---------------------------------------------------------------------------------------------
class Answers:
    """Pipelined HTTP/1.1 responses, parsed as they arrive: ``(status, body)`` in the order they came."""

    def __init__(self) -> None:
        import httptools

        self.got: list[tuple[int, bytes]] = []
        self._body = b""
        self._parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.got.append((self._parser.get_status_code(), self._body))
        self._body = b""


def pipeline(url: str, data: bytes, count: int, piece: int | None = None, deaf: float = 0.0) -> Answers:
    """Write ``data`` (``piece`` bytes at a time) without waiting for answers, read nothing for ``deaf``
    seconds, then read until ``count`` answers came or the connection closed."""
    answers = Answers()
    with socket.create_connection(address(url)) as sock:
        size = piece or len(data)
        writer = threading.Thread(
            target=lambda: [sock.sendall(data[i : i + size]) for i in range(0, len(data), size)], daemon=True
        )
        writer.start()
        time.sleep(deaf)
        sock.settimeout(30)
        while len(answers.got) < count and (chunk := sock.recv(1 << 20)):
            answers.feed(chunk)
        writer.join(30)
    return answers


def counting_protocol(
    client_timeout: float | None = 60.0,
) -> tuple[type[connection.GuardedProtocol], list[int]]:
    """The guarded protocol, noting the longest queue of pipelined requests any of its connections reached."""
    peak = [0]

    class Counting(connection.protocol(client_timeout)):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            peak[0] = max(peak[0], len(self.pipeline))

    return Counting, peak


def test_pipelined_requests_are_queued_a_few_at_a_time_however_many_are_sent(
    serve: Callable[..., str],
) -> None:
    counting, peak = counting_protocol()
    app = create_app(Settings(upstream=Upstream.parse(serve(ScriptedUpstream())), log_file=None))
    url = serve(app, http=counting)
    request = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
    count = 5000  # 190 KB: without the bound, nearly all of it is queued at once (4,999 measured)
    answers = pipeline(url, request * count, count, deaf=0.5)  # a client that reads no answer at first
    assert answers.got == [(200, VERSION_BODY)] * count
    # Room for the limit plus one parser piece's worth, whatever the reads: not thousands.
    assert peak[0] <= connection.PIPELINE_LIMIT + connection.FEED // len(request) + 1, peak


def mixed_requests(count: int) -> tuple[bytes, list[bytes]]:
    """Pipelined requests of every shape (no body, small, larger than a parser piece, chunked), and the
    answer each should get from :func:`echo_request`."""
    data, expected = b"", []
    for i in range(count):
        body = b'{"model":"m%d"}' % i
        if i % 4 == 0:
            data += b"GET /api/tags?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
            body, method, path = b"", b"GET", b"/api/tags"
        elif i % 4 == 1:
            data += b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            method, path = b"POST", b"/api/show"
        elif i % 4 == 2:
            body += b" " * (3 * connection.FEED)
            data += b"POST /api/embed HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            method, path = b"POST", b"/api/embed"
        else:
            half = len(body) // 2
            data += b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            data += b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
            method, path = b"POST", b"/api/chat"
        expected.append(method + b" " + path + b" " + body)
    return data, expected


async def echo_request(seen: Seen, send: Send) -> None:
    if seen.path == "/api/pull":  # an answer that keeps the rest waiting longer than the client timeout
        await asyncio.sleep(3 * TIMEOUT)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": f"{seen.method} {seen.path} ".encode() + seen.body})


@pytest.mark.parametrize(
    ("case", "piece"), [("at once", None), ("in 37-byte pieces", 37), ("behind a long answer", None)]
)
def test_pipelined_requests_are_all_answered_in_order(
    serve: Callable[..., str], case: str, piece: int | None
) -> None:
    upstream = ScriptedUpstream(echo_request)
    counting, peak = counting_protocol(TIMEOUT)  # a request waiting its turn is not a slow client
    app = create_app(Settings(upstream=Upstream.parse(serve(upstream)), log_file=None))
    url = serve(app, http=counting)
    data, expected = mixed_requests(240)
    if case == "behind a long answer":
        data = b"POST /api/pull HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}" + data
        expected.insert(0, b"POST /api/pull {}")
    answers = pipeline(url, data, len(expected), piece)
    assert answers.got == [(200, answer) for answer in expected], case
    assert [f"{s.method} {s.path} ".encode() + s.body for s in upstream.forwarded] == expected
    # The queue stayed bounded (no request here is under 30 bytes); sent at once, it filled, so the requests
    # held back unparsed were among those answered in order.
    assert peak[0] <= connection.PIPELINE_LIMIT + connection.FEED // 30 + 1, peak
    assert piece is not None or peak[0] >= connection.PIPELINE_LIMIT, peak


# --- path tricks --------------------------------------------------------------------------------------------
TRICKS = [
    b"/api/blobs/../../otellama/metrics",
    b"/api/blobs/%2e%2e/%2e%2e/otellama/metrics",
    b"/api/blobs/%2E%2E%2F%2E%2E%2Fotellama%2Fmetrics",
    b"/api/blobs/..%2f..%2fotellama%2fhealth",
    b"/api/blobs/sha256:abc/./../x",
    b"/api/blobs/sha256:abc//..//x",
    b"/api/blobs/..;/otellama/metrics",
    b"/api/blobs/%00/x",
    b"/api/blobs/sha256:abc?../../otellama/metrics",
]


def test_blob_path_tricks_reach_ollama_verbatim_and_never_otellama(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    upstream = HashingUpstream()
    url = guarded_proxy(serve, serve(upstream), tmp_path / "log.jsonl")
    for number, target in enumerate(TRICKS, start=1):
        answer = exchange(url, b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                          b"Connection: close\r\n\r\nhi")  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 200 "), (target, answer[:80])
        assert b'"size":2' in answer and b"gen_ai" not in answer, target  # upstream's answer, not metrics
        assert len(upstream.received) == number, target
        forwarded = upstream.received[-1]["raw_path"]
        assert forwarded + (b"?" + target.split(b"?", 1)[1] if b"?" in target else b"") == target


# --- what must not leak or grow -----------------------------------------------------------------------------
def test_captured_content_is_capped_per_attribute(
    serve: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otellama.observe.request import CONTENT_LIMIT

    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY")
    huge_answer = "z" * (5 * CONTENT_LIMIT)

    async def answer(seen: Seen, send: Send) -> None:
        body = orjson.dumps(
            {"model": "m", "message": {"role": "assistant", "content": huge_answer}, "done": True}
        )
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json; charset=utf-8")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    log_file = tmp_path / "otellama.jsonl"
    upstream = serve(ScriptedUpstream(answer))
    url = serve(
        create_app(Settings(upstream=Upstream.parse(upstream), log_file=log_file), tracer_provider=provider)
    )
    many = [{"role": "user", "content": f"{i:03d}" + "q" * 4000} for i in range(200)]  # 800 KB of prompt
    one = [{"role": "user", "content": "q" * 3 * CONTENT_LIMIT + "?"}]  # one 192 KiB message
    for messages in (many, one):
        response = httpx.post(f"{url}/api/chat", json={"model": "m", "messages": messages, "stream": False})
        # The client gets it all.
        assert response.status_code == 200 and len(response.content) > 5 * CONTENT_LIMIT
    lines = read_lines(log_file, 2)
    genai = [span for span in spans.get_finished_spans() if span.name == "chat m"]
    assert len(lines) == len(genai) == 2
    for messages, line, span in zip((many, one), lines, genai, strict=True):
        attributes = span.attributes or {}
        for name, field in (
            ("gen_ai.input.messages", "input_messages"),
            ("gen_ai.output.messages", "output_messages"),
        ):
            encoded = str(attributes[name]).encode()
            assert len(encoded) <= CONTENT_LIMIT  # per attribute, however many messages (UTF-8 bytes)
            assert orjson.loads(encoded) == line[field]
            assert len(orjson.dumps(line[field])) <= CONTENT_LIMIT
        kept = [m["parts"][0]["content"] for m in line["input_messages"]]
        # The latest messages are kept, the oldest one kept marked where it was cut.
        assert messages[-1]["content"].endswith(kept[-1].removeprefix("…")) and kept[0].startswith("…")
        [out] = line["output_messages"]
        assert out["parts"][0]["content"].startswith("zzz") and out["parts"][0]["content"].endswith("…")


def test_invented_model_and_client_names_leave_the_series_count_bounded(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from prometheus_client.parser import text_string_to_metric_families

    from otellama.emulator import EmulatorSettings, create_emulator
    from otellama.exchange import Exchange
    from otellama.observe.record import TraceIds, build
    from otellama.sinks.capper import LIMIT as CARDINALITY_LIMIT
    from otellama.sinks.otel.metrics import record_metrics
    from otellama.sinks.otel.sink import OtelSink

    # 100,000 invented names straight through the record -> metrics path (over HTTP it would take minutes).
    exchange_ = Exchange("POST", "/api/generate", b"", [], time.time(), time.perf_counter())
    exchange_.request_body, exchange_.status, exchange_.t_end = b'{"model":"m"}', 404, time.perf_counter()
    template = build(exchange_, None, TraceIds(1, 2, 3, None, True), server_address="127.0.0.1",
                     server_port=11434, client_header=b"x-client-name", cold_start_seconds=1.0,
                     capture_content=False)  # fmt: skip
    reader = InMemoryMetricReader()
    otel = OtelSink(metric_readers=[reader], environ={})
    # operation=None records only the request counter (the histograms share its attributes): 100k in ~1 s.
    for i in range(100_000):
        record = dataclasses.replace(
            template, model=f"invented-{i}", client=f"client-{i % 5000}", operation=None
        )
        record_metrics(otel.instruments, record, otel.cap)
    data = reader.get_metrics_data()
    assert data is not None
    [requests] = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                  if m.name == "ollama.requests"]  # fmt: skip
    points: list[Any] = list(requests.data.data_points)
    assert sum(p.value for p in points) == 100_000  # every request counted...
    models = {p.attributes["gen_ai.request.model"] for p in points}
    clients = {p.attributes["otellama.client"] for p in points}
    assert len(models) == CARDINALITY_LIMIT + 1 and "other" in models  # ...in at most 101 model values
    assert len(clients) == CARDINALITY_LIMIT + 1 and "other" in clients
    assert len(points) <= 2 * (CARDINALITY_LIMIT + 1)  # series follow the names in use, not their product
    otel.close()

    # And a few thousand over HTTP, each with a new model and a new client name.
    emulator = create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01, max_queue=1000))
    url = serve(create_app(Settings(upstream=Upstream.parse(serve(emulator)), log_file=None)))

    async def invent(count: int) -> None:
        import aiohttp  # lighter than httpx at this rate: the client is not what is tested

        async with aiohttp.ClientSession() as session:
            gate = asyncio.Semaphore(32)

            async def one(i: int) -> None:
                body = {"model": f"made-up-{i}", "prompt": "x"}
                headers = {"X-Client-Name": f"bot-{i}"}
                async with gate, session.post(f"{url}/api/generate", json=body, headers=headers) as response:
                    await response.read()

            await asyncio.gather(*(one(i) for i in range(count)))

    def requests_total() -> tuple[str, list[Any]]:
        text = httpx.get(f"{url}/otellama/metrics").text
        families = text_string_to_metric_families(text)
        return text, [s for f in families for s in f.samples if s.name == "ollama_requests_total"]

    asyncio.run(invent(3000))
    assert eventually(lambda: sum(s.value for s in requests_total()[1]) == 3000)  # recorded after the answers
    text, samples = requests_total()
    assert len({s.labels.get("gen_ai_request_model") for s in samples}) <= CARDINALITY_LIMIT + 1
    assert len({s.labels.get("otellama_client") for s in samples}) <= CARDINALITY_LIMIT + 1
    assert len(text) < 2_000_000  # the whole scrape stays small
    assert len(httpx.get(f"{url}/otellama/stats").content) < 2_000_000


def test_the_upstream_client_keeps_no_cookies_between_users(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    async def sets_cookies(seen: Seen, send: Send) -> None:
        who = seen.header(b"x-user") or b"?"
        headers = [(b"set-cookie", b"session=" + who + b"; Path=/"), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": seen.header(b"cookie") or b"no cookie"})

    upstream = ScriptedUpstream(sets_cookies)
    url = guarded_proxy(serve, serve(upstream), tmp_path / "log.jsonl")
    alice = httpx.get(f"{url}/api/tags", headers={"X-User": "alice"})
    assert alice.headers["set-cookie"] == "session=alice; Path=/"  # passed back to the client who got it
    for _ in range(3):  # same proxy, same pooled upstream connection, another user
        bob = httpx.get(f"{url}/api/tags", headers={"X-User": "bob"})
        assert bob.text == "no cookie"
    with httpx.Client() as browser:  # a client that does keep its own cookies still sends them itself
        browser.get(f"{url}/api/tags", headers={"X-User": "carol"})
        assert browser.get(f"{url}/api/tags").text == "session=carol"
    assert [seen.header(b"cookie") for seen in upstream.forwarded] == [
        None,
        None,
        None,
        None,
        None,
        b"session=carol",
    ]


class _Broken(httpx.AsyncBaseTransport):
    """A transport with a bug: it raises something no transport should."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise RuntimeError("SECRET-internal-detail at /srv/otellama/transport.py line 42")


def test_responses_carry_no_otellama_internals(serve: Callable[..., str], tmp_path: Path) -> None:
    from otellama.emulator import EmulatorSettings, create_emulator

    emulator_url = serve(create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01)))
    url = guarded_proxy(serve, emulator_url, tmp_path / "log.jsonl")
    body = {"model": "llama3.2:3b", "prompt": "hi", "stream": True}
    cases = [
        ("POST", "/api/generate", body),
        ("GET", "/api/tags", None),
        ("POST", "/api/generate", {"model": "nope"}),
        ("GET", "/no/such/path", None),
    ]
    for method, path, payload in cases:
        direct = httpx.request(method, f"{emulator_url}{path}", json=payload)
        proxied = httpx.request(method, f"{url}{path}", json=payload)
        assert proxied.status_code == direct.status_code
        assert sorted(proxied.headers.keys()) == sorted(direct.headers.keys()), path  # nothing added
    # otellama's own errors: Ollama-shaped, and no traceback, module path or exception text.
    broken = serve(create_app(Settings(log_file=None), transport=_Broken()))
    answers = [
        httpx.post(f"{broken}/api/chat", content=b"{}"),
        httpx.post(f"{broken}/v1/chat/completions", content=b"{}"),
    ]
    dead = guarded_proxy(serve, "127.0.0.1:9", tmp_path / "dead.jsonl")  # discard port: refused
    answers.append(httpx.post(f"{dead}/api/chat", content=b"{}"))
    answers.append(
        httpx.Response(431, content=exchange(url, b"GET / HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"))
    )
    for answer in answers:
        text = answer.text
        for leak in (
            "Traceback",
            "SECRET",
            ".py",
            "line 42",
            "uvicorn",
            "starlette",
            "aiohttp",
            "RuntimeError",
        ):
            assert leak not in text, (leak, text)
        assert "server" not in answer.headers
    assert answers[0].status_code == 500 and answers[0].json() == {
        "error": "otellama: internal error (details are in otellama's log)"
    }
    assert answers[1].json()["error"]["message"].startswith("otellama: internal error")
    assert answers[2].status_code == 502 and "error" in answers[2].json()


@pytest.mark.parametrize(("value", "timeout"), [(None, 60.0), ("5", 5.0), ("0", None), ("off", None)])
def test_client_timeout_setting(value: str | None, timeout: float | None) -> None:
    env = {} if value is None else {"OTELLAMA_CLIENT_TIMEOUT": value}
    assert Settings.from_env(env).client_timeout == timeout
    assert connection.protocol(timeout).client_timeout == timeout
