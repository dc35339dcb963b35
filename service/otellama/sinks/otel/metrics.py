"""A record's measurements: every instrument otellama records, and :func:`record_metrics`, which records one
exchange on them. Names, units and buckets come from :mod:`~otellama.sinks.otel.semconv`.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.metrics import Meter

from otellama.observe.record import Record
from otellama.sinks.capper import Capper, cut
from otellama.sinks.otel import semconv
from otellama.sinks.otel.aggregates import Aggregates, Histogram, SpanRef, key_of
from otellama.sinks.otel.spans import attributes_of


class Instruments:
    """Every instrument otellama records, created once from ``semconv``'s names, units and buckets.

    What is recorded for every exchange is aggregated by :class:`~otellama.sinks.otel.aggregates.Aggregates`
    (through the SDK it would cost more than the rest of telemetry together); the rare failure counters are
    ordinary SDK instruments, like the export queue's own (:mod:`~otellama.sinks.otel.exportqueue`).
    """

    def __init__(self, meter: Meter, aggregates: Aggregates) -> None:
        histogram = aggregates.histogram
        self.operation_duration = histogram(semconv.CLIENT_OPERATION_DURATION)
        self.token_usage = histogram(semconv.CLIENT_TOKEN_USAGE)
        self.time_to_first_chunk = histogram(semconv.CLIENT_TIME_TO_FIRST_CHUNK)
        self.server_duration = histogram(semconv.SERVER_REQUEST_DURATION)
        self.server_ttft = histogram(semconv.SERVER_TIME_TO_FIRST_TOKEN)
        self.time_per_output_token = histogram(semconv.SERVER_TIME_PER_OUTPUT_TOKEN)
        self.load = histogram(semconv.LOAD_DURATION)
        self.prompt_eval = histogram(semconv.PROMPT_EVAL_DURATION)
        self.eval = histogram(semconv.EVAL_DURATION)
        self.queue = histogram(semconv.QUEUE_DURATION)
        self.generation_throughput = histogram(semconv.GENERATION_THROUGHPUT)
        self.prompt_throughput = histogram(semconv.PROMPT_THROUGHPUT)
        self.cold_starts = aggregates.counter(semconv.COLD_STARTS)
        self.requests = aggregates.counter(semconv.REQUESTS)
        self.in_flight = aggregates.counter(semconv.IN_FLIGHT, monotonic=False)

        def counter(metric: semconv.Metric) -> Any:
            return meter.create_counter(metric.name, unit=metric.unit, description=metric.description)

        self.export_failures = counter(semconv.EXPORT_FAILURES)
        self.log_failures = counter(semconv.LOG_FAILURES)


def record_metrics(
    instruments: Instruments, record: Record, cap: Capper, span: SpanRef | None = None
) -> None:
    """Record one exchange. ``span`` (the sampled GenAI span's ids) becomes the histograms' exemplar.

    Every attribute value that a request or Ollama chose is bounded by :mod:`~otellama.sinks.capper`; the
    others are otellama's own words.
    """
    attributes = attributes_of(
        (semconv.OPERATION, record.operation),
        (semconv.PROVIDER, semconv.PROVIDER_OLLAMA if record.operation else None),
        (semconv.REQUEST_MODEL, cap(semconv.REQUEST_MODEL, record.model) if record.model else None),
        (semconv.OUTCOME, record.outcome),
        (semconv.ERROR_TYPE, cut(record.error_type) if record.error_type else None),
        (semconv.CLIENT_NAME, cap(semconv.CLIENT_NAME, record.client) if record.client else None),
        # Bounded already: a configured host's name (or none, with one upstream).
        (semconv.UPSTREAM, record.upstream),
    )
    key = key_of(attributes)
    instruments.requests.add(1, key)
    if record.operation is None:
        return  # model management, health checks, blobs: counted, nothing more to measure
    i, t = instruments, record.timings
    queue = t.queue_ns  # a property: read once
    observations: list[tuple[Histogram, float | int | None]] = [
        (i.operation_duration, record.duration_s),
        (i.time_to_first_chunk, record.time_to_first_chunk_s if record.stream else None),
        (i.server_duration, None if t.total_duration is None else t.total_duration / 1e9),
        (i.load, None if t.load_duration is None else t.load_duration / 1e9),
        (i.prompt_eval, None if t.prompt_eval_duration is None else t.prompt_eval_duration / 1e9),
        (i.eval, None if t.eval_duration is None else t.eval_duration / 1e9),
        (i.queue, None if queue is None else queue / 1e9),
        (i.server_ttft, record.server_time_to_first_token_s),
        (i.time_per_output_token, record.time_per_output_token_s),
        (i.generation_throughput, t.tokens_per_second),
        (i.prompt_throughput, t.prompt_tokens_per_second),
    ]
    for histogram, value in observations:
        if value is not None:
            histogram.record(value, key, span)
    for tokens, kind in (
        (record.input_tokens, semconv.TOKEN_TYPE_INPUT),
        (record.output_tokens, semconv.TOKEN_TYPE_OUTPUT),
    ):
        if tokens is not None:
            i.token_usage.record(tokens, key_of({**attributes, semconv.TOKEN_TYPE: kind}), span)
    if record.cold_start:
        i.cold_starts.add(1, key)
