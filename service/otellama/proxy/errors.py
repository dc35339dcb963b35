"""otellama's own answers: errors in the shape of the API the client called, and what each failure means.

Clients parse an error in the shape of the API they called: Ollama's flat ``{"error": "..."}`` for its
native paths, OpenAI's ``{"error": {"message", "type", "param", "code"}}`` under ``/v1/``. Every answer
otellama gives itself (the proxy's 502/504, the key gate's 401, the connection guard's 408/431) is built
here, so that the shapes cannot drift apart.
"""

from __future__ import annotations

import httpx
import orjson

from otellama.proxy.transport import BadResponse
from otellama.settings import Upstream


def error_body(path: str, message: str, *, kind: str = "api_error", code: str | None = None) -> bytes:
    """``message`` as the API under ``path`` shapes errors: OpenAI's object under ``/v1/`` (with ``kind``
    as its ``type`` and ``code``), Ollama's flat ``{"error": message}`` everywhere else."""
    if path.startswith("/v1/"):
        return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})
    return orjson.dumps({"error": message})


def json_headers(body: bytes, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """The headers of an error answer carrying ``body``."""
    return [
        (b"content-type", b"application/json; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        *extra,
    ]


class ShuttingDown(Exception):
    """otellama is stopping and the request outlived ``OTELLAMA_SHUTDOWN_GRACE``."""


SHUTDOWN = ShuttingDown()


class HostsDown(httpx.ConnectError):
    """With several upstreams: every host a request could go to refused it or could not be reached."""

    def __init__(self, tried: list[tuple[str, str]]) -> None:
        self.tried = tried
        named = "; ".join(f"{name} ({reason})" for name, reason in tried)
        super().__init__(f"otellama: no Ollama host could take the request; tried {named}")


def classify_failure(exc: BaseException, upstream: Upstream) -> tuple[int, str, str]:
    """Map a failure to (status, message, error type): upstream transport failures (see the exception tree in
    :mod:`otellama.proxy.transport`), otellama shutting down, and otellama's own bugs (500, named by nothing
    but "internal")."""
    where = upstream.url
    if isinstance(exc, HostsDown):
        return 502, str(exc), "upstreams_down"
    if isinstance(exc, ShuttingDown):
        return (
            503,
            "otellama: shutting down; the request was cut after the grace period (OTELLAMA_SHUTDOWN_GRACE)",
            "shutdown",
        )
    if not isinstance(exc, httpx.TransportError):
        return 500, "otellama: internal error (details are in otellama's log)", "internal_error"
    if isinstance(exc, httpx.ReadTimeout):
        return (
            504,
            f"otellama: Ollama at {where} sent nothing within the read timeout (OTELLAMA_READ_TIMEOUT)",
            "timeout",
        )
    if isinstance(exc, httpx.ConnectTimeout):
        return (
            502,
            f"otellama: could not connect to Ollama at {where} within the connect timeout "
            "(OTELLAMA_CONNECT_TIMEOUT); check OTELLAMA_UPSTREAM / --upstream",
            "connect_timeout",
        )
    if isinstance(exc, httpx.ConnectError):
        return (
            502,
            f"otellama: cannot reach Ollama at {where} ({exc}); is it running? "
            "Set OTELLAMA_UPSTREAM or --upstream to its address",
            "connect_error",
        )
    if isinstance(exc, BadResponse):
        return 502, f"otellama: Ollama at {where}: {exc}", "protocol_error"
    if isinstance(exc, httpx.RemoteProtocolError):
        return (
            502,
            f"otellama: Ollama at {where} closed the connection without a valid response",
            "protocol_error",
        )
    return 502, f"otellama: request to Ollama at {where} failed: {exc}", type(exc).__name__
