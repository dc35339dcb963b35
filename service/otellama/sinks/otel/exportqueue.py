"""The span export queue: the SDK's ``BatchSpanProcessor``, with what it throws away counted.

``BatchSpanProcessor`` keeps at most ``OTEL_BSP_MAX_QUEUE_SIZE`` spans (2048) waiting for the exporter; when
the collector is down, black-holed or slow, the queue fills and each new span pushes out the oldest. That
bound is what keeps a dead collector from growing otellama's memory, and it is right; but the SDK only logs
the loss (and reports it as a metric only behind ``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``). This
processor counts every dropped span on ``otellama.export.dropped`` (Prometheus
``otellama_export_dropped_total``), by ``error.type``: ``queue_full``, or ``already_shutdown`` for spans
ended after shutdown began. The JSONL log is unaffected: it is written before spans are queued, so
``otellama replay`` can re-send whatever was dropped.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from opentelemetry.metrics import MeterProvider, get_meter_provider
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from otellama import __version__
from otellama.sinks.otel import semconv

#: Counter of spans the export queue dropped.
EXPORT_DROPPED: Final = "otellama.export.dropped"
QUEUE_FULL: Final = "queue_full"
ALREADY_SHUTDOWN: Final = "already_shutdown"


class CountedBatchSpanProcessor(BatchSpanProcessor):
    """A ``BatchSpanProcessor`` (same arguments, same ``OTEL_BSP_*`` defaults) that counts its drops."""

    def __init__(
        self, span_exporter: SpanExporter, meter_provider: MeterProvider | None = None, **options: Any
    ) -> None:
        super().__init__(span_exporter, **options)
        processor = self._batch_processor
        # The SDK's own bounded deque (maxlen = max_queue_size): read its length, never touch its contents.
        self._queue: deque[ReadableSpan] = processor._queue
        meter = (meter_provider or get_meter_provider()).get_meter("otellama", __version__)
        self._counter = meter.create_counter(
            EXPORT_DROPPED,
            unit="{span}",
            description="Spans dropped by the export queue (collector too slow or down)",
        )
        self._full = {semconv.SIGNAL: "traces", semconv.ERROR_TYPE: QUEUE_FULL}
        self._late = {semconv.SIGNAL: "traces", semconv.ERROR_TYPE: ALREADY_SHUTDOWN}
        #: Spans dropped so far (also on the metric).
        self.dropped = 0

    @property
    def queued(self) -> int:
        """Spans waiting for the exporter now; never more than the queue's maximum."""
        return len(self._queue)

    @property
    def capacity(self) -> int:
        return self._queue.maxlen or 0

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is not None and context.trace_flags.sampled:
            if self._batch_processor._shutdown:
                self._drop(self._late)
            elif len(self._queue) >= self.capacity:
                self._drop(self._full)  # appending pushes the oldest span out
        super().on_end(span)

    def _drop(self, attributes: dict[str, str]) -> None:
        self.dropped += 1
        self._counter.add(1, attributes)
