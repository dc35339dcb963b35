"""Real OTLP receivers (gRPC and HTTP/protobuf) that tests start themselves.

Telemetry is only proven once it has crossed a socket in the OTLP wire format, so these receivers decode
exactly what an exporter sent and flatten it into plain Python for assertions::

    with OtlpGrpcReceiver() as receiver:
        ...  # point an exporter (or otellama) at receiver.endpoint
        [span] = receiver.wait_for_spans("ollama.chat")
        assert span.kind == "SERVER" and span.attributes["gen_ai.request.model"] == "llama3"

Exporters batch, so always ``wait_for_*`` rather than sleep. ``fail_with``, ``fail_times``, ``retry_after``
and ``delay`` make a receiver misbehave on purpose for fault tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc import (
    LogsServiceServicer,
    add_LogsServiceServicer_to_server,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2_grpc import (
    MetricsServiceServicer,
    add_MetricsServiceServicer_to_server,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Exemplar
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = [
    "OtlpGrpcReceiver",
    "OtlpHttpReceiver",
    "OtlpReceiver",
    "ReceivedEvent",
    "ReceivedMetric",
    "ReceivedSpan",
    "Signal",
]

Signal = Literal["traces", "metrics", "logs"]
ExportRequest = ExportTraceServiceRequest | ExportMetricsServiceRequest | ExportLogsServiceRequest
FailT = TypeVar("FailT")
ItemT = TypeVar("ItemT")

DEFAULT_TIMEOUT = 10.0
_POLL_SECONDS = 0.005
_LISTED_ON_TIMEOUT = 40  # enough to see what went wrong without drowning the failure in a big run


# --------------------------------------------------------------------------------------------------------
# What arrived, as plain Python


@dataclasses.dataclass(frozen=True)
class ReceivedEvent:
    """One span event."""

    name: str
    time_ns: int
    attributes: dict[str, object]


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived on the wire. Ids are lowercase hex; ``kind`` and ``status_code`` are names."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    kind: str  # "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER" or "UNSPECIFIED"
    kind_value: int  # the proto enum number behind ``kind``
    start_ns: int
    end_ns: int
    attributes: dict[str, object]
    status_code: str  # "UNSET", "OK" or "ERROR"
    status_message: str
    events: tuple[ReceivedEvent, ...]
    resource: dict[str, object]
    scope_name: str

    @property
    def duration_ns(self) -> int:
        """``end_ns - start_ns``."""
        return self.end_ns - self.start_ns


@dataclasses.dataclass(frozen=True)
class ReceivedMetric:
    """One metric data point as it arrived on the wire, flattened together with its metric's metadata.

    ``kind`` is "histogram", "sum", "gauge", "exp_histogram" or "summary". Fields that do not apply to the
    kind are None or empty. Cumulative metrics are re-sent on every export, so the same series can appear
    many times: points are in arrival order, the last one for a series is the newest.
    """

    name: str
    unit: str
    description: str
    kind: str
    attributes: dict[str, object]
    resource: dict[str, object]
    scope_name: str
    start_ns: int
    time_ns: int
    temporality: str | None = None  # "CUMULATIVE" or "DELTA" (sum, histogram, exp_histogram)
    is_monotonic: bool | None = None  # sum only
    value: int | float | None = None  # sum and gauge
    count: int | None = None  # histogram, exp_histogram, summary
    sum: float | None = None  # histogram, exp_histogram, summary (None when the exporter left it out)
    min: float | None = None
    max: float | None = None
    bucket_counts: tuple[int, ...] = ()  # histogram: len(explicit_bounds) + 1 buckets
    explicit_bounds: tuple[float, ...] = ()
    exemplars: tuple[dict[str, object], ...] = ()  # {"trace_id", "span_id", "value", "time_ns", "attributes"}
    scale: int | None = None  # exp_histogram only, from here down
    zero_count: int | None = None
    positive_offset: int | None = None
    positive_bucket_counts: tuple[int, ...] = ()
    negative_offset: int | None = None
    negative_bucket_counts: tuple[int, ...] = ()


def _enum_name(name: str, prefix: str) -> str:
    return name.removeprefix(prefix)


def _any_value(value: AnyValue) -> object:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if which is None:  # an empty AnyValue is OTLP's null
        return None
    return getattr(value, which)  # string_value, bool_value, int_value, double_value, bytes_value


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, object]:
    return {pair.key: _any_value(pair.value) for pair in pairs}


def _number(point: Any) -> int | float | None:
    """The oneof ``as_int``/``as_double`` value that number points and exemplars carry."""
    which = point.WhichOneof("value")
    return None if which is None else getattr(point, which)


def _exemplars(exemplars: Sequence[Exemplar]) -> tuple[dict[str, object], ...]:
    return tuple(
        {
            "trace_id": e.trace_id.hex() or None,
            "span_id": e.span_id.hex() or None,
            "value": _number(e),
            "time_ns": e.time_unix_nano,
            "attributes": _attributes(e.filtered_attributes),
        }
        for e in exemplars
    )


def _optional(point: Any, field: str) -> float | None:
    return getattr(point, field) if point.HasField(field) else None


def _flatten_spans(requests: Iterable[ExportTraceServiceRequest]) -> list[ReceivedSpan]:
    spans: list[ReceivedSpan] = []
    for request in requests:
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                spans.extend(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        kind=_enum_name(Span.SpanKind.Name(span.kind), "SPAN_KIND_"),
                        kind_value=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        status_code=_enum_name(Status.StatusCode.Name(span.status.code), "STATUS_CODE_"),
                        status_message=span.status.message,
                        events=tuple(
                            ReceivedEvent(e.name, e.time_unix_nano, _attributes(e.attributes))
                            for e in span.events
                        ),
                        resource=resource,
                        scope_name=scope_spans.scope.name,
                    )
                    for span in scope_spans.spans
                )
    return spans


def _temporality(value: int) -> str:
    return _enum_name(AggregationTemporality.Name(value), "AGGREGATION_TEMPORALITY_")


def _flatten_metrics(requests: Iterable[ExportMetricsServiceRequest]) -> list[ReceivedMetric]:
    points: list[ReceivedMetric] = []
    for request in requests:
        for resource_metrics in request.resource_metrics:
            resource = _attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    common: dict[str, Any] = {
                        "name": metric.name,
                        "unit": metric.unit,
                        "description": metric.description,
                        "resource": resource,
                        "scope_name": scope_metrics.scope.name,
                    }
                    points.extend(_flatten_metric_points(metric, common))
    return points


def _flatten_metric_points(metric: Any, common: dict[str, Any]) -> list[ReceivedMetric]:
    def base(point: Any, kind: str) -> dict[str, Any]:
        return {
            **common,
            "kind": kind,
            "attributes": _attributes(point.attributes),
            "start_ns": point.start_time_unix_nano,
            "time_ns": point.time_unix_nano,
        }

    which = metric.WhichOneof("data")
    if which == "histogram":
        temporality = _temporality(metric.histogram.aggregation_temporality)
        return [
            ReceivedMetric(
                **base(p, "histogram"),
                temporality=temporality,
                count=p.count,
                sum=_optional(p, "sum"),
                min=_optional(p, "min"),
                max=_optional(p, "max"),
                bucket_counts=tuple(p.bucket_counts),
                explicit_bounds=tuple(p.explicit_bounds),
                exemplars=_exemplars(p.exemplars),
            )
            for p in metric.histogram.data_points
        ]
    if which in ("sum", "gauge"):
        data = getattr(metric, which)
        is_sum = which == "sum"
        return [
            ReceivedMetric(
                **base(p, which),
                temporality=_temporality(data.aggregation_temporality) if is_sum else None,
                is_monotonic=data.is_monotonic if is_sum else None,
                value=_number(p),
                exemplars=_exemplars(p.exemplars),
            )
            for p in data.data_points
        ]
    if which == "exponential_histogram":
        temporality = _temporality(metric.exponential_histogram.aggregation_temporality)
        return [
            ReceivedMetric(
                **base(p, "exp_histogram"),
                temporality=temporality,
                count=p.count,
                sum=_optional(p, "sum"),
                min=_optional(p, "min"),
                max=_optional(p, "max"),
                exemplars=_exemplars(p.exemplars),
                scale=p.scale,
                zero_count=p.zero_count,
                positive_offset=p.positive.offset,
                positive_bucket_counts=tuple(p.positive.bucket_counts),
                negative_offset=p.negative.offset,
                negative_bucket_counts=tuple(p.negative.bucket_counts),
            )
            for p in metric.exponential_histogram.data_points
        ]
    if which == "summary":
        return [
            ReceivedMetric(**base(p, "summary"), count=p.count, sum=p.sum) for p in metric.summary.data_points
        ]
    return []  # a metric with no data: nothing to flatten


def _describe_span(span: ReceivedSpan) -> str:
    return f"{span.name!r} kind={span.kind} status={span.status_code} attributes={span.attributes}"


def _describe_metric(point: ReceivedMetric) -> str:
    shown = point.value if point.kind in ("sum", "gauge") else f"count={point.count} sum={point.sum}"
    return f"{point.name!r} {point.kind} {shown} attributes={point.attributes}"


# --------------------------------------------------------------------------------------------------------
# Storage, waiting and fault knobs shared by both transports


class OtlpReceiver(Generic[FailT]):
    """Storage, flattening, waiting and fault injection shared by the gRPC and HTTP receivers.

    Fault knobs, read on every export call (set them from the test at any time):

    - ``delay``: seconds to wait before answering (the data is still stored if the call then succeeds,
      even when the exporter has given up by then, as a real collector would have it).
    - ``fail_with``: answer with this error (a ``grpc.StatusCode`` or an HTTP status) instead of storing.
    - ``fail_times``: with ``fail_with``, fail only this many more calls, then succeed; None = every call.
    - ``retry_after``: seconds the failure tells the exporter to wait (gRPC ``RetryInfo``, HTTP
      ``Retry-After``); both Python exporters honour it, so ``0`` makes retry tests fast.
    """

    def __init__(self) -> None:
        self.delay: float = 0.0
        self.fail_with: FailT | None = None
        self.fail_times: int | None = None
        self.retry_after: float | None = None
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._stopping = threading.Event()  # wakes handlers sleeping in ``delay`` so stop() is prompt
        self._received: list[tuple[ExportRequest, dict[str, str]]] = []
        self._attempts: dict[Signal, int] = {"traces": 0, "metrics": 0, "logs": 0}

    # -- lifecycle (transports implement _start/_stop) -----------------------------------------------

    @property
    def endpoint(self) -> str:
        """Base URL to give an exporter, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        """The port the receiver listens on (chosen by the OS)."""
        raise NotImplementedError

    def start(self) -> Self:
        """Start listening; returns self."""
        self._stopping.clear()
        self._start()
        return self

    def stop(self) -> None:
        """Stop listening and end in-flight calls. What was received stays readable."""
        self._stopping.set()
        self._stop()

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what arrived ------------------------------------------------------------------------------

    def trace_requests(self) -> list[ExportTraceServiceRequest]:
        """Every accepted trace export, decoded, in arrival order."""
        with self._lock:
            return [r for r, _ in self._received if isinstance(r, ExportTraceServiceRequest)]

    def metric_requests(self) -> list[ExportMetricsServiceRequest]:
        """Every accepted metrics export, decoded, in arrival order."""
        with self._lock:
            return [r for r, _ in self._received if isinstance(r, ExportMetricsServiceRequest)]

    def log_requests(self) -> list[ExportLogsServiceRequest]:
        """Every accepted logs export, decoded, in arrival order (logs are stored, not flattened)."""
        with self._lock:
            return [r for r, _ in self._received if isinstance(r, ExportLogsServiceRequest)]

    def request_headers(self) -> list[dict[str, str]]:
        """Headers (gRPC: invocation metadata) of every accepted export call, lowercase keys, in order."""
        with self._lock:
            return [dict(headers) for _, headers in self._received]

    def attempts(self, signal: Signal | None = None) -> int:
        """How many export calls arrived, failed-on-purpose ones included (retries count each time)."""
        with self._lock:
            return self._attempts[signal] if signal else sum(self._attempts.values())

    def spans(self, name: str | None = None) -> list[ReceivedSpan]:
        """Every received span (only those called ``name``, if given), in arrival order."""
        spans = _flatten_spans(self.trace_requests())
        return spans if name is None else [s for s in spans if s.name == name]

    def metrics(self, name: str | None = None) -> list[ReceivedMetric]:
        """Every received metric data point (only of metric ``name``, if given), in arrival order."""
        points = _flatten_metrics(self.metric_requests())
        return points if name is None else [p for p in points if p.name == name]

    def clear(self) -> None:
        """Forget everything received so far (attempt counts included)."""
        with self._lock:
            self._received.clear()
            self._attempts = dict.fromkeys(self._attempts, 0)

    # -- waiting -----------------------------------------------------------------------------------

    def wait_for_spans(
        self,
        want: int | str | Callable[[ReceivedSpan], bool] = 1,
        *,
        count: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> list[ReceivedSpan]:
        """Block until enough spans arrived; return the matching ones (all spans for an int ``want``).

        ``want`` is a total number of spans, a span name, or a predicate over one span; with a name or a
        predicate, ``count`` (default 1) matching spans are awaited. Raises AssertionError listing what
        did arrive once ``timeout`` seconds pass.
        """
        predicate, needed, wanted = _wanted(want, count, "span")
        return self._wait(
            lambda: [s for s in self.spans() if predicate(s)], needed, timeout, wanted, "traces"
        )

    def wait_for_metrics(
        self,
        want: int | str | Callable[[ReceivedMetric], bool] = 1,
        *,
        count: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> list[ReceivedMetric]:
        """Like :meth:`wait_for_spans`, over metric data points (a ``str`` matches the metric name)."""
        predicate, needed, wanted = _wanted(want, count, "metric point")
        return self._wait(
            lambda: [p for p in self.metrics() if predicate(p)], needed, timeout, wanted, "metrics"
        )

    async def wait_for_spans_async(
        self,
        want: int | str | Callable[[ReceivedSpan], bool] = 1,
        *,
        count: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - same signature as the blocking twin
    ) -> list[ReceivedSpan]:
        """:meth:`wait_for_spans` for async tests: yields to the event loop instead of blocking it, so an
        app served on the same loop can keep exporting."""
        predicate, needed, wanted = _wanted(want, count, "span")
        return await self._wait_async(
            lambda: [s for s in self.spans() if predicate(s)], needed, timeout, wanted, "traces"
        )

    async def wait_for_metrics_async(
        self,
        want: int | str | Callable[[ReceivedMetric], bool] = 1,
        *,
        count: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - same signature as the blocking twin
    ) -> list[ReceivedMetric]:
        """:meth:`wait_for_metrics` for async tests."""
        predicate, needed, wanted = _wanted(want, count, "metric point")
        return await self._wait_async(
            lambda: [p for p in self.metrics() if predicate(p)], needed, timeout, wanted, "metrics"
        )

    def _wait(
        self, matching: Callable[[], list[ItemT]], needed: int, timeout: float, wanted: str, signal: Signal
    ) -> list[ItemT]:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(found := matching()) < needed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(self._timeout_report(timeout, wanted, signal))
                self._arrived.wait(remaining)
        return found

    async def _wait_async(
        self, matching: Callable[[], list[ItemT]], needed: int, limit: float, wanted: str, signal: Signal
    ) -> list[ItemT]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while len(found := matching()) < needed:
            if loop.time() > deadline:
                raise AssertionError(self._timeout_report(limit, wanted, signal))
            await asyncio.sleep(_POLL_SECONDS)
        return found

    def _timeout_report(self, timeout: float, wanted: str, signal: Signal) -> str:
        arrived = (
            [_describe_span(s) for s in self.spans()]
            if signal == "traces"
            else [_describe_metric(p) for p in self.metrics()]
        )
        lines = [f"  - {line}" for line in arrived[:_LISTED_ON_TIMEOUT]]
        if len(arrived) > _LISTED_ON_TIMEOUT:
            lines.append(f"  ... and {len(arrived) - _LISTED_ON_TIMEOUT} more")
        kind = "spans" if signal == "traces" else "metric points"
        return (
            f"{type(self).__name__} at {self.endpoint}: timed out after {timeout}s waiting for {wanted}; "
            f"{len(arrived)} {kind} arrived in {self.attempts(signal)} export call(s)"
            + (":\n" + "\n".join(lines) if lines else "")
        )

    # -- what the transports call ------------------------------------------------------------------

    def _admit(self, signal: Signal) -> FailT | None:
        """Count the attempt, sit out ``delay``, then say which failure to answer with (None: accept)."""
        with self._lock:
            self._attempts[signal] += 1
        if self.delay > 0:
            self._stopping.wait(self.delay)
        with self._lock:
            failure = self.fail_with
            if failure is None:
                return None
            if self.fail_times is not None:
                if self.fail_times <= 0:
                    return None
                self.fail_times -= 1
            return failure

    def _store(self, request: ExportRequest, headers: dict[str, str]) -> None:
        with self._arrived:
            self._received.append((request, headers))
            self._arrived.notify_all()


def _wanted(
    want: int | str | Callable[[ItemT], bool], count: int | None, noun: str
) -> tuple[Callable[[ItemT], bool], int, str]:
    """Normalise a ``wait_for_*`` request into (predicate, how many, description for the failure)."""
    if isinstance(want, int):
        if count is not None:
            raise ValueError("give either a number to wait for or count=, not both")
        return (lambda _: True), want, f"{want} {noun}(s)"
    needed = 1 if count is None else count
    if isinstance(want, str):
        name = want
        return (
            (lambda item: getattr(item, "name", None) == name),
            needed,
            f"{needed} {noun}(s) named {name!r}",
        )
    label = getattr(want, "__qualname__", repr(want))
    return want, needed, f"{needed} {noun}(s) matching {label}"


# --------------------------------------------------------------------------------------------------------
# gRPC


class _GrpcServicer(TraceServiceServicer, MetricsServiceServicer, LogsServiceServicer):
    """One object serves all three services; each Export is told apart by its request type."""

    _SIGNALS: dict[type[Message], tuple[Signal, type[Message]]] = {
        ExportTraceServiceRequest: ("traces", ExportTraceServiceResponse),
        ExportMetricsServiceRequest: ("metrics", ExportMetricsServiceResponse),
        ExportLogsServiceRequest: ("logs", ExportLogsServiceResponse),
    }

    def __init__(self, receiver: OtlpGrpcReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: ExportRequest, context: grpc.ServicerContext) -> Message:
        signal, response_type = self._SIGNALS[type(request)]
        failure = self._receiver._admit(signal)
        if failure is not None:
            if self._receiver.retry_after is not None:
                seconds = self._receiver.retry_after
                info = RetryInfo()
                info.retry_delay.FromNanoseconds(round(seconds * 1e9))
                context.set_trailing_metadata((("google.rpc.retryinfo-bin", info.SerializeToString()),))
            context.abort(failure, "otlp test receiver failing on purpose")
        headers = {key.lower(): str(value) for key, value in context.invocation_metadata()}
        self._receiver._store(request, headers)
        return response_type()


class OtlpGrpcReceiver(OtlpReceiver[grpc.StatusCode]):
    """An OTLP/gRPC collector on ``127.0.0.1`` and a free port: traces, metrics and logs services.

    Give ``endpoint`` to a gRPC exporter (``insecure=True``, or implied by the ``http://`` scheme).
    ``fail_with`` takes a ``grpc.StatusCode``, e.g. ``UNAVAILABLE`` (retried by the Python exporter) or
    ``INVALID_ARGUMENT`` (not retried).
    """

    def __init__(self) -> None:
        super().__init__()
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """The port the receiver listens on (chosen by the OS)."""
        return self._port

    def _start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="otlp-grpc-receiver")
        self._server = grpc.server(self._executor)
        servicer = _GrpcServicer(self)
        add_TraceServiceServicer_to_server(servicer, self._server)
        add_MetricsServiceServicer_to_server(servicer, self._server)
        add_LogsServiceServicer_to_server(servicer, self._server)
        self._port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        if self._executor is not None:
            # grpc.server does not own the pool it was given, so its threads are ours to end
            self._executor.shutdown(wait=True)
            self._executor = None


# --------------------------------------------------------------------------------------------------------
# HTTP/protobuf


_HTTP_SIGNALS: dict[str, tuple[Signal, type[Message], type[Message]]] = {
    "/v1/traces": ("traces", ExportTraceServiceRequest, ExportTraceServiceResponse),
    "/v1/metrics": ("metrics", ExportMetricsServiceRequest, ExportMetricsServiceResponse),
    "/v1/logs": ("logs", ExportLogsServiceRequest, ExportLogsServiceResponse),
}


class _HttpServer(ThreadingHTTPServer):
    # Handler threads are joined on close (not daemons) so stop() leaves no socket behind; ``delay`` is
    # interruptible and each request gets its own connection (HTTP/1.0), so joining is prompt.
    daemon_threads = False
    block_on_close = True

    def __init__(self, receiver: OtlpHttpReceiver) -> None:
        super().__init__(("127.0.0.1", 0), _HttpHandler)
        self.receiver = receiver


class _HttpHandler(BaseHTTPRequestHandler):
    server: _HttpServer
    timeout = 5.0  # a client that connects and never sends must not hang stop()

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if length is None:
            return self._answer(411, b"")
        body = self.rfile.read(int(length))  # read even what is refused, so the client sees the answer
        route = _HTTP_SIGNALS.get(self.path.split("?", 1)[0])
        if route is None:
            return self._answer(404, b"")
        signal, request_type, response_type = route
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/x-protobuf":  # the Python exporters never send OTLP/JSON
            return self._answer(415, b"")
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding != "identity":
                return self._answer(415, b"")
            request = request_type.FromString(body)
        except (OSError, EOFError, zlib.error, DecodeError) as error:
            return self._answer(400, RpcStatus(message=f"undecodable body: {error}").SerializeToString())

        receiver = self.server.receiver
        failure = receiver._admit(signal)
        if failure is not None:
            extra = {}
            if receiver.retry_after is not None:
                # Retry-After is integer seconds by RFC; the Python exporter also takes fractions
                extra["Retry-After"] = f"{receiver.retry_after:g}"
            status = RpcStatus(message="otlp test receiver failing on purpose")
            return self._answer(failure, status.SerializeToString(), extra)
        receiver._store(request, {k.lower(): v for k, v in self.headers.items()})
        return self._answer(200, response_type().SerializeToString())

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the exporter gave up (its timeout beat ``delay``): nothing left to tell it

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output about the test, not about every export


class OtlpHttpReceiver(OtlpReceiver[int]):
    """An OTLP/HTTP (protobuf) collector on ``127.0.0.1`` and a free port.

    Accepts ``POST /v1/traces``, ``/v1/metrics`` and ``/v1/logs`` with ``application/x-protobuf`` bodies,
    plain, gzip or deflate. ``endpoint`` is the base URL (what ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes); give
    a per-signal exporter ``f"{endpoint}/v1/traces"``. ``fail_with`` takes an HTTP status: 429, 502, 503
    and 504 are retried by the Python exporter, others are not.
    """

    def __init__(self) -> None:
        super().__init__()
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """The port the receiver listens on (chosen by the OS)."""
        return self._port

    def _start(self) -> None:
        self._server = _HttpServer(self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, name="otlp-http-receiver"
        )
        self._thread.start()

    def _stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
