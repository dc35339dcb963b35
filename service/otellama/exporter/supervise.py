"""The proxy's side of the exporter process: start it, read its status, restart it when it dies, stop it.

Nothing here waits for the exporter on the proxy's path: records reach it through the JSONL log, which the
proxy writes whatever the exporter does. Only ``/otellama/metrics`` and ``/otellama/stats`` wait for it
(:meth:`Supervisor.ask`): their numbers live there. The child runs in a session of its own, so a Ctrl-C or a
signal to the proxy's process group reaches the proxy only, and the proxy stops it in order
(:meth:`Supervisor.stop`): after the last request drained and the log was closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from otellama.exchange import HostState
from otellama.exporter import relay
from otellama.exporter.follow import mark_end
from otellama.exporter.process import FROM_VARIABLE, SOCKET_VARIABLE
from otellama.settings import Settings

log = logging.getLogger(__name__)

#: Pause before the first restart; doubled after each quick death, up to :data:`RESTART_MAX`.
RESTART_FIRST: Final = 0.5
RESTART_MAX: Final = 30.0
#: An exporter that ran this long before dying is restarted after :data:`RESTART_FIRST` again.
STABLE_AFTER: Final = 60.0
#: Seconds between two in-flight reports to the exporter.
IN_FLIGHT_EVERY: Final = 1.0
#: Seconds ``/otellama/metrics`` and ``/otellama/stats`` wait for the exporter's answer (Prometheus's
#: default scrape timeout is 10).
ASK_TIMEOUT: Final = 8.0
#: How long a status line may be.
_STATUS_LIMIT: Final = 64 * 1024


class Supervisor:
    """Runs ``python -m otellama exporter`` for ``settings``' log while the proxy runs.

    :attr:`restarts` counts unexpected exits; :attr:`status` holds the exporter's latest counters, summed
    over its lives (each life starts again from zero).
    """

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str] | None = None,
        on_failures: Callable[[str, int], None] = lambda signal, batches: None,
        in_flight: Callable[[], Mapping[tuple[tuple[str, str], ...], int]] = dict,
        instance_id: str | None = None,
        hosts: Callable[[], Sequence[HostState]] | None = None,
        feed_hosts: bool = False,
    ) -> None:
        if settings.log_file is None:
            raise ValueError("the exporter follows the JSONL log; OTELLAMA_LOG_FILE is off")
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        self.restarts = 0
        self._on_failures = on_failures
        self._in_flight = in_flight
        self._hosts = hosts
        # Reading the host states can make the proxy ask a single Ollama /api/ps: only when the exporter
        # sends metrics on its own (OTLP); else only when a scrape reads them.
        self._feed_hosts = feed_hosts
        self.instance_id = instance_id
        self.status: dict[str, int] = {}
        self._earlier: dict[str, int] = {}  # the counters of lives that ended
        self._current: dict[str, int] = {}
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Set by the running exporter's first status line: its SIGTERM handler and relay are in place.
        self._ready = asyncio.Event()
        # The relay's socket, in a directory only this user can enter (made at start, removed at stop).
        self._directory: str | None = None
        self._from = ""  # where the log ended when the proxy started: the live view's start

    async def start(self) -> None:
        """Start the exporter (after saving "the end of the log" as its place on a first run)."""
        log_file = self.settings.log_file
        assert log_file is not None
        try:
            await asyncio.to_thread(mark_end, log_file)
            status = os.stat(log_file)
            self._from = f"{status.st_ino}:{status.st_size}"
        except OSError as exc:  # an unwritable log never stops otellama (the log sink says so itself)
            log.warning("cannot mark the exporter's place in the log %s: %s", log_file, exc)
        self._directory = tempfile.mkdtemp(prefix="otellama-exporter-")
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _spawn(self) -> asyncio.subprocess.Process:
        environ = {**self.environ, "OTELLAMA_LOG_FILE": str(self.settings.log_file)}
        if self.instance_id and "service.instance.id" not in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
            # One instance, however often the exporter restarts: the proxy's (the SDK draws one per process).
            attributes = environ.get("OTEL_RESOURCE_ATTRIBUTES", "").strip().strip(",")
            instance = f"service.instance.id={self.instance_id}"
            environ["OTEL_RESOURCE_ATTRIBUTES"] = f"{attributes},{instance}" if attributes else instance
        environ["OTELLAMA_LOG_BACKUPS"] = str(self.settings.log_backups)
        environ[FROM_VARIABLE] = self._from
        if self._directory is not None:
            environ[SOCKET_VARIABLE] = self._socket()
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "otellama",
            "exporter",
            env=environ,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # signals to the proxy's group are the proxy's to pass on
            limit=_STATUS_LIMIT,
        )

    async def _watch(self) -> None:
        pause = RESTART_FIRST
        while not self._stopping:
            started = time.monotonic()
            try:
                self.process = await self._spawn()
            except OSError as exc:
                log.error("cannot start the exporter process: %s", exc)
            else:
                feeding = asyncio.get_running_loop().create_task(self._feed(self.process))
                await self._read(self.process)
                code = await self.process.wait()
                # Cleared, not replaced: whoever waits for the exporter now waits for its next life.
                self._ready.clear()
                feeding.cancel()
                self._earlier = self.total()
                self._current = {}
                if self._stopping:
                    return
                self.restarts += 1
                log.warning(
                    "the exporter process exited (%s); restarting it (%d restarts so far). Nothing is lost: "
                    "it goes on from its saved place in the log",
                    _describe(code),
                    self.restarts,
                )
            if time.monotonic() - started > STABLE_AFTER:
                pause = RESTART_FIRST
            await asyncio.sleep(pause)
            pause = min(pause * 2, RESTART_MAX)

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an overlong line: not a status line
            if not line:
                return
            self._ready.set()
            with contextlib.suppress(ValueError, TypeError):
                value = orjson.loads(line)
                if isinstance(value, dict):
                    counts = {k: v for k, v in value.items() if isinstance(v, int)}
                    for signal_name in ("traces", "metrics"):
                        key = f"failed_{signal_name}"
                        new = counts.get(key, 0) - self._current.get(key, 0)
                        if new > 0:
                            self._on_failures(signal_name, new)
                    self._current = counts

    async def _feed(self, process: asyncio.subprocess.Process) -> None:
        """Tell the exporter the in-flight gauge, and what each Ollama host holds, once a second (it exports
        them with the other metrics: they live in this process, the metrics are rendered in that one)."""
        stdin = process.stdin
        assert stdin is not None
        while process.returncode is None:
            if stdin.transport.get_write_buffer_size() < _STATUS_LIMIT:  # a stuck child grows no buffer
                with contextlib.suppress(OSError, RuntimeError):
                    stdin.write(orjson.dumps(self.report(hosts=self._feed_hosts)) + b"\n")
            await asyncio.sleep(IN_FLIGHT_EVERY)

    def report(self, *, hosts: bool = True) -> dict[str, Any]:
        """What lives in this process that the exporter shows: requests in flight, and the hosts' states."""
        pairs = [[list(map(list, key)), value] for key, value in self._in_flight().items()]
        report: dict[str, Any] = {"in_flight": pairs}
        if hosts and self._hosts is not None:
            report["hosts"] = [dataclasses.asdict(state) for state in self._hosts()]
        return report

    def _socket(self) -> str:
        assert self._directory is not None
        return str(Path(self._directory) / "relay.sock")

    async def ask(self, request: Mapping[str, Any], within: float = ASK_TIMEOUT) -> bytes | None:
        """The exporter's answer to a relay ``request`` (:mod:`~otellama.exporter.relay`), waiting for it to
        be ready (a restart) ``within`` seconds; None if it gave none."""
        if self._directory is None:
            return None
        began = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), within)
        return await relay.ask(self._socket(), request, max(within - (time.monotonic() - began), 0.1))

    def total(self) -> dict[str, int]:
        """The exporter's counters over all its lives (``behind_bytes`` is the latest, not a sum)."""
        summed = dict(self._earlier)
        for key, value in self._current.items():
            summed[key] = value if key == "behind_bytes" else summed.get(key, 0) + value
        return summed

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.returncode is None else None

    async def stop(self, within: float | None) -> None:
        """Have the exporter export to the end of the log and exit; kill it after ``within`` seconds
        (None: wait). What it did not export stays in the log and goes out after the next start."""
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            started = time.monotonic()
            # A SIGTERM that came while the exporter was still starting would kill it before its handler
            # is in place: let it get ready first, within the same grace.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), within)
            if within is not None:
                within = max(0.0, within - (time.monotonic() - started))
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), within)
            except TimeoutError:
                log.warning(
                    "the exporter did not finish within the shutdown grace; the rest of the log is exported "
                    "after the next start"
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
