"""Pass-through: whatever the client sends reaches Ollama, whatever Ollama answers reaches the client."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Callable

import httpx
import orjson
import pytest
from starlette.types import Send

from otellama.exchange import Exchange
from tests.conftest import ScriptedUpstream, Seen


def _start(status: int, headers: list[tuple[bytes, bytes]]) -> dict[str, object]:
    return {"type": "http.response.start", "status": status, "headers": headers}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/", b""),
        ("HEAD", "/api/tags", b""),
        ("POST", "/api/generate", b'{"model":"m","prompt":"hi"}'),
        ("DELETE", "/api/delete", b'{"model":"m"}'),
        ("PUT", "/api/some/future/path", b"\x00\x01binary"),
        ("PATCH", "/api/experimental/thing", b"{}"),
        ("OPTIONS", "/v1/chat/completions", b""),
        ("POST", "/api/blobs/sha256:" + "ab" * 32, b"blob-bytes"),
        ("GET", "/api/status", b""),
    ],
)
def test_every_method_and_path_reaches_upstream_unchanged(
    proxy_to: Callable[..., str], serve: Callable[..., str], method: str, path: str, body: bytes
) -> None:
    upstream = ScriptedUpstream()
    upstream_url = serve(upstream)
    url = proxy_to(upstream_url)
    response = httpx.request(
        method,
        f"{url}{path}?q=1&x=%2Fslash",
        content=body or None,
        headers={"X-Custom": "kept", "Authorization": "Bearer secret", "Origin": "http://app.example"},
    )
    assert response.status_code == 200
    [seen] = upstream.forwarded
    assert (seen.method, seen.path, seen.query) == (method, path, b"q=1&x=%2Fslash")
    assert seen.body == body
    # Host is rewritten to Ollama's own address (it answers 403 otherwise); everything else passes.
    assert seen.header(b"host") == upstream_url.removeprefix("http://").encode()
    assert seen.header(b"x-custom") == b"kept"
    assert seen.header(b"authorization") == b"Bearer secret"
    assert seen.header(b"origin") == b"http://app.example"
    if method != "HEAD":
        assert response.content == body


def test_hop_by_hop_headers_are_not_forwarded(
    proxy_to: Callable[..., str], serve: Callable[..., str]
) -> None:
    upstream = ScriptedUpstream()
    url = proxy_to(serve(upstream))
    httpx.post(
        f"{url}/api/chat",
        content=b"{}",
        headers={
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic x",
            "X-Keep": "1",
        },
    )
    [seen] = upstream.forwarded
    names = {k for k, _ in seen.headers}
    assert not names & {b"keep-alive", b"te", b"proxy-authorization"}
    assert seen.header(b"x-keep") == b"1"


def test_percent_encoded_path_is_not_decoded(proxy_to: Callable[..., str], serve: Callable[..., str]) -> None:
    upstream = ScriptedUpstream()
    url = proxy_to(serve(upstream))
    httpx.get(f"{url}/api/show/a%2Fb%20c")
    assert upstream.forwarded[0].raw_path == b"/api/show/a%2Fb%20c"


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (200, b"application/json; charset=utf-8", b""),  # /api/copy and /api/delete answer an empty 200
        (
            404,
            b"application/json; charset=utf-8",
            b'{"error":"model \\"nope\\" not found, try pulling it first"}',
        ),
        (
            400,
            b"application/json; charset=utf-8",
            b'{"error":"invalid character \'x\' looking for beginning"}',
        ),
        (503, b"application/json; charset=utf-8", b'{"error":"server busy, please try again."}'),
        (500, b"text/plain; charset=utf-8", b"internal failure, not json"),
        (403, b"", b""),  # Ollama's Host/Origin refusal has no body at all
        (201, b"application/octet-stream", bytes(range(256))),
    ],
)
def test_status_headers_and_body_come_back_unchanged(
    proxy_to: Callable[..., str], serve: Callable[..., str], status: int, content_type: bytes, body: bytes
) -> None:
    async def answer(seen: Seen, send: Send) -> None:
        headers = [(b"x-ollama-thing", b"v1"), (b"content-length", str(len(body)).encode())]
        if content_type:
            headers.append((b"content-type", content_type))
        await send(_start(status, headers))
        await send({"type": "http.response.body", "body": body})

    url = proxy_to(serve(ScriptedUpstream(answer)))
    response = httpx.post(f"{url}/api/copy", content=b"{}")
    assert response.status_code == status
    assert response.content == body
    assert response.headers.get("content-type", "").encode() == content_type
    assert response.headers["content-length"] == str(len(body))
    assert response.headers["x-ollama-thing"] == "v1"
    assert "server" not in response.headers  # otellama adds nothing of its own


@pytest.mark.parametrize(
    ("content_type", "chunks"),
    [
        (b"application/x-ndjson", [b'{"response":"A","done":false}\n', b'{"response":"","done":true}\n']),
        (b"text/event-stream", [b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n"]),
    ],
)
async def test_chunks_reach_the_client_before_the_upstream_sends_the_next(
    proxy_to: Callable[..., str], serve: Callable[..., str], content_type: bytes, chunks: list[bytes]
) -> None:
    client_has_first = threading.Event()
    upstream_waited: list[bool] = []

    async def paced(seen: Seen, send: Send) -> None:
        await send(_start(200, [(b"content-type", content_type)]))
        await send({"type": "http.response.body", "body": chunks[0], "more_body": True})
        # Chunk 2 goes out only once the client holds chunk 1: a buffering proxy would time out here.
        upstream_waited.append(await asyncio.to_thread(client_has_first.wait, 10))
        await send({"type": "http.response.body", "body": chunks[1], "more_body": False})

    url = proxy_to(serve(ScriptedUpstream(paced)))
    received: list[bytes] = []
    async with (
        httpx.AsyncClient() as client,
        client.stream("POST", f"{url}/api/chat", content=b"{}") as response,
    ):
        assert response.headers["content-type"].encode() == content_type
        async for chunk in response.aiter_raw():
            received.append(chunk)
            client_has_first.set()
    assert upstream_waited == [True]
    assert received == chunks


def test_large_streamed_upload_passes_intact(proxy_to: Callable[..., str], serve: Callable[..., str]) -> None:
    import hashlib

    async def digest(seen: Seen, send: Send) -> None:
        await send(_start(201, [(b"content-type", b"text/plain")]))
        await send({"type": "http.response.body", "body": hashlib.sha256(seen.body).hexdigest().encode()})

    url = proxy_to(serve(ScriptedUpstream(digest)))
    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256(block * 32).hexdigest()
    response = httpx.post(f"{url}/api/blobs/sha256:{expected}", content=(block for _ in range(32)))
    assert (response.status_code, response.text) == (201, expected)


def test_connect_failure_answers_502_in_ollama_shape(proxy_to: Callable[..., str]) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = proxy_to(f"127.0.0.1:{port}")
    native = httpx.post(f"{url}/api/generate", content=b"{}")
    assert native.status_code == 502
    assert native.headers["content-type"] == "application/json; charset=utf-8"
    message = native.json()["error"]
    assert f"127.0.0.1:{port}" in message and "OTELLAMA_UPSTREAM" in message
    openai_style = httpx.post(f"{url}/v1/chat/completions", content=b"{}")
    assert openai_style.status_code == 502
    assert "OTELLAMA_UPSTREAM" in openai_style.json()["error"]["message"]


def _slow_first_byte(delay: float) -> ScriptedUpstream:
    async def slow(seen: Seen, send: Send) -> None:
        await asyncio.sleep(delay)  # a model load: nothing at all until it is done
        await send(_start(200, [(b"content-type", b"application/json; charset=utf-8")]))
        await send({"type": "http.response.body", "body": b'{"done":true}'})

    return ScriptedUpstream(slow)


def test_no_read_timeout_by_default(proxy_to: Callable[..., str], serve: Callable[..., str]) -> None:
    # httpx's default 5 s read timeout is the classic way proxies kill long model loads.
    url = proxy_to(serve(_slow_first_byte(5.5)))
    response = httpx.post(f"{url}/api/generate", content=b"{}", timeout=30)
    assert (response.status_code, response.content) == (200, b'{"done":true}')


def test_configured_read_timeout_answers_504(proxy_to: Callable[..., str], serve: Callable[..., str]) -> None:
    url = proxy_to(serve(_slow_first_byte(3)), read_timeout=0.3)
    started = time.monotonic()
    response = httpx.post(f"{url}/api/generate", content=b"{}", timeout=30)
    assert response.status_code == 504
    assert "OTELLAMA_READ_TIMEOUT" in response.json()["error"]
    assert time.monotonic() - started < 2.5


def test_upstream_dying_mid_stream_ends_ndjson_with_an_error_line(
    proxy_to: Callable[..., str], serve: Callable[..., str]
) -> None:
    async def dies(seen: Seen, send: Send) -> None:
        await send(_start(200, [(b"content-type", b"application/x-ndjson")]))
        await send(
            {"type": "http.response.body", "body": b'{"response":"A","done":false}\n', "more_body": True}
        )
        raise RuntimeError("upstream crashed")  # uvicorn drops the connection mid-body

    url = proxy_to(serve(ScriptedUpstream(dies)))
    response = httpx.post(f"{url}/api/generate", content=b"{}")
    lines = response.content.splitlines()
    assert lines[0] == b'{"response":"A","done":false}'
    assert "otellama" in orjson.loads(lines[-1])["error"]


def test_health_reports_whether_upstream_answered(
    proxy_to: Callable[..., str], serve: Callable[..., str]
) -> None:
    url = proxy_to(serve(ScriptedUpstream()))
    deadline = time.monotonic() + 5
    health = httpx.get(f"{url}/otellama/health").json()
    while health["upstream_ok"] is None and time.monotonic() < deadline:
        health = httpx.get(f"{url}/otellama/health").json()
    assert health["status"] == "ok"
    assert health["upstream_ok"] is True
    assert health["upstream_version"] == "0.0.0-scripted"

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    url = proxy_to(f"127.0.0.1:{dead_port}")
    health = httpx.get(f"{url}/otellama/health").json()
    while health["upstream_ok"] is None and time.monotonic() < deadline:
        health = httpx.get(f"{url}/otellama/health").json()
    assert health["upstream_ok"] is False
    assert "refused" in health["upstream_error"].lower()


def test_recorder_gets_one_exchange_after_the_last_byte(serve: Callable[..., str]) -> None:
    from otellama.app import create_app
    from otellama.settings import Settings, Upstream

    calls: list[tuple[str, Exchange]] = []
    chunks: list[bytes] = []

    class Recording:
        def observe(self, exchange: Exchange) -> Callable[[bytes, float], None]:
            calls.append(("observe", exchange))
            return lambda chunk, now: chunks.append(chunk)

        def finish(self, exchange: Exchange) -> None:
            calls.append(("finish", exchange))

    class Recorder:
        def begin(self, exchange: Exchange) -> Recording:
            calls.append(("begin", exchange))
            return Recording()

    upstream = serve(ScriptedUpstream())
    url = serve(create_app(Settings(upstream=Upstream.parse(upstream)), recorder=Recorder()))
    httpx.post(f"{url}/api/generate?x=1", content=b'{"model":"m"}')
    assert [name for name, _ in calls] == ["begin", "observe", "finish"]
    exchange = calls[-1][1]
    assert (exchange.method, exchange.path, exchange.query, exchange.status) == (
        "POST",
        "/api/generate",
        b"x=1",
        200,
    )
    assert exchange.request_body == b'{"model":"m"}'
    assert exchange.outcome == "ok"
    assert b"".join(chunks) == b'{"model":"m"}'
    assert exchange.response_size == len(b'{"model":"m"}')
    assert exchange.t_start <= exchange.t_headers <= exchange.t_end  # type: ignore[operator]


@pytest.mark.parametrize("where", ["begin", "recording"])
def test_a_failing_recorder_never_touches_the_response(serve: Callable[..., str], where: str) -> None:
    from otellama.app import create_app
    from otellama.settings import Settings, Upstream

    class BrokenRecording:
        def observe(self, exchange: Exchange) -> None:
            raise RuntimeError("telemetry bug")

        def finish(self, exchange: Exchange) -> None:
            raise RuntimeError("telemetry bug")

    class Broken:
        def begin(self, exchange: Exchange) -> BrokenRecording:
            if where == "begin":
                raise RuntimeError("telemetry bug")
            return BrokenRecording()

    upstream = serve(ScriptedUpstream())
    url = serve(create_app(Settings(upstream=Upstream.parse(upstream)), recorder=Broken()))
    response = httpx.post(f"{url}/api/generate", content=b'{"model":"m"}')
    assert (response.status_code, response.content) == (200, b'{"model":"m"}')


def _open_stream(url: str, path: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(request + body)
    return sock


@pytest.mark.parametrize("when", ["after the first chunk", "before the response headers"])
async def test_client_disconnect_closes_the_upstream_request_at_once(
    proxy_to: Callable[..., str], serve: Callable[..., str], when: str
) -> None:
    from otellama.emulator import EmulatorSettings, create_emulator
    from tests.conftest import wait_for

    # A slow load keeps the emulator silent for a while, so "before headers" has time to happen.
    emulator = create_emulator(EmulatorSettings(token_rate=20, load_seconds=1.0 if when[0] == "b" else 0.01))
    url = proxy_to(serve(emulator))
    body = orjson.dumps(
        {"model": "llama3.2:3b", "prompt": "tell me a long story", "options": {"num_predict": 500}}
    )
    sock = await asyncio.to_thread(_open_stream, url, "/api/generate", body)
    try:
        if when == "after the first chunk":
            received = b""
            while b'"response"' not in received:  # the headers may arrive on their own
                chunk = await asyncio.to_thread(sock.recv, 65536)
                if not chunk:
                    break
                received += chunk
            assert b'"response"' in received
        else:
            assert await wait_for(lambda: emulator.in_flight > 0)  # reached the emulator, which is "loading"
    finally:
        closed_at = time.monotonic()
        sock.close()
    assert await wait_for(lambda: bool(emulator.cancellations), limit=5)
    [cancellation] = emulator.cancellations
    assert cancellation.at - closed_at < 0.1


def test_a_finished_stream_leaves_no_reference_cycle(
    proxy_to: Callable[..., str], serve: Callable[..., str]
) -> None:
    """An exchange's objects are freed when it ends, by reference counting. One left in a reference cycle
    waits for a full garbage collection, and a thousand streams of them made those collections long: the
    event loop's tail (RELIABILITY.md). The stream outlasts WATCH_DELAY, so the disconnect watcher runs."""
    from otellama.emulator import EmulatorSettings, create_emulator
    from otellama.proxy.forward import WATCH_DELAY, RelayState

    tokens = 10
    emulator = create_emulator(EmulatorSettings(token_rate=tokens / (5 * WATCH_DELAY), load_seconds=0.0))
    url = proxy_to(serve(emulator))
    body = orjson.dumps(
        {
            "model": "llama3.2:3b",
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": tokens},
        }
    )

    def relay_states() -> int:
        return sum(isinstance(thing, RelayState) for thing in gc.get_objects())

    gc.collect()
    gc.disable()  # what a cycle holds stays, so it can be counted
    try:
        with httpx.Client(timeout=10) as client:
            for _ in range(3):
                with client.stream("POST", f"{url}/api/chat", content=body) as response:
                    lines = list(response.iter_lines())
                assert response.status_code == 200 and orjson.loads(lines[-1])["done"] is True
        deadline = time.monotonic() + 2.0  # the watcher ends on the server's next turn after the last byte
        while (left := relay_states()) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        gc.enable()
    assert left == 0
