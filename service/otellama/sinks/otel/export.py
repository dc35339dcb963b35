"""Export: the OTLP exporters built from the standard ``OTEL_*`` variables, counted when they fail, and the
service's resource. Shared by live export and ``otellama replay``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otellama import __version__
from otellama.settings import otel_flag

log = logging.getLogger(__name__)


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


def disabled(environ: Mapping[str, str]) -> bool:
    """``OTEL_SDK_DISABLED``, read as the SDK reads it: only ``true`` (any case) disables."""
    return otel_flag(environ, "OTEL_SDK_DISABLED")


def otlp_protocol(environ: Mapping[str, str], signal: str) -> str | None:
    """The OTLP protocol for ``signal`` (traces, metrics), or None when no endpoint is configured.

    Export is on only when an endpoint is set, so a laptop without a collector gets no error spam. The
    SDK reads ``OTEL_EXPORTER_OTLP_PROTOCOL`` only in its auto-configuration; we build exporters ourselves,
    so it is honoured here. The default is the spec's, ``http/protobuf``.
    """
    upper = signal.upper()
    if disabled(environ):
        return None
    if _env(environ, f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT") is None:
        return None
    return (
        _env(environ, f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )


#: The exporter names ``OTEL_TRACES_EXPORTER`` and ``OTEL_METRICS_EXPORTER`` may list (the SDK's, less
#: ``prometheus``: otellama's Prometheus text is always on ``/otellama/metrics``).
EXPORTER_NAMES: Final = ("otlp", "console", "none")


def selected_exporters(environ: Mapping[str, str], signal: str) -> tuple[str, ...]:
    """The exporters chosen for ``signal`` (traces, metrics): ``otlp`` and/or ``console``, or none.

    ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER`` as the SDK documents them: a comma-separated list of
    ``otlp``, ``console``, ``none`` (``none`` wins). Unset, otellama keeps its promise that a laptop without a
    collector gets no error spam: ``otlp`` only when an OTLP endpoint is configured. ``OTEL_SDK_DISABLED``
    turns every exporter off. Unknown names are logged and ignored.
    """
    if disabled(environ):
        return ()
    raw = environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if not raw:
        return ("otlp",) if otlp_protocol(environ, signal) is not None else ()
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if "none" in names:
        return ()
    for name in names:
        if name not in EXPORTER_NAMES:
            log.warning(
                "OTEL_%s_EXPORTER: %r is not supported (otlp, console, none); ignored", signal.upper(), name
            )
    return tuple(dict.fromkeys(name for name in names if name in ("otlp", "console")))


def configured_protocol(environ: Mapping[str, str], signal: str) -> str:
    """The OTLP protocol for ``signal`` whether or not an endpoint is set (the exporter's default then)."""
    upper = signal.upper()
    return (
        _env(environ, f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )


def span_exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` selects (see :func:`selected_exporters`)."""
    found: list[SpanExporter] = []
    for name in selected_exporters(environ, "traces"):
        if name == "otlp":
            found.append(span_exporter(configured_protocol(environ, "traces")))
        else:
            import sys

            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            # stderr: the exporter process's stdout carries its status to the proxy.
            found.append(ConsoleSpanExporter(out=sys.stderr))
    return found


def metric_exporters(environ: Mapping[str, str]) -> list[MetricExporter]:
    """The metric exporters ``OTEL_METRICS_EXPORTER`` selects (see :func:`selected_exporters`)."""
    found: list[MetricExporter] = []
    for name in selected_exporters(environ, "metrics"):
        if name == "otlp":
            found.append(metric_exporter(configured_protocol(environ, "metrics")))
        else:
            import sys

            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            found.append(ConsoleMetricExporter(out=sys.stderr))
    return found


class SdkExportLines(logging.Filter):
    """Holds back the SDK exporters' warnings and errors, keeping the latest for otellama's own complaint.

    The README promises that a failing collector is logged at most once a minute, whoever logs it. The
    SDK's exporters log every failed attempt (and retry); otellama logs one line a minute that says what
    to check, and with this filter that line carries the SDK's latest reason (:meth:`latest`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._latest: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        self._latest = record.getMessage()[:500]
        return False

    def latest(self) -> str:
        """``": <the SDK's latest failure line>"``, or nothing if it logged none."""
        return f": {self._latest}" if self._latest else ""


#: The loggers of the SDK's exporters and export helpers (:func:`quiet_sdk_exporters` holds their lines).
SDK_EXPORT_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.sdk.metrics._internal.export",
    "opentelemetry.sdk._shared_internal",
)
_SDK_LINES = SdkExportLines()


def quiet_sdk_exporters() -> SdkExportLines:
    """Put the one :class:`SdkExportLines` filter on each of :data:`SDK_EXPORT_LOGGERS`; return it."""
    for name in SDK_EXPORT_LOGGERS:
        logger = logging.getLogger(name)
        if _SDK_LINES not in logger.filters:
            logger.addFilter(_SDK_LINES)
    return _SDK_LINES


def span_exporter(protocol: str, endpoint: str | None = None) -> SpanExporter:
    """The OTLP span exporter for ``protocol`` (``grpc`` or ``http/protobuf``), as live export and replay use.

    The exporters read endpoint, headers, timeout, compression and certificates from the standard
    variables themselves (and append ``/v1/traces`` to a base endpoint over HTTP, as users expect);
    ``endpoint``, a base URL like ``OTEL_EXPORTER_OTLP_ENDPOINT``, overrides the configured one.
    """
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans

        return GrpcSpans() if endpoint is None else GrpcSpans(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

    return HttpSpans() if endpoint is None else HttpSpans(endpoint=endpoint.rstrip("/") + "/v1/traces")


def metric_exporter(protocol: str) -> MetricExporter:
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
    created = Resource.create(attributes)
    return _HashedOnce(created.attributes, created.schema_url)


class _HashedOnce(Resource):
    """A resource that hashes once. The SDK's OTLP encoders group every span by its resource, and a
    Resource hashes by dumping its attributes to JSON each time: ~8 us a span, a quarter of the encoding's
    CPU in the exporter process (BENCHMARKS.md). Its attributes cannot change, so neither can the hash."""

    def __init__(self, attributes: Mapping[str, Any], schema_url: str | None = None) -> None:
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash
