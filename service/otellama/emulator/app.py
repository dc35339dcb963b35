"""The emulated Ollama server as an ASGI application: the route table, and errors in each API's own shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from starlette.types import Receive, Scope, Send

from otellama.emulator import management, native, v1
from otellama.emulator.exchange import JSON, JSON_UTF8, PLAIN, ClientGone, Exchange, HTTPError
from otellama.emulator.runtime import Cancellation, Runtime
from otellama.emulator.settings import EmulatorSettings
from otellama.emulator.wire import NEWLINE, openai_error

Handler = Callable[[Runtime, Exchange], Awaitable[None]]

_ROUTES: dict[str, dict[str, Handler]] = {
    "/": {"GET": management.root, "HEAD": management.root},
    "/api/version": {"GET": management.version, "HEAD": management.version},
    "/api/tags": {"GET": management.tags, "HEAD": management.tags},
    "/api/ps": {"GET": management.ps},
    "/api/show": {"POST": management.show},
    "/api/generate": {"POST": native.generate},
    "/api/chat": {"POST": native.chat},
    "/api/embed": {"POST": native.embed},
    "/api/embeddings": {"POST": native.embeddings},
    "/api/pull": {"POST": management.pull},
    "/api/push": {"POST": management.push},
    "/api/create": {"POST": management.create},
    "/api/copy": {"POST": management.copy},
    "/api/delete": {"DELETE": management.delete},
    "/v1/chat/completions": {"POST": v1.chat_completions},
    "/v1/completions": {"POST": v1.completions},
    "/v1/embeddings": {"POST": v1.embeddings},
    "/v1/models": {"GET": v1.list_models},
}
# Routes with a parameter in the path, matched by prefix when the exact lookup misses.
_PREFIXED: tuple[tuple[str, dict[str, Handler]], ...] = (
    ("/api/blobs/", {"HEAD": management.blob_head, "POST": management.blob_upload}),
    ("/v1/models/", {"GET": v1.show_model}),
)


class Emulator:
    """The emulated Ollama server, an ASGI application (see the package docstring).

    Public state, for tests and the demo: :attr:`cancellations` lists requests whose client went away
    mid-response, :attr:`in_flight` counts the model runs admitted and not finished.
    """

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self.settings = settings or EmulatorSettings()
        self._runtime = Runtime(self.settings)

    @property
    def cancellations(self) -> list[Cancellation]:
        """Requests whose client went away before their response was complete, oldest first."""
        return self._runtime.cancellations

    @property
    def in_flight(self) -> int:
        """Model runs admitted (running, loading or queued) and not yet finished."""
        return self._runtime.in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(scope, receive, send)
        path = exchange.path
        methods = _ROUTES.get(path)
        if methods is None:
            methods = next((m for prefix, m in _PREFIXED if path.startswith(prefix)), None)
        if methods is None:
            await exchange.respond(404, PLAIN, b"404 page not found")
            return
        handler = methods.get(scope["method"])
        if handler is None:
            await exchange.respond(405, PLAIN, b"405 method not allowed")
            return
        try:
            await handler(self._runtime, exchange)
        except HTTPError as exc:
            if exchange.started:
                raise
            if path.startswith("/v1/"):
                body = orjson.dumps(openai_error(exc.status, exc.message), option=NEWLINE)
                await exchange.respond(exc.status, JSON, body)
            else:
                await exchange.respond(exc.status, JSON_UTF8, orjson.dumps({"error": exc.message}))
        except ClientGone:
            pass


def create_emulator(settings: EmulatorSettings | None = None) -> Emulator:
    """Build the emulator ASGI app; run it with ``otellama.server`` (or any ASGI server)."""
    return Emulator(settings)
