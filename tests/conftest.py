"""Fixtures: real uvicorn servers on real sockets, the in-repo Ollama recordings, a scriptable upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from otellama.app import create_app
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.server import BackgroundServer
from otellama.settings import Settings, Upstream
from tests.serving import Serve

# Everything a test reads lives inside the repository (tests/data/README.md says where it came from).
DATA = Path(__file__).resolve().parent / "data"
CAPTURES = DATA / "ollama-captures"
API_FIXTURES = DATA / "ollama-api"


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Start any ASGI app on a free port for the test; returns its base URL. Stopped at teardown."""
    servers: list[BackgroundServer] = []

    def start(app: ASGIApp, **options: object) -> str:
        server = BackgroundServer(app, **options).start()
        servers.append(server)
        return server.url

    yield start
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def proxy_to(serve: Callable[..., str], tmp_path: Path) -> Callable[..., str]:
    """Start otellama in front of ``upstream_url``; returns otellama's base URL. Logs go to ``tmp_path``."""

    def start(upstream_url: str, **settings: Any) -> str:
        settings.setdefault("log_file", tmp_path / "otellama.jsonl")
        app = create_app(Settings(upstream=Upstream.parse(upstream_url), **settings))
        return serve(app)

    return start


@pytest.fixture
def otellama() -> Iterator[Callable[..., Serve]]:
    """Start ``otellama serve`` (a real process, with its exporter) in front of an upstream; killed at
    teardown."""
    started: list[Serve] = []

    def start(upstream: str, log_file: Path, **env: str) -> Serve:
        started.append(Serve(upstream, log_file, **env))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def emulator() -> Iterator[str]:
    """The Ollama emulator with no token pacing, on a real socket; its base URL."""
    with BackgroundServer(create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01))) as server:
        yield server.url


@dataclasses.dataclass
class Seen:
    """One request as the scripted upstream received it."""

    method: str
    path: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


VERSION_BODY = b'{"version":"0.0.0-scripted"}'
Handler = Callable[[Seen, Send], Awaitable[None]]


class ScriptedUpstream:
    """An upstream that records every request and answers with whatever the test's handler sends."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.seen: list[Seen] = []
        self.handler = handler or self.echo
        self.lock = threading.Lock()

    @property
    def forwarded(self) -> list[Seen]:
        """What the client sent through the proxy."""
        with self.lock:
            return list(self.seen)

    @staticmethod
    async def echo(seen: Seen, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": seen.body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                reply = "lifespan.startup.complete"
                if message["type"] == "lifespan.shutdown":
                    reply = "lifespan.shutdown.complete"
                await send({"type": reply})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/api/version":  # otellama's health probe, not the test's traffic
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": VERSION_BODY})
            return
        seen = Seen(
            scope["method"], scope["path"], scope["raw_path"], scope["query_string"], scope["headers"], body
        )
        with self.lock:
            self.seen.append(seen)
        await self.handler(seen, send)


async def wait_for(predicate: Callable[[], bool], limit: float = 5.0) -> bool:
    """Poll a condition that another thread makes true; False if it never did within ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True
