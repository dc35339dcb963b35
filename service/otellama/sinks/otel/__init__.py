"""The OpenTelemetry sink: spans and metrics rendered from a record, and their export.

``semconv`` names every attribute, metric and span; ``spans`` renders a record's spans; ``metrics`` records
its measurements, aggregated by ``aggregates``; ``export`` builds the OTLP exporters and the bounded
export queue; ``sink`` puts them together behind the sink interface.

May import what :mod:`otellama.sinks` may. These modules and :mod:`otellama.sinks.fanout` are the only
ones in the server that speak OpenTelemetry.
"""
