"""Explicit-bucket histograms that otellama aggregates itself and hands to the SDK's metric readers.

One exchange records up to 13 histograms. Through the SDK each record costs ~8 µs per metric reader: it
copies and validates the attributes, hashes them into a frozenset and consults the exemplar filter. With the
Prometheus and OTLP readers that is ~200 µs an exchange, most of telemetry's budget. Here a record is a
bisect, one dict lookup on an attribute tuple and a few additions per reader, and each reader still gets the
data points the SDK would have built: cumulative or delta as the reader prefers, count, sum, min and max,
and, when exemplars are on, the last sampled measurement per bucket with its trace and span ids (what the
SDK's aligned-bucket reservoir keeps).

The points reach the readers through ``MetricReader._set_collect_callback``, the hook the SDK's
MeterProvider registers itself with: :meth:`Histograms.attach` wraps the provider's callback and adds these
histograms to what the SDK collected for the other instruments. It is an SDK-internal hook, so
``tests/test_histograms.py`` checks the result against the SDK's own aggregation of the same measurements;
an SDK release that changes the hook fails there, not in production.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otellama.semconv import Metric as MetricSpec

#: A data point's attributes as a tuple of (key, value) pairs: hashable, built once per exchange.
Key: TypeAlias = tuple[tuple[str, Any], ...]
#: The sampled span a measurement belongs to, as (trace id, span id): it becomes the bucket's exemplar.
SpanRef: TypeAlias = tuple[int, int]
_Collect: TypeAlias = Callable[..., MetricsData | None]


class _Point:
    """One attribute set's running aggregate, for one reader."""

    __slots__ = ("count", "counts", "exemplars", "max", "min", "start", "sum")

    def __init__(self, buckets: int, start: int) -> None:
        self.counts = [0] * buckets
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.start = start
        #: bucket index -> (value, time, trace id, span id) of the last sampled measurement in it
        self.exemplars: dict[int, tuple[float, int, int, int]] = {}


class _Store:
    """A reader's view: cumulative points live forever, delta points are handed over and forgotten."""

    __slots__ = ("delta", "points", "since")

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.points: dict[tuple[int, Key], _Point] = {}
        self.since = time.time_ns()  # start of the current delta interval


class Histograms:
    """Every histogram of one meter, aggregated here, collected by every attached reader."""

    def __init__(self, resource: Resource, scope: InstrumentationScope, *, exemplars: bool) -> None:
        self.resource, self.scope, self.exemplars = resource, scope, exemplars
        self._specs: list[MetricSpec] = []
        self._bounds: list[tuple[float, ...]] = []
        self._stores: dict[MetricReader, _Store] = {}
        self._lock = threading.Lock()

    def histogram(self, spec: MetricSpec) -> Histogram:
        """The instrument for ``spec``, whose ``buckets`` are its explicit bucket boundaries."""
        self._specs.append(spec)
        self._bounds.append(tuple(spec.buckets or ()))
        return Histogram(self, len(self._specs) - 1)

    def attach(self, reader: MetricReader) -> None:
        """Make ``reader`` collect these histograms too. Call after its MeterProvider registered it."""
        # The SDK annotates this callback as taking a temporality; it is called with a timeout (as below).
        original: _Collect | None = reader._collect  # type: ignore[assignment]
        if original is None:
            raise ValueError("attach a reader after its MeterProvider was created")
        temporality = next(
            (t for cls, t in reader._instrument_class_temporality.items() if issubclass(cls, SdkHistogram)),
            AggregationTemporality.CUMULATIVE,
        )
        with self._lock:
            self._stores[reader] = _Store(delta=temporality is AggregationTemporality.DELTA)

        def collect(reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
            return self._merge(original(reader, timeout_millis=timeout_millis), self.collect(reader))

        reader._set_collect_callback(collect)  # type: ignore[arg-type]

    def record(self, index: int, value: float, key: Key, span: SpanRef | None) -> None:
        if not (value >= 0.0 and value != math.inf):  # also false for NaN; the SDK drops these too
            return
        bucket = bisect_left(self._bounds[index], value)
        point_key = (index, key)
        with self._lock:
            for store in self._stores.values():
                point = store.points.get(point_key)
                if point is None:
                    point = store.points[point_key] = _Point(len(self._bounds[index]) + 1, store.since)
                point.counts[bucket] += 1
                point.count += 1
                point.sum += value
                if value < point.min:
                    point.min = value
                if value > point.max:
                    point.max = value
                if span is not None and self.exemplars:
                    point.exemplars[bucket] = (value, time.time_ns(), span[0], span[1])

    def collect(self, reader: MetricReader) -> list[Metric]:
        """The reader's histograms now; a delta reader's points start over."""
        now = time.time_ns()
        with self._lock:
            store = self._stores.get(reader)
            if store is None:
                return []
            taken = [
                (index, key, point, list(point.counts), dict(point.exemplars))
                for (index, key), point in store.points.items()
            ]
            for _, _, point, _, _ in taken:
                point.exemplars.clear()  # like the SDK's reservoirs: each collection gets fresh ones
            if store.delta:
                start, store.points, store.since = store.since, {}, now
        temporality = AggregationTemporality.DELTA if store.delta else AggregationTemporality.CUMULATIVE
        by_index: dict[int, list[HistogramDataPoint]] = {}
        for index, key, point, counts, exemplars in taken:
            by_index.setdefault(index, []).append(
                HistogramDataPoint(
                    attributes=dict(key),
                    start_time_unix_nano=start if store.delta else point.start,
                    time_unix_nano=now,
                    count=point.count,
                    sum=point.sum,
                    bucket_counts=counts,
                    explicit_bounds=self._bounds[index],
                    min=point.min,
                    max=point.max,
                    exemplars=[
                        Exemplar(None, value, at, span_id=span_id, trace_id=trace_id)
                        for value, at, trace_id, span_id in exemplars.values()
                    ],
                )
            )
        return [
            Metric(
                name=self._specs[index].name,
                description=self._specs[index].description,
                unit=self._specs[index].unit,
                data=HistogramData(data_points=points, aggregation_temporality=temporality),
            )
            for index, points in sorted(by_index.items())
        ]

    def _merge(self, data: MetricsData | None, ours: list[Metric]) -> MetricsData | None:
        if not ours:
            return data
        if data is None or not data.resource_metrics:
            scope = ScopeMetrics(self.scope, ours, self.scope.schema_url or "")
            return MetricsData([ResourceMetrics(self.resource, [scope], self.resource.schema_url)])
        first, *others = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, scoped in enumerate(scopes):
            if scoped.scope == self.scope:
                scopes[i] = ScopeMetrics(scoped.scope, [*scoped.metrics, *ours], scoped.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(self.scope, ours, self.scope.schema_url or ""))
        return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *others])


class Histogram:
    """One histogram: :meth:`record` a value for an attribute set, optionally from a sampled span."""

    __slots__ = ("_index", "_owner")

    def __init__(self, owner: Histograms, index: int) -> None:
        self._owner, self._index = owner, index

    def record(self, value: float, key: Key, span: SpanRef | None = None) -> None:
        self._owner.record(self._index, value, key, span)


def key_of(attributes: dict[str, Any]) -> Key:
    """The hashable form of a data point's attributes."""
    return tuple(attributes.items())


__all__: Sequence[str] = ("Histogram", "Histograms", "Key", "SpanRef", "key_of")
