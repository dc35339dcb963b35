"""Faults around otellama: the client always gets Ollama's bytes or a clear Ollama-shaped error, the record
says what happened, and nothing hangs.

Each test records its figure with ``record_property`` (``pytest tests/test_faults.py -o junit_family=xunit1
--junitxml=faults.xml`` collects them; RELIABILITY.md quotes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import orjson
import pytest
from starlette.types import Send

from otellama.app import create_app
from otellama.emulator import BUSY_MESSAGE, FAULT_HEADER, EmulatorSettings, create_emulator
from otellama.settings import Settings, Upstream
from tests.conftest import API_FIXTURES, ScriptedUpstream, Seen
from tests.serving import wait_until_healthy
from tests.test_abuse import HashingUpstream, eventually, read_lines

Record = Callable[[str, object], None]
NDJSON = b"application/x-ndjson"
MODEL = "llama3.2:3b"


def proxy(serve: Callable[..., str], upstream_url: str, log_file: Path | None, **settings: Any) -> str:
    return serve(create_app(Settings(upstream=Upstream.parse(upstream_url), log_file=log_file, **settings)))


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.99 * len(values)) - 1)]


# --- an upstream that misbehaves at the TCP level ---------------------------------------------------------
class RawUpstream:
    """A TCP server whose ``script(conn, request)`` writes whatever bytes (or resets) the test wants.

    Answers otellama's ``/api/version`` probe itself. :attr:`closed_at` collects the time each scripted
    connection was closed by otellama (seen as EOF or a reset while the script waits on ``recv``).
    """

    def __init__(self, script: Callable[[socket.socket, bytes], None]) -> None:
        self.script = script
        self.closed_at: list[float] = []
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            if request.startswith(b"GET /api/version "):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                return
            self.requests.append(request)
            self.script(conn, request)

    def wait_closed(self, conn: socket.socket) -> None:
        """Block until otellama closes this connection; note when."""
        conn.settimeout(30)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
        self.closed_at.append(time.monotonic())

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def raw_upstream() -> Iterator[Callable[[Callable[[socket.socket, bytes], None]], RawUpstream]]:
    made: list[RawUpstream] = []

    def make(script: Callable[[socket.socket, bytes], None]) -> RawUpstream:
        made.append(RawUpstream(script))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


TOKENS = [b'{"model":"m","response":"Hel","done":false}\n', b'{"model":"m","response":"lo","done":false}\n']


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # RST, not FIN


# --- upstream faults ----------------------------------------------------------------------------------------
def test_refused_connection_answers_502_at_once(
    serve: Callable[..., str], tmp_path: Path, record_property: Record
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens here once the socket is closed
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, f"127.0.0.1:{port}", log_file)

    async def burst() -> list[tuple[int, dict[str, Any], float]]:
        async with httpx.AsyncClient(timeout=10) as client:

            async def one(i: int) -> tuple[int, dict[str, Any], float]:
                started = time.monotonic()
                path = "/v1/chat/completions" if i % 2 else "/api/chat"
                response = await client.post(f"{url}{path}", content=b'{"model":"m"}')
                return response.status_code, response.json(), time.monotonic() - started

            return await asyncio.gather(*(one(i) for i in range(100)))

    results = asyncio.run(burst())
    assert {status for status, _, _ in results} == {502}
    for i, (_, body, _) in enumerate(results):
        message = body["error"]["message"] if i % 2 else body["error"]
        assert "OTELLAMA_UPSTREAM" in message and "Connection refused" in message
    lines = read_lines(log_file, 100)
    assert len(lines) == 100
    assert {(line["outcome"], line["error_type"], line["status"]) for line in lines} == {
        ("error", "connect_error", 502)
    }
    worst = max(elapsed for _, _, elapsed in results)
    record_property("figure", f"100 concurrent requests, Ollama down: all 502 in {ms(worst)} ms (slowest)")
    assert worst < 3


def test_reset_mid_stream_ends_with_an_error_line(
    serve: Callable[..., str], tmp_path: Path, raw_upstream: Any, record_property: Record
) -> None:
    def script(conn: socket.socket, request: bytes) -> None:
        conn.sendall(STREAM_HEAD + chunk(TOKENS[0]) + chunk(TOKENS[1]))
        time.sleep(0.05)
        reset(conn)

    upstream = raw_upstream(script)
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, upstream.url, log_file)
    response = httpx.post(f"{url}/api/generate", content=b'{"model":"m","prompt":"hi"}', timeout=10)
    lines = response.content.splitlines(keepends=True)
    assert response.status_code == 200
    assert lines[:2] == TOKENS  # Ollama's own bytes first, untouched
    error = orjson.loads(lines[2])["error"]
    assert error.startswith("otellama:") and len(lines) == 3
    [line] = read_lines(log_file, 1)
    assert line["outcome"] == "error" and line["error_type"] in ("ReadError", "protocol_error")
    assert line["chunks"] == 2  # what Ollama sent; the error line is otellama's
    record_property(
        "figure", f"reset after 2 chunks: client got 2 chunks + error line ({line['error_type']})"
    )


def test_stalled_stream_waits_and_a_client_disconnect_still_closes_upstream(
    serve: Callable[..., str], tmp_path: Path, raw_upstream: Any, record_property: Record
) -> None:
    def script(conn: socket.socket, request: bytes) -> None:
        conn.sendall(STREAM_HEAD + chunk(TOKENS[0]) + chunk(TOKENS[1]))
        upstream.wait_closed(conn)  # then silence, until otellama hangs up

    upstream = raw_upstream(script)
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, upstream.url, log_file)  # no read timeout: the default
    host, port = url.removeprefix("http://").split(":")
    body = b'{"model":"m","prompt":"hi"}'
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while received.count(b'"done":false') < 2:
            received += client.recv(65536)
        client.settimeout(1.5)
        with pytest.raises(TimeoutError):
            client.recv(65536)  # a stall: otellama waits with the client, it does not give up for it
        left_at = time.monotonic()
    assert eventually(lambda: len(upstream.closed_at) == 1)
    closed_after = upstream.closed_at[0] - left_at
    assert closed_after < 0.5
    [line] = read_lines(log_file, 1)
    assert (line["outcome"], line["error_type"]) == ("cancelled", "cancelled")
    assert line["output_tokens"] == 2  # the tokens seen before the client left
    record_property("figure", f"stall, then client left: upstream closed {ms(closed_after)} ms later")


def test_stalled_stream_with_a_read_timeout_gets_an_error_line(
    serve: Callable[..., str], tmp_path: Path, raw_upstream: Any, record_property: Record
) -> None:
    def script(conn: socket.socket, request: bytes) -> None:
        conn.sendall(STREAM_HEAD + chunk(TOKENS[0]) + chunk(TOKENS[1]))
        upstream.wait_closed(conn)

    upstream = raw_upstream(script)
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, upstream.url, log_file, read_timeout=0.5)
    started = time.monotonic()
    response = httpx.post(f"{url}/api/generate", content=b'{"model":"m"}', timeout=10)
    elapsed = time.monotonic() - started
    lines = response.content.splitlines(keepends=True)
    assert lines[:2] == TOKENS
    assert "OTELLAMA_READ_TIMEOUT" in orjson.loads(lines[2])["error"]
    assert 0.5 <= elapsed < 1.5
    assert eventually(lambda: len(upstream.closed_at) == 1)
    [line] = read_lines(log_file, 1)
    assert (line["outcome"], line["error_type"]) == ("error", "timeout")
    record_property("figure", f"read timeout 0.5 s: error line after {ms(elapsed)} ms, upstream closed")


def test_error_line_mid_stream_is_passed_through_and_recorded(
    serve: Callable[..., str], tmp_path: Path, record_property: Record
) -> None:
    recorded = (API_FIXTURES / "error_midstream_generate.ndjson").read_bytes()  # Ollama's own bytes

    async def answer(seen: Seen, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", NDJSON)]})
        for line in recorded.splitlines(keepends=True):
            await send({"type": "http.response.body", "body": line, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, serve(ScriptedUpstream(answer)), log_file)
    proxied = httpx.post(f"{url}/api/generate", content=b'{"model":"gemma4","prompt":"hi"}').content
    assert proxied == recorded  # byte for byte, error line included
    [line] = read_lines(log_file, 1)
    assert (line["outcome"], line["error_type"], line["status"]) == ("error", "stream_error", 200)
    assert line["error"] == orjson.loads(recorded.splitlines()[-1])["error"]
    # The emulator's fault injection, through the official client: it raises Ollama's error.
    emulator = create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01))
    url = proxy(serve, serve(emulator), tmp_path / "emulated.jsonl")
    client = ollama.Client(host=url, headers={FAULT_HEADER: "midstream-error"})
    with client, pytest.raises(ollama.ResponseError):
        list(client.generate(MODEL, "hi", stream=True))
    record_property(
        "figure", f"{{error}} line after 200: {len(proxied)} bytes identical, stream_error recorded"
    )


MALFORMED = [
    b'{"model":"m","response":"a","done":false}\n',
    b"not json at all\n",
    b'{"model":"m","response":"b",\n',
    b"\x00\xff\xfe\n",
    b"[1,2,3]\n",
    b'{"model":"m","response":"c","done":false}',  # and no final line
]


def test_malformed_ndjson_is_forwarded_byte_for_byte(
    serve: Callable[..., str], tmp_path: Path, record_property: Record
) -> None:
    huge_line = b'{"model":"m","response":"' + b"x" * (10 * 1024 * 1024) + b'","done":false}\n'

    async def answer(seen: Seen, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", NDJSON)]})
        pieces = (
            MALFORMED
            if seen.path == "/api/generate"
            else [huge_line[:5000], huge_line[5000:], b'{"done":true}\n']
        )
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, serve(ScriptedUpstream(answer)), log_file)
    garbage = httpx.post(f"{url}/api/generate", content=b'{"model":"m"}')
    assert garbage.content == b"".join(MALFORMED)
    huge = httpx.post(f"{url}/api/chat", content=b'{"model":"m"}', timeout=30)
    assert hashlib.sha256(huge.content).digest() == hashlib.sha256(huge_line + b'{"done":true}\n').digest()
    first, second = read_lines(log_file, 2)
    assert (first["outcome"], first["error_type"]) == ("error", "malformed_stream")
    assert first["error"].endswith("the stream ended without a final object")
    # A 10 MB line: parsing stopped at the cap, forwarding did not; too long to read is not malformed.
    assert (second["status"], second["outcome"], second["error_type"]) == (200, "ok", None)
    record_property(
        "figure", "garbage NDJSON: identical bytes, malformed_stream; 10 MB line: identical bytes, ok"
    )


SSE = b"text/event-stream"
DONE_ANYWAY = {
    "/api/generate": (
        NDJSON,
        [
            b'{"model":"m","response":"It","done":false}\n',
            b"not json at all\n",
            b'{"model":"m","response":" is.","done":false}\n',
            b'{"model":"m","response":"","done":true,"done_reason":"stop","eval_count":2}\n',
        ],
    ),
    "/v1/chat/completions": (
        SSE,
        [
            b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"It"}}]}\n\n',
            b"data: {oops\n\n",
            b'data: {"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
            b"data: [DONE]\n\n",
        ],
    ),
}


@pytest.mark.parametrize("path", list(DONE_ANYWAY), ids=["ndjson", "sse"])
def test_garbage_before_a_proper_ending_is_recorded_as_a_malformed_stream(
    serve: Callable[..., str], tmp_path: Path, record_property: Record, path: str
) -> None:
    content_type, pieces = DONE_ANYWAY[path]

    async def answer(seen: Seen, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]}
        )
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, serve(ScriptedUpstream(answer)), log_file)
    response = httpx.post(f"{url}{path}", content=b'{"model":"m","stream":true}')
    assert (response.status_code, response.content) == (200, b"".join(pieces))  # Ollama's bytes, untouched
    [line] = read_lines(log_file, 1)
    # The stream ended properly, but not every line was Ollama's protocol: no clean success.
    assert (line["status"], line["outcome"], line["error_type"]) == (200, "error", "malformed_stream")
    assert "not a JSON object; the stream still ended with a final object" in line["error"]
    assert line["finish_reasons"] == ["stop"]  # what the proper ending said is kept
    record_property("figure", f"{path}: garbage then a proper ending: identical bytes, malformed_stream")


def test_busy_storm_every_client_gets_ollamas_503(
    serve: Callable[..., str], tmp_path: Path, record_property: Record
) -> None:
    emulator = create_emulator(EmulatorSettings(token_rate=200, load_seconds=0.01, parallel=2, max_queue=2))
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, serve(emulator), log_file)
    count = 300

    async def storm() -> list[tuple[int, bytes, float]]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:

            async def one(i: int) -> tuple[int, bytes, float]:
                started = time.monotonic()
                response = await client.post(
                    f"{url}/api/generate",
                    json={"model": MODEL, "prompt": f"q{i}", "options": {"num_predict": 20}},
                )
                return response.status_code, response.content, time.monotonic() - started

            return await asyncio.gather(*(one(i) for i in range(count)))

    started = time.monotonic()
    results = asyncio.run(storm())
    wall = time.monotonic() - started
    busy = [body for status, body, _ in results if status == 503]
    served = [body for status, body, _ in results if status == 200]
    assert len(busy) + len(served) == count  # nothing else: no 502, no hang
    assert len(busy) > count // 2
    assert set(busy) == {orjson.dumps({"error": BUSY_MESSAGE})}  # Ollama's own body, untouched
    assert all(orjson.loads(body.splitlines()[-1])["done"] for body in served)
    lines = read_lines(log_file, count)
    assert len(lines) == count
    assert sum(line["status"] == 503 and line["error_type"] == "503" for line in lines) == len(busy)
    slowest = max(elapsed for _, _, elapsed in results)
    record_property(
        "figure", f"{count} at once, 4 slots: {len(busy)} got Ollama's 503, {len(served)} served, "
        f"all done in {ms(wall)} ms (slowest {ms(slowest)} ms), {len(lines)} records"
    )  # fmt: skip


# --- client faults ------------------------------------------------------------------------------------------
def open_request(url: str, head: bytes, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head + body)
    return sock


def post_head(path: str, length: int) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), length)


def read_until(sock: socket.socket, marker: bytes, count: int = 1) -> bytes:
    received = b""
    while received.count(marker) < count:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return received


def test_client_leaving_at_every_stage_closes_the_upstream_request(
    serve: Callable[..., str], tmp_path: Path, record_property: Record
) -> None:
    emulator = create_emulator(EmulatorSettings(token_rate=20, load_seconds=1.0))
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, serve(emulator), log_file)
    figures = []
    stages = {
        "waiting for Ollama (model loading)": ("/api/generate", None),
        "after the first chunk": ("/api/chat", b'"content"'),
        "after five chunks": ("/api/generate", b'"response"'),
        "after the first /v1 event": ("/v1/chat/completions", b"data: "),
    }
    for number, (stage, (path, marker)) in enumerate(stages.items(), start=1):
        story = "a long story"
        messages = [{"role": "user", "content": story}]
        body = orjson.dumps(
            {
                "model": MODEL,
                "prompt": story,
                "messages": messages,
                "stream": True,
                "options": {"num_predict": 500},
            }
        )
        sock = open_request(url, post_head(path, len(body)), body)
        if marker is None:
            assert eventually(lambda: emulator.in_flight == 1)
        else:
            read_until(sock, marker, 5 if stage == "after five chunks" else 1)
        left_at = time.monotonic()
        sock.close()
        assert eventually(lambda n=number: len(emulator.cancellations) == n), stage  # type: ignore[misc]
        noticed = emulator.cancellations[-1].at - left_at
        assert noticed < 0.2, stage
        line = read_lines(log_file, number)[-1]
        assert (line["outcome"], line["error_type"]) == ("cancelled", "cancelled"), stage
        seen = emulator.cancellations[-1].chunks_sent
        if marker is None:
            assert line["output_tokens"] is None and line["status"] is None, stage  # it got nothing
        else:
            assert 1 <= line["output_tokens"] <= seen, stage  # the tokens seen before the client left
        figures.append(f"{stage}: upstream closed in {ms(noticed)} ms")
    record_property("figure", "; ".join(figures))


def test_client_leaving_during_a_blob_upload_closes_the_upstream_request(
    serve: Callable[..., str], tmp_path: Path, record_property: Record
) -> None:
    upstream = HashingUpstream()
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, serve(upstream), log_file)
    sock = open_request(url, post_head("/api/blobs/sha256:" + "ab" * 32, 100 * 1024 * 1024), b"x" * 3_000_000)
    time.sleep(0.2)  # let the first megabytes reach the upstream
    left_at = time.monotonic()
    sock.close()
    assert eventually(lambda: upstream.disconnects == 1)
    noticed = time.monotonic() - left_at
    assert upstream.received == []  # Ollama never saw a complete (truncated) blob
    [line] = read_lines(log_file, 1)
    assert (line["outcome"], line["error_type"], line["endpoint"]) == (
        "cancelled",
        "cancelled",
        "/api/blobs/{digest}",
    )
    record_property(
        "figure", f"upload cut at 3 MB of 100 MB: upstream saw the disconnect within {ms(noticed)} ms"
    )


# --- otellama in a process of its own (collector latency, signals, disk limits) -----------------------------
LAUNCHER = """
import os, resource, signal, socket, sys
from otellama import server
from otellama.proxy import connection
from otellama.app import create_app
from otellama.settings import Settings

settings = Settings.from_env()
if os.environ.get("TEST_FSIZE_LIMIT"):  # a disk that fills up, without root or a tmpfs
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(os.environ["TEST_FSIZE_LIMIT"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
app = create_app(settings)
sock = socket.create_server(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
import uvicorn
config = server.config(app, "127.0.0.1", 0, http=connection.protocol(settings.client_timeout),
                       timeout_graceful_shutdown=settings.shutdown_grace)
uvicorn.Server(config).run(sockets=[sock])
"""


class Process:
    """otellama as ``otellama serve`` runs it (cli.py: client timeouts, shutdown grace), in a subprocess.

    Not the command itself only because the test needs a free port chosen without a race.
    """

    def __init__(self, upstream: str, log_file: Path, **env: str) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTELLAMA_"))}
        environ.update(OTELLAMA_UPSTREAM=upstream, OTELLAMA_LOG_FILE=str(log_file), **env)
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.process.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.process.stdout.readline())}"
        wait_until_healthy(self.url, self.process, self.stop)

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def wait(self, limit: float = 20) -> int:
        return self.process.wait(limit)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        _, err = self.process.communicate(timeout=20)
        return err.decode(errors="replace")


@pytest.fixture
def process() -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(upstream: str, log_file: Path, **env: str) -> Process:
        started.append(Process(upstream, log_file, **env))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


# --- collector faults ---------------------------------------------------------------------------------------
class SlowCollector:
    """Accepts OTLP over HTTP and answers 200 after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        self.requests += 1
        await asyncio.sleep(self.delay)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


EMULATOR = """
import socket, uvicorn
from otellama import server
from otellama.emulator import EmulatorSettings, create_emulator

sock = socket.create_server(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
app = create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01))
uvicorn.Server(server.config(app, "127.0.0.1", 0)).run(sockets=[sock])
"""

LOADER = """
import asyncio, json, sys, time
import aiohttp

url, count, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = {"model": "llama3.2:3b", "prompt": "hi", "stream": False, "options": {"num_predict": 8}}

async def main():
    took = []
    async with aiohttp.ClientSession() as session:
        async def worker(n):
            for _ in range(n):
                started = time.perf_counter()
                async with session.post(url + "/api/generate", json=body) as response:
                    await response.read()
                    assert response.status == 200, response.status
                took.append(time.perf_counter() - started)
        await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))
    print(json.dumps(took))

asyncio.run(main())
"""


def latencies(url: str, count: int, concurrency: int = 4) -> list[float]:
    """Request latencies measured by a client in a process of its own (no GC pause of ours in them)."""
    done = subprocess.run(
        [sys.executable, "-c", LOADER, url, str(count), str(concurrency)], capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    return [float(x) for x in orjson.loads(done.stdout)]


def scraped(url: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/otellama/metrics").text
    return {
        ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


@pytest.fixture
def emulator_process() -> Iterator[str]:
    """The emulator in a process of its own (stopped even when the test fails); yields its URL."""
    emulator = subprocess.Popen([sys.executable, "-c", EMULATOR], stdout=subprocess.PIPE)
    try:
        assert emulator.stdout is not None
        yield f"http://127.0.0.1:{int(emulator.stdout.readline())}"
    finally:
        emulator.kill()
        emulator.communicate()


def test_a_down_black_holed_or_slow_collector_fails_no_request_and_drops_nothing(
    serve: Callable[..., str],
    tmp_path: Path,
    process: Callable[..., Process],
    emulator_process: str,
    record_property: Record,
    request: pytest.FixtureRequest,
) -> None:
    # Emulator, otellama and client each in a process of their own. What a broken collector costs requests
    # in time is measured by bench/proxy_bench.py (--telemetry blackhole), on a quiet machine: here, on
    # shared cores, only correctness is asserted, and the latencies are recorded as the test's figure.
    emulator_url = emulator_process
    black_hole = socket.create_server(("127.0.0.1", 0), backlog=1)  # accepts TCP (backlog), never answers
    request.addfinalizer(black_hole.close)  # closed however the test ends: a later test may want the port
    endpoints = {
        "none": None,
        "healthy": serve(SlowCollector(delay=0)),
        "down": f"http://127.0.0.1:{closed_port()}",
        "black-holed": f"http://127.0.0.1:{black_hole.getsockname()[1]}",
        "slow": serve(SlowCollector(delay=2.0)),
    }
    count, figures = 600, []
    for collector, endpoint in endpoints.items():
        log_file = tmp_path / f"{collector}.jsonl"
        env = {}
        if endpoint is not None:
            # The SDK's default queue (2048 spans); batches of 64 (encoding the default 512 holds the GIL
            # for ~10 ms, which is the p99 of any run with a collector, working or not); exports give up
            # after 0.5 s.
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_TIMEOUT": "0.5",
                   "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64", "OTEL_METRIC_EXPORT_INTERVAL": "200"}  # fmt: skip
        proc = process(emulator_url, log_file, **env)
        latencies(proc.url, 40)  # warm-up: connections, first-request costs
        took = latencies(proc.url, count)
        worst, typical = p99(took), statistics.median(took)
        lines = read_lines(log_file, count + 40)
        assert len(lines) == count + 40, collector  # every exchange is in the JSONL, whatever the collector
        assert all(line["outcome"] == "ok" for line in lines), collector

        # Spans wait in the log for the exporter process, not in a queue that drops them (issue 12).
        def exporter(name: str, url: str = proc.url) -> float:
            return sum(scraped(url, f"otellama_exporter_{name}").values())

        if collector in ("black-holed", "slow", "down"):
            assert eventually(lambda: exporter("backlog_bytes") > 0), collector  # waiting, not dropped
        if collector == "healthy":
            assert eventually(lambda: exporter("backlog_bytes") == 0)
        dropped = exporter("dropped_bytes_total")
        assert dropped == 0, collector
        figures.append(
            f"{collector}: p50 {ms(typical)} / p99 {ms(worst)} ms, "
            f"{len(lines)}/{count + 40} in JSONL, {int(exporter('backlog_bytes'))} bytes of log waiting"
        )
        proc.stop()
    record_property("figure", "; ".join(figures))


def queue_metrics(reader: Any) -> dict[tuple[str, str | None], float]:
    """The SDK's span-queue metrics on ``reader`` now: (name, error.type or None) -> value."""
    from otellama.sinks.otel import semconv

    data = reader.get_metrics_data()
    found: dict[tuple[str, str | None], float] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name not in (
                    semconv.SPAN_PROCESSED,
                    semconv.SPAN_QUEUE_SIZE,
                    semconv.SPAN_QUEUE_CAPACITY,
                ):
                    continue
                for point in metric.data.data_points:
                    attributes = dict(point.attributes or {})
                    assert (
                        attributes[semconv.COMPONENT_TYPE] == semconv.COMPONENT_TYPE_BATCHING_SPAN_PROCESSOR
                    )
                    key = (metric.name, attributes.get(semconv.ERROR_TYPE))
                    found[key] = found.get(key, 0) + point.value  # type: ignore[union-attr]
    return found


def test_the_export_queue_is_bounded_and_counts_what_it_drops(request: pytest.FixtureRequest) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from otellama.sinks.otel import semconv
    from otellama.sinks.otel.exportqueue import CountedBatchSpanProcessor

    size, capacity = (semconv.SPAN_QUEUE_SIZE, None), (semconv.SPAN_QUEUE_CAPACITY, None)
    handed, full = (semconv.SPAN_PROCESSED, None), (semconv.SPAN_PROCESSED, semconv.QUEUE_FULL)
    late = (semconv.SPAN_PROCESSED, semconv.ALREADY_SHUTDOWN)
    black_hole = socket.create_server(("127.0.0.1", 0), backlog=1)
    request.addfinalizer(black_hole.close)  # closed even when an assertion fails
    reader = InMemoryMetricReader()
    exporter = OTLPSpanExporter(
        endpoint=f"http://127.0.0.1:{black_hole.getsockname()[1]}/v1/traces", timeout=0.3
    )
    queue = CountedBatchSpanProcessor(
        exporter, MeterProvider(metric_readers=[reader]), max_queue_size=32, max_export_batch_size=16
    )
    provider = TracerProvider()
    provider.add_span_processor(queue)
    tracer = provider.get_tracer("test")
    for i in range(1000):
        tracer.start_span(f"span {i}").end()
        if i % 50 == 49:
            now = queue_metrics(reader)
            assert now[capacity] == 32 and 0 < now[size] <= 32, now
    dropped = queue_metrics(reader)[full]
    assert 1000 - 32 - 16 <= dropped <= 1000 - 32  # at most one batch was taken by the exporter
    provider.shutdown()  # the exporter is handed what is left (and fails)
    tracer.start_span("after shutdown").end()
    after = queue_metrics(reader)
    assert after.keys() == {capacity, size, handed, full, late} and after[full] == dropped, after
    assert (after[capacity], after[size], after[late]) == (32, 0, 1), after
    # Every span was handed to the exporter or counted dropped. The SDK checks "full?" and then appends: a
    # batch the worker takes in between averts a drop already counted, so a few may be counted twice.
    assert 0 <= after[handed] + dropped - 1000 <= 16, after


def test_the_sdk_still_offers_what_the_export_queue_relies_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """exportqueue.py uses only public SDK API: if this fails, the SDK changed it (see its docstring)."""
    import importlib.metadata
    import inspect

    from opentelemetry.sdk import environment_variables
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otellama.sinks.otel import semconv
    from otellama.sinks.otel.exportqueue import CountedBatchSpanProcessor

    sdk = f"opentelemetry-sdk {importlib.metadata.version('opentelemetry-sdk')}"
    variable = "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED"
    assert getattr(environment_variables, variable, None) == variable, (
        f"{sdk}: opentelemetry.sdk.environment_variables.{variable} is gone; exportqueue.py sets it"
    )
    parameter = inspect.signature(BatchSpanProcessor).parameters.get("meter_provider")
    assert parameter is not None and parameter.kind is inspect.Parameter.KEYWORD_ONLY, (
        f"{sdk}: BatchSpanProcessor(..., *, meter_provider=) is gone; exportqueue.py passes otellama's"
    )
    # Whatever the variable says for the rest of the SDK (here: off, or unset), the queue's metrics are on,
    # and the variable is left as it was.
    for setting in ("false", None):
        if setting is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, setting)
        reader = InMemoryMetricReader()
        queue = CountedBatchSpanProcessor(
            InMemorySpanExporter(),
            MeterProvider(metric_readers=[reader]),
            max_queue_size=4,
            max_export_batch_size=4,
        )
        assert os.environ.get(variable) == setting
        provider = TracerProvider()
        provider.add_span_processor(queue)
        provider.get_tracer("test").start_span("exported").end()
        provider.shutdown()
        provider.get_tracer("test").start_span("too late").end()
        assert queue_metrics(reader) == {
            (semconv.SPAN_QUEUE_CAPACITY, None): 4,
            (semconv.SPAN_QUEUE_SIZE, None): 0,
            (semconv.SPAN_PROCESSED, None): 1,
            (semconv.SPAN_PROCESSED, semconv.ALREADY_SHUTDOWN): 1,
        }, (
            f"{sdk}: BatchSpanProcessor no longer records {semconv.SPAN_QUEUE_CAPACITY}, "
            f"{semconv.SPAN_QUEUE_SIZE} and {semconv.SPAN_PROCESSED} (error.type) on the meter_provider it "
            f"is given when {variable}=true at construction; exportqueue.py relies on it"
        )


# --- shutdown -----------------------------------------------------------------------------------------------
async def open_streams(
    client: httpx.AsyncClient, url: str, count: int, tokens: int
) -> list[asyncio.Task[list[bytes]]]:
    """Start ``count`` streams; returns their tasks (each yields its lines) once every stream has begun."""
    begun = 0
    all_begun = asyncio.Event()

    async def stream(i: int) -> list[bytes]:
        nonlocal begun
        body = {"model": MODEL, "prompt": f"story {i}", "options": {"num_predict": tokens}}
        lines: list[bytes] = []
        try:
            async with client.stream("POST", f"{url}/api/generate", json=body) as response:
                async for line in response.aiter_lines():
                    lines.append(line.encode())
                    if len(lines) == 1:
                        begun += 1
                        if begun == count:
                            all_begun.set()
        except httpx.TransportError as exc:
            lines.append(f"<transport error: {type(exc).__name__}>".encode())
        return lines

    tasks = [asyncio.create_task(stream(i)) for i in range(count)]
    await asyncio.wait_for(all_begun.wait(), 20)
    return tasks


def test_sigterm_lets_running_streams_finish_then_flushes_the_log(
    serve: Callable[..., str], tmp_path: Path, process: Callable[..., Process], record_property: Record
) -> None:
    emulator = create_emulator(EmulatorSettings(token_rate=40, load_seconds=0.01, parallel=16))
    log_file = tmp_path / "otellama.jsonl"
    proc = process(serve(emulator), log_file, OTELLAMA_SHUTDOWN_GRACE="30")

    async def run() -> tuple[list[list[bytes]], float, int]:
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = await open_streams(client, proc.url, 10, tokens=60)  # ~1.5 s each at 40 tokens/s
            proc.signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = await asyncio.gather(*tasks)
        code = await asyncio.to_thread(proc.wait)
        return results, time.monotonic() - signalled, code

    results, took, code = asyncio.run(run())
    assert code == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down cleanly
    for lines in results:
        assert orjson.loads(lines[-1])["done"] is True  # every running stream finished
    lines = read_lines(log_file, 10)
    assert len(lines) == 10 and all(line["outcome"] == "ok" for line in lines)  # and was logged
    assert emulator.cancellations == []
    record_property(
        "figure", f"SIGTERM with 10 streams running: all 10 finished and logged, exited after {ms(took)} ms"
    )


def test_sigterm_past_the_grace_period_cuts_streams_cleanly_and_still_logs_them(
    serve: Callable[..., str], tmp_path: Path, process: Callable[..., Process], record_property: Record
) -> None:
    emulator = create_emulator(EmulatorSettings(token_rate=20, load_seconds=0.01, parallel=16))
    log_file = tmp_path / "otellama.jsonl"
    proc = process(serve(emulator), log_file, OTELLAMA_SHUTDOWN_GRACE="0.5")

    async def run() -> tuple[list[list[bytes]], float, int]:
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = await open_streams(client, proc.url, 10, tokens=2000)  # far longer than the grace period
            proc.signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = await asyncio.gather(*tasks)
        code = await asyncio.to_thread(proc.wait)
        return results, time.monotonic() - signalled, code

    results, took, code = asyncio.run(run())
    assert code == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down cleanly
    assert took < 5
    for lines in results:
        last = orjson.loads(lines[-1])
        assert "OTELLAMA_SHUTDOWN_GRACE" in last["error"]  # an Ollama-shaped end, not a silent cut
    lines = read_lines(log_file, 10)
    assert len(lines) == 10
    assert {(line["outcome"], line["error_type"]) for line in lines} == {("error", "shutdown")}
    assert eventually(lambda: len(emulator.cancellations) == 10)  # Ollama was told to stop generating
    figure = (
        "SIGTERM, grace 0.5 s, 10 endless streams: each cut with an error line, 10/10 logged, exited after"
    )
    record_property("figure", f"{figure} {ms(took)} ms")


def test_sigkill_loses_only_unwritten_lines_never_half_a_line(
    serve: Callable[..., str], tmp_path: Path, process: Callable[..., Process], record_property: Record
) -> None:
    emulator = create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01))
    log_file = tmp_path / "otellama.jsonl"
    proc = process(serve(emulator), log_file, OTELLAMA_LOG_MAX_BYTES="200000", OTELLAMA_LOG_BACKUPS="100")
    completed = 0
    enough = 1500

    async def hammer() -> None:
        nonlocal completed
        reached = asyncio.Event()
        body = orjson.dumps({"model": MODEL, "prompt": "hi", "options": {"num_predict": 4}})
        async with httpx.AsyncClient(timeout=10) as client:

            async def worker() -> None:
                nonlocal completed
                with contextlib.suppress(httpx.TransportError):
                    while True:
                        await client.post(f"{proc.url}/api/generate", content=body)
                        completed += 1
                        if completed == enough:
                            reached.set()

            workers = [asyncio.create_task(worker()) for _ in range(50)]
            await reached.wait()
            proc.signal(signal.SIGKILL)  # mid-flight: rotating, writing, answering
            await asyncio.gather(*workers)

    asyncio.run(hammer())
    proc.wait()
    files = sorted(tmp_path.glob("otellama.jsonl*"))
    assert len(files) > 2  # it was rotating as it died
    raw = [path.read_bytes() for path in files]
    assert all(data.endswith(b"\n") for data in raw if data)  # no torn last line in any file
    lines = [orjson.loads(line) for data in raw for line in data.splitlines()]  # every line parses
    assert len({line["trace_id"] for line in lines}) == len(lines)
    assert completed - 50 <= len(lines) <= completed + 50  # only the ones in flight can be missing
    figure = (
        f"SIGKILL under 50 clients: {len(lines)} lines for {completed} answered requests, every line whole"
    )
    record_property("figure", f"{figure}, {len(files)} rotated files")


# --- log faults ---------------------------------------------------------------------------------------------
def log_failures(url: str) -> float:
    return sum(scraped(url, "otellama_log_failures_total").values())


async def generate_many(url: str, count: int, concurrency: int = 100) -> list[int]:
    import aiohttp  # httpx's pool bookkeeping would make this test's client the bottleneck at 100 at once

    body = orjson.dumps({"model": MODEL, "prompt": "hi", "options": {"num_predict": 4}})
    async with aiohttp.ClientSession() as session:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with gate, session.post(f"{url}/api/generate", data=body) as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(one() for _ in range(count)))


def test_a_missing_blocked_or_full_log_never_fails_a_request(
    serve: Callable[..., str], tmp_path: Path, record_property: Record
) -> None:
    emulator_url = serve(
        create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01, parallel=100, max_queue=1000))
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file where the log directory should be")
    cases = {
        "missing directory": (tmp_path / "not" / "yet" / "there" / "otellama.jsonl", 0),
        "a file in the way": (blocker / "otellama.jsonl", 200),
        "disk full (/dev/full)": (Path("/dev/full"), 200),
    }
    figures = []
    for case, (log_file, failures) in cases.items():
        url = proxy(serve, emulator_url, log_file)
        statuses = asyncio.run(generate_many(url, 200))
        assert statuses == [200] * 200, case  # the log never costs a request
        assert eventually(lambda u=url, f=failures: log_failures(u) == f), case  # type: ignore[misc]
        if case == "missing directory":
            assert len(read_lines(log_file, 200)) == 200  # created, then written
        figures.append(f"{case}: 200/200 requests OK, {failures} failures counted")
    record_property("figure", "; ".join(figures))


def test_a_disk_filling_up_mid_line_leaves_no_torn_line(
    serve: Callable[..., str], tmp_path: Path, process: Callable[..., Process], record_property: Record
) -> None:
    """RLIMIT_FSIZE stands in for a full disk: writes past it are short, then fail, on a regular file."""
    emulator_url = serve(
        create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01, parallel=100, max_queue=1000))
    )
    log_file = tmp_path / "otellama.jsonl"
    limit = 50_000  # about 35 lines
    proc = process(emulator_url, log_file, TEST_FSIZE_LIMIT=str(limit), OTELLAMA_LOG_MAX_BYTES="0")
    statuses = asyncio.run(generate_many(proc.url, 300))
    assert statuses == [200] * 300
    data = log_file.read_bytes()
    assert 0 < len(data) <= limit
    assert data.endswith(b"\n")  # the line that did not fit was cut back off, not left torn
    lines = [orjson.loads(line) for line in data.splitlines()]
    assert eventually(lambda: log_failures(proc.url) == 300 - len(lines))  # every dropped line counted
    record_property(
        "figure", f"disk full at {limit} bytes: 300/300 requests OK, {len(lines)} whole lines kept, "
        f"{300 - len(lines)} dropped and counted, no torn line"
    )  # fmt: skip


def test_rotation_under_100_concurrent_requests_loses_and_tears_nothing(
    serve: Callable[..., str], tmp_path: Path, record_property: Record
) -> None:
    emulator_url = serve(
        create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01, parallel=100, max_queue=1000))
    )
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, emulator_url, log_file, log_max_bytes=20_000, log_backups=200)
    count = 1000
    statuses = asyncio.run(generate_many(url, count))
    assert statuses == [200] * count

    def read_log() -> list[tuple[Path, bytes]] | None:
        """Every log file and its bytes; None when a rotation renamed one between the listing and the read
        (the last lines are written after the responses, so rotation can still be under way)."""
        try:
            return [(path, path.read_bytes()) for path in tmp_path.glob("otellama.jsonl*")]
        except FileNotFoundError:
            return None

    def logged_ids() -> set[str]:
        found = read_log() or []
        try:
            return {orjson.loads(line)["trace_id"] for _, data in found for line in data.splitlines()}
        except orjson.JSONDecodeError:  # a line being written as we read: look again
            return set()

    # Counting lines is not enough: a listing taken mid-rotation can count one file's lines twice.
    assert eventually(lambda: len(logged_ids()) == count)
    files = read_log()  # every line is written: nothing rotates any more
    assert files is not None
    lines = []
    for path, data in files:
        assert data.endswith(b"\n") and len(data) <= 20_000, path.name
        lines += [orjson.loads(line) for line in data.splitlines()]
    assert len(lines) == count  # none lost, none twice
    assert log_failures(url) == 0
    figure = f"{count} requests, 100 at a time, log rotating every ~14 lines: {len(lines)} lines"
    record_property("figure", f"{figure} in {len(files)} files, none torn, none lost")


@pytest.mark.parametrize(
    ("value", "grace"), [(None, 30.0), ("10", 10.0), ("0", 0.0), ("none", None), ("NONE", None), ("2.5", 2.5)]
)
def test_shutdown_grace_setting(value: str | None, grace: float | None) -> None:
    env = {} if value is None else {"OTELLAMA_SHUTDOWN_GRACE": value}
    assert Settings.from_env(env).shutdown_grace == grace  # 0 cuts at once; only "none" waits forever


def test_a_bad_shutdown_grace_names_the_variable() -> None:
    from otellama.settings import SettingsError

    for value in ("soon", "-1"):
        with pytest.raises(SettingsError, match="OTELLAMA_SHUTDOWN_GRACE"):
            Settings.from_env({"OTELLAMA_SHUTDOWN_GRACE": value})
