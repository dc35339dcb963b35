"""Routing several Ollama hosts: warm-first (otellama) against round-robin and least-busy without residency.

Three emulated hosts, each able to keep ``--max-loaded`` models in memory (Ollama's
``OLLAMA_MAX_LOADED_MODELS``), all having the same five models; a mixed workload of those five models
(skewed, as real use is: a couple of popular models and a long tail) sent by ``--clients`` concurrent
clients. The same workload (same seed, same order) runs three times in one process, each time against
three fresh hosts:

- ``warm-first``: through otellama with the three hosts as ``--upstream`` (the router under test);
- ``round-robin``: the client sends each request to the next host in turn, as a generic balancer does;
- ``least-busy``: to the host with the fewest requests in flight, ties in turn, without knowing what is
  loaded where (what LiteLLM's least-busy strategy or a "least connections" balancer does).

The baselines talk to the hosts directly, so they pay no proxy at all; only warm-first pays otellama.

Measured per strategy: cold starts (answers whose ``load_duration`` says the model had to be loaded:
above half the modelled load time) and the time to first token (first streamed chunk, at the client)
p50/p95. Both are driven by the emulator's modelled load and generation times (sleeps), not by CPU, so
the numbers hold on a busy machine.

Usage: python bench/router_bench.py [--requests 150] [--clients 6] [--load-seconds 1.0] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from otellama.app import create_app
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.server import BackgroundServer
from otellama.settings import Settings, Upstream

MODELS = ("llama3.2:3b", "gemma3:1b", "qwen3:14b", "mistral:7b", "phi4:14b")
WEIGHTS = (35, 25, 20, 12, 8)
HOSTS = 3


@dataclass
class Result:
    strategy: str
    ttft: list[float]
    cold: int
    failed: int
    wall: float

    def row(self) -> str:
        q = statistics.quantiles(self.ttft, n=100)
        return (
            f"| {self.strategy} | {len(self.ttft)} | {self.cold} | {statistics.median(self.ttft) * 1000:.0f} "
            f"| {q[94] * 1000:.0f} | {self.failed} | {self.wall:.1f} |"
        )


def workload(requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return rng.choices(MODELS, weights=WEIGHTS, k=requests)


def emulator_settings(args: argparse.Namespace) -> EmulatorSettings:
    return EmulatorSettings(
        seed=args.seed,
        token_rate=args.token_rate,
        load_seconds=args.load_seconds,
        keep_alive=3600,
        parallel=2,
        max_queue=64,
        models=MODELS,
        response_tokens=(20, 40),
        max_loaded=args.max_loaded,
    )


async def run(
    strategy: str, models: list[str], clients: int, pick: Callable[[], str], done: Callable[[str], None]
) -> tuple[list[float], list[int], int]:
    queue = list(reversed(models))
    ttft: list[float] = []
    loads: list[int] = []
    failed = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failed
        while queue:
            model = queue.pop()
            url = pick()
            body = {"model": model, "prompt": "Tell me something.", "stream": True}
            start = time.perf_counter()
            first: float | None = None
            final: dict[str, object] = {}
            try:
                async with http.stream("POST", f"{url}/api/generate", json=body) as response:
                    if response.status_code != 200:
                        failed += 1
                        continue
                    async for line in response.aiter_lines():
                        if first is None:
                            first = time.perf_counter() - start
                        if line:
                            final = orjson.loads(line)
            finally:
                done(url)
            if first is not None and final.get("done"):
                ttft.append(first)
                loads.append(int(str(final.get("load_duration", 0))))
            else:
                failed += 1

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return ttft, loads, failed


def measure(strategy: str, args: argparse.Namespace, models: list[str]) -> Result:
    servers = [BackgroundServer(create_emulator(emulator_settings(args))).start() for _ in range(HOSTS)]
    urls = [server.url for server in servers]
    proxy: BackgroundServer | None = None
    try:
        in_flight = dict.fromkeys(urls, 0)
        turn = itertools.count()

        def done(url: str) -> None:
            if url in in_flight:
                in_flight[url] -= 1

        if strategy == "warm-first":
            with tempfile.TemporaryDirectory() as tmp:
                settings = Settings(
                    upstreams=tuple(Upstream.parse(f"h{i}={url}") for i, url in enumerate(urls)),
                    log_file=Path(tmp) / "bench.jsonl",
                    poll_interval=args.poll_interval,
                )
                proxy = BackgroundServer(create_app(settings)).start()
                time.sleep(0.3)  # the first poll

                def through_proxy() -> str:
                    assert proxy is not None
                    return proxy.url

                return _timed(strategy, args, models, through_proxy, done)
        if strategy == "round-robin":

            def round_robin() -> str:
                return urls[next(turn) % HOSTS]

            return _timed(strategy, args, models, round_robin, done)

        def least_busy() -> str:
            fewest = min(in_flight.values())
            ties = [url for url in urls if in_flight[url] == fewest]
            url = ties[next(turn) % len(ties)]
            in_flight[url] += 1
            return url

        return _timed(strategy, args, models, least_busy, done)
    finally:
        if proxy is not None:
            proxy.stop()
        for server in servers:
            server.stop()


def _timed(
    strategy: str,
    args: argparse.Namespace,
    models: list[str],
    pick: Callable[[], str],
    done: Callable[[str], None],
) -> Result:
    start = time.perf_counter()
    ttft, loads, failed = asyncio.run(run(strategy, models, args.clients, pick, done))
    cold = sum(load > args.load_seconds * 0.5e9 for load in loads)
    return Result(strategy, ttft, cold, failed, time.perf_counter() - start)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--load-seconds", type=float, default=1.0)
    parser.add_argument("--token-rate", type=float, default=200.0)
    parser.add_argument("--max-loaded", type=int, default=2)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    models = workload(args.requests, args.seed)
    mix = ", ".join(f"{m} {models.count(m)}" for m in MODELS)
    print(
        f"{HOSTS} hosts x {args.max_loaded} loaded models, {args.requests} requests ({mix}), "
        f"{args.clients} clients, load {args.load_seconds} s, {args.token_rate:g} tokens/s, seed {args.seed}"
    )
    print("| strategy | answered | cold starts | TTFT p50 ms | TTFT p95 ms | failed | wall s |")
    print("|---|---|---|---|---|---|---|")
    for strategy in ("warm-first", "round-robin", "least-busy"):
        print(measure(strategy, args, models).row(), flush=True)


if __name__ == "__main__":
    main()
