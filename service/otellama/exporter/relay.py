"""``/otellama/metrics`` and ``/otellama/stats`` answered by the exporter process, through the proxy's port.

The numbers behind both live in the exporter process (:mod:`~otellama.exporter.live`), so the proxy asks it:
one request per connection on a Unix socket in a private directory, a JSON line each way in, the answer's
bytes back until the exporter closes, after a mark (:data:`ANSWERED`) that tells an empty answer (the metrics
of a disabled SDK) from none at all. ``{"metrics": report}`` carries the proxy's in-flight gauge and host
states (they live in the proxy) so the scrape shows them as they are now; ``{"stats": seconds}`` asks for
the window's summary as JSON. The proxy adds the few metrics only it knows (log write failures, exporter
restarts) with :func:`merge_expositions`.

Bounds: a request line is at most :data:`REQUEST_LIMIT` bytes; the proxy reads at most
:data:`ANSWER_LIMIT` bytes and waits at most its timeout. A scrape that comes while the exporter is
restarting gets a 503, which Prometheus records as a failed scrape, not as counters gone to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socketserver
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

log = logging.getLogger(__name__)

REQUEST_LIMIT: Final = 4 * 1024 * 1024
ANSWER_LIMIT: Final = 256 * 1024 * 1024
#: The first byte of every answer: without it an empty answer would read as no answer (a 503).
ANSWERED: Final = b"="

Answer = Callable[[Mapping[str, Any]], bytes]


class RelayServer:
    """The exporter's end: answers each request on the Unix socket at ``path`` with ``answer(request)``."""

    def __init__(self, path: str, answer: Answer) -> None:
        handle = self._handle
        self.path = path

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                handle(self.rfile.readline(REQUEST_LIMIT), self.wfile.write)

        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by an exporter that was killed
        self._answer = answer
        self._server = socketserver.ThreadingUnixStreamServer(path, Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _handle(self, line: bytes, write: Callable[[bytes], Any]) -> None:
        try:
            request = orjson.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            answer = self._answer(request)
        except Exception as exc:  # a bad request or a failing render: the proxy gets nothing, and says so
            log.warning("could not answer the proxy's %r: %r", line[:80], exc)
            return
        with contextlib.suppress(OSError):
            write(ANSWERED + answer)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


async def ask(path: str, request: Mapping[str, Any], within: float) -> bytes | None:
    """The proxy's end: the exporter's answer to ``request``, or None if it gave none ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(orjson.dumps(request) + b"\n")
                await writer.drain()
                chunks: list[bytes] = []
                size = 0
                while chunk := await reader.read(1 << 16):
                    size += len(chunk)
                    if size > ANSWER_LIMIT:
                        return None
                    chunks.append(chunk)
                answer = b"".join(chunks)
                return answer[1:] if answer[:1] == ANSWERED else None
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        log.debug("the exporter did not answer %r: %r", request, exc)
        return None


def merge_expositions(first: bytes, second: bytes) -> bytes:
    """Two Prometheus text expositions as one: ``second``'s metric families that ``first`` lacks are
    appended (a family may appear only once in a scrape; both have ``target_info``, for example)."""
    names = {line.split()[2] for line in first.splitlines() if line.startswith(b"# HELP ")}
    kept: list[bytes] = []
    keep = True
    for line in second.splitlines(keepends=True):
        if line.startswith(b"# HELP "):
            keep = line.split()[2] not in names
        if keep:
            kept.append(line)
    return first + b"".join(kept)
