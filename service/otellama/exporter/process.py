"""``python -m otellama exporter``: follow the log, render, export, save the position; report to the proxy.

One loop: read a batch of lines from the saved position, rebuild each record (:meth:`Record.from_json`) and
render its spans, export the spans synchronously, and save the position after the batch only once every span
exporter accepted it. A failed export is retried
with a growing pause (up to :data:`RETRY_MAX` seconds) and never skipped, so a collector that is down for
ten minutes gets every span of those minutes once it is back, in order, with the original ids and times.
Delivery is at least once: a process killed between an accepted export and saving the position sends that
one batch again after its restart (backends keyed on span ids keep one copy).

Metrics and the stats window are the live view's (:mod:`~otellama.exporter.live`), a thread that reads
the same lines as soon as they are logged, whatever the collector does. Metrics go through the SDK's
periodic readers, cumulatively, so a metric export that fails is caught up by the next that succeeds;
the proxy's ``/otellama/metrics`` and ``/otellama/stats`` are answered from here
(:mod:`~otellama.exporter.relay`).

The process exits when its parent (the proxy) is gone, and on SIGTERM exports to the end of the log and
exits (the proxy kills it if that takes longer than the shutdown grace; what was not exported then is
exported after the next start, from the saved position).

Each second it writes one JSON line of counters to stdout for the proxy's own metrics (restarts, drops).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import orjson
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider, TraceBasedExemplarFilter
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otellama.exchange import HostState, LoadedModel
from otellama.exporter.follow import LogFollower, Position
from otellama.exporter.live import LiveView
from otellama.exporter.relay import RelayServer
from otellama.observe.record import Record
from otellama.settings import Settings
from otellama.sinks.complaints import Complaints
from otellama.sinks.otel.aggregates import Aggregates
from otellama.sinks.otel.export import (
    CountingMetricExporter,
    disabled,
    metric_exporters,
    quiet_sdk_exporters,
    resource,
    span_exporters,
)
from otellama.sinks.otel.hosts import HostGauges
from otellama.sinks.otel.metrics import Instruments
from otellama.sinks.otel.spans import SCOPE, render_spans
from otellama.sinks.stats import RollingStats

log = logging.getLogger(__name__)

#: Lines read, rendered and exported together (a batch of ~4 spans a line).
BATCH_LINES: Final = 256
#: Seconds between looks at a log that has nothing new.
POLL: Final = 0.05
#: The longest pause between two attempts to export a failed batch.
RETRY_MAX: Final = 5.0
_REPORT_LIMIT: Final = 1 << 20
#: How much lower than the proxy's the exporter process's CPU priority is (``nice``).
EXPORTER_NICENESS: Final = 10
#: Seconds between two status lines to the proxy.
STATUS_EVERY: Final = 1.0
#: Seconds between two reads of the log for the metrics and the stats (an answer to the proxy reads first).
LIVE_EVERY: Final = 0.25
#: The environment the supervisor passes: the relay's socket, and where the live view starts ("inode:offset").
SOCKET_VARIABLE: Final = "OTELLAMA_EXPORTER_SOCKET"
FROM_VARIABLE: Final = "OTELLAMA_EXPORTER_FROM"


class Exporter:
    """The exporting loop (see the module docstring), for one log and the ``OTEL_*`` environment."""

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str],
        *,
        span_export: Sequence[SpanExporter] | None = None,
        metric_readers: Sequence[MetricReader] | None = None,
        status: TextIO | None = None,
        prometheus: bool = False,
        live_from: Position | None = None,
    ) -> None:
        if settings.log_file is None:
            raise ValueError("the exporter follows the JSONL log; OTELLAMA_LOG_FILE is off")
        self.resource = resource(environ)
        self.span_exporters = list(span_exporters(environ) if span_export is None else span_export)
        self.counts: dict[str, int] = {"lines": 0, "spans": 0, "failed_traces": 0, "failed_metrics": 0}
        readers = list(metric_readers) if metric_readers is not None else []
        if metric_readers is None:
            for exporter in metric_exporters(environ):
                readers.append(PeriodicExportingMetricReader(CountingMetricExporter(exporter, self._failed)))
        # Exemplars only travel over OTLP (the Prometheus reader drops them): don't pay for them otherwise.
        exemplars = bool(readers)
        #: What the proxy's ``/otellama/metrics`` shows (when ``prometheus``: the proxy relays to us).
        self.registry: Any = None
        if prometheus:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry

            self.registry = CollectorRegistry()
            readers.append(PrometheusMetricReader(registry=self.registry))
        self._sdk_lines = quiet_sdk_exporters()
        self._complain = Complaints(log)
        self.meter_provider = MeterProvider(
            metric_readers=readers,
            resource=self.resource,
            exemplar_filter=TraceBasedExemplarFilter() if exemplars else AlwaysOffExemplarFilter(),
        )
        self.aggregates = Aggregates(self.resource, SCOPE, exemplars=exemplars)
        if not disabled(environ):  # a disabled SDK's meters record nothing; ours follow suit (README)
            for reader in readers:
                self.aggregates.attach(reader)
        self.instruments = Instruments(
            self.meter_provider.get_meter(SCOPE.name, SCOPE.version), self.aggregates
        )
        #: What each Ollama host holds, as the proxy last reported it (the per-host gauges read it).
        self.hosts: list[HostState] = []
        HostGauges(self.meter_provider.get_meter(SCOPE.name, SCOPE.version), lambda: self.hosts)
        self._reported: dict[tuple[tuple[str, str], ...], int] = {}
        self._report_lock = threading.Lock()
        self.follower = LogFollower(settings.log_file, settings.log_backups)
        #: Metrics and the stats window, read from the log apart from the span export (module docstring).
        self.live = LiveView(
            LogFollower(settings.log_file, settings.log_backups, start=live_from),
            self.instruments if readers else None,
            RollingStats(),
        )
        self.draining = threading.Event()
        self._status = status
        #: Set when the proxy's end of our stdin closed: it is gone, and we go too.
        self.parent_gone = threading.Event()

    def listen(self, fd: int) -> None:
        """Read the proxy's in-flight reports from ``fd`` (its stdin), in a thread of its own.

        Unbuffered reads: a daemon thread blocked in a buffered reader would hold its lock at exit."""

        def run() -> None:
            pending = b""
            while chunk := _read(fd):
                *lines, pending = (pending + chunk).split(b"\n")
                pending = pending[-_REPORT_LIMIT:]
                for line in lines[-1:]:  # only the latest report counts
                    with contextlib.suppress(ValueError):
                        self.apply_report(orjson.loads(line))
            # End of the pipe: the proxy is gone (killed, or it closed it to stop us). Only the proxy holds
            # its other end, so this is the one sure sign: getppid() is no use in a PID namespace, where
            # the parent can read as 1 from the start.
            self.parent_gone.set()
            self.draining.set()

        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):  # asyncio: a pipe; uvloop: a socket pair
            threading.Thread(target=run, name="in-flight", daemon=True).start()

    def apply_report(self, report: Any) -> None:
        """Take the proxy's in-flight gauge and host states (``report``); raises ValueError on a bad one."""
        try:
            now = {tuple((str(k), str(v)) for k, v in key): int(n) for key, n in report["in_flight"]}
            hosts = [_host_state(state) for state in report["hosts"]] if "hosts" in report else None
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a report: {exc!r}") from exc
        with self._report_lock:
            if hosts is not None:
                self.hosts = hosts
            reported = self._reported
            for key in reported.keys() | now.keys():
                # Adding 0 makes the series exist: an idle proxy reports 0 in flight, not nothing.
                self.instruments.in_flight.add(now.get(key, 0) - reported.get(key, 0), key)
            self._reported = now

    def answer(self, request: Mapping[str, Any]) -> bytes:
        """The relay's answer (:mod:`~otellama.exporter.relay`): the Prometheus text, or the stats window."""
        if "metrics" in request:
            self.apply_report(request["metrics"])
            self.live.catch_up()
            if self.registry is None:
                raise ValueError("no Prometheus reader here")
            from prometheus_client import generate_latest

            return bytes(generate_latest(self.registry))
        if "stats" in request:
            self.live.catch_up()
            return orjson.dumps(self.live.stats.summary(float(request["stats"])))
        raise ValueError(f"unknown request {sorted(request)}")

    def _failed(self, signal_name: str) -> None:
        self.counts[f"failed_{signal_name}"] += 1
        self._complain(
            "OTLP export of %s failed%s; is the collector at the configured endpoint up?",
            signal_name,
            self._sdk_lines.latest(),
        )

    def step(self) -> int:
        """Export one batch; returns the lines it held (0: nothing new). Retries until exported; raises
        :class:`_Stop` (position unsaved) when the export fails while shutting down or orphaned."""
        lines, position = self.follower.read(BATCH_LINES)
        if not lines:
            return 0
        spans: list[ReadableSpan] = []
        for raw in lines if self.span_exporters else ():
            record = Record.from_line(raw)
            if record is None:
                self.follower.skipped_lines += 1
                continue
            if not record.ids.sampled:
                continue
            try:
                rendered = render_spans(record, self.resource)
            except Exception as exc:  # one line we cannot render must not stop every line after it
                self.follower.skipped_lines += 1
                self._complain("a logged record could not be rendered and was skipped: %r", exc)
                continue
            spans.extend(rendered)
        if spans:
            self._export(spans)
        self.follower.commit(position)
        self.counts["lines"] += len(lines)
        self.counts["spans"] += len(spans)
        return len(lines)

    def _export(self, spans: list[ReadableSpan]) -> None:
        pause = 0.1
        pending = list(self.span_exporters)
        while True:
            failed = []
            for exporter in pending:
                try:
                    result = exporter.export(spans)
                except Exception as exc:  # an exporter that raises has failed like one that says so
                    log.debug("span export raised", exc_info=exc)
                    result = SpanExportResult.FAILURE
                if result is not SpanExportResult.SUCCESS:
                    failed.append(exporter)
            if not failed:
                self._complain.recovered()
                return
            pending = failed
            self.counts["failed_traces"] += 1
            self._complain(
                "OTLP export of traces failed%s; the spans wait in the log and export is retried. Is the "
                "collector at the configured endpoint up?",
                self._sdk_lines.latest(),
            )
            self.report()
            if self._orphaned() or self.draining.is_set():
                # Shutting down with the collector failing: the batch stays in the log (position unsaved)
                # and goes out after the next start, rather than holding the shutdown for the whole grace.
                raise _Stop
            time.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    def _orphaned(self) -> bool:
        return self.parent_gone.is_set()

    def report(self) -> None:
        """One status line for the proxy."""
        if self._status is None:
            return
        counts = {
            **self.counts,
            "dropped_bytes": self.follower.dropped_bytes,
            "dropped_files": self.follower.dropped_files,
            # Counted by the reader that parses every line: the span export, or else the live view.
            "skipped_lines": (self.follower if self.span_exporters else self.live.follower).skipped_lines,
            "behind_bytes": self.follower.behind(),
        }
        try:
            self._status.write(orjson.dumps(counts).decode() + "\n")
            self._status.flush()
        except (OSError, ValueError):  # the proxy stopped listening: it is going away
            pass

    def run(self) -> int:
        """Export until drained (SIGTERM) or orphaned; returns the exit code."""
        live = threading.Thread(
            target=self.live.run, args=(self.draining, LIVE_EVERY), name="live", daemon=True
        )
        live.start()
        try:
            self._loop(0.0)
        except _Stop:
            pass
        finally:
            self.report()
            self.follower.close()
            live.join()
            with contextlib.suppress(OSError):
                self.live.catch_up()  # the last lines' metrics go out with the last metric export
            self.live.follower.close()
            self.meter_provider.shutdown()  # a last metric export
            for exporter in self.span_exporters:
                exporter.shutdown()
        return 0

    def _loop(self, last_report: float) -> None:
        while True:
            done = self.step()
            now = time.monotonic()
            if now - last_report >= STATUS_EVERY:
                self.report()
                last_report = now
            if done:
                continue
            if self.draining.is_set() or self._orphaned():
                return
            self.draining.wait(POLL)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


class _Stop(Exception):
    """Stop exporting now: the proxy is gone, or shutting down while the collector fails."""


def main(environ: Mapping[str, str] | None = None) -> int:
    """Entry point of ``python -m otellama exporter`` (started by ``otellama serve``)."""
    env = dict(os.environ if environ is None else environ)
    # Below the proxy in the CPU scheduler's eyes: when the cores are contended, requests come first and the
    # exporter catches up when they are not (the log holds what it has not sent yet).
    with contextlib.suppress(OSError):
        os.nice(EXPORTER_NICENESS)
    # The proxy starts us in a session of our own, and where the kernel groups sessions for the scheduler
    # (autogroups, on by default on many Linux systems) a nice value only counts inside the group: the group
    # itself would get as much CPU as the proxy's and take it from the proxy's event loop (BENCHMARKS.md, the
    # soak). So the group is niced too; without autogroups the file is absent and os.nice() above is enough.
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(EXPORTER_NICENESS))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(env)
    socket_path = env.get(SOCKET_VARIABLE)
    exporter = Exporter(
        settings,
        env,
        status=sys.stdout,
        prometheus=bool(socket_path),
        live_from=_position(env.get(FROM_VARIABLE)),
    )
    relay = None
    if socket_path:
        relay = RelayServer(socket_path, exporter.answer)
        relay.start()  # before the first status line, which tells the proxy it may ask

    def drain(signum: int, frame: Any) -> None:
        exporter.draining.set()

    signal.signal(signal.SIGTERM, drain)
    exporter.report()  # the first status line says "ready": from now on a SIGTERM drains instead of killing
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack on stderr, for a hang
    exporter.listen(sys.stdin.fileno())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the proxy decides when we stop
    try:
        return exporter.run()
    finally:
        if relay is not None:
            relay.close()


def _position(text: str | None) -> Position | None:
    """``inode:offset`` (the supervisor's :data:`FROM_VARIABLE`) as a position; None if absent or bad."""
    with contextlib.suppress(AttributeError, ValueError):
        inode, offset = str(text).split(":")
        return Position(int(inode), int(offset))
    return None


def _host_state(value: Mapping[str, Any]) -> HostState:
    """A :class:`~otellama.exchange.HostState` from the proxy's report (``dataclasses.asdict`` of one)."""
    loaded = tuple(LoadedModel(**model) for model in value["loaded"])
    return HostState(**{**value, "loaded": loaded, "installed": tuple(value["installed"])})
