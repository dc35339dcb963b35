"""Spans, metrics and the JSONL line: three renderings of one :class:`~otellama.record.Record`.

:class:`Telemetry` is the proxy's recorder. When a request arrives it only picks the exchange's trace ids
(so the upstream call can carry ``traceparent`` to Ollama) and counts it in flight; after the last byte it
builds the record and renders it. Spans are built finished, with the ids chosen up front and back-dated
timestamps, by :func:`render_spans` (which ``otellama replay`` reuses to re-export a logged exchange
unchanged) and handed to the tracer provider's span processors and exporters. The metrics recorded for every
exchange are aggregated by ``aggregates.py``, the rare failure counters by the SDK.

This module, ``aggregates.py`` and ``semconv.py`` are the only ones that speak OpenTelemetry.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.propagate import extract, get_global_textmap
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, TraceBasedExemplarFilter
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from otellama import __version__, ollama, semconv
from otellama.aggregates import Aggregates, Histogram, Key, SpanRef, key_of
from otellama.exportqueue import CountedBatchSpanProcessor
from otellama.jsonlog import JsonLog, encode
from otellama.proxy import OK, Exchange
from otellama.record import Record, TraceIds, build
from otellama.settings import Settings
from otellama.stats import RollingStats
from otellama.stream import StreamObserver

log = logging.getLogger("otellama.telemetry")

#: Distinct values kept per metric attribute; the rest are counted as ``other``.
CARDINALITY_LIMIT: Final = 100
OVERFLOW: Final = "other"
_PHASE_SPANS: Final = {
    "queue": semconv.SPAN_QUEUE,
    "load": semconv.SPAN_LOAD,
    "prompt_eval": semconv.SPAN_PROMPT_EVAL,
    "eval": semconv.SPAN_EVAL,
}
_TRUE: Final = ("true", "1", "yes", "on")


# --- spans ----------------------------------------------------------------------------------------------
#: The instrumentation scope of everything otellama records.
SCOPE: Final = InstrumentationScope("otellama", __version__)
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_UNSET: Final = Status(StatusCode.UNSET)


def _span_context(trace_id: int, span_id: int, sampled: bool, remote: bool) -> otel_context.Context:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    span = NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=remote, trace_flags=flags))
    return trace.set_span_in_context(span)


def render_spans(record: Record, resource: Resource) -> list[ReadableSpan]:
    """The exchange's finished spans, with the ids chosen when the request arrived; none if unsampled.

    SERVER span for the request; under it the GenAI CLIENT span ``{operation} {model}``; under that one span
    per Ollama phase. They are built complete, as the SDK's span processors receive them at ``on_end``,
    rather than started and ended through a tracer: the exchange is over, its ids were drawn (and sent to
    Ollama in ``traceparent``) before it began, and its sampling decision was made then too, so a tracer's
    sampler, id generator and attribute copying would only cost time (~25 µs a span). Used live and by
    replay: the spans depend on the record alone.
    """
    ids = record.ids
    if not ids.sampled:
        return []
    parent = None
    if ids.parent_span_id is not None:
        parent = SpanContext(ids.trace_id, ids.parent_span_id, is_remote=True, trace_flags=_SAMPLED)
    failed = record.outcome != OK
    status = Status(StatusCode.ERROR, record.error) if failed else _UNSET

    def ours(span_id: int) -> SpanContext:
        return SpanContext(ids.trace_id, span_id, is_remote=False, trace_flags=_SAMPLED)

    server = ours(ids.server_span_id)

    def span(
        name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
        attributes: dict[str, Any] | None, start: int, end: int, status: Status = _UNSET,
    ) -> ReadableSpan:  # fmt: skip
        return ReadableSpan(
            name, context, parent, resource, attributes, kind=kind, status=status,
            start_time=start, end_time=end, instrumentation_scope=SCOPE,
        )  # fmt: skip

    server_attributes = _attributes(
        (semconv.HTTP_METHOD, record.method),
        (semconv.HTTP_ROUTE, record.endpoint),
        (semconv.HTTP_STATUS, record.status),
        (semconv.ERROR_TYPE, record.error_type),
        (semconv.OUTCOME, record.outcome),
        (semconv.CLIENT_NAME, record.client),
    )
    name = f"{record.method} {record.endpoint}"
    spans = [
        span(name, server, parent, SpanKind.SERVER, server_attributes, record.start_ns, record.end_ns, status)
    ]
    if ids.genai_span_id is not None and record.operation is not None:
        genai = ours(ids.genai_span_id)
        name = f"{record.operation} {record.model}" if record.model else record.operation
        attributes = genai_attributes(record)
        spans.append(
            span(name, genai, server, SpanKind.CLIENT, attributes, record.start_ns, record.end_ns, status)
        )
        for phase, start, end in record.phases():
            span_id = ids.phase_span_ids.get(phase)
            if span_id is not None:
                spans.append(
                    span(_PHASE_SPANS[phase], ours(span_id), genai, SpanKind.INTERNAL, None, start, end)
                )
    return spans


def _attributes(*pairs: tuple[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in pairs if value is not None}


def genai_attributes(record: Record) -> dict[str, Any]:
    """The GenAI span's attributes (docs/reference.md §2) plus Ollama's raw numbers as ``ollama.*``."""
    t, r = record.timings, record.request
    attributes = _attributes(
        (semconv.OPERATION, record.operation),
        (semconv.PROVIDER, semconv.PROVIDER_OLLAMA),
        (semconv.REQUEST_MODEL, record.model),
        (semconv.RESPONSE_MODEL, record.response_model),
        (semconv.REQUEST_STREAM, record.stream),
        (semconv.REQUEST_TEMPERATURE, r.temperature),
        (semconv.REQUEST_TOP_P, r.top_p),
        (semconv.REQUEST_TOP_K, r.top_k),
        (semconv.REQUEST_SEED, r.seed),
        (semconv.REQUEST_MAX_TOKENS, r.max_tokens),
        (semconv.REQUEST_STOP_SEQUENCES, tuple(r.stop) if r.stop else None),
        (semconv.FINISH_REASONS, tuple(record.finish_reasons) if record.finish_reasons else None),
        (semconv.INPUT_TOKENS, record.input_tokens),
        (semconv.OUTPUT_TOKENS, record.output_tokens),
        (semconv.TIME_TO_FIRST_CHUNK, record.time_to_first_chunk_s),
        (semconv.SERVER_ADDRESS, record.server_address),
        (semconv.SERVER_PORT, record.server_port),
        (semconv.ERROR_TYPE, record.error_type),
        (semconv.OLLAMA_LOAD_NS, t.load_duration),
        (semconv.OLLAMA_PROMPT_EVAL_NS, t.prompt_eval_duration),
        (semconv.OLLAMA_EVAL_NS, t.eval_duration),
        (semconv.OLLAMA_TOTAL_NS, t.total_duration),
        (semconv.OLLAMA_QUEUE_NS, t.queue_ns),
        (semconv.OLLAMA_PROMPT_EVAL_COUNT, t.prompt_eval_count),
        (semconv.OLLAMA_EVAL_COUNT, t.eval_count),
        (semconv.OLLAMA_TOKENS_PER_SECOND, t.tokens_per_second),
        (semconv.OLLAMA_PROMPT_TOKENS_PER_SECOND, t.prompt_tokens_per_second),
        (semconv.OLLAMA_COLD_START, record.cold_start),
        (semconv.OLLAMA_DONE_REASON, record.done_reason),
        (semconv.OLLAMA_CHUNKS, record.chunks),
        (semconv.OLLAMA_BODY_PARSED, r.parsed),
        (semconv.CLIENT_NAME, record.client),
    )
    if r.input_messages is not None:
        attributes[semconv.INPUT_MESSAGES] = encode_json(r.input_messages)
    if record.output_messages is not None:
        attributes[semconv.OUTPUT_MESSAGES] = encode_json(record.output_messages)
    return attributes


def encode_json(value: Sequence[Mapping[str, Any]]) -> str:
    return orjson.dumps(list(value)).decode()


# --- metrics --------------------------------------------------------------------------------------------
class Capper:
    """Keeps at most ``limit`` distinct values per attribute; later newcomers become ``other``.

    A client inventing model names must not be able to grow the metric store without bound.
    """

    def __init__(self, limit: int = CARDINALITY_LIMIT) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}

    def __call__(self, key: str, value: str) -> str:
        seen = self._seen.setdefault(key, set())
        if value in seen:
            return value
        if len(seen) >= self.limit:
            return OVERFLOW
        seen.add(value)
        return value


class Instruments:
    """Every instrument otellama records, created once from ``semconv``'s names, units and buckets.

    What is recorded for every exchange is aggregated by :class:`~otellama.aggregates.Aggregates` (through
    the SDK it would cost more than the rest of telemetry together); the rare failure counters are ordinary
    SDK instruments, like the export queue's own (exportqueue.py).
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
    """Record one exchange. ``span`` (the sampled GenAI span's ids) becomes the histograms' exemplar."""
    attributes = _attributes(
        (semconv.OPERATION, record.operation),
        (semconv.PROVIDER, semconv.PROVIDER_OLLAMA if record.operation else None),
        (semconv.REQUEST_MODEL, cap(semconv.REQUEST_MODEL, record.model) if record.model else None),
        (semconv.OUTCOME, record.outcome),
        (semconv.ERROR_TYPE, record.error_type),
        (semconv.CLIENT_NAME, cap(semconv.CLIENT_NAME, record.client) if record.client else None),
    )
    key = key_of(attributes)
    instruments.requests.add(1, key)
    if record.operation is None:
        return  # model management, health checks, blobs: counted, nothing more to measure
    i, t = instruments, record.timings
    observations: list[tuple[Histogram, float | int | None]] = [
        (i.operation_duration, record.duration_s),
        (i.time_to_first_chunk, record.time_to_first_chunk_s if record.stream else None),
        (i.server_duration, None if t.total_duration is None else t.total_duration / 1e9),
        (i.load, None if t.load_duration is None else t.load_duration / 1e9),
        (i.prompt_eval, None if t.prompt_eval_duration is None else t.prompt_eval_duration / 1e9),
        (i.eval, None if t.eval_duration is None else t.eval_duration / 1e9),
        (i.queue, None if t.queue_ns is None else t.queue_ns / 1e9),
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


# --- export ---------------------------------------------------------------------------------------------
class _Complaints:
    """Logs a failure at most once a minute, so a dead collector does not flood the log."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._last = -every
        self._lock = threading.Lock()

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.every:
                return
            self._last = now
        log.warning(message, *args)


class CountingSpanExporter(SpanExporter):
    """Wraps an exporter to count failed batches: the SDK's processors ignore export results."""

    def __init__(self, inner: SpanExporter, on_failure: Callable[[str], None]) -> None:
        self.inner, self.on_failure = inner, on_failure

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:
            result = SpanExportResult.FAILURE
            log.debug("span export raised", exc_info=exc)
        if result is not SpanExportResult.SUCCESS:
            self.on_failure("traces")
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingMetricExporter(MetricExporter):
    """The metric side of :class:`CountingSpanExporter`."""

    def __init__(self, inner: MetricExporter, on_failure: Callable[[str], None]) -> None:
        super().__init__(inner._preferred_temporality, inner._preferred_aggregation)
        self.inner, self.on_failure = inner, on_failure

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            result = MetricExportResult.FAILURE
            log.debug("metric export raised", exc_info=exc)
        if result is not MetricExportResult.SUCCESS:
            self.on_failure("metrics")
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _env(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def _disabled(environ: Mapping[str, str]) -> bool:
    return (_env(environ, "OTEL_SDK_DISABLED") or "").lower() in _TRUE


def otlp_protocol(environ: Mapping[str, str], signal: str) -> str | None:
    """The OTLP protocol for ``signal`` (traces, metrics), or None when no endpoint is configured.

    Export is on only when an endpoint is set, so a laptop without a collector gets no error spam. The
    SDK reads ``OTEL_EXPORTER_OTLP_PROTOCOL`` only in its auto-configuration; we build exporters ourselves,
    so it is honoured here. The default is the spec's, ``http/protobuf``.
    """
    upper = signal.upper()
    if _disabled(environ):
        return None
    if _env(environ, f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT") is None:
        return None
    return (
        _env(environ, f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )


def _span_exporter(protocol: str) -> SpanExporter:
    # The exporters read endpoint, headers, timeout, compression and certificates from the standard
    # variables themselves (and append /v1/traces to a base endpoint over HTTP, as users expect).
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans

        return GrpcSpans()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

    return HttpSpans()


def _metric_exporter(protocol: str) -> MetricExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics

        return GrpcMetrics()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics

    return HttpMetrics()


def resource(environ: Mapping[str, str]) -> Resource:
    """``service.name`` defaults to ``otellama``; ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` win."""
    # An empty variable is unset (spec); keys are matched whole ("app.service.name" is another key).
    keys = {item.split("=", 1)[0].strip() for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")}
    named = bool(environ.get("OTEL_SERVICE_NAME", "").strip()) or "service.name" in keys
    attributes: dict[str, str] = {"service.version": __version__}
    if not named:
        attributes["service.name"] = "otellama"
    return Resource.create(attributes)


class Telemetry:
    """The proxy's :class:`~otellama.proxy.Recorder`: records every exchange to every configured sink.

    By default everything comes from the standard ``OTEL_*`` environment; tests inject a tracer provider
    and extra metric readers. ``/otellama/metrics`` is always on through a Prometheus reader of its own.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tracer_provider: TracerProvider | None = None,
        metric_readers: Sequence[MetricReader] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        env = os.environ if environ is None else environ
        self.settings = settings
        self._complain = _Complaints()
        self._own_providers: list[Any] = []
        self.registry = CollectorRegistry()
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry), *metric_readers]
        metrics_protocol = otlp_protocol(env, "metrics")
        if metrics_protocol is not None:
            metric_exporter = CountingMetricExporter(_metric_exporter(metrics_protocol), self._export_failed)
            readers.append(PeriodicExportingMetricReader(metric_exporter))
        # Exemplars only travel over OTLP (the Prometheus reader drops them): don't pay for them otherwise.
        wanted = metrics_protocol is not None or bool(metric_readers)
        metrics_resource = resource(env)
        self.meter_provider = meter_provider = SdkMeterProvider(
            metric_readers=readers,
            resource=metrics_resource,
            exemplar_filter=TraceBasedExemplarFilter() if wanted else AlwaysOffExemplarFilter(),
        )
        self._own_providers.append(meter_provider)
        self.aggregates = Aggregates(metrics_resource, SCOPE, exemplars=wanted)
        if not _disabled(env):  # a disabled SDK's meters record nothing; ours follow suit (README)
            for reader in readers:
                self.aggregates.attach(reader)
        self.instruments = Instruments(meter_provider.get_meter(SCOPE.name, SCOPE.version), self.aggregates)

        traces_protocol = otlp_protocol(env, "traces")
        self.tracing = tracer_provider is not None or traces_protocol is not None
        if tracer_provider is None:
            tracer_provider = TracerProvider(resource=resource(env))
            self._own_providers.append(tracer_provider)
            if traces_protocol is not None:
                span_exporter = CountingSpanExporter(_span_exporter(traces_protocol), self._export_failed)
                # A bounded queue (a dead collector cannot grow memory) whose drops are counted.
                queue = CountedBatchSpanProcessor(span_exporter, meter_provider)
                tracer_provider.add_span_processor(queue)
        self.tracer_provider = tracer_provider
        self.sampler = tracer_provider.sampler
        # Finished spans go straight to the provider's processors (see render_spans). A provider disabled
        # by OTEL_SDK_DISABLED hands out a no-op tracer, which has none.
        tracer = tracer_provider.get_tracer("otellama", __version__)
        self._spans: SpanProcessor | None = getattr(tracer, "span_processor", None) if self.tracing else None
        self._resource = getattr(tracer, "resource", None) or resource(env)
        self.tracing = self._spans is not None

        self.log: JsonLog | None = None
        if settings.log_file is not None:
            self.log = JsonLog(
                settings.log_file, max_bytes=settings.log_max_bytes, backups=settings.log_backups
            )
        self.cap = Capper()
        self.stats = RollingStats()  # GET /otellama/stats: recent exchanges, in bounded memory
        self._client_header = settings.client_header.lower().encode("latin-1")
        self._capture = capture_content(env)
        self._random = random.Random()
        # The headers the configured propagators (OTEL_PROPAGATORS) read: traceparent, tracestate, baggage.
        self._trace_headers = frozenset(f.lower().encode("latin-1") for f in get_global_textmap().fields)

    # --- Recorder --------------------------------------------------------------------------------------
    def begin(self, exchange: Exchange) -> None:
        endpoint = ollama.endpoint_for(exchange.method, exchange.path)
        operation: Key = ((semconv.OPERATION, endpoint.operation),) if endpoint is not None else ()
        self.instruments.in_flight.add(1, operation)
        parent_context = None
        parent = trace.INVALID_SPAN_CONTEXT
        fields = self._trace_headers
        if any(name in fields for name, _ in exchange.request_headers):  # most clients send none
            parent_context = extract(_HeaderCarrier(exchange.request_headers, fields))
            parent = trace.get_current_span(parent_context).get_span_context()
        bits = self._random.getrandbits
        trace_id = parent.trace_id if parent.is_valid else bits(128)
        server_span_id = bits(64)
        genai_span_id = bits(64) if endpoint is not None else None
        sampled = True
        if self.tracing:
            decision = self.sampler.should_sample(
                parent_context if parent.is_valid else None, trace_id, exchange.path, SpanKind.SERVER
            )
            sampled = decision.decision in (Decision.RECORD_AND_SAMPLE,)
        ids = TraceIds(
            trace_id=trace_id,
            server_span_id=server_span_id,
            genai_span_id=genai_span_id,
            parent_span_id=parent.span_id if parent.is_valid else None,
            sampled=sampled,
        )
        token = None
        if self.tracing:
            # The traced upstream call becomes a child of the GenAI span-to-be; its traceparent goes out.
            token = otel_context.attach(
                _span_context(trace_id, genai_span_id or server_span_id, sampled, remote=False)
            )
        exchange.tap = _Tap(ids, token, operation)

    def observe(self, exchange: Exchange) -> Callable[[bytes, float], None] | None:
        tap: _Tap = exchange.tap
        framing = ollama.framing_for((exchange.response_header(b"content-type") or b"").decode("latin-1"))
        tap.observer = StreamObserver(framing, exchange.t_start, capture_content=self._capture)
        return tap.observer.feed

    def finish(self, exchange: Exchange) -> None:
        tap: _Tap = exchange.tap
        self.instruments.in_flight.add(-1, tap.operation)
        if tap.token is not None:
            otel_context.detach(tap.token)
        observation = tap.observer.finish(exchange.t_end) if tap.observer is not None else None
        ids = tap.ids
        if ids.genai_span_id is not None and ids.sampled:
            draw = self._random.getrandbits
            ids = TraceIds(
                ids.trace_id, ids.server_span_id, ids.genai_span_id, ids.parent_span_id, ids.sampled,
                {name: draw(64) for name in _PHASE_SPANS},
            )  # fmt: skip
        record = build(
            exchange,
            observation,
            ids,
            server_address=self.settings.upstream.host,
            server_port=self.settings.upstream.port,
            client_header=self._client_header,
            cold_start_seconds=self.settings.cold_start_seconds,
            capture_content=self._capture,
        )
        self.render(record)

    def render(self, record: Record) -> None:
        """Write the record to every sink; a failing sink is counted and logged, never raised."""
        if self.log is not None and not self.log.write(encode(record.to_json())):
            self.instruments.log_failures.add(1)
        exemplar = None
        if self._spans is not None and record.ids.sampled:
            try:
                for span in render_spans(record, self._resource):
                    self._spans.on_end(span)
            except Exception as exc:
                self._complain("rendering spans failed: %r", exc)
            ids = record.ids
            exemplar = (ids.trace_id, ids.genai_span_id or ids.server_span_id)
        record_metrics(self.instruments, record, self.cap, exemplar)
        self.stats.add(record)

    # --- the rest -------------------------------------------------------------------------------------
    def _export_failed(self, signal: str) -> None:
        self.instruments.export_failures.add(1, {semconv.SIGNAL: signal})
        self._complain("OTLP export of %s failed; is the collector at the configured endpoint up?", signal)

    def prometheus(self) -> bytes:
        """The metrics in Prometheus text format, for ``GET /otellama/metrics``."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def shutdown(self) -> None:
        """Flush and stop what this object built (injected providers belong to their owner)."""
        for provider in self._own_providers:
            provider.shutdown()
        if self.log is not None:
            self.log.close()


class _Tap:
    """Telemetry's state for one exchange, kept on :attr:`Exchange.tap`."""

    __slots__ = ("ids", "observer", "operation", "token")

    def __init__(
        self, ids: TraceIds, token: contextvars.Token[otel_context.Context] | None, operation: Key
    ) -> None:
        self.ids, self.token, self.operation = ids, token, operation
        self.observer: StreamObserver | None = None


class _HeaderCarrier(dict[str, str]):
    """ASGI headers as the mapping OpenTelemetry's propagators read ``traceparent`` (or B3...) from."""

    def __init__(self, headers: Sequence[tuple[bytes, bytes]], fields: frozenset[bytes]) -> None:
        super().__init__((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k in fields)


def capture_content(environ: Mapping[str, str]) -> bool:
    """Whether prompts and responses may be recorded (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``).

    ``SPAN_ONLY``, ``EVENT_ONLY``, ``SPAN_AND_EVENT`` and the legacy ``true`` turn it on; anything else,
    including unset and ``NO_CONTENT``, leaves it off. otellama records content on spans and in the JSONL
    line (which replay turns back into spans), so the three modes mean the same here.
    """
    value = environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip().upper()
    return value in ("SPAN_ONLY", "EVENT_ONLY", "SPAN_AND_EVENT", "TRUE")
