"""Soak: otellama under long, heavy, Ollama-shaped load, watched every second.

Three processes on this machine: the emulator (``otellama.emulator``, paced like a busy Ollama), otellama
(as ``otellama serve`` runs it, plus an event-loop lag probe), and this driver. Two phases:

1. **Streams**: ``--streams`` (1,000) concurrent ``/api/generate`` streams for ``--minutes`` (10), closed
   loop: when one ends, the next starts. Each stream is ``--tokens`` tokens at ``--token-rate`` tokens/s
   (100 at 10/s: ten seconds, as a loaded Ollama serving many users writes them). Every stream must end
   with Ollama's ``done: true`` line.
2. **Bursts**: ``--burst-seconds`` (60) of bursts, 5 s on and 5 s off, of short requests
   (``POST /api/show``, which the emulator answers at ~30,000/s, so otellama is the bottleneck; a paced
   one-token ``/api/generate`` would measure the emulator's pacing instead) offered by wrk as fast as it
   goes (wrk is closed-loop: the figure says what was reached; with wrk2, ``--wrk2`` offers exactly
   ``--burst-rate``, 5,000/s).

Every second it records otellama's RSS and open file descriptors (from /proc, via psutil), the event
loop's lag (otellama's loop sleeps 10 ms at a time and reports how late it woke: p99 and max per second),
requests finished and errors. At the end it counts the JSONL log's lines (all rotated files) against the
requests that reached otellama.

The lag probe also times otellama's garbage collections: with 1,000 streams in flight a full collection
stops the loop for 50-150 ms now and then (the lag's max, not its p99). ``--gc tuned`` tries
``gc.freeze()`` and higher thresholds instead (RELIABILITY.md has what that did).

Pass: zero lost exchanges (lines = finished requests + requests cut in flight, which are logged as
``cancelled``), no upward drift of RSS or descriptors after warm-up (the last minute's median within 5 %
(+5 MB) of the first steady minute's for RSS, +5 % for descriptors), event-loop lag p99 under 20 ms while
streaming.

  .venv/bin/python bench/soak.py                      # the full soak: 10 + 1 minutes
  .venv/bin/python bench/soak.py --minutes 2 --burst-seconds 30
  .venv/bin/python bench/soak.py --minutes 1 --out soak.jsonl   # every second's sample as JSON lines

Linux only (/proc, prctl). Needs wrk for the bursts (apt-get install wrk); without it, bursts are skipped.
Exit status: 0 pass, 1 fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import psutil

HOST = "127.0.0.1"
WARMUP_SECONDS = 60.0  # RSS and descriptors settle: pools fill, caches warm, the log reaches its size
LAG_TARGET_MS = 20.0

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
from otellama import connection, server
from otellama.app import create_app
from otellama.settings import Settings

settings = Settings.from_env()
app = create_app(settings)
if sys.argv[2] != "default" and app.telemetry is not None:  # /otellama/stats' ring: tell its growth apart
    from otellama.stats import RollingStats
    app.telemetry.stats = RollingStats(int(sys.argv[2]))
gc_pauses = []
_gc_started = [0.0]

def _gc_timer(phase, info):
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        gc_pauses.append((info["generation"], time.perf_counter() - _gc_started[0]))

gc.callbacks.append(_gc_timer)
if sys.argv[1] == "tuned":  # an experiment (RELIABILITY.md): fewer collections, each one longer
    gc.collect()
    gc.freeze()
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

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{"model":"llama3.2:3b"}'
wrk.headers["Content-Type"] = "application/json"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("SOAK %d %d %d %d %.1f %.1f\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99)))
end
"""


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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
        self.wrk_runs: list[dict[str, float]] = []
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
            }
            self.samples.append(sample)
            if self.args.out is not None:
                with self.args.out.open("a") as out:
                    out.write(json.dumps(sample) + "\n")
            if len(self.samples) % 10 == 0:
                log(
                    f"{self.phase}: t={sample['t']:.0f}s rss={sample['rss_mb']}MB fds={fds} "
                    f"lag p99={sample['lag_p99_ms']}ms finished={c.finished} errors={c.errors}"
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
        self.phase = "bursts"
        wrk = shutil.which("wrk")
        if wrk is None:
            log("bursts skipped: wrk is missing (apt-get install wrk)")
            return
        script = self.workdir / "short.lua"
        script.write_text(WRK_SCRIPT)
        deadline = time.monotonic() + seconds
        rate_flag = []
        if self.args.wrk2:
            rate_flag = [f"-R{self.args.burst_rate}"]
        log(f"bursts: 5 s on, 5 s off, for {seconds:.0f} s, {self.args.burst_connections} connections")
        while time.monotonic() < deadline:
            process = await asyncio.create_subprocess_exec(
                wrk, "-t2", f"-c{self.args.burst_connections}", "-d5s", "--timeout", "10s", *rate_flag,
                "-s", str(script), f"{self.proxy.url}/api/show",
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )  # fmt: skip
            output, _ = await process.communicate()
            match = re.search(rb"^SOAK (\d+) (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)$", output, re.MULTILINE)
            if match is None:
                raise RuntimeError(f"unexpected wrk output:\n{output.decode(errors='replace')}")
            requests, duration_us, socket_errors, status_errors, p50_us, p99_us = (
                float(g) for g in match.groups()
            )
            run = {
                "requests": requests,
                "seconds": duration_us / 1e6,
                "socket_errors": socket_errors,
                "status_errors": status_errors,
                "p50_ms": p50_us / 1e3,
                "p99_ms": p99_us / 1e3,
            }
            self.wrk_runs.append(run)
            log(f"burst: {requests / run['seconds']:.0f} requests/s, p99 {run['p99_ms']:.1f} ms, "
                f"errors {int(socket_errors + status_errors)}")  # fmt: skip
            self.phase = "bursts (idle)"
            await asyncio.sleep(5.0)
            self.phase = "bursts"

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
        wrk_requests = int(sum(run["requests"] for run in self.wrk_runs))
        # Every stream the driver sent has its line. wrk stops with requests in flight (at most its
        # connection count per run): those have lines too (cancelled, or answered after wrk stopped
        # counting), so the burst lines may exceed wrk's count by that much, never fall short of it.
        lost_streams = self.counters.started - len(stream_lines)
        lost_bursts = max(0, wrk_requests - len(burst_lines))
        extra_bursts = len(burst_lines) - wrk_requests
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
            return sorted(values)[int(0.99 * (len(values) - 1))] * 1e3 if values else 0.0

        burst_rps = [run["requests"] / run["seconds"] for run in self.wrk_runs]
        result = {
            "minutes": self.args.minutes,
            "streams": self.args.streams,
            "streams_started": self.counters.started,
            "streams_finished": self.counters.finished,
            "chunks_relayed": self.counters.chunks,
            "stream_errors": self.counters.errors,
            "error_kinds": self.counters.error_kinds,
            "burst_requests": wrk_requests,
            "burst_rps_median": round(statistics.median(burst_rps), 0) if burst_rps else None,
            "burst_p99_ms": round(max((r["p99_ms"] for r in self.wrk_runs), default=0.0), 1),
            "burst_errors": int(sum(r["socket_errors"] + r["status_errors"] for r in self.wrk_runs)),
            "jsonl_lines": len(lines),
            "jsonl_cancelled": cancelled,
            "jsonl_stream_lines": len(stream_lines),
            "jsonl_burst_lines": len(burst_lines),
            "burst_lines_beyond_wrk_count": extra_bursts,
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
            "zero lost exchanges": lost == 0
            and extra_bursts <= self.args.burst_connections * len(self.wrk_runs),
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
        ("bursts", f"{r['burst_requests']} short requests, median {r['burst_rps_median']} req/s per burst, "
         f"p99 {r['burst_p99_ms']} ms, {r['burst_errors']} errors"),
        ("records", f"{r['jsonl_stream_lines']} stream lines for {r['streams_started']} streams sent; "
         f"{r['jsonl_burst_lines']} burst lines for {r['burst_requests']} counted by wrk "
         f"(+{r['burst_lines_beyond_wrk_count']} in flight at wrk's stops); lost {r['lost']}"),
        ("RSS", f"{r['rss_mb_first_steady_minute']} MB first steady minute -> {r['rss_mb_last_minute']} MB "
         f"last minute (peak {r['rss_mb_peak']} MB)"),
        ("descriptors", f"{r['fds_first_steady_minute']:.0f} -> {r['fds_last_minute']:.0f}"),
        ("event-loop lag", f"p99 {r['lag_p99_ms_streams']} ms (max {r['lag_max_ms_streams']} ms) streaming; "
         f"p99 {r['lag_p99_ms_bursts']} ms in bursts"),
        ("garbage collector", f"{r['gc']}; longest pause {r['gc_max_pause_ms']} ms"),
    ]  # fmt: skip
    out = ["| what | measured |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
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
        "--burst-seconds", type=float, default=60.0, help="length of the burst phase (default 60)"
    )
    parser.add_argument("--burst-rate", type=int, default=5000, help="offered short requests/s (wrk2 only)")
    parser.add_argument("--burst-connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument(
        "--wrk2", action="store_true", help="the wrk on PATH is wrk2: offer exactly --burst-rate"
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
        choices=("tuned", "default"),
        default="default",
        help="otellama's garbage collector: Python's default, as `otellama serve` runs, or tuned "
        "(gc.freeze() after start, thresholds 50000/50/100: fewer pauses, but a longer one and more RSS; "
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
