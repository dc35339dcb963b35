"""The OpenTelemetry sink: spans and metrics rendered from a record, and their export.

``semconv`` names every attribute, metric and span; ``spans`` renders a record's spans; ``metrics`` records
its measurements, aggregated by ``aggregates``; ``export`` builds the OTLP exporters and the bounded
export queue; ``calls`` is the tracer the upstream call's span is made with when another process exports
it; ``sink`` puts them together behind the sink interface.

May import what :mod:`otellama.sinks` may. In the server, only these modules and :mod:`otellama.app` import
OpenTelemetry: the app wraps the upstream client in opentelemetry-instrumentation-httpx when asked, and
passes a caller's tracer provider and metric readers through to :mod:`~otellama.sinks.otel.sink`.
"""
