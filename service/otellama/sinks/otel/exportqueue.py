"""The span export queue: the SDK's ``BatchSpanProcessor``, its own metrics on, on otellama's meter provider.

``BatchSpanProcessor`` keeps at most ``OTEL_BSP_MAX_QUEUE_SIZE`` spans (2048) waiting for the exporter; when
the collector is down, black-holed or slow, the queue fills and each new span pushes out the oldest. That
bound is what keeps a dead collector from growing otellama's memory, and it is right. The JSONL log is
unaffected: it is written before spans are queued, so ``otellama replay`` can re-send whatever was dropped.

What the SDK provides (opentelemetry-sdk 1.45, semantic conventions' SDK metrics), on the meter provider
passed as ``meter_provider=``, so on ``/otellama/metrics`` and over OTLP, under the ``opentelemetry-sdk``
scope, with ``otel.component.type`` = ``batching_span_processor`` and ``otel.component.name``:

- ``otel.sdk.processor.span.processed`` (Prometheus ``otel_sdk_processor_span_processed_total``): spans
  handed to the exporter (no ``error.type``) and spans dropped, by ``error.type``: ``queue_full``, or
  ``already_shutdown`` for spans ended after shutdown began;
- ``otel.sdk.processor.span.queue.size``: spans waiting now;
- ``otel.sdk.processor.span.queue.capacity``: the queue's bound.

That covers everything otellama used to count itself (``otellama.export.dropped``, by reading the SDK's
private queue), so nothing of ours is left but one thing the SDK does not offer: a way to turn these metrics
on for one processor. It reads ``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED`` in the constructor and records
nothing unless it is ``true``; there is no argument for it. Setting the variable for the whole process would
also turn on every other SDK self-metric (spans started and live, metric reader and exporter metrics, some
on the global meter provider), so the variable is set only while this queue is built. The queue's metrics
are otellama's documented loss signal, so they are on whatever the variable says elsewhere.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.environment_variables import OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

_environ_lock = threading.Lock()


class CountedBatchSpanProcessor(BatchSpanProcessor):
    """A ``BatchSpanProcessor`` (same arguments, same ``OTEL_BSP_*`` defaults) whose own metrics (queue size
    and capacity, spans processed and dropped) are recorded on ``meter_provider`` (the global one if None)."""

    def __init__(
        self, span_exporter: SpanExporter, meter_provider: MeterProvider | None = None, **options: Any
    ) -> None:
        with _sdk_self_metrics():
            super().__init__(span_exporter, meter_provider=meter_provider, **options)


@contextmanager
def _sdk_self_metrics() -> Iterator[None]:
    """``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED=true`` for the duration, then as it was."""
    with _environ_lock:
        before = os.environ.get(OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED)
        os.environ[OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED] = "true"
        try:
            yield
        finally:
            if before is None:
                del os.environ[OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED]
            else:
                os.environ[OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED] = before
