"""``otellama replay``: re-export logged exchanges as traces, so that a collector outage loses nothing.

Each JSONL line is read back into its :class:`~otellama.observe.record.Record` and rendered by the very
function that rendered it live, :func:`otellama.sinks.otel.spans.render_spans`: the server span, the GenAI
span and the phase spans come out with their original trace ids, span ids, parents, timestamps, attributes and
status, under the same resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``). The span of the
upstream HTTP call (made by the httpx instrumentation) travels in the record (``trace.upstream_span``), so it
is replayed too; lines logged before it did have none.

Export goes where live export goes, configured by the standard variables (``OTEL_EXPORTER_OTLP_ENDPOINT``
or ``..._TRACES_ENDPOINT``, ``..._PROTOCOL``, ``..._HEADERS``, ``..._TIMEOUT``, ...). Spans are exported in
batches of :data:`BATCH_SPANS`, synchronously: unlike the SDK's batch processor, which drops spans when its
queue is full and ignores export results, replay waits for every batch and counts the exchanges of a
failed one as failed. After :data:`GIVE_UP_AFTER` failed batches in a row (an endpoint that refuses, or is
not there) it stops trying and counts the rest as failed too. Unsampled exchanges had no spans live and
get none now; they are counted as skipped, like corrupt lines and lines outside ``--since``/``--until``.

Replaying the same log twice sends the same spans twice; backends keyed on span ids keep one copy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, TextIO

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otellama.observe.record import Record
from otellama.settings import Settings
from otellama.sinks.otel.export import disabled, otlp_protocol, resource, span_exporter
from otellama.sinks.otel.spans import render_spans
from otellama.tools import logscan, terminal

BATCH_SPANS: Final = 512
GIVE_UP_AFTER: Final = 3


class ReplayError(logscan.ReportError):
    """Replay cannot start (no endpoint configured, no log); the message says what to do."""


@dataclasses.dataclass
class Outcome:
    """What a replay did, counted in exchanges (log lines); ``spans`` counts spans exported."""

    exported: int = 0
    spans: int = 0
    failed: int = 0
    unsampled: int = 0
    corrupt: int = 0
    outside: int = 0
    gave_up: bool = False

    @property
    def skipped(self) -> int:
        return self.unsampled + self.corrupt + self.outside


def endpoint_of(exporter: SpanExporter, environ: Mapping[str, str]) -> str:
    """Where ``exporter`` sends, for messages."""
    found = getattr(exporter, "_endpoint", None)
    if isinstance(found, str):
        return found
    return environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "?"
    )


def replay(
    files: Sequence[Path],
    exporter: SpanExporter,
    window: logscan.Window | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    progress: terminal.Progress | None = None,
) -> Outcome:
    """Render every sampled exchange of ``files`` inside ``window`` and export it through ``exporter``."""
    env = os.environ if environ is None else environ
    window = window or logscan.Window()
    since = window.since if window.since is not None else float("-inf")
    until = window.until if window.until is not None else float("inf")
    spans_resource = resource(env)
    collected: list[ReadableSpan] = []
    outcome = Outcome()
    pending = 0  # exchanges whose spans wait in ``collected``
    failures_in_a_row = 0
    read = 0

    def flush() -> None:
        nonlocal pending, failures_in_a_row
        spans = collected[:]
        collected.clear()
        if not spans:
            return
        if outcome.gave_up:
            result = SpanExportResult.FAILURE
        else:
            try:
                result = exporter.export(spans)
            except Exception:  # an exporter that raises has failed like one that says so
                result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            outcome.exported += pending
            outcome.spans += len(spans)
            failures_in_a_row = 0
        else:
            outcome.failed += pending
            failures_in_a_row += 1
            outcome.gave_up = outcome.gave_up or failures_in_a_row >= GIVE_UP_AFTER or outcome.exported == 0
        pending = 0

    def heard(size: int) -> None:
        nonlocal read
        read += size
        if progress is not None:
            progress.update(read, f"{outcome.exported + pending:,} exchanges")

    try:
        for raw in logscan.lines_of(files, heard):
            line = logscan.parse(raw)
            start = logscan.start_of(line) if line is not None else None
            if line is None or start is None:
                outcome.corrupt += 1
                continue
            if not since <= start < until or not window.names(line):
                outcome.outside += 1
                continue
            try:
                record = Record.from_json(line)
            except (KeyError, TypeError, ValueError, AttributeError):
                outcome.corrupt += 1
                continue
            if not record.ids.sampled:
                outcome.unsampled += 1
                continue
            collected.extend(render_spans(record, spans_resource))
            pending += 1
            if len(collected) >= BATCH_SPANS:
                flush()
        flush()
    finally:
        if progress is not None:
            progress.close()
    return outcome


def run(
    files: Sequence[str],
    *,
    since: str | None = None,
    until: str | None = None,
    models: Sequence[str] = (),
    clients: Sequence[str] = (),
    endpoint: str | None = None,
    protocol: str | None = None,
    out: TextIO,
    err: TextIO,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``otellama replay``; returns the exit code: 0 all exported, 1 some failed, 2 could not start.

    ``endpoint`` and ``protocol`` (``--endpoint``, ``--protocol``) stand for ``OTEL_EXPORTER_OTLP_ENDPOINT``
    and ``OTEL_EXPORTER_OTLP_PROTOCOL`` for this run.
    """
    env = dict(os.environ if environ is None else environ)
    if endpoint:
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint
    if protocol:
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = protocol
    chosen = otlp_protocol(env, "traces")
    if chosen is None:
        if disabled(env):
            raise ReplayError("OTEL_SDK_DISABLED=true turns OTLP export off; unset it to replay")
        raise ReplayError(
            "no OTLP endpoint to replay to: pass --endpoint or set OTEL_EXPORTER_OTLP_ENDPOINT "
            "(e.g. http://127.0.0.1:4318, or http://127.0.0.1:4317 with OTEL_EXPORTER_OTLP_PROTOCOL=grpc)"
        )
    if chosen not in ("grpc", "http/protobuf"):
        raise ReplayError(f"OTLP protocol {chosen!r} is not supported: use grpc or http/protobuf")
    now = time.time()
    window = logscan.Window(
        since=logscan.read_time(since, now) if since else None,
        until=logscan.read_time(until, now) if until else None,
        models=tuple(models),
        clients=tuple(clients),
    )
    paths = [Path(f) for f in files]
    paths = logscan.time_order(paths) if paths else logscan.log_files(Settings.from_env(env))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ReplayError(f"no such log file: {', '.join(missing)}")
    exporter = span_exporter(chosen, endpoint)
    where = endpoint_of(exporter, env)
    style = terminal.Style.for_stream(err)
    progress = terminal.Progress(err, sum(p.stat().st_size for p in paths), "replaying")
    quiet = _Quiet("opentelemetry.exporter")  # replay says what failed itself, once
    try:
        outcome = replay(paths, exporter, window, environ=env, progress=progress)
    finally:
        quiet.restore()
        exporter.shutdown()
    out.write(
        f"replayed {outcome.exported:,} exchanges ({outcome.spans:,} spans) to {where} over {chosen}; "
        f"skipped {outcome.skipped:,} ({outcome.unsampled:,} unsampled, {outcome.corrupt:,} corrupt, "
        f"{outcome.outside:,} outside the window or filters); failed {outcome.failed:,}\n"
    )
    if outcome.failed:
        reason = (
            "refused the spans or did not answer; nothing was exported"
            if outcome.exported == 0
            else f"failed {GIVE_UP_AFTER} batches in a row, so replay stopped"
            if outcome.gave_up
            else "failed some batches"
        )
        err.write(
            style(f"otellama replay: the OTLP endpoint {where} {reason}.", "red")
            + "\n  Is the collector up and listening there? The endpoint is set by --endpoint, "
            "OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, the protocol by --protocol "
            f"or OTEL_EXPORTER_OTLP_PROTOCOL (now {chosen}). Replaying the same files again is safe.\n"
        )
        return 1
    return 0


class _Quiet:
    """Silences a logger tree for a while: the exporters log every retry, replay reports failures once."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def restore(self) -> None:
        self.logger.setLevel(self.level)
