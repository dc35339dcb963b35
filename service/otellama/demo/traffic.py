"""``python -m otellama.demo.traffic``: a steady mix of Ollama client calls, for the demo stack and the stack
test.

Between them the scenarios produce every kind of exchange otellama tells apart, so every chart of the bundled
Grafana dashboards has something to show: streamed and non-streamed chat and generate, embeddings, an
OpenAI-style call, a model listing, a burst that makes requests queue inside Ollama, a model unloaded and
asked for again (a cold start), an unknown model (404), a stream that fails midway and a client that hangs up
mid-stream.

The midway failure uses the emulator's ``X-Emulator-Fault`` header; a real Ollama ignores it and that
exchange simply succeeds. :data:`SCENARIOS` lists them (the stack test runs each once, in order);
:func:`main` loops forever over a weighted random pick of them, from a few worker threads (the ``demo``
profile of ``docker-compose.yml`` runs it). What it asks for (models, prompts, clients) is the workload it
shares with ``otellama demo`` (:mod:`otellama.demo.workload`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import httpx

from otellama.demo.workload import (
    CHAT_MODEL,
    CHAT_MODELS,
    CHAT_PROMPT,
    CLIENTS,
    CONCURRENT,
    EMBED_INPUT,
    EMBED_MODEL,
    GREETING,
    LINES_BEFORE_HANGUP,
    MIDSTREAM_FAULT,
    QUESTION,
    SHORT_PROMPT,
    UNKNOWN_MODEL,
    client_headers,
)

# Named, not __name__: run as `python -m otellama.demo.traffic` (the demo stack does) it is "__main__".
log = logging.getLogger("otellama.demo.traffic")


@dataclasses.dataclass(frozen=True)
class Caller:
    """One client of otellama: an HTTP connection pool, the client name it sends, the model it asks for."""

    http: httpx.Client
    client: str | None = None
    model: str = CHAT_MODEL

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return client_headers(self.client) | (extra or {})

    def call(self, path: str, body: dict[str, Any]) -> str:
        """A non-streamed call: the whole body is read; returns the status code."""
        return str(self.http.post(path, json=body, headers=self.headers()).status_code)

    def stream(
        self,
        path: str,
        body: dict[str, Any],
        *,
        hang_up_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> int:
        """A streamed call; returns the lines read. ``hang_up_after`` closes the connection early."""
        lines = 0
        with self.http.stream("POST", path, json=body, headers=self.headers(headers)) as response:
            for line in response.iter_lines():
                lines += bool(line)
                if hang_up_after is not None and lines >= hang_up_after:
                    break  # leaving the block closes the connection: otellama sees the client go
        return lines


def _chat_body(caller: Caller, prompt: str, stream: bool) -> dict[str, Any]:
    return {"model": caller.model, "messages": [{"role": "user", "content": prompt}], "stream": stream}


def generate_stream(c: Caller) -> str:
    lines = c.stream("/api/generate", {"model": c.model, "prompt": QUESTION})
    return f"{lines} lines"


def generate(c: Caller) -> str:
    return c.call("/api/generate", {"model": c.model, "prompt": SHORT_PROMPT, "stream": False})


def chat_stream(c: Caller) -> str:
    return f"{c.stream('/api/chat', _chat_body(c, CHAT_PROMPT, stream=True))} lines"


def chat(c: Caller) -> str:
    return c.call("/api/chat", _chat_body(c, GREETING, stream=False))


def embed(c: Caller) -> str:
    return c.call("/api/embed", {"model": EMBED_MODEL, "input": list(EMBED_INPUT)})


def openai_chat(c: Caller) -> str:
    body = {"model": c.model, "messages": [{"role": "user", "content": GREETING}]}
    return c.call("/v1/chat/completions", body)


def list_models(c: Caller) -> str:
    """Not a GenAI operation: counted by outcome, nothing more."""
    return str(c.http.get("/api/tags", headers=c.headers()).status_code)


def cold_start(c: Caller) -> str:
    """Unload the model (an empty prompt with ``keep_alive: 0``), then ask for it: it has to load again."""
    c.call("/api/generate", {"model": c.model, "keep_alive": 0})
    return generate_stream(c)


def burst(c: Caller, size: int = CONCURRENT) -> str:
    """Several requests at once for one model, so that some wait for a free slot (queue time)."""
    with concurrent.futures.ThreadPoolExecutor(size) as pool:
        replies = list(pool.map(lambda _: generate(c), range(size)))
    return ",".join(replies)


def unknown_model(c: Caller) -> str:
    return c.call("/api/generate", {"model": UNKNOWN_MODEL, "prompt": GREETING, "stream": False})


def midstream_error(c: Caller) -> str:
    body = _chat_body(c, CHAT_PROMPT, stream=True)
    return f"{c.stream('/api/chat', body, headers=MIDSTREAM_FAULT)} lines"


def hang_up(c: Caller) -> str:
    """A client that reads the first lines of a stream and disconnects: a cancelled exchange."""
    lines = c.stream("/api/chat", _chat_body(c, CHAT_PROMPT, stream=True), hang_up_after=LINES_BEFORE_HANGUP)
    return f"left after {lines} lines"


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Caller], str]
    weight: float  # how often the endless loop picks it, relative to the others


SCENARIOS: Final = (
    Scenario("cold start", cold_start, 0.2),
    Scenario("generate, streamed", generate_stream, 4),
    Scenario("generate", generate, 2),
    Scenario("chat, streamed", chat_stream, 6),
    Scenario("chat", chat, 2),
    Scenario("embed", embed, 3),
    Scenario("/v1/chat/completions", openai_chat, 1),
    Scenario("list models", list_models, 0.5),
    Scenario("burst", burst, 0.5),
    Scenario("unknown model", unknown_model, 0.3),
    Scenario("mid-stream error", midstream_error, 0.3),
    Scenario("client hangs up", hang_up, 0.4),
)


def _worker(target: str, pause: float, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    weights = [s.weight for s in SCENARIOS]
    timeout = httpx.Timeout(10.0, read=600.0)  # a cold load of a real model takes minutes
    with httpx.Client(base_url=target, timeout=timeout, trust_env=False) as http:
        while not stop.is_set():
            caller = Caller(http, rng.choice(CLIENTS), rng.choice(CHAT_MODELS))
            scenario = rng.choices(SCENARIOS, weights)[0]
            try:
                outcome = scenario.run(caller)
                log.debug("%s %s %s: %s", caller.client, caller.model, scenario.name, outcome)
            except httpx.HTTPError as exc:
                log.warning("%s: %s: %s", scenario.name, type(exc).__name__, exc)
                stop.wait(5.0)  # otellama restarting, or not up yet
            stop.wait(rng.uniform(0, 2 * pause))


def _wait_until_up(target: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if httpx.get(f"{target}/api/version", timeout=5.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        log.info("waiting for %s", target)
        stop.wait(2.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m otellama.demo.traffic", description="Send a steady mix of Ollama client calls."
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("OTELLAMA_TRAFFIC_TARGET", "http://127.0.0.1:11435"),
        help="otellama's URL (OTELLAMA_TRAFFIC_TARGET, default http://127.0.0.1:11435)",
    )
    parser.add_argument("--workers", type=int, default=3, help="concurrent callers (default 3)")
    parser.add_argument("--pause", type=float, default=1.0, help="mean seconds between calls (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the mix (default 0)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (default 0: never)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()
    # PID 1 in a container gets no default SIGTERM handling: stop cleanly on `docker compose stop`.
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        target = args.target.rstrip("/")
        _wait_until_up(target, stop)
        log.info("sending traffic to %s from %d workers", target, args.workers)
        threads = [
            threading.Thread(target=_worker, args=(target, args.pause, args.seed + i, stop), daemon=True)
            for i in range(args.workers)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + args.seconds if args.seconds > 0 else math.inf
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.is_set() and time.monotonic() < deadline:
                stop.wait(0.2)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)  # each finishes the call it is in
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
