"""The exporter's live view: each logged exchange's metrics and its place in the stats window, as soon as
the proxy has logged it.

The proxy records nothing per exchange but its JSONL line (issue 12's budget: its own telemetry work must
stay a few tens of microseconds). This view, in the exporter process, reads each line a second time,
records the exchange's metrics (the Prometheus reader behind ``/otellama/metrics`` and any OTLP metric
reader) and adds it to the window behind ``/otellama/stats``. It reads apart from the span export, which
saves its place only once the collector has the spans: a collector that is down holds up spans, never
metrics or stats.

It starts where the log ended when the proxy started (the supervisor says where), so its counters cover the
proxy's life as they did when the proxy kept them, and an exporter that is restarted reads the same lines
again and arrives at the same counts. Each read runs to the end of the log under a lock, so an answer to
the proxy (:meth:`LiveView.catch_up` first, then render) includes every line logged before it was asked.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from otellama.exporter.follow import LogFollower
from otellama.observe.record import Record
from otellama.sinks.capper import Capper
from otellama.sinks.complaints import Complaints
from otellama.sinks.otel.metrics import Instruments, record_metrics
from otellama.sinks.stats import RollingStats

log = logging.getLogger(__name__)

#: Lines read at a time (the lock is let go between batches, so an answer waits for one batch at most).
BATCH: Final = 512


class LiveView:
    """Metrics and stats of every line ``follower`` reads (see the module docstring). Thread-safe."""

    def __init__(self, follower: LogFollower, instruments: Instruments | None, stats: RollingStats) -> None:
        self.follower = follower
        #: None when no metric reader wants the exchanges (``OTEL_SDK_DISABLED``): stats only.
        self.instruments = instruments
        self.stats = stats
        self.lock = threading.Lock()
        self.cap = Capper()
        self._complain = Complaints(log)

    def catch_up(self) -> int:
        """Read the log to its end now; returns the lines read."""
        done = 0
        with self.lock:
            while lines := self.follower.read(BATCH)[0]:
                for raw in lines:
                    self._add(raw)
                done += len(lines)
        return done

    def _add(self, raw: bytes) -> None:
        record = Record.from_line(raw)
        if record is None:
            self.follower.skipped_lines += 1  # reported when no span export reads the lines (process.py)
            return
        ids = record.ids
        exemplar = (ids.trace_id, ids.genai_span_id or ids.server_span_id) if ids.sampled else None
        try:
            if self.instruments is not None:
                record_metrics(self.instruments, record, self.cap, exemplar)
            self.stats.write(record)
        except Exception as exc:  # one line we cannot count must not stop every line after it
            self.follower.skipped_lines += 1
            self._complain("a logged record could not be counted and was skipped: %r", exc)

    def run(self, stop: threading.Event, every: float) -> None:
        """Catch up every ``every`` seconds until ``stop`` is set (a thread of its own)."""
        while not stop.wait(every):
            try:
                self.catch_up()
            except OSError as exc:
                self._complain("reading the log for the metrics failed: %s", exc)
