"""Every real recording reaches the client through the proxy byte for byte, with its status and type, and
is recorded as what it was: each 2xx an ``ok``, each error by its status, none malformed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import Send

from otellama.app import create_app
from otellama.server import BackgroundServer
from otellama.settings import Settings, Upstream
from tests import captures
from tests.conftest import ScriptedUpstream, Seen

ALL = captures.load()
BY_NAME = {capture.name: capture for capture in ALL}


def test_all_recordings_are_here() -> None:
    assert len(ALL) == 48


async def _replay(seen: Seen, send: Send) -> None:
    capture = BY_NAME[(seen.header(b"x-capture") or b"").decode()]
    headers = [(b"content-type", capture.content_type)]
    if not capture.streamed:
        headers.append((b"content-length", str(len(capture.body)).encode()))
    await send({"type": "http.response.start", "status": capture.status, "headers": headers})
    for chunk in capture.chunks():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def replaying(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ScriptedUpstream, str, Path]]:
    """One replaying upstream (the recording is chosen by an X-Capture header) and otellama before it,
    logging to a JSONL file whose lines name the recording as their client."""
    upstream = ScriptedUpstream(_replay)
    log_file = tmp_path_factory.mktemp("captures") / "otellama.jsonl"
    with BackgroundServer(upstream) as ollama:
        app = create_app(Settings(upstream=Upstream.parse(ollama.url), log_file=log_file))
        with BackgroundServer(app) as proxy:
            yield upstream, proxy.url, log_file


def line_of(log_file: Path, client: str, limit: float = 10.0) -> dict[str, Any]:
    """The JSONL line of the exchange with ``client`` as its client (written just after the last byte)."""
    deadline = time.monotonic() + limit
    while True:
        written = log_file.read_bytes() if log_file.exists() else b""
        lines = written[: written.rfind(b"\n") + 1].splitlines()  # whole lines only
        found = [line for line in map(orjson.loads, lines) if line["client"] == client]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, client
            line: dict[str, Any] = found[0]
            return line
        time.sleep(0.005)


@pytest.mark.parametrize("capture", ALL, ids=[c.name for c in ALL])
def test_recording_passes_byte_for_byte_and_is_recorded_as_it_was(
    replaying: tuple[ScriptedUpstream, str, Path], capture: captures.Capture
) -> None:
    upstream, url, log_file = replaying
    before = len(upstream.forwarded)
    response = httpx.request(
        capture.method,
        url + capture.endpoint,
        content=capture.request_body or None,
        headers={"X-Capture": capture.name, "X-Client-Name": capture.name},
    )
    assert response.status_code == capture.status
    assert response.headers["content-type"].encode() == capture.content_type
    assert response.content == capture.body
    seen = upstream.forwarded[before]
    assert (seen.method, seen.path, seen.body) == (capture.method, capture.endpoint, capture.request_body)
    line = line_of(log_file, capture.name)
    # Ollama's own bytes are never malformed, however big their lines (a pull's progress, a final object).
    expected = ("ok", None) if capture.status < 400 else ("error", str(capture.status))
    assert (line["status"], line["outcome"], line["error_type"]) == (capture.status, *expected)
