"""What an upstream (or a client, through what the record keeps of it) cannot make otellama do.

Each test runs otellama on a real socket in front of an upstream that misbehaves on purpose: a raw TCP
server for what no HTTP server would send (a head that never ends, an unrequested 101), a scripted ASGI one
for hostile but well-formed answers. The figures are the issue's probe (issue 10), made small enough to run.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.types import Send

from otellama.app import create_app
from otellama.observe.request import FIELD_LIMIT, LABEL_LIMIT
from otellama.observe.stream import LINE_CAP
from otellama.settings import Settings, Upstream
from otellama.sinks.capper import LENGTH as METRIC_VALUE_LIMIT
from tests.conftest import ScriptedUpstream, Seen
from tests.test_abuse import read_lines
from tests.test_faults import RawUpstream, proxy

NDJSON = b"application/x-ndjson"
Script = Callable[[socket.socket, bytes], None]


@pytest.fixture
def raw_upstream() -> Iterator[Callable[[Script], RawUpstream]]:
    made: list[RawUpstream] = []

    def make(script: Script) -> RawUpstream:
        made.append(RawUpstream(script))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


def send_until_closed(conn: socket.socket, head: bytes, then: bytes = b"", repeat: int = 0) -> int:
    """Send ``head``, then ``then`` ``repeat`` times, until otellama hangs up; the bytes that went out."""
    sent = 0
    try:
        conn.sendall(head)
        sent += len(head)
        for _ in range(repeat):
            conn.sendall(then)
            sent += len(then)
        conn.settimeout(30)
        while conn.recv(65536):
            pass
    except OSError:
        pass  # otellama closed with our bytes unread: a reset
    return sent


# --- the response head -------------------------------------------------------------------------------------
def test_a_2_mb_response_head_gets_a_502_and_is_recorded(
    serve: Callable[..., str], tmp_path: Path, raw_upstream: Callable[[Script], RawUpstream]
) -> None:
    filler = b"x-filler: " + b"f" * 1012 + b"\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + filler * 2048 + b"\r\nok"
    upstream = raw_upstream(lambda conn, request: send_until_closed(conn, head))
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, upstream.url, log_file)
    response = httpx.get(f"{url}/api/tags", timeout=10)
    assert response.status_code == 502
    assert "x-filler" not in response.headers
    assert response.json()["error"].startswith("otellama: Ollama at")
    [line] = read_lines(log_file, 1)
    assert (line["status"], line["outcome"], line["error_type"]) == (502, "error", "protocol_error")


def test_an_endless_header_gets_a_502_at_once_and_never_stalls_the_proxy(
    serve: Callable[..., str], tmp_path: Path, raw_upstream: Callable[[Script], RawUpstream]
) -> None:
    sent: list[int] = []

    def endless(conn: socket.socket, request: bytes) -> None:
        # 64 MB of one header value: before the bound, tens of seconds of one core in the event loop.
        sent.append(send_until_closed(conn, b"HTTP/1.1 200 OK\r\nx-endless: ", b"a" * 65536, 1024))

    upstream = raw_upstream(endless)
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, upstream.url, log_file)
    health: list[float] = []
    stop = threading.Event()

    def probe_health() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                started = time.monotonic()
                assert client.get(f"{url}/otellama/health").status_code == 200
                health.append(time.monotonic() - started)
                time.sleep(0.01)

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    try:
        time.sleep(0.1)
        started = time.monotonic()
        response = httpx.post(f"{url}/api/chat", content=b'{"model":"m"}', timeout=30)
        elapsed = time.monotonic() - started
        time.sleep(0.1)
    finally:
        stop.set()
        prober.join(15)
    assert response.status_code == 502
    assert elapsed < 1
    assert len(health) >= 10 and max(health) < 0.5  # /otellama/health answered all along
    [line] = read_lines(log_file, 1)
    assert (line["status"], line["outcome"], line["error_type"]) == (502, "error", "protocol_error")
    assert sent[0] < 16 * 1024 * 1024  # the 64 KiB taken, and what the socket buffers held


def test_an_unrequested_switch_of_protocols_gets_a_502_and_is_recorded(
    serve: Callable[..., str], tmp_path: Path, raw_upstream: Callable[[Script], RawUpstream]
) -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nnot http"
    upstream = raw_upstream(lambda conn, request: send_until_closed(conn, switch))
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, upstream.url, log_file)
    response = httpx.get(f"{url}/api/tags")  # otellama never forwards Upgrade (hop-by-hop): unasked
    assert response.status_code == 502
    assert b"not http" not in response.content
    [line] = read_lines(log_file, 1)
    assert (line["status"], line["outcome"], line["error_type"]) == (502, "error", "protocol_error")


# --- what the record keeps ---------------------------------------------------------------------------------
def test_huge_model_names_leave_the_metrics_the_log_and_the_spans_bounded(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    async def answer(seen: Seen, send: Send) -> None:
        model = orjson.loads(seen.body)["model"]
        lines = [
            {"model": model, "message": {"role": "assistant", "content": "hi"}, "done": False},
            {"model": model, "message": {"role": "assistant", "content": ""}, "done": True,
             "done_reason": "stop" * 100_000, "eval_count": 1, "eval_duration": 1000},
        ]  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", NDJSON)]})
        await send({"type": "http.response.body", "body": b"".join(orjson.dumps(x) + b"\n" for x in lines)})

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    log_file = tmp_path / "otellama.jsonl"
    settings = Settings(upstream=Upstream.parse(serve(ScriptedUpstream(answer))), log_file=log_file)
    url = serve(create_app(settings, tracer_provider=provider))
    names = [f"{i}-" + "m" * 300_000 for i in range(4)]  # distinct: each would be a series of its own
    with httpx.Client(timeout=30) as client:
        for name in names:
            response = client.post(
                f"{url}/api/chat", json={"model": name, "messages": [{"role": "user", "content": "hi"}]}
            )
            assert response.status_code == 200 and name in response.text  # Ollama's bytes, untouched
        lines = read_lines(log_file, len(names))
        scrape = client.get(f"{url}/otellama/metrics").text
    assert len(lines) == len(names)
    for line, name in zip(lines, names, strict=True):
        assert len(orjson.dumps(line)) < 16 * 1024
        assert name.startswith(line["model"][:-1]) and len(line["model"]) == FIELD_LIMIT
        assert len(line["response_model"]) == FIELD_LIMIT and len(line["done_reason"]) == LABEL_LIMIT
    # Every series of four exchanges, with labels of at most METRIC_VALUE_LIMIT characters.
    assert len(scrape) < 256 * 1024
    assert max(len(text) for text in scrape.splitlines()) < 6 * METRIC_VALUE_LIMIT
    assert f'gen_ai_request_model="0-{"m" * (METRIC_VALUE_LIMIT - 3)}…"' in scrape
    finished = spans.get_finished_spans()
    assert len(finished) >= 2 * len(names)
    for span in finished:
        assert len(span.name) <= FIELD_LIMIT + 16
        for value in (span.attributes or {}).values():
            assert not isinstance(value, str) or len(value) <= FIELD_LIMIT


def test_a_utf8_client_name_is_recorded_as_written(serve: Callable[..., str], tmp_path: Path) -> None:
    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, serve(ScriptedUpstream()), log_file)
    with httpx.Client() as client:
        for value in ("été".encode(), b"\xe9t\xe9", b"caf\xc3"):  # UTF-8, then two that are not
            client.post(f"{url}/api/tags", headers={"x-client-name": value})
        lines = read_lines(log_file, 3)
        scrape = client.get(f"{url}/otellama/metrics").text
    # UTF-8 where it is UTF-8 (as clients send it), latin-1 where it is not (RFC 9110's historical reading).
    assert [line["client"] for line in lines] == ["été", "été", "cafÃ"]
    assert 'otellama_client="été"' in scrape


def test_a_stream_that_ends_inside_an_over_cap_line_is_incomplete(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    first = b'{"model":"m","response":"Hi","done":false}\n'

    async def answer(seen: Seen, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", NDJSON)]})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        piece = b"{" + b"1" * (1024 * 1024 - 1)
        for _ in range(LINE_CAP // len(piece) + 2):  # past the cap, and never a newline
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    log_file = tmp_path / "otellama.jsonl"
    url = proxy(serve, serve(ScriptedUpstream(answer)), log_file)
    response = httpx.post(f"{url}/api/generate", content=b'{"model":"m","prompt":"hi"}', timeout=30)
    assert response.status_code == 200 and response.content.startswith(first)
    [line] = read_lines(log_file, 1)
    assert (line["outcome"], line["error_type"], line["chunks"]) == ("error", "incomplete_stream", 1)
    assert "longer than" in line["error"]
