"""The OTLP test receivers, proven with the real OpenTelemetry SDK exporters over real sockets."""

from __future__ import annotations

import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, cast

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from tests.otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver, OtlpReceiver

Transport = Literal["grpc", "http", "http-gzip"]
TRANSPORTS: list[Transport] = ["grpc", "http", "http-gzip"]
AnyReceiver = OtlpReceiver[Any]
RESOURCE = Resource.create({"service.name": "otlp-receiver-test", "deployment.environment": "test"})


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Transport:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def receiver(transport: Transport) -> Iterator[AnyReceiver]:
    started: AnyReceiver
    with OtlpGrpcReceiver() if transport == "grpc" else OtlpHttpReceiver() as started:
        yield started


def span_exporter(transport: Transport, receiver: AnyReceiver, timeout: float = 5.0) -> SpanExporter:
    if transport == "grpc":
        return GrpcSpanExporter(endpoint=receiver.endpoint, insecure=True, timeout=timeout)
    compression = HttpCompression.Gzip if transport == "http-gzip" else HttpCompression.NoCompression
    return HttpSpanExporter(
        endpoint=f"{receiver.endpoint}/v1/traces", timeout=timeout, compression=compression
    )


def metric_exporter(transport: Transport, receiver: AnyReceiver) -> MetricExporter:
    if transport == "grpc":
        return GrpcMetricExporter(endpoint=receiver.endpoint, insecure=True, timeout=5)
    compression = HttpCompression.Gzip if transport == "http-gzip" else HttpCompression.NoCompression
    return HttpMetricExporter(endpoint=f"{receiver.endpoint}/v1/metrics", timeout=5, compression=compression)


@contextmanager
def tracer_provider(exporter: SpanExporter, *, batch: bool = False) -> Iterator[TracerProvider]:
    provider = TracerProvider(resource=RESOURCE)
    processor = (
        BatchSpanProcessor(exporter, schedule_delay_millis=50) if batch else SimpleSpanProcessor(exporter)
    )
    provider.add_span_processor(processor)
    try:
        yield provider
    finally:
        provider.shutdown()


def test_spans_arrive_with_ids_parentage_kinds_attributes_and_status(
    transport: Transport, receiver: AnyReceiver
) -> None:
    with tracer_provider(span_exporter(transport, receiver)) as provider:
        tracer = provider.get_tracer("otlp.receiver.test")
        with tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as parent:
            parent.set_attributes(
                {
                    "s": "text",
                    "b": True,
                    "i": 42,
                    "f": 0.25,
                    "strings": ["a", "b"],
                    "ints": [1, 2, 3],
                    "floats": [0.5, 1.5],
                    "bools": [True, False],
                }
            )
            with tracer.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
                child.add_event("first token", {"token.index": 0})
                child.set_status(Status(StatusCode.ERROR, "upstream broke"))
        parent_context, child_context = parent.get_span_context(), child.get_span_context()

    # SimpleSpanProcessor exports the child first (it ends first)
    child_span, parent_span = receiver.wait_for_spans(2)

    assert parent_span.name == "parent"
    assert parent_span.trace_id == f"{parent_context.trace_id:032x}"
    assert parent_span.span_id == f"{parent_context.span_id:016x}"
    assert parent_span.parent_span_id is None
    assert (parent_span.kind, parent_span.kind_value) == ("SERVER", 2)
    assert parent_span.attributes == {
        "s": "text",
        "b": True,
        "i": 42,
        "f": 0.25,
        "strings": ["a", "b"],
        "ints": [1, 2, 3],
        "floats": [0.5, 1.5],
        "bools": [True, False],
    }
    assert parent_span.status_code == "UNSET"
    assert parent_span.resource["service.name"] == "otlp-receiver-test"
    assert parent_span.resource["deployment.environment"] == "test"
    assert parent_span.scope_name == "otlp.receiver.test"
    assert 0 < parent_span.start_ns <= child_span.start_ns <= child_span.end_ns <= parent_span.end_ns

    assert child_span.name == "child"
    assert child_span.trace_id == parent_span.trace_id
    assert child_span.span_id == f"{child_context.span_id:016x}"
    assert child_span.parent_span_id == parent_span.span_id
    assert child_span.kind == "CLIENT"
    assert (child_span.status_code, child_span.status_message) == ("ERROR", "upstream broke")
    [event] = child_span.events
    assert (event.name, event.attributes) == ("first token", {"token.index": 0})
    assert child_span.start_ns <= event.time_ns <= child_span.end_ns

    assert receiver.spans("child") == [child_span]
    assert len(receiver.trace_requests()) == 2
    assert receiver.attempts("traces") == 2


def test_metric_points_arrive_with_bounds_counts_sums_attributes_and_exemplars(
    transport: Transport, receiver: AnyReceiver
) -> None:
    reader = PeriodicExportingMetricReader(
        metric_exporter(transport, receiver), export_interval_millis=math.inf
    )  # never on its own: force_flush below decides when
    exp_view = View(instrument_name="exp.size", aggregation=ExponentialBucketHistogramAggregation())
    meters = MeterProvider(metric_readers=[reader], resource=RESOURCE, views=[exp_view])
    tracing = TracerProvider(resource=RESOURCE)  # exemplars need a sampled span in context; nothing exported
    try:
        meter = meters.get_meter("otlp.receiver.test")
        latency = meter.create_histogram(
            "test.latency",
            unit="s",
            description="how long",
            explicit_bucket_boundaries_advisory=[0.1, 0.5, 1],
        )
        requests = meter.create_counter("test.requests", unit="{request}")
        in_flight = meter.create_up_down_counter("test.in_flight")
        temperature = meter.create_gauge("test.temperature")
        size = meter.create_histogram("exp.size", unit="By")
        for value in (0.05, 0.3, 0.3, 2.0):
            latency.record(value, {"model": "a"})
        with tracing.get_tracer("t").start_as_current_span("sampled") as span:
            latency.record(0.7, {"model": "b"})
        requests.add(1, {"model": "a", "ok": True})
        requests.add(2, {"model": "a", "ok": True})
        in_flight.add(3)
        in_flight.add(-1)
        temperature.set(21.5, {"room": "lab"})
        for value in (1, 2, 4, 1000):
            size.record(value)
        assert meters.force_flush()

        receiver.wait_for_metrics(lambda p: p.name == "exp.size")
        points = {(p.name, tuple(sorted(p.attributes.items()))): p for p in receiver.metrics()}
    finally:
        meters.shutdown()
        tracing.shutdown()

    a = points["test.latency", (("model", "a"),)]
    assert (a.kind, a.unit, a.description, a.temporality) == ("histogram", "s", "how long", "CUMULATIVE")
    assert a.explicit_bounds == (0.1, 0.5, 1.0)
    assert a.bucket_counts == (1, 2, 0, 1)
    assert (a.count, a.min, a.max) == (4, 0.05, 2.0)
    assert a.sum == pytest.approx(2.65)
    assert a.exemplars == ()  # recorded outside any span: the trace-based filter keeps none
    assert a.resource["service.name"] == "otlp-receiver-test"
    assert a.scope_name == "otlp.receiver.test"
    assert 0 < a.start_ns <= a.time_ns

    b = points["test.latency", (("model", "b"),)]
    assert (b.count, b.sum, b.bucket_counts) == (1, 0.7, (0, 0, 1, 0))
    [exemplar] = b.exemplars
    context = span.get_span_context()
    assert exemplar["trace_id"] == f"{context.trace_id:032x}"
    assert exemplar["span_id"] == f"{context.span_id:016x}"
    assert exemplar["value"] == 0.7

    counter = points["test.requests", (("model", "a"), ("ok", True))]
    assert (counter.kind, counter.is_monotonic, counter.value, counter.unit) == ("sum", True, 3, "{request}")
    up_down = points["test.in_flight", ()]
    assert (up_down.kind, up_down.is_monotonic, up_down.value) == ("sum", False, 2)
    gauge = points["test.temperature", (("room", "lab"),)]
    assert (gauge.kind, gauge.value, gauge.is_monotonic, gauge.temporality) == ("gauge", 21.5, None, None)

    exp = points["exp.size", ()]
    assert (exp.kind, exp.count, exp.sum, exp.zero_count) == ("exp_histogram", 4, 1007, 0)
    assert exp.scale is not None and sum(exp.positive_bucket_counts) == 4


def test_periodic_cumulative_exports_repeat_points_in_arrival_order(receiver: AnyReceiver) -> None:
    exporter = (
        GrpcMetricExporter(endpoint=receiver.endpoint, insecure=True)
        if isinstance(receiver, OtlpGrpcReceiver)
        else HttpMetricExporter(endpoint=f"{receiver.endpoint}/v1/metrics")
    )
    meters = MeterProvider(
        metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=50)]
    )
    try:
        counter = meters.get_meter("m").create_counter("ticks")
        counter.add(1)
        receiver.wait_for_metrics(lambda p: p.name == "ticks" and p.value == 1)
        counter.add(4)
        last = receiver.wait_for_metrics(lambda p: p.name == "ticks" and p.value == 5)[-1]
    finally:
        meters.shutdown()
    assert receiver.metrics("ticks")[-1].value == 5 == last.value


async def test_async_wait_sees_batched_spans_without_blocking_the_loop(
    transport: Transport, receiver: AnyReceiver
) -> None:
    with tracer_provider(span_exporter(transport, receiver), batch=True) as provider:
        for name in ("one", "two", "three"):
            provider.get_tracer("t").start_span(name).end()
        spans = await receiver.wait_for_spans_async(lambda s: s.name.startswith("t"), count=2)
        assert sorted(s.name for s in spans) == ["three", "two"]
        assert [p.name for p in await receiver.wait_for_metrics_async(0)] == []


def test_wait_times_out_with_a_list_of_what_arrived(receiver: AnyReceiver) -> None:
    transport: Transport = "grpc" if isinstance(receiver, OtlpGrpcReceiver) else "http"
    with tracer_provider(span_exporter(transport, receiver)) as provider:
        provider.get_tracer("t").start_span("arrived", attributes={"k": "v"}).end()
    receiver.wait_for_spans("arrived")
    started = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        receiver.wait_for_spans("missing", timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 2
    message = str(failure.value)
    assert "1 span(s) named 'missing'" in message
    assert "1 spans arrived in 1 export call(s)" in message
    assert "'arrived' kind=INTERNAL status=UNSET attributes={'k': 'v'}" in message
    with pytest.raises(AssertionError, match="0 metric points arrived"):
        receiver.wait_for_metrics(1, timeout=0.05)
    with pytest.raises(ValueError, match="not both"):
        receiver.wait_for_spans(2, count=2)


def test_non_retryable_failure_is_refused_and_not_stored(transport: Transport, receiver: AnyReceiver) -> None:
    receiver.fail_with = grpc.StatusCode.INVALID_ARGUMENT if transport == "grpc" else 400
    with exporting(span_exporter(transport, receiver)) as exporter:
        assert exporter.export([_ended_span("refused")]) == SpanExportResult.FAILURE
        assert (receiver.attempts("traces"), receiver.spans()) == (1, [])

        receiver.fail_with = None
        assert exporter.export([_ended_span("accepted")]) == SpanExportResult.SUCCESS
        assert [s.name for s in receiver.spans()] == ["accepted"]


def test_retryable_failure_for_a_few_calls_then_success(transport: Transport, receiver: AnyReceiver) -> None:
    receiver.fail_with = grpc.StatusCode.UNAVAILABLE if transport == "grpc" else 503
    receiver.fail_times = 2
    receiver.retry_after = 0.01  # the exporters honour it instead of their 1 s, 2 s, ... backoff
    with exporting(span_exporter(transport, receiver)) as exporter:
        started = time.monotonic()
        assert exporter.export([_ended_span("retried")]) == SpanExportResult.SUCCESS
        assert time.monotonic() - started < 0.9
    assert receiver.attempts() == 3
    assert receiver.fail_times == 0
    assert [s.name for s in receiver.spans()] == ["retried"]


def test_delay_outlasting_the_exporter_fails_the_export_but_the_data_still_lands(
    transport: Transport, receiver: AnyReceiver
) -> None:
    receiver.delay = 0.3
    with exporting(span_exporter(transport, receiver, timeout=0.1)) as exporter:
        started = time.monotonic()
        assert exporter.export([_ended_span("late")]) == SpanExportResult.FAILURE
        assert time.monotonic() - started < 0.3
    [late] = receiver.wait_for_spans(1)
    assert late.name == "late"
    assert receiver.attempts() == 1


def test_stop_ends_a_call_sleeping_in_delay_promptly() -> None:
    receiver = OtlpHttpReceiver().start()
    receiver.delay = 60
    answered: list[int] = []

    def post() -> None:
        request = urllib.request.Request(
            f"{receiver.endpoint}/v1/traces",
            data=ExportTraceServiceRequest().SerializeToString(),
            headers={"Content-Type": "application/x-protobuf"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            answered.append(response.status)

    client = threading.Thread(target=post)
    client.start()
    assert _eventually(lambda: receiver.attempts() == 1)
    started = time.monotonic()
    receiver.stop()
    client.join(timeout=5)
    assert time.monotonic() - started < 1.5
    assert answered == [200]


def test_exporters_configured_by_environment_reach_the_http_signal_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with OtlpHttpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20t0ken")
        with tracer_provider(HttpSpanExporter()) as provider:
            provider.get_tracer("t").start_span("from env").end()
        meters = MeterProvider(
            metric_readers=[
                PeriodicExportingMetricReader(HttpMetricExporter(), export_interval_millis=math.inf)
            ]
        )
        meters.get_meter("m").create_counter("env.counter").add(7)
        meters.force_flush()  # an infinite interval never collects by itself, not even at shutdown
        meters.shutdown()

        assert receiver.wait_for_spans("from env")[0].name == "from env"
        assert receiver.wait_for_metrics("env.counter")[0].value == 7
        assert {h["authorization"] for h in receiver.request_headers()} == {"Bearer t0ken"}


def test_grpc_metadata_is_recorded() -> None:
    with OtlpGrpcReceiver() as receiver:
        exporter = GrpcSpanExporter(endpoint=receiver.endpoint, headers={"x-tenant": "lab"})
        with tracer_provider(exporter) as provider:
            provider.get_tracer("t").start_span("with metadata").end()
        receiver.wait_for_spans(1)
        assert receiver.request_headers()[0]["x-tenant"] == "lab"


@pytest.mark.parametrize(
    ("path", "content_type", "encoding", "body", "status"),
    [
        ("/v1/nope", "application/x-protobuf", None, b"", 404),
        ("/v1/traces", "application/json", None, b"{}", 415),
        ("/v1/traces", "application/x-protobuf", "br", b"", 415),
        ("/v1/traces", "application/x-protobuf", None, b"\xff\xff\xff", 400),
        ("/v1/traces", "application/x-protobuf", "gzip", b"not gzip", 400),
        ("/v1/logs", "application/x-protobuf", None, b"", 200),
    ],
)
def test_http_answers_bad_requests_with_client_errors(
    path: str, content_type: str, encoding: str | None, body: bytes, status: int
) -> None:
    headers = {"Content-Type": content_type} | ({"Content-Encoding": encoding} if encoding else {})
    with OtlpHttpReceiver() as receiver:
        request = urllib.request.Request(f"{receiver.endpoint}{path}", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                answered = response.status
        except urllib.error.HTTPError as error:
            answered = error.code
            error.close()
        assert answered == status
        assert len(receiver.log_requests()) == (1 if status == 200 else 0)
        assert receiver.spans() == []


@contextmanager
def exporting(exporter: SpanExporter) -> Iterator[SpanExporter]:
    try:
        yield exporter
    finally:
        exporter.shutdown()


# No processor: spans made here reach the wire only through the test's own ``export`` call.
_UNEXPORTED = TracerProvider(resource=RESOURCE).get_tracer("otlp.receiver.test")


def _ended_span(name: str) -> ReadableSpan:
    span = _UNEXPORTED.start_span(name)
    span.end()
    return cast(ReadableSpan, span)  # the SDK tracer's spans are ReadableSpans


def _eventually(condition: Callable[[], bool], limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
