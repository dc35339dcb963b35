"""One HTTP exchange as the emulator sees it: reading a request body, writing a response, and the errors.

:class:`Exchange` wraps the ASGI ``receive`` and ``send`` of one request; the request field readers here
reject a wrongly typed field the way Go's JSON decoder does, with a 400.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Mapping
from email.utils import formatdate
from typing import Any, Final

import orjson
from starlette.types import Receive, Scope, Send

JSON_UTF8: Final = b"application/json; charset=utf-8"
JSON: Final = b"application/json"
NDJSON: Final = b"application/x-ndjson"
SSE: Final = b"text/event-stream"
PLAIN: Final = b"text/plain; charset=utf-8"

_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600,
}


class HTTPError(Exception):
    """Raised before a response has started; rendered as Ollama (or, under /v1, OpenAI) renders errors."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client disconnected while its request body was still being read."""


@functools.lru_cache(maxsize=4)
def http_date(second: int) -> bytes:
    return formatdate(second, usegmt=True).encode()


def keep_alive_seconds(value: object) -> float | None:
    """``keep_alive`` in seconds (negative = forever = ``math.inf``), parsed as Ollama's ``api.Duration``."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Go converts a JSON number with int(t) * time.Second: fractions of a second are dropped.
        return math.inf if value < 0 else float(int(value))
    if isinstance(value, str):
        text = value.strip()
        sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
        if body == "0":
            return 0.0
        parts = _DURATION_PART.findall(body)
        if body and "".join(number + unit for number, unit in parts) == body:
            seconds = sign * sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
            return math.inf if seconds < 0 else seconds
        raise HTTPError(400, f'time: invalid duration "{value}"')
    raise HTTPError(400, "json: cannot unmarshal keep_alive: expected a number or a duration string")


def _field(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise HTTPError(400, f"json: cannot unmarshal field {key!r}: unexpected {type(value).__name__}")
    return value


def text_field(body: Mapping[str, Any], key: str) -> str:
    value: str = _field(body, key, str, "")
    return value


def dict_field(body: Mapping[str, Any], key: str) -> dict[str, Any]:
    value: dict[str, Any] = _field(body, key, dict, {})
    return value


def list_field(body: Mapping[str, Any], key: str) -> list[Any]:
    value: list[Any] = _field(body, key, list, [])
    return value


def bool_field(body: Mapping[str, Any], key: str) -> bool | None:
    value: bool | None = _field(body, key, bool, None)
    return value


def int_field(body: Mapping[str, Any], key: str) -> int | None:
    value: int | float | None = _field(body, key, (int, float), None)
    return None if value is None else int(value)


class Exchange:
    """One HTTP request and its response writer; what the disconnect watcher needs to know of it."""

    __slots__ = (
        "chunks_sent",
        "finished",
        "loaded_ns",
        "model",
        "path",
        "receive",
        "scope",
        "send",
        "slot_ns",
        "start_ns",
        "started",
        "stream_type",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.start_ns = time.monotonic_ns()
        self.scope = scope
        self.receive = receive
        self.send = send
        self.path: str = scope["path"]
        self.model = ""
        self.chunks_sent = 0
        self.started = False
        self.finished = False
        self.stream_type = NDJSON
        self.loaded_ns = self.start_ns
        self.slot_ns = self.start_ns

    def header(self, name: str) -> str:
        wanted = name.encode()
        for key, value in self.scope["headers"]:
            if key.lower() == wanted:
                return bytes(value).decode("latin-1").strip()
        return ""

    async def body(self) -> bytes:
        parts = []
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(parts)

    async def json(self) -> dict[str, Any]:
        raw = await self.body()
        # Ollama parses JSON whatever the Content-Type says (curl -d sends a form type).
        if not raw.strip():
            raise HTTPError(400, "missing request body")
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise HTTPError(400, str(exc)) from None
        if not isinstance(value, dict):
            raise HTTPError(400, f"json: cannot unmarshal {type(value).__name__} into a request object")
        return value

    async def _start(self, status: int, content_type: bytes | None, length: int | None) -> None:
        self.started = True
        headers = [(b"date", http_date(int(time.time())))]
        if content_type is not None:
            headers.append((b"content-type", content_type))
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def respond(self, status: int, content_type: bytes | None, body: bytes) -> None:
        """Send a whole response (uvicorn drops the body of a HEAD response and keeps its length)."""
        self.finished = True
        await self._start(status, content_type, len(body))
        await self.send({"type": "http.response.body", "body": body})
        self.chunks_sent += 1

    async def write(self, data: bytes) -> None:
        # Headers go out with the first chunk, as Go's writer does: a long load delays the status line too.
        if not self.started:
            await self._start(200, self.stream_type, None)
        await self.send({"type": "http.response.body", "body": data, "more_body": True})
        self.chunks_sent += 1

    async def finish(self, data: bytes) -> None:
        self.finished = True
        if not self.started:
            await self._start(200, self.stream_type, None)
        await self.send({"type": "http.response.body", "body": data})
        self.chunks_sent += 1
