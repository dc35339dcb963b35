"""The OpenTelemetry sink: each record's spans and metrics through the SDK, and the trace context an exchange
carries to Ollama.

:class:`OtelSink` builds the providers from the standard ``OTEL_*`` environment (tests inject a tracer
provider and extra metric readers): a Prometheus reader of its own for ``/otellama/metrics``, always; OTLP
metric and span export when an endpoint is configured. Spans are built finished by
:func:`~otellama.sinks.otel.spans.render_spans` and handed to the provider's span processors; the metrics
recorded for every exchange are aggregated by :mod:`~otellama.sinks.otel.aggregates`, the rare failure
counters by the SDK.

With ``export_here=False`` (``otellama serve``: the exporter process renders spans, metrics and the stats
from the log) this sink only picks each exchange's trace context, keeps the in-flight count the exporter is
told, keeps the upstream call's span for the record (:mod:`~otellama.sinks.otel.calls`), and counts what
only this process sees (log write failures, the exporter's restarts): no per-exchange metric is recorded
here.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, get_global_textmap
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, TraceBasedExemplarFilter
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from otellama.exchange import Exchange
from otellama.observe.ollama import Endpoint
from otellama.observe.record import CallSpan, Record, TraceIds
from otellama.sinks.capper import Capper
from otellama.sinks.complaints import Complaints
from otellama.sinks.otel import semconv
from otellama.sinks.otel.aggregates import Aggregates, Key
from otellama.sinks.otel.calls import CallTracerProvider
from otellama.sinks.otel.export import (
    CountingMetricExporter,
    CountingSpanExporter,
    disabled,
    metric_exporters,
    quiet_sdk_exporters,
    resource,
    selected_exporters,
    span_exporters,
)
from otellama.sinks.otel.exportqueue import CountedBatchSpanProcessor
from otellama.sinks.otel.hosts import HostGauges, HostStates
from otellama.sinks.otel.metrics import Instruments, record_metrics
from otellama.sinks.otel.spans import PHASE_SPANS, SCOPE, render_spans

log = logging.getLogger(__name__)


class Started:
    """What :meth:`OtelSink.start` set up for one exchange, handed back to :meth:`OtelSink.stop`."""

    __slots__ = ("ids", "operation", "token")

    def __init__(
        self, ids: TraceIds, token: contextvars.Token[otel_context.Context] | None, operation: Key
    ) -> None:
        self.ids, self.token, self.operation = ids, token, operation


class OtelSink:
    """Spans and metrics of every record, and the trace context of every exchange (see module docstring)."""

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        metric_readers: Sequence[MetricReader] = (),
        environ: Mapping[str, str] | None = None,
        export_here: bool = True,
    ) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        env = os.environ if environ is None else environ
        #: Whether spans, metrics and the in-flight gauge are rendered in this process (module docstring).
        self.export_here = export_here
        self._complain = Complaints(log)
        self._own_providers: list[Any] = []
        self.registry = CollectorRegistry()
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry), *metric_readers]
        metric_export = metric_exporters(env) if export_here else []
        for metric_exporter_ in metric_export:
            exporter = CountingMetricExporter(metric_exporter_, self._export_failed)
            readers.append(PeriodicExportingMetricReader(exporter))
        if metric_export:
            quiet_sdk_exporters()
        # Exemplars only travel over OTLP (the Prometheus reader drops them): don't pay for them otherwise.
        wanted = bool(metric_export) or bool(metric_readers)
        metrics_resource = resource(env)
        self.meter_provider = meter_provider = SdkMeterProvider(
            metric_readers=readers,
            resource=metrics_resource,
            exemplar_filter=TraceBasedExemplarFilter() if wanted else AlwaysOffExemplarFilter(),
        )
        self._own_providers.append(meter_provider)
        self.aggregates = Aggregates(metrics_resource, SCOPE, exemplars=wanted)
        if not disabled(env):  # a disabled SDK's meters record nothing; ours follow suit (README)
            for reader in readers:
                self.aggregates.attach(reader)
        self.instruments = Instruments(meter_provider.get_meter(SCOPE.name, SCOPE.version), self.aggregates)

        traces_wanted = bool(selected_exporters(env, "traces"))
        tracing = tracer_provider is not None or traces_wanted
        #: The upstream call's spans, kept for the record when another process exports (None otherwise).
        self.calls: CallTracerProvider | None = None
        if tracer_provider is None:
            tracer_provider = TracerProvider(resource=resource(env))
            self._own_providers.append(tracer_provider)
            if not export_here and traces_wanted and not disabled(env):
                self.calls = CallTracerProvider()
            for span_exporter_ in span_exporters(env) if export_here else []:
                quiet_sdk_exporters()
                exporter_ = CountingSpanExporter(span_exporter_, self._export_failed)
                # A bounded queue (a dead collector cannot grow memory) whose drops are counted.
                tracer_provider.add_span_processor(CountedBatchSpanProcessor(exporter_, meter_provider))
        self.tracer_provider = tracer_provider
        #: The provider the httpx instrumentation makes the upstream call's span with.
        self.call_tracer_provider: trace.TracerProvider = self.calls or tracer_provider
        self.sampler = tracer_provider.sampler
        self._default_sampler = self.sampler is sampling.DEFAULT_ON
        # Finished spans go straight to the provider's processors (see render_spans). A provider disabled
        # by OTEL_SDK_DISABLED hands out a no-op tracer, which has none.
        tracer = tracer_provider.get_tracer(SCOPE.name, SCOPE.version)
        self._spans: SpanProcessor | None = getattr(tracer, "span_processor", None) if tracing else None
        #: Whether the upstream call is traced and ``traceparent`` sent (the exporting process renders spans).
        self.propagating = tracing and (self._spans is not None or not export_here)
        if not export_here:
            self._spans = None
        self._resource = getattr(tracer, "resource", None) or resource(env)
        #: Whether spans are recorded here (and the upstream call is traced, carrying ``traceparent``).
        self.tracing = self._spans is not None or self.propagating
        self.cap = Capper()
        #: Requests in flight now, by operation: what the exporter process reports as the in-flight gauge.
        self.in_flight_now: dict[Key, int] = {}
        self._random = random.Random()
        # The headers the configured propagators (OTEL_PROPAGATORS) read: traceparent, tracestate, baggage.
        self._trace_headers = frozenset(f.lower().encode("latin-1") for f in get_global_textmap().fields)

    def watch_hosts(self, states: HostStates) -> None:
        """Report the per-host gauges (:mod:`~otellama.sinks.otel.hosts`) from ``states`` (here only when
        this process renders the metrics: else the exporter is told the states)."""
        if not self.export_here:
            return
        HostGauges(self.meter_provider.get_meter(SCOPE.name, SCOPE.version), states)

    # --- per exchange ----------------------------------------------------------------------------------
    def start(self, exchange: Exchange, endpoint: Endpoint | None) -> Started:
        """The request arrived: count it in flight, pick its trace ids and make them the current context,
        so that the traced upstream call becomes a child of the GenAI span-to-be."""
        operation: Key = ((semconv.OPERATION, endpoint.operation),) if endpoint is not None else ()
        if self.export_here:
            self.instruments.in_flight.add(1, operation)
        in_flight = self.in_flight_now
        in_flight[operation] = in_flight.get(operation, 0) + 1
        parent_context = None
        parent = trace.INVALID_SPAN_CONTEXT
        fields = self._trace_headers
        # Most clients send none of these headers. A loop, not any() over a generator: 0.4 us less.
        for name, _ in exchange.request_headers:
            if name in fields:
                parent_context = extract(_HeaderCarrier(exchange.request_headers, fields))
                parent = trace.get_current_span(parent_context).get_span_context()
                break
        bits = self._random.getrandbits
        trace_id = parent.trace_id if parent.is_valid else bits(128)
        server_span_id = bits(64)
        genai_span_id = bits(64) if endpoint is not None else None
        sampled = True
        if self.tracing and self._default_sampler:
            # The SDK's default, ParentBased(AlwaysOn), decides as the parent did, else samples: no need to
            # build the SDK's sampling result for every request.
            sampled = parent.trace_flags.sampled if parent.is_valid else True
        elif self.tracing:
            decision = self.sampler.should_sample(
                parent_context if parent.is_valid else None, trace_id, exchange.path, SpanKind.SERVER
            )
            sampled = decision.decision is Decision.RECORD_AND_SAMPLE
        parent_span_id = parent.span_id if parent.is_valid else None
        # Positions, in the fields' order: keywords cost more in CPython 3.11.
        ids = TraceIds(trace_id, server_span_id, genai_span_id, parent_span_id, sampled)
        token = None
        if self.tracing:
            flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
            context = SpanContext(
                trace_id, genai_span_id or server_span_id, is_remote=False, trace_flags=flags
            )
            token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(context)))
        return Started(ids, token, operation)

    def stop(self, started: Started) -> TraceIds:
        """The exchange is over: no longer in flight; its ids, with the phase spans' drawn if it has any."""
        if self.export_here:
            self.instruments.in_flight.add(-1, started.operation)
        self.in_flight_now[started.operation] -= 1
        if started.token is not None:
            otel_context.detach(started.token)
        ids = started.ids
        if ids.genai_span_id is not None and ids.sampled:
            draw = self._random.getrandbits
            ids = TraceIds(
                ids.trace_id, ids.server_span_id, ids.genai_span_id, ids.parent_span_id, ids.sampled,
                {name: draw(64) for name in PHASE_SPANS},
            )  # fmt: skip
        return ids

    def upstream_span(self, ids: TraceIds) -> CallSpan | None:
        """The upstream call's span of the exchange with ``ids``, if it was traced and is to travel."""
        if self.calls is None:
            return None
        return self.calls.pop(ids.trace_id, ids.genai_span_id or ids.server_span_id)

    # --- the sink ----------------------------------------------------------------------------------------
    def write(self, record: Record) -> None:
        """Render the record's spans (if sampled) and record its metrics, with its span as exemplar (only
        when this process renders them: else the exporter does, from the log)."""
        if not self.export_here:
            return
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

    def watch_exporter(self, counters: Callable[[], Mapping[str, int]], restarts: Callable[[], int]) -> None:
        """Show the exporter process's ``counters`` (its status, summed over its lives) and ``restarts`` on
        this sink's metrics; read when the metrics are collected, never per exchange."""
        from opentelemetry.metrics import CallbackOptions, Observation

        meter = self.meter_provider.get_meter(SCOPE.name, SCOPE.version)

        def observed(value: Callable[[], int]) -> Any:
            def callback(options: CallbackOptions) -> list[Observation]:
                return [Observation(value())]

            return [callback]

        for metric, value in (
            (semconv.EXPORTER_RESTARTS, restarts),
            (semconv.EXPORTER_SPANS, lambda: counters().get("spans", 0)),
            (semconv.EXPORTER_DROPPED, lambda: counters().get("dropped_bytes", 0)),
            (semconv.EXPORTER_SKIPPED, lambda: counters().get("skipped_lines", 0)),
        ):
            meter.create_observable_counter(
                metric.name, observed(value), unit=metric.unit, description=metric.description
            )
        backlog = semconv.EXPORTER_BACKLOG
        meter.create_observable_gauge(
            backlog.name,
            observed(lambda: counters().get("behind_bytes", 0)),
            unit=backlog.unit,
            description=backlog.description,
        )

    def exporter_failed(self, signal: str, batches: int) -> None:
        """Count ``batches`` the exporter process failed to export (``signal``: traces or metrics)."""
        self.instruments.export_failures.add(batches, {semconv.SIGNAL: signal})

    def log_failed(self) -> None:
        """Count a JSONL line that could not be written."""
        self.instruments.log_failures.add(1)

    def prometheus(self) -> bytes:
        """The metrics in Prometheus text format, for ``GET /otellama/metrics``."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def close(self) -> None:
        """Flush and stop what this sink built (an injected tracer provider belongs to its owner)."""
        for provider in self._own_providers:
            provider.shutdown()

    def _export_failed(self, signal: str) -> None:
        self.instruments.export_failures.add(1, {semconv.SIGNAL: signal})
        latest = quiet_sdk_exporters().latest()
        self._complain(
            "OTLP export of %s failed%s; is the collector at the configured endpoint up?", signal, latest
        )


class _HeaderCarrier(dict[str, str]):
    """ASGI headers as the mapping OpenTelemetry's propagators read ``traceparent`` (or B3...) from."""

    def __init__(self, headers: Sequence[tuple[bytes, bytes]], fields: frozenset[bytes]) -> None:
        super().__init__((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k in fields)
