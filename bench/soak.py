"""Soak: otellama under long, heavy, Ollama-shaped load, watched every second.

Three processes on this machine: the emulator (``otellama.emulator``, paced like a busy Ollama), otellama
(as ``otellama serve`` runs it, plus an event-loop lag probe), and this driver. Two phases:

1. **Streams**: ``--streams`` (1,000) concurrent ``/api/generate`` streams for ``--minutes`` (10), closed
   loop: when one ends, the next starts. Each stream is ``--tokens`` tokens at ``--token-rate`` tokens/s
   (100 at 10/s: ten seconds, as a loaded Ollama serving many users writes them). Every stream must end
   with Ollama's ``done: true`` line.
2. **Bursts**: one burst per 10 s of ``--burst-seconds`` (60: six bursts), each 5 s of short requests
   (``POST /api/show``, which the emulator answers at ~30,000/s, so otellama is the bottleneck; a paced
   one-token ``/api/generate`` would measure the emulator's pacing instead) then 5 s of quiet. The load is
   open-loop, as wrk2 offers it: exactly ``--burst-rate`` (5,000) requests/s, request *i* written at
   start + *i* / rate whatever the answers are doing, pipelined (HTTP/1.1) round-robin onto
   ``--burst-connections`` (64) keep-alive connections. A closed-loop client (wrk) waits for each answer
   before asking again, so a slow server lowers the load it is offered and hides its own slowness. Latency
   runs from each request's *scheduled* time to its answer's last byte, so time spent queued counts
   (no coordinated omission). When otellama serves fewer than offered, requests queue; after sending, the
   driver waits up to 120 s for every answer (the drain) before the quiet starts, so the phase can last
   longer than ``--burst-seconds``. Per burst: offered and served rates, p50/p99 latency, errors (any
   status but 200, and requests still unanswered when a connection closes or the drain times out) and
   drain time.

Every second it records otellama's RSS and open file descriptors (from /proc, via psutil), the event
loop's lag (otellama's loop sleeps 10 ms at a time and reports how late it woke: p99 and max per second),
requests finished and errors (streams and bursts). At the end it counts the JSONL log's lines (all rotated
files) against the requests that reached otellama.

The lag probe also times otellama's garbage collections: with 1,000 streams in flight a full collection
stops the loop for 50-150 ms now and then (the lag's max, not its p99). otellama, like ``otellama serve``
since issue 12, runs ``gc.freeze()`` after start-up; ``--gc unfrozen`` runs it without (before/after
comparison), ``--gc tuned`` adds higher thresholds (RELIABILITY.md has what that did).

Pass: zero lost exchanges (stream lines = streams sent, including any cut in flight, which are logged as
``cancelled``; burst lines = burst requests written, exactly, since every answer is waited for), no errors,
no upward drift of RSS or descriptors after warm-up (the last minute's median within 5 % (+5 MB) of the
first steady minute's for RSS, +5 % for descriptors), event-loop lag p99 under 20 ms while streaming (the
bursts' lag is reported alongside, not judged).

  .venv/bin/python bench/soak.py                      # the full soak: 10 minutes, then six bursts
  .venv/bin/python bench/soak.py --minutes 2 --burst-seconds 30
  .venv/bin/python bench/soak.py --minutes 1 --out soak.jsonl   # every second's sample as JSON lines

Linux only (/proc, prctl). The driver warns when it falls more than 2 % behind ``--burst-rate`` itself (a
machine too busy to offer the load): the figures then say what was offered, not what was asked for.
Exit status: 0 pass, 1 fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import aiohttp
import httptools
import psutil

HOST = "127.0.0.1"
WARMUP_SECONDS = 60.0  # RSS and descriptors settle: pools fill, caches warm, the log reaches its size
LAG_TARGET_MS = 20.0
BURST_ON, BURST_OFF = 5.0, 5.0  # seconds of sending, then of quiet, per burst
DRAIN_TIMEOUT = 120.0  # seconds a burst's queued requests get to be answered before they count as errors
DRIVER_SLACK = 0.02  # the driver warns when its own schedule ran this much behind --burst-rate
SHOW_BODY = b'{"model":"llama3.2:3b"}'

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # The kernel kills the child if this script dies, even by SIGKILL: no server outlives a soak.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


EMULATOR = """
import socket, sys
import uvicorn
from otellama import server
from otellama.emulator import EmulatorSettings, create_emulator

rate, tokens, parallel = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
settings = EmulatorSettings(token_rate=rate, load_seconds=2.0, parallel=parallel, max_queue=parallel,
                            response_tokens=(tokens, tokens))
sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
print(sock.getsockname()[1], flush=True)
uvicorn.Server(server.config(create_emulator(settings), "127.0.0.1", 0, backlog=4096)).run(sockets=[sock])
"""

# otellama as `otellama serve` runs it, wrapped so that its event loop reports its own lag.
PROXY = """
import asyncio, gc, json, socket, sys, time
import uvicorn
from otellama import server
from otellama.proxy import connection
from otellama.app import create_app
from otellama.settings import Settings

settings = Settings.from_env()
app = create_app(settings)
if sys.argv[2] != "default" and app.telemetry is not None:  # /otellama/stats' ring: tell its growth apart
    from otellama.sinks.stats import RollingStats
    ring = RollingStats(int(sys.argv[2]))
    app.telemetry.sinks = tuple(ring if sink is app.rolling else sink for sink in app.telemetry.sinks)
    app.rolling = ring
gc_pauses = []
_gc_started = [0.0]

def _gc_timer(phase, info):
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        gc_pauses.append((info["generation"], time.perf_counter() - _gc_started[0]))

gc.callbacks.append(_gc_timer)
if sys.argv[1] != "unfrozen":  # as `otellama serve` does since issue 12: the start-up heap out of sight
    gc.collect()
    gc.freeze()
if sys.argv[1] == "tuned":  # an experiment (RELIABILITY.md): fewer collections, each one longer
    gc.set_threshold(50_000, 50, 100)

async def probe():
    loop = asyncio.get_running_loop()
    lags, report = [], loop.time() + 1.0
    while True:
        before = loop.time()
        await asyncio.sleep(0.01)
        lags.append(max(0.0, loop.time() - before - 0.01))
        if loop.time() >= report:
            lags.sort()
            p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))]
            pauses = [p for _, p in gc_pauses]
            print(json.dumps({"t": time.time(), "lag_p99_ms": p99 * 1e3, "lag_max_ms": lags[-1] * 1e3,
                              "lag_samples": lags, "gc_max_ms": max(pauses, default=0.0) * 1e3,
                              "gc_gen2": sum(g == 2 for g, _ in gc_pauses)}), flush=True)
            gc_pauses.clear()
            lags, report = [], report + 1.0

async def probed(scope, receive, send):
    if scope["type"] == "lifespan":
        asyncio.get_running_loop().create_task(probe())
    await app(scope, receive, send)

sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
print(sock.getsockname()[1], flush=True)
guarded = connection.protocol(settings.client_timeout)
config = server.config(probed, "127.0.0.1", 0, backlog=4096, http=guarded,
                       timeout_graceful_shutdown=settings.shutdown_grace)
uvicorn.Server(config).run(sockets=[sock])
"""


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))] if values else 0.0


def show_request(port: int) -> bytes:
    # Built once: while it keeps time, the driver only hands these bytes to a socket.
    head = (
        f"POST /api/show HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(SHOW_BODY)}\r\n\r\n"
    )
    return head.encode() + SHOW_BODY


class Burst:
    """One burst's tally; times are the driver's loop clock (monotonic seconds)."""

    def __init__(self, rate: int, seconds: float, start: float) -> None:
        self.rate = rate
        self.total = round(rate * seconds)  # requests scheduled: number i at start + i / rate
        self.start = start
        self.scheduled = 0  # requests whose time has come: written, or errors if their connection closed
        self.sent = 0  # written to a connection
        self.answered = 0  # responses parsed to their end, any status
        self.statuses: dict[int, int] = {}
        self.error_kinds: dict[str, int] = {}
        self.latencies: list[float] = []
        self.first_write = self.last_write = self.last_response = start
        self.late_max = 0.0  # how far behind its schedule the driver wrote, at worst
        self.dropped = 0  # written, never answered: the connection closed or the drain timed out
        self.drained = asyncio.Event()  # every request written, and every one answered or dropped

    @property
    def outstanding(self) -> int:
        return self.sent - self.answered - self.dropped

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    def error(self, kind: str, count: int = 1) -> None:
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + count

    def settle(self) -> None:
        if self.scheduled == self.total and self.outstanding == 0:
            self.drained.set()

    def summary(self) -> dict[str, Any]:
        # Sending lasts from the first write to the end of the last request's slot: exactly total / rate
        # when the driver keeps time, longer when it wrote late.
        sending = self.last_write - self.first_write + 1 / self.rate
        serving = self.last_response - self.first_write
        return {
            "requests": self.sent,
            "answered": self.answered,
            "offered_rps": round(self.sent / sending, 1),
            "served_rps": round(self.answered / serving, 1) if self.answered and serving > 0 else 0.0,
            "p50_ms": round(percentile(self.latencies, 0.50) * 1e3, 2),
            "p99_ms": round(percentile(self.latencies, 0.99) * 1e3, 2),
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "statuses": {str(code): n for code, n in sorted(self.statuses.items())},
            "drain_s": round(max(0.0, self.last_response - self.last_write), 3),
            "driver_late_max_ms": round(self.late_max * 1e3, 2),
            # Judged on the schedule, not on requests written: a closed connection is otellama's error.
            "driver_kept_pace": self.scheduled / sending >= self.rate * (1 - DRIVER_SLACK),
        }


class Pipelined(asyncio.Protocol):
    """One of the driver's keep-alive connections: requests written back to back, responses parsed.

    HTTP/1.1 answers pipelined requests in the order they came, so the next response to complete on a
    connection belongs to the oldest request still waiting on it.
    """

    def __init__(self, driver: BurstDriver) -> None:
        self.driver = driver
        self.waiting: deque[float] = deque()  # scheduled times of requests written and not yet answered
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.drop("unparsable response")

    def on_message_complete(self) -> None:  # httptools callback: a whole response has arrived
        if not self.waiting:
            self.driver.burst.error("response to no request")
            return
        self.driver.answered(self.parser.get_status_code(), self.waiting.popleft())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.drop("connection closed")

    def drop(self, kind: str) -> None:
        """Count what still waits as errors and close: nothing more will be read on this connection."""
        if self.waiting:
            self.driver.burst.dropped += len(self.waiting)
            self.driver.burst.error(f"{kind} with requests waiting", len(self.waiting))
            self.waiting.clear()
            self.driver.burst.settle()
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


class BurstDriver:
    """Open-loop short requests, as wrk2 offers them, from this process (Debian has wrk, not wrk2).

    Writes never wait for answers or for the socket: when otellama falls behind, requests queue in the
    socket buffers (uvicorn stops reading a connection while a pipelined request waits its turn) and then
    in the transport's, and the queueing shows in the latency.
    """

    def __init__(self, port: int, rate: int, connections: int) -> None:
        self.port = port
        self.rate = rate
        self.size = connections
        self.request = show_request(port)
        self.loop = asyncio.get_running_loop()
        self.connections: list[Pipelined] = []
        self.burst = Burst(rate, 0.0, self.loop.time())  # the current one: responses are counted on it
        self.bursts: list[Burst] = []

    def totals(self) -> tuple[int, int, int]:
        """Requests written, answered and errors so far, over all bursts."""
        bursts = self.bursts
        return sum(b.sent for b in bursts), sum(b.answered for b in bursts), sum(b.errors for b in bursts)

    def answered(self, status: int, scheduled: float) -> None:
        burst, now = self.burst, self.loop.time()
        burst.answered += 1
        burst.last_response = now
        burst.latencies.append(now - scheduled)
        burst.statuses[status] = burst.statuses.get(status, 0) + 1
        if status != 200:
            burst.error(f"status {status}")
        burst.settle()

    async def connect(self) -> None:
        # The same connections serve every burst; one that closed (otellama's keep-alive timeout, an
        # error) is replaced before the next burst starts.
        self.connections = [c for c in self.connections if c.transport is not None]
        while len(self.connections) < self.size:
            _, protocol = await self.loop.create_connection(lambda: Pipelined(self), HOST, self.port)
            self.connections.append(cast(Pipelined, protocol))

    async def run(self, seconds: float) -> dict[str, Any]:
        await self.connect()
        loop, rate, request, connections = self.loop, self.rate, self.request, self.connections
        burst = self.burst = Burst(rate, seconds, loop.time())
        self.bursts.append(burst)
        while burst.scheduled < burst.total:
            now = loop.time()
            due = min(burst.total, int((now - burst.start) * rate) + 1)
            if due > burst.scheduled:
                # The loop wakes about once a millisecond: write everything whose time has come.
                burst.late_max = max(burst.late_max, now - (burst.start + burst.scheduled / rate))
                for i in range(burst.scheduled, due):
                    connection = connections[i % len(connections)]
                    if connection.transport is None:
                        burst.error("connection closed before writing")
                        continue
                    connection.waiting.append(burst.start + i / rate)
                    connection.transport.write(request)
                    burst.sent += 1
                burst.scheduled = due
                burst.last_write = now
            await asyncio.sleep(burst.start + burst.scheduled / rate - loop.time())
        # Every answer is waited for, so the next burst starts on empty connections and the log's line
        # count can be held against the requests written exactly.
        burst.settle()
        try:
            await asyncio.wait_for(burst.drained.wait(), DRAIN_TIMEOUT)
        except TimeoutError:
            for connection in connections:
                if connection.waiting:
                    connection.drop(f"no response within {DRAIN_TIMEOUT:g} s")
        return burst.summary()

    def close(self) -> None:
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.close()


class Child:
    """A server subprocess that prints its port first; stderr goes to a file in the work directory."""

    def __init__(self, name: str, code: str, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.stderr = (workdir / f"{name}.stderr").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            preexec_fn=_die_with_parent,
        )
        assert self.process.stdout is not None
        self.stdout: IO[bytes] = self.process.stdout
        line = self.stdout.readline()
        if not line:
            raise RuntimeError(f"{name} did not start; see {workdir / (name + '.stderr')}")
        self.port = int(line)
        self.url = f"http://{HOST}:{self.port}"
        self.ps = psutil.Process(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr.close()


class Counters:
    def __init__(self) -> None:
        self.started = 0  # requests whose headers and body went to otellama
        self.finished = 0  # responses read to their end
        self.errors = 0  # anything but a complete 200 ending in done: true
        self.chunks = 0
        self.error_kinds: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.log_file = workdir / "otellama.jsonl"
        self.counters = Counters()
        self.samples: list[dict[str, Any]] = []
        self.lag_reports: list[dict[str, Any]] = []
        self.phase = "starting"
        self.driver: BurstDriver | None = None
        self.burst_runs: list[dict[str, Any]] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTELLAMA_"))}
        log("starting the emulator and otellama")
        self.emulator = Child(
            "emulator",
            EMULATOR,
            [str(args.token_rate), str(args.tokens), str(args.streams * 2)],
            env,
            workdir,
        )
        proxy_env = {
            **env,
            "OTELLAMA_UPSTREAM": self.emulator.url,
            "OTELLAMA_LOG_FILE": str(self.log_file),
            "OTELLAMA_LOG_BACKUPS": "1000",  # keep every line to count them
            **dict(item.split("=", 1) for item in args.proxy_env),
        }
        self.proxy = Child("otellama", PROXY, [args.gc, args.stats_capacity], proxy_env, workdir)
        if args.pin:
            # otellama alone on the last core; the emulator and this driver share the others. Its loop's
            # lag then measures otellama, not the machine's other load preempting it.
            cores = sorted(os.sched_getaffinity(0))
            self.proxy.ps.cpu_affinity([cores[-1]])
            self.emulator.ps.cpu_affinity(cores[:-1])
            os.sched_setaffinity(0, cores[:-1])
        threading.Thread(target=self._read_lag, daemon=True).start()

    def _read_lag(self) -> None:
        for line in self.proxy.stdout:
            with contextlib.suppress(ValueError):
                report = json.loads(line)
                report["phase"] = self.phase
                self.lag_reports.append(report)

    # -- sampling ------------------------------------------------------------------------------------
    async def sample_every_second(self) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            ps = self.proxy.ps
            with ps.oneshot():
                rss, fds, cpu = ps.memory_info().rss, ps.num_fds(), sum(ps.cpu_times()[:2])
            lag = self.lag_reports[-1] if self.lag_reports else {}
            c = self.counters
            burst_sent, burst_answered, burst_errors = (
                (0, 0, 0) if self.driver is None else self.driver.totals()
            )
            sample = {
                "t": round(time.monotonic() - started, 1),
                "phase": self.phase,
                "rss_mb": round(rss / 1e6, 1),
                "fds": fds,
                "cpu_s": round(cpu, 2),
                "lag_p99_ms": round(lag.get("lag_p99_ms", 0.0), 2),
                "lag_max_ms": round(lag.get("lag_max_ms", 0.0), 2),
                "gc_max_ms": round(lag.get("gc_max_ms", 0.0), 2),
                "gc_gen2": lag.get("gc_gen2", 0),
                "started": c.started,
                "finished": c.finished,
                "errors": c.errors,
                "chunks": c.chunks,
                "burst_sent": burst_sent,
                "burst_answered": burst_answered,
                "burst_errors": burst_errors,
            }
            self.samples.append(sample)
            if self.args.out is not None:
                with self.args.out.open("a") as out:
                    out.write(json.dumps(sample) + "\n")
            if len(self.samples) % 10 == 0:
                log(
                    f"{self.phase}: t={sample['t']:.0f}s rss={sample['rss_mb']}MB fds={fds} "
                    f"lag p99={sample['lag_p99_ms']}ms finished={c.finished + burst_answered} "
                    f"errors={c.errors + burst_errors}"
                )

    # -- phase 1: streams ---------------------------------------------------------------------------
    async def stream(self, session: aiohttp.ClientSession, number: int) -> None:
        c = self.counters
        body = {
            "model": "llama3.2:3b",
            "prompt": f"tell me story {number}",
            "options": {"num_predict": self.args.tokens},
        }
        c.started += 1
        try:
            async with session.post(f"{self.proxy.url}/api/generate", json=body) as response:
                last = b""
                async for line in response.content:
                    c.chunks += 1
                    last = line
                if response.status != 200:
                    c.error(f"status {response.status}")
                elif b'"done":true' not in last:
                    c.error("stream ended without done")
                else:
                    c.finished += 1
        except (TimeoutError, aiohttp.ClientError) as exc:
            c.error(type(exc).__name__)

    async def streams(self, session: aiohttp.ClientSession, seconds: float) -> None:
        # Load the model first: otherwise every stream started during the cold load would begin, and then
        # end, at the same instant, wave after wave (real traffic is not that synchronised).
        async with session.post(f"{self.emulator.url}/api/generate", json={"model": "llama3.2:3b"}) as warm:
            await warm.read()
        self.phase = "streams"
        deadline = time.monotonic() + seconds
        log(f"streams: {self.args.streams} concurrent for {seconds:.0f} s")

        async def lane(index: int) -> None:
            # Lanes start spread over one stream's length, as independent users' would.
            await asyncio.sleep(index * (self.args.tokens / self.args.token_rate) / self.args.streams)
            number = index
            while time.monotonic() < deadline:
                await self.stream(session, number)
                number += self.args.streams

        await asyncio.gather(*(lane(i) for i in range(self.args.streams)))

    # -- phase 2: bursts ----------------------------------------------------------------------------
    async def bursts(self, seconds: float) -> None:
        count = math.ceil(seconds / (BURST_ON + BURST_OFF))
        if count == 0:
            return
        args = self.args
        self.driver = driver = BurstDriver(self.proxy.port, args.burst_rate, args.burst_connections)
        log(
            f"bursts: {count} of {BURST_ON:g} s on, {BURST_OFF:g} s off, {args.burst_rate} requests/s "
            f"offered on {args.burst_connections} connections"
        )
        try:
            for number in range(count):
                if number:
                    self.phase = "bursts (idle)"
                    await asyncio.sleep(BURST_OFF)
                self.phase = "bursts"  # sending and draining: otellama is busy until the last answer
                run = await driver.run(BURST_ON)
                self.burst_runs.append(run)
                log(
                    f"burst {number + 1}: offered {run['offered_rps']:.0f}/s, "
                    f"served {run['served_rps']:.0f}/s, p50 {run['p50_ms']:.1f} ms, "
                    f"p99 {run['p99_ms']:.1f} ms, errors {run['errors']}, "
                    f"drained in {run['drain_s']:.2f} s"
                )
                if not run["driver_kept_pace"]:
                    log(
                        f"WARNING: the driver fell behind: {run['offered_rps']:.0f} requests/s offered of "
                        f"{args.burst_rate} (late by up to {run['driver_late_max_ms']:.0f} ms); this machine "
                        "is too busy to offer the asked-for load"
                    )
        finally:
            driver.close()

    # -- the run ------------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        sampler = asyncio.create_task(self.sample_every_second())
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await self.streams(session, self.args.minutes * 60)
        await self.bursts(self.args.burst_seconds)
        self.phase = "settling"
        await asyncio.sleep(2.0)
        sampler.cancel()
        return self.verdict()

    def log_lines(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.workdir.glob("otellama.jsonl*")):
            for line in path.read_bytes().splitlines():
                yield json.loads(line)

    def verdict(self) -> dict[str, Any]:
        lines = list(self.log_lines())
        stream_lines = [line for line in lines if line["stream"] is True]
        burst_lines = [line for line in lines if line["stream"] is not True]
        runs = self.burst_runs
        burst_requests = sum(run["requests"] for run in runs)
        # Every stream sent and every burst request written has its line, no more and no fewer: the
        # bursts wait for every answer, so none is in flight when the lines are counted.
        lost_streams = self.counters.started - len(stream_lines)
        lost_bursts = max(0, burst_requests - len(burst_lines))
        extra_bursts = max(0, len(burst_lines) - burst_requests)
        lost = lost_streams + lost_bursts
        cancelled = sum(line["outcome"] == "cancelled" for line in lines)
        stream_samples = [s for s in self.samples if s["phase"] == "streams"]
        steady = [s for s in stream_samples if s["t"] >= min(WARMUP_SECONDS, len(stream_samples) / 4)]
        first, last = steady[:60], steady[-60:]

        def median(key: str, part: list[dict[str, Any]]) -> float:
            return statistics.median(s[key] for s in part) if part else 0.0

        rss_first, rss_last = median("rss_mb", first), median("rss_mb", last)
        fds_first, fds_last = median("fds", first), median("fds", last)
        lags = [lag for r in self.lag_reports if r["phase"] == "streams" for lag in r["lag_samples"]]
        burst_lags = [lag for r in self.lag_reports if r["phase"] == "bursts" for lag in r["lag_samples"]]

        def p99(values: list[float]) -> float:
            return percentile(values, 0.99) * 1e3

        def median_of(key: str) -> float | None:
            return round(statistics.median(run[key] for run in runs), 1) if runs else None

        result = {
            "minutes": self.args.minutes,
            "streams": self.args.streams,
            "streams_started": self.counters.started,
            "streams_finished": self.counters.finished,
            "chunks_relayed": self.counters.chunks,
            "stream_errors": self.counters.errors,
            "error_kinds": self.counters.error_kinds,
            "burst_rate": self.args.burst_rate,
            "burst_connections": self.args.burst_connections,
            "bursts": runs,
            "burst_requests": burst_requests,
            "burst_offered_rps_median": median_of("offered_rps"),
            "burst_served_rps_median": median_of("served_rps"),
            "burst_p50_ms_median": median_of("p50_ms"),
            "burst_p99_ms": round(max((run["p99_ms"] for run in runs), default=0.0), 1),
            "burst_drain_s_max": round(max((run["drain_s"] for run in runs), default=0.0), 2),
            "burst_errors": sum(run["errors"] for run in runs),
            "jsonl_lines": len(lines),
            "jsonl_cancelled": cancelled,
            "jsonl_stream_lines": len(stream_lines),
            "jsonl_burst_lines": len(burst_lines),
            "burst_lines_beyond_requests": extra_bursts,
            "lost": lost,
            "rss_mb_first_steady_minute": rss_first,
            "rss_mb_last_minute": rss_last,
            "rss_mb_peak": max((s["rss_mb"] for s in self.samples), default=0.0),
            "fds_first_steady_minute": fds_first,
            "fds_last_minute": fds_last,
            "lag_p99_ms_streams": round(p99(lags), 2),
            "lag_max_ms_streams": round(max(lags, default=0.0) * 1e3, 2),
            "lag_p99_ms_bursts": round(p99(burst_lags), 2),
            "gc_max_pause_ms": round(
                max((r.get("gc_max_ms", 0.0) for r in self.lag_reports), default=0.0), 1
            ),
            "gc": self.args.gc,
            "pinned": self.args.pin,
            "proxy_cpu_s": self.samples[-1]["cpu_s"] if self.samples else None,
        }
        checks = {
            "zero lost exchanges (JSONL lines = requests)": lost == 0 and extra_bursts == 0,
            "no stream errors": result["stream_errors"] == 0,
            "no burst errors": result["burst_errors"] == 0,
            "RSS flat after warm-up": rss_last <= rss_first * 1.05 + 5,
            "descriptors flat after warm-up": fds_last <= fds_first * 1.05 + 5,
            f"event-loop lag p99 < {LAG_TARGET_MS:g} ms (streams)": result["lag_p99_ms_streams"]
            < LAG_TARGET_MS,
        }
        result["checks"] = checks
        result["pass"] = all(checks.values())
        return result

    def stop(self) -> None:
        self.proxy.stop()
        self.emulator.stop()


def report(result: dict[str, Any]) -> str:
    r = result
    rows = [
        ("streams", f"{r['streams']} concurrent for {r['minutes']:g} min: {r['streams_finished']} finished, "
         f"{r['chunks_relayed']} chunks relayed, {r['stream_errors']} errors"),
        ("bursts", f"{len(r['bursts'])} x {BURST_ON:g} s, {r['burst_rate']} requests/s offered "
         f"(open loop, {r['burst_connections']} pipelined connections, `POST /api/show`): "
         f"{r['burst_requests']} requests; per burst (median) offered {r['burst_offered_rps_median']}/s, "
         f"served {r['burst_served_rps_median']}/s, p50 {r['burst_p50_ms_median']} ms; p99 at worst "
         f"{r['burst_p99_ms']} ms (from the scheduled time); drain at worst {r['burst_drain_s_max']} s; "
         f"{r['burst_errors']} errors"),
        ("records", f"{r['jsonl_stream_lines']} stream lines for {r['streams_started']} streams sent; "
         f"{r['jsonl_burst_lines']} burst lines for {r['burst_requests']} burst requests written "
         f"({r['burst_lines_beyond_requests']} beyond them); lost {r['lost']}"),
        ("RSS", f"{r['rss_mb_first_steady_minute']} MB first steady minute -> {r['rss_mb_last_minute']} MB "
         f"last minute (peak {r['rss_mb_peak']} MB)"),
        ("descriptors", f"{r['fds_first_steady_minute']:.0f} -> {r['fds_last_minute']:.0f}"),
        ("event-loop lag", f"p99 {r['lag_p99_ms_streams']} ms (max {r['lag_max_ms_streams']} ms) streaming; "
         f"p99 {r['lag_p99_ms_bursts']} ms in bursts"),
        ("garbage collector", f"{r['gc']}; longest pause {r['gc_max_pause_ms']} ms"),
    ]  # fmt: skip
    out = ["| what | measured |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if r["bursts"]:
        out += [
            "",
            "| burst | offered/s | served/s | p50 ms | p99 ms | errors | drain s | driver late, max ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {n} | {b['offered_rps']:.0f} | {b['served_rps']:.0f} | {b['p50_ms']} | {b['p99_ms']} | "
            f"{b['errors']} | {b['drain_s']:.2f} | {b['driver_late_max_ms']} |"
            for n, b in enumerate(r["bursts"], 1)
        ]
    out += ["", "| check | result |", "|---|---|"]
    out += [f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in result["checks"].items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the stream phase (default 10)")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams (default 1000)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per stream (default 100)")
    parser.add_argument("--token-rate", type=float, default=10.0, help="tokens/s per stream (default 10)")
    parser.add_argument(
        "--burst-seconds",
        type=float,
        default=60.0,
        help="the burst phase's schedule: one 5 s burst per 10 s (default 60: six bursts); draining "
        "a burst otellama could not keep up with makes the phase longer",
    )
    parser.add_argument(
        "--burst-rate", type=int, default=5000, help="short requests/s offered during a burst (default 5000)"
    )
    parser.add_argument(
        "--burst-connections",
        type=int,
        default=64,
        help="keep-alive connections the bursts' requests are pipelined onto (default 64)",
    )
    parser.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for otellama (repeatable)")  # fmt: skip
    parser.add_argument("--pin", action="store_true", help="otellama alone on the last CPU core")
    parser.add_argument(
        "--stats-capacity",
        default="default",
        help="exchanges kept for GET /otellama/stats (default: otellama's, 100,000, ~10-16 MB when full, "
        "so RSS climbs until it is); a small ring shows what else grows",
    )
    parser.add_argument(
        "--gc",
        choices=("tuned", "default", "unfrozen"),
        default="default",
        help="otellama's garbage collector: default, as `otellama serve` runs (gc.freeze() after start-up, "
        "Python's thresholds); unfrozen (no gc.freeze(): before issue 12, for comparison); or tuned "
        "(gc.freeze() and thresholds 50000/50/100: fewer pauses, but a longer one and more RSS; "
        "see RELIABILITY.md)",
    )
    parser.add_argument("--out", type=Path, help="append every second's sample here as a JSON line")
    parser.add_argument("--json", type=Path, help="write the result here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, stderr)")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.unlink(missing_ok=True)
    resource_limit = os.sysconf("SC_OPEN_MAX")
    if resource_limit < args.streams * 4:
        log(f"open file limit {resource_limit} is low for {args.streams} streams: raise it (ulimit -n)")
    workdir = Path(tempfile.mkdtemp(prefix="otellama-soak-"))
    soak = Soak(args, workdir)
    try:
        result = asyncio.run(soak.run())
    finally:
        soak.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"work directory kept: {workdir}")
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    log("PASS" if result["pass"] else "FAIL")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
