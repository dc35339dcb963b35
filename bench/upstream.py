"""A fast fake Ollama for benchmarking the proxy: raw ASGI under uvicorn with uvloop and httptools.

It does as little as possible per request, so that what a benchmark sees through otellama is the
proxy's overhead and not this server's. Every line it sends is built once at start-up.

Routes:
  POST /api/generate   an Ollama-shaped NDJSON token stream: CHUNKS lines with ``done: false`` and a
                       final ``done: true`` object with timings. ``?chunks=N&rate=R`` override the
                       defaults per request (the benchmark drives flood and paced streams through one
                       proxy); rate 0 writes as fast as the socket takes it, rate R paces at R tokens/s.
  anything else        a tiny non-streamed JSON answer, like ``/api/show`` or ``/api/generate`` with
                       ``stream: false``.

Usage: python bench/upstream.py [--host 127.0.0.1] [--port 11500] [--chunks 200] [--rate 0]
(environment: BENCH_UPSTREAM_CHUNKS, BENCH_UPSTREAM_RATE).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CREATED_AT = "2026-01-01T00:00:00.000000000Z"
TOKEN_LINE = b'{"model":"m","created_at":"%s","response":"tok","done":false}\n' % CREATED_AT.encode()
SMALL_BODY = b'{"model":"m","created_at":"%s","response":"Hello!","done":true}' % CREATED_AT.encode()
# Longest allowed per-request chunk count: bounds the work one request can ask for.
MAX_CHUNKS = 100_000

_STREAM_HEADERS = [(b"content-type", b"application/x-ndjson")]
_SMALL_HEADERS = [
    (b"content-type", b"application/json; charset=utf-8"),
    (b"content-length", str(len(SMALL_BODY)).encode()),
]


def final_line(chunks: int, rate: float) -> bytes:
    """The ``done: true`` object closing a stream, with timings consistent with its pacing."""
    eval_ns = int(chunks / rate * 1e9) if rate > 0 else chunks * 1000
    return (
        b'{"model":"m","created_at":"%s","response":"","done":true,"done_reason":"stop",'
        b'"total_duration":%d,"load_duration":1200000,"prompt_eval_count":12,'
        b'"prompt_eval_duration":3000000,"eval_count":%d,"eval_duration":%d}\n'
        % (CREATED_AT.encode(), eval_ns + 4_200_000, chunks, eval_ns)
    )


class Upstream:
    """The ASGI app; ``chunks`` and ``rate`` are the defaults a request's query string can override."""

    def __init__(self, chunks: int, rate: float) -> None:
        self.chunks = chunks
        self.rate = rate
        self._finals: dict[tuple[int, float], bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Run with lifespan off, so every scope is an HTTP request.
        message = await receive()
        while message.get("more_body", False):
            message = await receive()
        if scope["path"] == "/api/generate":
            chunks, rate = self._options(scope["query_string"])
            await self._stream(receive, send, chunks, rate)
        else:
            await send({"type": "http.response.start", "status": 200, "headers": _SMALL_HEADERS})
            await send({"type": "http.response.body", "body": SMALL_BODY})

    def _options(self, query: bytes) -> tuple[int, float]:
        chunks, rate = self.chunks, self.rate
        for key, value in parse_qsl(query.decode("latin-1")):
            if key == "chunks":
                chunks = max(0, min(int(value), MAX_CHUNKS))
            elif key == "rate":
                rate = max(0.0, float(value))
        return chunks, rate

    async def _stream(self, receive: Receive, send: Send, chunks: int, rate: float) -> None:
        final = self._finals.get((chunks, rate))
        if final is None:
            final = self._finals[(chunks, rate)] = final_line(chunks, rate)
        await send({"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS})
        token = {"type": "http.response.body", "body": TOKEN_LINE, "more_body": True}
        if rate > 0:
            # Like Ollama, stop generating when the client leaves: the benchmark cuts paced streams at
            # the end of a round, and abandoned streams must not load the next one. (After the body,
            # receive() returns only when the client disconnects.)
            gone = asyncio.ensure_future(receive())
            try:
                loop = asyncio.get_running_loop()
                start = loop.time()
                for i in range(chunks):
                    # Absolute deadlines: a late wake-up catches up instead of slowing the whole stream.
                    delay = start + i / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if gone.done():
                        return
                    await send(token)
            finally:
                gone.cancel()
        else:
            for _ in range(chunks):
                await send(token)
        await send({"type": "http.response.body", "body": final, "more_body": False})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11500)
    parser.add_argument("--chunks", type=int, default=int(os.environ.get("BENCH_UPSTREAM_CHUNKS", "200")))
    parser.add_argument("--rate", type=float, default=float(os.environ.get("BENCH_UPSTREAM_RATE", "0")))
    args = parser.parse_args()
    uvicorn.run(
        Upstream(args.chunks, args.rate),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        server_header=False,
        date_header=False,
        log_level="warning",
        timeout_keep_alive=65,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
