"""Every real recording reaches the client through the proxy byte for byte, with its status and type."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
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
def replaying() -> Iterator[tuple[ScriptedUpstream, str]]:
    """One replaying upstream (the recording is chosen by an X-Capture header) and otellama before it."""
    upstream = ScriptedUpstream(_replay)
    with (
        BackgroundServer(upstream) as ollama,
        BackgroundServer(create_app(Settings(upstream=Upstream.parse(ollama.url), log_file=None))) as proxy,
    ):
        yield upstream, proxy.url


@pytest.mark.parametrize("capture", ALL, ids=[c.name for c in ALL])
def test_recording_passes_byte_for_byte(
    replaying: tuple[ScriptedUpstream, str], capture: captures.Capture
) -> None:
    upstream, url = replaying
    before = len(upstream.forwarded)
    response = httpx.request(
        capture.method,
        url + capture.endpoint,
        content=capture.request_body or None,
        headers={"X-Capture": capture.name},
    )
    assert response.status_code == capture.status
    assert response.headers["content-type"].encode() == capture.content_type
    assert response.content == capture.body
    seen = upstream.forwarded[before]
    assert (seen.method, seen.path, seen.body) == (capture.method, capture.endpoint, capture.request_body)
