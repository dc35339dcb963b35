"""How much otellama costs: direct (client -> upstream) against proxied (client -> otellama -> upstream).

One run measures, on this machine:
  1. non-streamed requests (tiny JSON, POST /api/show): requests/s and added latency p50/p99 at one
     connection (this script's client, sequential keep-alive requests) and at 16 connections (wrk),
     with the proxy's CPU per request and, beside it, its exporter process's;
  2. token streams of 200 NDJSON chunks, flooded at 32 and 256 concurrent streams and paced at 50 tokens/s
     at 32, 64 and 256: streams/s, added time to first chunk p50/p99, proxy CPU per chunk relayed;
  3. the proxy's peak RSS holding 1,000 concurrent slow streams, per stream over its idle baseline.

The upstream (bench/upstream.py), the proxy (``python -m otellama serve``) and this load generator are
three processes. Direct and proxied rounds are interleaved in random order and each figure is the
median over rounds, differences being taken within a pair of rounds (docs/reference.md §4), so that drift
in the machine's load hits both paths alike.

  .venv/bin/python bench/proxy_bench.py                     # full run, about 5 minutes
  .venv/bin/python bench/proxy_bench.py --quick             # smoke run, about 1 minute
  .venv/bin/python bench/proxy_bench.py --write BENCHMARKS.md
  .venv/bin/python bench/proxy_bench.py --proxy-env OTELLAMA_LOG_FILE=off --label "no JSONL log"

Each configuration (--label, --proxy-env) has its own section in the --write file, so runs of several
configurations sit side by side.

Linux only: CPU and memory figures come from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import datetime as dt
import functools
import importlib.metadata
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, cast

import httptools
import uvloop

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_SCRIPT = ROOT / "bench" / "upstream.py"
PLAIN_PROXY_SCRIPT = Path(__file__).with_name("plain_proxy.py")
SINK_SCRIPT = Path(__file__).with_name("otlp_sink.py")
HOST = "127.0.0.1"  # loopback only: this load must never leave the machine
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

STREAM_CHUNKS = 200
PACED_RATE = 50.0  # tokens/s, a typical Ollama generation speed on a GPU
RSS_RATE = 2.0  # tokens/s for the memory test: slow enough that 1,000 streams stay open, cheap on CPU
SMALL_BODY = b'{"model":"m"}'
STREAM_BODY = b'{"model":"m","prompt":"Why is the sky blue?"}'

# Targets (telemetry off), from the issue.
#: Added p50 at 1 connection: 0.5 ms for the byte path (issue 2); issue 12's for telemetry on.
TARGET_ADDED_P50_MS = {"off": 0.5, "default": 0.30, "on": 0.40, "blackhole": 0.40}
TARGET_FLOOD_RATIO = 0.80
TARGET_PACED_TTFC_P99_MS = 2.0
TARGET_RSS_KB_PER_STREAM = 100.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long each part runs. A pair is one direct and one proxied round, in random order."""

    latency_pairs: int
    latency_requests: int  # sequential requests per 1-connection round
    wrk_pairs: int
    wrk_seconds: int
    flood_pairs: int
    flood_seconds: float
    paced_pairs: int
    paced_seconds: float  # measured window; paced rounds first spend one stream's length ramping up
    rss_streams: int
    rss_hold_seconds: float


FULL = Plan(
    latency_pairs=15,
    latency_requests=400,
    wrk_pairs=5,
    wrk_seconds=3,
    flood_pairs=5,
    flood_seconds=3.0,
    paced_pairs=4,
    paced_seconds=6.0,
    rss_streams=1000,
    rss_hold_seconds=5.0,
)
QUICK = Plan(
    latency_pairs=4,
    latency_requests=200,
    wrk_pairs=1,
    wrk_seconds=1,
    flood_pairs=1,
    flood_seconds=1.5,
    paced_pairs=1,
    paced_seconds=2.0,
    rss_streams=1000,
    rss_hold_seconds=2.0,
)
FLOOD_WARMUP = 0.5  # seconds of each flood round not measured: connections to upstream open, caches warm
SETTLE = 0.3  # pause after a round whose streams were cut, so their teardown is not charged to the next


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Processes


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork: the child only calls it
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # The kernel kills the child if this script dies, even by SIGKILL, so no server outlives a
    # benchmark that was interrupted where no ``finally`` runs.
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A server subprocess on a loopback port, with its CPU time and memory read from /proc."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.argv = [*argv, "--port", str(self.port)]
        self.log_path = logdir / f"{name}-{self.port}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=logdir,  # whatever the server writes to relative paths (the proxy's JSONL log) lands here
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )

    async def ready(self) -> None:
        """Wait (up to 30 s) until the server answers HTTP on its port."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError):  # not listening yet (TimeoutError is an OSError too)
                reader, writer = await asyncio.open_connection(HOST, self.port)
                try:
                    writer.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if (await asyncio.wait_for(reader.readline(), 5.0)).startswith(b"HTTP/1.1 200"):
                        return
                finally:
                    writer.close()
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start: {self.tail()}")

    def _stat(self) -> list[str]:
        text = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return text[text.rindex(")") + 2 :].split()  # the command name may hold spaces

    def cpu_seconds(self) -> float:
        fields = self._stat()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def children_cpu_seconds(self) -> float:
        """CPU of the running children (the exporter process ``otellama serve`` supervises)."""
        total = 0.0
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for pid in children:
                with contextlib.suppress(OSError):
                    text = Path(f"/proc/{pid}/stat").read_text()
                    fields = text[text.rindex(")") + 2 :].split()
                    total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return total

    def _status_kb(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])  # in kB
        raise RuntimeError(f"{key} missing from /proc/{self.proc.pid}/status")

    def rss_kb(self) -> int:
        return self._status_kb("VmRSS")

    def peak_rss_kb(self) -> int:
        return self._status_kb("VmHWM")

    def tail(self, lines: int = 20) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class Servers:
    """Starts the upstream and proxy processes and guarantees they are all stopped."""

    def __init__(self, proxy_env: dict[str, str], logdir: Path, telemetry: str) -> None:
        self.proxy_env = proxy_env
        self.logdir = logdir
        self.telemetry = telemetry
        self.started: list[Server] = []

    def upstream(self) -> Server:
        server = Server("upstream", [sys.executable, str(UPSTREAM_SCRIPT)], dict(os.environ), self.logdir)
        self.started.append(server)
        return server

    def proxy(self, upstream: Server) -> Server:
        # The caller's OTEL_*/OTELLAMA_* settings must not leak in: the configuration under test is
        # exactly what --proxy-env says.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTELLAMA_"))}
        env.update(self.proxy_env)
        argv = [sys.executable, "-m", "otellama", "serve", "--host", HOST]
        if self.telemetry == "off":
            argv = [sys.executable, str(PLAIN_PROXY_SCRIPT), "--host", HOST]
        server = Server("proxy", [*argv, "--upstream", f"http://{HOST}:{upstream.port}"], env, self.logdir)
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()
        self.started.clear()


# ---------------------------------------------------------------------------------------------------
# The load generator's HTTP client: asyncio protocol + httptools, the parser uvicorn uses, so that the
# client spends little and the same on both paths.


class Tally:
    """NDJSON lines received across a round's connections."""

    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines = 0


class Exchange:
    """One request's timings as the client saw them (``time.perf_counter()`` readings)."""

    __slots__ = ("cut", "done", "failed", "lines", "status", "t_done", "t_first", "t_sent")

    def __init__(self) -> None:
        self.t_sent = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.failed = False  # the connection broke before the response was complete
        self.cut = False  # ...because the benchmark cut it at the end of a round: not an error
        self.status = 0
        self.lines = 0
        self.done = False


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._exchange = Exchange()
        self._prev = self._last = b""
        self._lost: BaseException | None = None
        self._aborted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but has its interface.
        self._transport = cast(asyncio.Transport, transport)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            if self._transport is not None:
                self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        self._lost = exc
        if self._waiter is not None and not self._waiter.done():
            self._exchange.failed = True
            self._exchange.cut = self._aborted
            self._waiter.set_exception(exc)

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self._exchange.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        exchange = self._exchange
        if exchange.t_first is None:
            exchange.t_first = time.perf_counter()
        lines = body.count(b"\n")
        exchange.lines += lines
        self._tally.lines += lines
        self._prev, self._last = self._last, body

    def on_message_complete(self) -> None:
        exchange = self._exchange
        exchange.t_done = time.perf_counter()
        # The final object may arrive split over two reads; it is short, so the last two hold it.
        exchange.done = b'"done":true' in self._prev[-1024:] + self._last
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def send(self, request: bytes, into: list[Exchange]) -> Exchange:
        """Send ``request`` and wait for the whole response; ``into`` gets the exchange at once."""
        if self._lost is not None or self._transport is None:
            raise ConnectionResetError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._prev = self._last = b""
        exchange = self._exchange = Exchange()
        into.append(exchange)
        self._transport.write(request)
        await self._waiter
        return exchange

    def abort(self) -> None:
        self._aborted = True
        if self._transport is not None:
            self._transport.abort()


async def connect(port: int, count: int, tally: Tally) -> list[Connection]:
    loop = asyncio.get_running_loop()
    connections: list[Connection] = []
    for start in range(0, count, 100):  # in batches: a burst of 1,000 SYNs can overflow a backlog
        batch = [
            loop.create_connection(lambda: Connection(tally), HOST, port)
            for _ in range(min(100, count - start))
        ]
        for _, protocol in await asyncio.gather(*batch):
            connections.append(protocol)
    return connections


def http_request(path: str, port: int, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def stream_request(port: int, chunks: int, rate: float) -> bytes:
    return http_request(f"/api/generate?chunks={chunks}&rate={rate:g}", port, STREAM_BODY)


# ---------------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass
class Paired:
    """One figure measured in paired rounds: ``direct[i]`` and ``proxied[i]`` ran back to back."""

    direct: list[float] = dataclasses.field(default_factory=list)
    proxied: list[float] = dataclasses.field(default_factory=list)

    def add(self, direct: float, proxied: float) -> None:
        self.direct.append(direct)
        self.proxied.append(proxied)

    @property
    def direct_median(self) -> float:
        return statistics.median(self.direct)

    @property
    def proxied_median(self) -> float:
        return statistics.median(self.proxied)

    @property
    def diff(self) -> float:
        return statistics.median(p - d for d, p in zip(self.direct, self.proxied, strict=True))

    @property
    def ratio(self) -> float:
        return statistics.median(
            p / d if d else float("nan") for d, p in zip(self.direct, self.proxied, strict=True)
        )


@dataclasses.dataclass
class Row:
    """One line of the results table; every cell is already formatted."""

    measurement: str
    direct: str = "—"
    proxied: str = "—"
    change: str = "—"
    target: str = "—"
    verdict: str = "—"


def verdict(ok: bool | None, errors: int = 0) -> str:
    """pass/FAIL against a target (None: no target); failed requests void the figure whatever it says."""
    if errors:
        return f"ERROR ({errors} failed)"
    if ok is None:
        return "—"
    return "pass" if ok else "FAIL"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def ms_diff(seconds: float) -> str:
    return f"{seconds * 1000:+.3f} ms"


def per(cpu_seconds: float, count: float, digits: int = 0) -> str:
    return f"{cpu_seconds / count * 1e6:.{digits}f} µs" if count else "—"


Section = tuple[str, list[Row]]


# ---------------------------------------------------------------------------------------------------
# Measurements


@dataclasses.dataclass
class WrkResult:
    requests: int
    seconds: float
    p50: float  # seconds
    p99: float
    errors: int


class StreamRound:
    """``concurrency`` connections streaming back to back, measured over a window after a warm-up.

    Streams still running when the window closes are cut: their chunks up to then are counted, their
    time to first chunk too if they started inside the window.
    """

    def __init__(self, port: int, request: bytes, concurrency: int) -> None:
        self.port = port
        self.request = request
        self.concurrency = concurrency
        self.exchanges: list[Exchange] = []
        self.streams_per_second = 0.0
        self.ttfc: list[float] = []
        self.lines = 0
        self.proxy_cpu = 0.0
        self.errors = 0

    async def run(self, stagger: float, warmup: float, window: float, proxy: Server | None) -> None:
        tally = Tally()
        connections = await connect(self.port, self.concurrency, tally)
        start = time.perf_counter()
        w0, w1 = start + warmup, start + warmup + window
        workers = [
            asyncio.ensure_future(self._worker(c, start + i * stagger / self.concurrency, w1))
            for i, c in enumerate(connections)
        ]
        try:
            await asyncio.sleep(w0 - time.perf_counter())
            lines0, cpu0 = tally.lines, proxy.cpu_seconds() if proxy else 0.0
            await asyncio.sleep(w1 - time.perf_counter())
            self.lines = tally.lines - lines0
            self.proxy_cpu = proxy.cpu_seconds() - cpu0 if proxy else 0.0
        finally:
            for connection in connections:
                connection.abort()
            await asyncio.gather(*workers, return_exceptions=True)
        expected = STREAM_CHUNKS + 1
        finished = [e for e in self.exchanges if not e.failed]
        self.errors = sum(1 for e in finished if e.status != 200 or not e.done or e.lines != expected)
        self.errors += sum(1 for e in self.exchanges if e.failed and not e.cut)
        done_at = [e.t_done for e in finished if e.t_done is not None]
        self.streams_per_second = sum(1 for t in done_at if w0 <= t < w1) / window
        self.ttfc = [
            e.t_first - e.t_sent for e in self.exchanges if e.t_first is not None and w0 <= e.t_sent < w1
        ]

    async def _worker(self, connection: Connection, start_at: float, stop_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        with contextlib.suppress(ConnectionError):  # the round's end cut the connection
            while time.perf_counter() < stop_at:
                await connection.send(self.request, self.exchanges)


class Bench:
    """The measurements, each appending a section of rows; direct and proxied share one upstream."""

    def __init__(self, plan: Plan, servers: Servers, seed: int) -> None:
        self.plan = plan
        self.servers = servers
        self.random = random.Random(seed)
        self.sections: list[Section] = []
        self._upstream: Server | None = None
        self._proxy: Server | None = None

    async def start(self) -> None:
        self._upstream = self.servers.upstream()
        await self._upstream.ready()
        self._proxy = self.servers.proxy(self._upstream)
        await self._proxy.ready()

    @property
    def proxy(self) -> Server:
        assert self._proxy is not None, "start() first"
        return self._proxy

    def port(self, proxied: bool) -> int:
        assert self._upstream is not None, "start() first"
        return self.proxy.port if proxied else self._upstream.port

    def order(self) -> list[bool]:
        """A pair's two rounds in random order; True means proxied."""
        pair = [False, True]
        self.random.shuffle(pair)
        return pair

    # -- 1. non-streamed requests -------------------------------------------------------------------

    async def latency(
        self,
        path: str = "/api/show",
        body: bytes = SMALL_BODY,
        title: str = "Non-streamed requests (tiny JSON, POST /api/show), 1 connection, sequential",
    ) -> None:
        log(f"non-streamed requests, 1 connection, {path}")
        plan = self.plan
        connections = {p: (await connect(self.port(p), 1, Tally()))[0] for p in (False, True)}
        requests = {p: http_request(path, self.port(p), body) for p in (False, True)}
        p50, p99, rps = Paired(), Paired(), Paired()
        cpu = 0.0
        errors = 0

        async def round_(proxied: bool, count: int) -> tuple[list[float], float]:
            exchanges: list[Exchange] = []
            started = time.perf_counter()
            for _ in range(count):
                await connections[proxied].send(requests[proxied], exchanges)
            elapsed = time.perf_counter() - started
            nonlocal errors
            errors += sum(1 for e in exchanges if e.status != 200)
            return [e.t_done - e.t_sent for e in exchanges if e.t_done is not None], elapsed

        try:
            for proxied in (False, True):  # warm-up, not recorded
                await asyncio.wait_for(round_(proxied, 200), 60)
            for _ in range(plan.latency_pairs):
                results: dict[bool, tuple[list[float], float]] = {}
                for proxied in self.order():
                    cpu0 = self.proxy.cpu_seconds()
                    results[proxied] = await asyncio.wait_for(round_(proxied, plan.latency_requests), 60)
                    if proxied:
                        cpu += self.proxy.cpu_seconds() - cpu0
                (direct, d_elapsed), (proxy, p_elapsed) = results[False], results[True]
                p50.add(percentile(direct, 50), percentile(proxy, 50))
                p99.add(percentile(direct, 99), percentile(proxy, 99))
                rps.add(len(direct) / d_elapsed, len(proxy) / p_elapsed)
        finally:
            for connection in connections.values():
                connection.abort()
        added = p50.diff * 1000
        target = TARGET_ADDED_P50_MS.get(self.servers.telemetry, 0.5)
        self.sections.append(
            (
                title,
                [
                    Row(
                        "requests/s",
                        f"{rps.direct_median:.0f}",
                        f"{rps.proxied_median:.0f}",
                        f"{rps.ratio:.0%} of direct",
                    ),
                    Row(
                        "latency p50",
                        ms(p50.direct_median),
                        ms(p50.proxied_median),
                        ms_diff(p50.diff),
                        f"≤ +{target} ms",
                        verdict(added <= target, errors),
                    ),
                    Row("latency p99", ms(p99.direct_median), ms(p99.proxied_median), ms_diff(p99.diff)),
                    Row(
                        "proxy CPU per request", proxied=per(cpu, plan.latency_pairs * plan.latency_requests)
                    ),
                ],
            )
        )

    async def throughput(self, wrk: str | None, workdir: Path) -> None:
        title = "Non-streamed requests, 16 connections (wrk, 1 thread, closed loop)"
        if wrk is None:
            self.sections.append((title, [Row("not measured: wrk is missing (apt-get install wrk)")]))
            return
        log("non-streamed requests, 16 connections (wrk)")
        script = workdir / "post.lua"
        script.write_text(WRK_SCRIPT)
        rps, p50, p99 = Paired(), Paired(), Paired()
        cpu = exporter_cpu = 0.0
        requests = errors = 0
        for proxied in (False, True):  # warm-up, not recorded
            await self._wrk(wrk, script, proxied, 1)
        for _ in range(self.plan.wrk_pairs):
            results: dict[bool, WrkResult] = {}
            for proxied in self.order():
                cpu0, exporter0 = self.proxy.cpu_seconds(), self.proxy.children_cpu_seconds()
                results[proxied] = result = await self._wrk(wrk, script, proxied, self.plan.wrk_seconds)
                if proxied:
                    cpu += self.proxy.cpu_seconds() - cpu0
                    # The exporter catches up after the round; what it spent then lands in the next
                    # round's window, so over the rounds it is counted (all but the last round's tail).
                    exporter_cpu += self.proxy.children_cpu_seconds() - exporter0
                    requests += result.requests
                errors += result.errors
            direct, proxy = results[False], results[True]
            rps.add(direct.requests / direct.seconds, proxy.requests / proxy.seconds)
            p50.add(direct.p50, proxy.p50)
            p99.add(direct.p99, proxy.p99)
        self.sections.append(
            (
                title,
                [
                    Row(
                        "requests/s",
                        f"{rps.direct_median:.0f}",
                        f"{rps.proxied_median:.0f}",
                        f"{rps.ratio:.0%} of direct",
                        verdict=verdict(None, errors),
                    ),
                    Row("latency p50", ms(p50.direct_median), ms(p50.proxied_median), ms_diff(p50.diff)),
                    Row("latency p99", ms(p99.direct_median), ms(p99.proxied_median), ms_diff(p99.diff)),
                    Row("proxy CPU per request", proxied=per(cpu, requests)),
                    Row("exporter process CPU per request", proxied=per(exporter_cpu, requests)),
                ],
            )
        )

    async def _wrk(self, wrk: str, script: Path, proxied: bool, seconds: int) -> WrkResult:
        url = f"http://{HOST}:{self.port(proxied)}/api/show"
        process = await asyncio.create_subprocess_exec(
            *(wrk, "-t1", "-c16", f"-d{seconds}s", "--timeout", "5s", "-s", str(script), url),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), seconds + 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        match = re.search(rb"^BENCH (\d+) (\d+) ([\d.]+) ([\d.]+) (\d+)$", output, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"unexpected wrk output:\n{output.decode(errors='replace')}")
        count, duration_us, p50_us, p99_us, errors = match.groups()
        return WrkResult(
            int(count), int(duration_us) / 1e6, float(p50_us) / 1e6, float(p99_us) / 1e6, int(errors)
        )

    # -- 2. token streams -------------------------------------------------------------------------

    async def streams(self, paced: bool, concurrency: int) -> None:
        rate = PACED_RATE if paced else 0.0
        how = f"paced at {PACED_RATE:g} tokens/s" if paced else "flood (upstream writes as fast as it can)"
        log(f"token streams, {how}, {concurrency} concurrent")
        # Paced streams start spread over one stream's length, as independent users' would, and are
        # measured once all run; flood streams start together and follow each other (a closed loop).
        stream_seconds = STREAM_CHUNKS / PACED_RATE
        stagger = stream_seconds if paced else 0.0
        warmup = stream_seconds if paced else FLOOD_WARMUP
        window = self.plan.paced_seconds if paced else self.plan.flood_seconds
        pairs = self.plan.paced_pairs if paced else self.plan.flood_pairs
        throughput, ttfc50, ttfc99 = Paired(), Paired(), Paired()
        cpu = 0.0
        lines = errors = 0
        for _ in range(pairs):
            results: dict[bool, StreamRound] = {}
            for proxied in self.order():
                port = self.port(proxied)
                results[proxied] = round_ = StreamRound(
                    port, stream_request(port, STREAM_CHUNKS, rate), concurrency
                )
                run = round_.run(stagger, warmup, window, self.proxy if proxied else None)
                await asyncio.wait_for(run, warmup + window + 60)
                errors += round_.errors
                await asyncio.sleep(SETTLE)
            direct, proxy = results[False], results[True]
            throughput.add(direct.streams_per_second, proxy.streams_per_second)
            ttfc50.add(percentile(direct.ttfc, 50), percentile(proxy.ttfc, 50))
            ttfc99.add(percentile(direct.ttfc, 99), percentile(proxy.ttfc, 99))
            cpu += proxy.proxy_cpu
            lines += proxy.lines
        ratio = Row(
            "streams/s",
            f"{throughput.direct_median:.1f}",
            f"{throughput.proxied_median:.1f}",
            f"{throughput.ratio:.0%} of direct",
        )
        p99 = Row(
            "time to first chunk p99",
            ms(ttfc99.direct_median),
            ms(ttfc99.proxied_median),
            ms_diff(ttfc99.diff),
        )
        if paced:
            p99.target = f"≤ +{TARGET_PACED_TTFC_P99_MS:g} ms"
            p99.verdict = verdict(ttfc99.diff * 1000 <= TARGET_PACED_TTFC_P99_MS, errors)
        else:
            ratio.target = f"≥ {TARGET_FLOOD_RATIO:.0%} of direct"
            ratio.verdict = verdict(throughput.ratio >= TARGET_FLOOD_RATIO, errors)
        self.sections.append(
            (
                f"Token streams ({STREAM_CHUNKS} NDJSON chunks), {how}, {concurrency} concurrent",
                [
                    ratio,
                    Row(
                        "time to first chunk p50",
                        ms(ttfc50.direct_median),
                        ms(ttfc50.proxied_median),
                        ms_diff(ttfc50.diff),
                    ),
                    p99,
                    Row("proxy CPU per chunk relayed", proxied=per(cpu, lines, 1)),
                ],
            )
        )

    # -- 3. memory ----------------------------------------------------------------------------------

    async def memory(self) -> None:
        """On fresh servers, so that heap grown by earlier phases cannot hide what streams cost."""
        streams = self.plan.rss_streams
        log(f"memory, {streams} concurrent slow streams")
        upstream = self.servers.upstream()
        await upstream.ready()
        proxy = self.servers.proxy(upstream)
        await proxy.ready()
        # Every code path runs once first (the upstream connection pool, lazy imports), so the baseline
        # is an idle proxy rather than a proxy that never served.
        warm = await connect(proxy.port, 8, Tally())
        warm_request = stream_request(proxy.port, 5, 0)
        await asyncio.wait_for(asyncio.gather(*(c.send(warm_request, []) for c in warm)), 30)
        for connection in warm:
            connection.abort()
        await asyncio.sleep(1.0)
        base = {"proxy": proxy.rss_kb(), "upstream": upstream.rss_kb()}
        peak = dict(base)
        # Long enough to outlast the hold; the streams are cut when it ends.
        request = stream_request(proxy.port, STREAM_CHUNKS, RSS_RATE)
        connections = await connect(proxy.port, streams, Tally())
        exchanges: list[list[Exchange]] = [[] for _ in connections]
        senders = [
            asyncio.ensure_future(c.send(request, into))
            for c, into in zip(connections, exchanges, strict=True)
        ]

        def streaming() -> list[bool]:
            return [
                bool(e) and e[0].t_first is not None and not s.done()
                for e, s in zip(exchanges, senders, strict=True)
            ]

        try:
            deadline = time.monotonic() + 60
            while not all(streaming()):
                if time.monotonic() > deadline or any(s.done() for s in senders):
                    break  # some stream ended or never began: counted as failed below
                await asyncio.sleep(0.05)
            hold_until = time.monotonic() + self.plan.rss_hold_seconds
            while time.monotonic() < hold_until:
                peak["proxy"] = max(peak["proxy"], proxy.rss_kb())
                peak["upstream"] = max(peak["upstream"], upstream.rss_kb())
                await asyncio.sleep(0.1)
            # VmHWM also catches a peak between two samples.
            peak["proxy"] = max(peak["proxy"], proxy.peak_rss_kb())
            peak["upstream"] = max(peak["upstream"], upstream.peak_rss_kb())
            failed = streaming().count(False)
        finally:
            for connection in connections:
                connection.abort()
            await asyncio.gather(*senders, return_exceptions=True)
            proxy.stop()
            upstream.stop()
        kb = {k: (peak[k] - base[k]) / streams for k in base}
        self.sections.append(
            (
                f"Memory: {streams} concurrent slow streams ({RSS_RATE:g} tokens/s); "
                "direct = the upstream server holding the same streams",
                [
                    Row(
                        "RSS per concurrent stream, over idle",
                        f"{kb['upstream']:.1f} KB",
                        f"{kb['proxy']:.1f} KB",
                        f"{kb['proxy'] / kb['upstream']:.1f} times the upstream's"
                        if kb["upstream"] > 0
                        else "—",
                        f"≤ {TARGET_RSS_KB_PER_STREAM:g} KB",
                        verdict(kb["proxy"] <= TARGET_RSS_KB_PER_STREAM, failed),
                    ),
                    Row(
                        "RSS idle → peak",
                        f"{base['upstream'] / 1024:.1f} → {peak['upstream'] / 1024:.1f} MB",
                        f"{base['proxy'] / 1024:.1f} → {peak['proxy'] / 1024:.1f} MB",
                    ),
                ],
            )
        )


# wrk's own summary is text for people; this prints the figures on one line for the script to parse.
WRK_SCRIPT = f"""\
wrk.method = "POST"
wrk.body = '{SMALL_BODY.decode()}'
wrk.headers["Content-Type"] = "application/json"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %.1f %.1f %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
"""


# ---------------------------------------------------------------------------------------------------
# Machine, report, main


def ensure_wrk() -> str | None:
    """wrk's path; installs Debian's package when missing and this is root with apt-get."""
    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        if not found:
            log("wrk not found and cannot install it here: run `sudo apt-get install wrk`")
        return found
    log("wrk not found: installing Debian's package (apt-get update && apt-get install -y wrk) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        if subprocess.run(argv, env=env, capture_output=True, timeout=600, check=False).returncode:
            log(f"`{' '.join(argv)}` failed: install wrk by hand")
            return None
    return shutil.which("wrk")


def machine(wrk: str | None) -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("uvicorn", "uvloop", "httptools", "httpx", "opentelemetry-sdk")
    )
    wrk_version = "no wrk"
    if wrk:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10, check=False)
        wrk_version = "wrk " + out.stdout.split()[1] if out.stdout.split()[1:] else "wrk"
    return (
        f"{os.cpu_count()} CPUs: {model}, Linux {platform.release()}, Python {platform.python_version()}, "
        f"{versions}, {wrk_version}"
    )


def revision() -> str:
    """The commit under test, so that a table says which proxy it measured."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode:
        return "an unknown revision"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, check=False
    )
    return f"commit {head.stdout.strip()}" + (" with uncommitted changes" if dirty.stdout.strip() else "")


class CpuLedger:
    """How busy the machine was with other processes while the benchmark ran.

    Busy time from /proc/stat minus the time this script and its children (reaped, so all of them by
    the end) used. Much above zero means other work shared the cores and the figures are pessimistic.
    """

    def __init__(self) -> None:
        self._busy0 = self._machine_busy()
        self._ours0 = self._ours()
        self.wall0 = time.monotonic()

    @staticmethod
    def _machine_busy() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / CLOCK_TICKS  # user..steal; guest time is already in user

    @staticmethod
    def _ours() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others_cores(self) -> float:
        """Cores' worth of CPU that other processes used, on average, since construction."""
        others = (self._machine_busy() - self._busy0) - (self._ours() - self._ours0)
        return max(0.0, others) / (time.monotonic() - self.wall0)


def render(label: str, env: dict[str, str], quick: bool, sections: list[Section], footer: list[str]) -> str:
    lines = [f"### Configuration: {label}", ""]
    shown = " ".join(f"`{k}={v}`" for k, v in env.items()) or "none"
    lines.append(
        f"Proxy environment: {shown} (the caller's `OTEL_*` and `OTELLAMA_*` variables are not passed on)."
    )
    if quick:
        lines += ["", "**Quick run** (`--quick`): few, short rounds; a smoke test, not figures to quote."]
    lines += [
        "",
        "| Measurement | Direct | Proxied | Proxied vs direct | Target | Result |",
        "|---|---:|---:|---:|---|---|",
    ]
    for heading, rows in sections:
        lines.append(f"| **{heading}** | | | | | |")
        for row in rows:
            cells = (row.measurement, row.direct, row.proxied, row.change, row.target, row.verdict)
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *footer]
    return "\n".join(lines)


def write_section(path: Path, label: str, text: str) -> None:
    """Replace this configuration's generated section of ``path``, or append one at the end."""
    start, end = f"<!-- bench:start {label} -->", f"<!-- bench:end {label} -->"
    content = path.read_text() if path.exists() else ""
    block = f"{start}\n{text}\n{end}"
    i, j = content.find(start), content.find(end)
    if i >= 0 and j > i:
        content = content[:i] + block + content[j + len(end) :]
    else:
        content = content.rstrip("\n") + ("\n\n" if content else "") + block + "\n"
    path.write_text(content)


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--proxy-env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def command_line() -> str:
    """This run's command as someone would type it from the repository root."""
    python, script = Path(sys.executable), Path(__file__).resolve()
    with contextlib.suppress(ValueError):
        python = python.relative_to(ROOT)
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join([str(python), str(script), *sys.argv[1:]])


async def run(
    plan: Plan, seed: int, proxy_env: dict[str, str], wrk: str | None, telemetry: str
) -> list[Section]:
    with tempfile.TemporaryDirectory(prefix="otellama-bench-") as tmp:
        sink: Server | None = None
        black_hole: socket.socket | None = None
        if telemetry == "blackhole":
            # OTLP configured, but the collector accepts TCP and never answers: what a client sees then.
            black_hole = socket.create_server((HOST, 0), backlog=4096)
            proxy_env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{black_hole.getsockname()[1]}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_METRIC_EXPORT_INTERVAL": "5000",
                **proxy_env,
            }
        if telemetry == "on":
            # Every sink on: OTLP traces and metrics to a local endpoint, the JSONL log, Prometheus.
            sink = Server("otlp-sink", [sys.executable, str(SINK_SCRIPT)], dict(os.environ), Path(tmp))
            await sink.ready()
            proxy_env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{sink.port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_METRIC_EXPORT_INTERVAL": "5000",
                **proxy_env,
            }
        servers = Servers(proxy_env, Path(tmp), telemetry)
        bench = Bench(plan, servers, seed)
        phases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("servers", bench.start),
            ("1 connection", bench.latency),
            (
                "1 connection, GenAI",
                lambda: bench.latency(
                    "/api/generate?chunks=0",
                    STREAM_BODY,
                    "GenAI requests (POST /api/generate, the final object only), 1 connection, sequential",
                ),
            ),
            ("16 connections", lambda: bench.throughput(wrk, Path(tmp))),
        ]
        for paced in (False, True):
            for concurrency in (32, 64, 256) if paced else (32, 256):
                name = f"{'paced' if paced else 'flood'} {concurrency}"
                phases.append((name, functools.partial(bench.streams, paced, concurrency)))
        phases.append(("memory", bench.memory))
        try:
            for name, phase in phases:
                began = time.monotonic()
                if name == "memory":
                    servers.stop_all()  # the memory test runs alone, on fresh servers
                await phase()
                log(f"  {name}: {time.monotonic() - began:.1f} s")
        except BaseException:
            for server in servers.started:
                if server.proc.poll() is not None:
                    log(f"{server.name} exited with {server.proc.returncode}:\n{server.tail()}")
            raise
        finally:
            servers.stop_all()
            if sink is not None:
                sink.stop()
            if black_hole is not None:
                black_hole.close()
    return bench.sections


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run instead of ~5 minutes")
    parser.add_argument(
        "--write", type=Path, metavar="FILE", help="replace this configuration's table in FILE"
    )
    parser.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable for the proxy process (repeatable), e.g. to turn telemetry on",
    )
    parser.add_argument(
        "--label",
        help="name of the configuration under test: heads its table and keys its section in --write "
        "(default: the --proxy-env list, or 'default settings')",
    )
    parser.add_argument("--seed", type=int, help="seed for the order of rounds (default: random)")
    parser.add_argument(
        "--telemetry",
        choices=("default", "off", "on", "blackhole"),
        default="default",
        help="off: a proxy that records nothing (the byte path alone); on: every sink, OTLP to a local "
        "endpoint included; blackhole: as on, with a collector that accepts TCP and never answers; "
        "default: `otellama serve` as shipped (JSONL and Prometheus, no OTLP)",
    )
    args = parser.parse_args(argv)
    proxy_env = parse_env(args.proxy_env)
    default_label = {
        "off": "telemetry off",
        "on": "telemetry on (OTLP, JSONL, Prometheus)",
        "blackhole": "telemetry on, collector black-holed",
    }.get(args.telemetry)
    label: str = (
        args.label
        or default_label
        or ", ".join(f"{k}={v}" for k, v in proxy_env.items())
        or "default settings"
    )
    if "--" in label or ">" in label:
        raise SystemExit("--label must not contain '--' or '>': it goes into an HTML comment")
    seed: int = args.seed if args.seed is not None else random.randrange(1 << 31)

    # 1,000 streams hold about 3,000 sockets across the three processes; children inherit the limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    wrk = ensure_wrk()
    started, measured = dt.datetime.now(dt.UTC), revision()
    ledger = CpuLedger()
    load = os.getloadavg()[0]
    log(f"otellama proxy benchmark, {'quick' if args.quick else 'full'} run, {label}, seed {seed}")
    try:
        sections = uvloop.run(run(QUICK if args.quick else FULL, seed, proxy_env, wrk, args.telemetry))
    except KeyboardInterrupt:  # the servers are already stopped
        log("interrupted")
        return 130
    elapsed = time.monotonic() - ledger.wall0
    footer = [
        f"Command: `{command_line()}` (seed {seed}) on {measured} · {started:%Y-%m-%d %H:%M} UTC · "
        f"took {elapsed:.0f} s",
        "",
        f"Machine: {machine(wrk)}. Load average at start {load:.2f}; other processes used "
        f"{ledger.others_cores():.2f} cores on average during the run.",
    ]
    text = render(label, proxy_env, args.quick, sections, footer)
    print(text)
    if args.write:
        write_section(args.write, label, text)
        log(f"wrote the '{label}' section of {args.write}")
    broken = any(row.verdict.startswith("ERROR") for _, rows in sections for row in rows)
    return 1 if broken else 0  # a missed target is a result; failed requests mean no result


if __name__ == "__main__":
    sys.exit(main())
