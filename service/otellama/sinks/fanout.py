"""The fan-out: the proxy's :class:`~otellama.exchange.Recorder`, which turns each exchange into one
:class:`~otellama.observe.record.Record` and hands that same value to every sink.

When a request arrives, :meth:`Telemetry.begin` only has the OpenTelemetry sink pick the exchange's trace
ids (so the upstream call can carry ``traceparent`` to Ollama) and count it in flight; it returns the
exchange's :class:`~otellama.exchange.Recording`. After the last byte, the recording builds the record and
:meth:`Telemetry.render` writes it to each sink in turn: the JSONL line, the spans and metrics, the stats
window. No sink derives a number of its own; a sink that fails is logged, never raised into the proxy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from otellama.exchange import Exchange, Recording
from otellama.observe import ollama
from otellama.observe.record import Record, build
from otellama.observe.stream import StreamObserver
from otellama.settings import Settings
from otellama.sinks.complaints import Complaints
from otellama.sinks.otel.sink import OtelSink, Started

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Somewhere a record goes. :meth:`write` is called once per exchange, after its last byte."""

    def write(self, record: Record) -> None:
        """Render ``record``; a failure is the sink's to count (the fan-out logs what escapes)."""

    def close(self) -> None:
        """Flush and release what the sink holds; called once, at shutdown."""


class Telemetry:
    """The proxy's recorder: one record per exchange, rendered to ``sinks`` in order.

    ``otel`` picks each exchange's trace context when it begins; it is usually one of ``sinks`` too.
    """

    def __init__(
        self,
        settings: Settings,
        otel: OtelSink,
        sinks: Sequence[Sink],
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.otel = otel
        self.sinks = tuple(sinks)
        self._complain = Complaints(log)
        self._client_header = settings.client_header.lower().encode("latin-1")
        self.capture = capture_content(os.environ if environ is None else environ)

    def begin(self, exchange: Exchange) -> Recording:
        """The request arrived: pick its trace context (see the module docstring)."""
        started = self.otel.start(exchange, ollama.endpoint_for(exchange.method, exchange.path))
        return _Recording(self, started)

    def render(self, record: Record) -> None:
        """Write the record to every sink; a failing sink is logged (once a minute), never raised."""
        for sink in self.sinks:
            try:
                sink.write(record)
            except Exception as exc:
                self._complain("the %s sink failed: %r", type(sink).__name__, exc)

    def close(self) -> None:
        """Close every sink (flushing exporters blocks on the network: call it off the event loop)."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing the %s sink failed", type(sink).__name__)

    def _finish(self, exchange: Exchange, started: Started, observer: StreamObserver | None) -> None:
        ids = self.otel.stop(started)
        observation = observer.finish(exchange.t_end) if observer is not None else None
        upstream = self.settings.upstream
        record = build(
            exchange,
            observation,
            ids,
            server_address=upstream.host,
            server_port=upstream.port,
            client_header=self._client_header,
            cold_start_seconds=self.settings.cold_start_seconds,
            capture_content=self.capture,
            upstream_span=self.otel.upstream_span(ids),
        )
        self.render(record)


class _Recording:
    """One exchange's handle (:class:`~otellama.exchange.Recording`): its trace context and observer."""

    __slots__ = ("_observer", "_started", "_telemetry")

    def __init__(self, telemetry: Telemetry, started: Started) -> None:
        self._telemetry = telemetry
        self._started = started
        self._observer: StreamObserver | None = None

    def observe(self, exchange: Exchange) -> Callable[[bytes, float], None] | None:
        framing = ollama.framing_for((exchange.response_header(b"content-type") or b"").decode("latin-1"))
        self._observer = StreamObserver(framing, exchange.t_start, capture_content=self._telemetry.capture)
        return self._observer.feed

    def finish(self, exchange: Exchange) -> None:
        self._telemetry._finish(exchange, self._started, self._observer)


def capture_content(environ: Mapping[str, str]) -> bool:
    """Whether prompts and responses may be recorded (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``).

    ``SPAN_ONLY``, ``EVENT_ONLY``, ``SPAN_AND_EVENT`` and the legacy ``true`` turn it on; anything else,
    including unset and ``NO_CONTENT``, leaves it off. otellama records content on spans and in the JSONL
    line (which replay turns back into spans), so the three modes mean the same here.
    """
    value = environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip().upper()
    return value in ("SPAN_ONLY", "EVENT_ONLY", "SPAN_AND_EVENT", "TRUE")
