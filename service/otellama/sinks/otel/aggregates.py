"""The metrics recorded for every exchange, aggregated by otellama and handed to the SDK's metric readers.

One exchange records up to 13 histograms and two or three counters. Through the SDK each record costs ~8 µs
per metric reader: it copies and validates the attributes, hashes them into a frozenset and consults the
exemplar filter. With the Prometheus and OTLP readers that comes to ~200 µs an exchange, most of telemetry's
budget (and the in-flight counter sits on the request path). Here a record is one dict lookup on an
attribute tuple and a few additions per reader, and each reader still gets the data points the SDK would
have built: cumulative or delta as the reader prefers for each kind of instrument; count, sum, min, max and
buckets for histograms; and, when exemplars are on, the last sampled measurement per bucket with its trace
and span ids (what the SDK's aligned-bucket reservoir keeps). Rare instruments (export and log failures)
stay ordinary SDK instruments.

The points reach the readers through ``MetricReader._set_collect_callback``, the hook the SDK's
MeterProvider registers itself with: :meth:`Aggregates.attach` wraps the provider's callback and adds these
metrics to what the SDK collected for its own instruments. It is an SDK-internal hook, so
``tests/test_aggregates.py`` checks the result against the SDK's own aggregation of the same measurements;
an SDK release that changes the hook fails there, and ``tests/test_internals.py`` names the change.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, TypeAlias

from opentelemetry.sdk.metrics import Counter as SdkCounter
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import UpDownCounter as SdkUpDownCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otellama.sinks.otel.semconv import Metric as MetricSpec

#: A data point's attributes as a tuple of (key, value) pairs: hashable, built once per exchange.
Key: TypeAlias = tuple[tuple[str, Any], ...]
#: The sampled span a measurement belongs to, as (trace id, span id): it becomes the bucket's exemplar.
SpanRef: TypeAlias = tuple[int, int]
_Collect: TypeAlias = Callable[..., MetricsData | None]
_KINDS: tuple[type, ...] = (SdkHistogram, SdkCounter, SdkUpDownCounter)


class _HistogramPoint:
    """One attribute set's running histogram, for one reader."""

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


class _SumPoint:
    __slots__ = ("start", "value")

    def __init__(self, start: int) -> None:
        self.value = 0
        self.start = start


class _Store:
    """A reader's points. Those of its delta instruments are handed over at collection and forgotten."""

    __slots__ = ("delta", "points", "since")

    def __init__(self, delta: frozenset[type]) -> None:
        self.delta = delta  # the SDK instrument classes this reader wants as deltas
        self.points: dict[tuple[int, Key], Any] = {}
        self.since = time.time_ns()  # the last collection: start of the current delta interval


class _Instrument:
    __slots__ = ("bounds", "index", "kind", "owner", "spec")

    def __init__(self, owner: Aggregates, index: int, spec: MetricSpec, kind: type) -> None:
        self.owner, self.index, self.spec, self.kind = owner, index, spec, kind
        self.bounds = tuple(spec.buckets or ())


class Histogram(_Instrument):
    """Explicit-bucket histogram with the boundaries of its spec's ``buckets``."""

    __slots__ = ()

    def record(self, value: float, key: Key, span: SpanRef | None = None) -> None:
        if not (value >= 0.0 and value != math.inf):  # also false for NaN; the SDK drops these too
            return
        bucket = bisect_left(self.bounds, value)  # buckets are (b[i-1], b[i]]: upper bound inclusive
        point_key = (self.index, key)
        owner = self.owner
        with owner.lock:
            for store in owner.stores.values():
                point = store.points.get(point_key)
                if point is None:
                    point = store.points[point_key] = _HistogramPoint(len(self.bounds) + 1, store.since)
                point.counts[bucket] += 1
                point.count += 1
                point.sum += value
                if value < point.min:
                    point.min = value
                if value > point.max:
                    point.max = value
                if span is not None and owner.exemplars:
                    point.exemplars[bucket] = (value, time.time_ns(), span[0], span[1])


class Counter(_Instrument):
    """A sum: monotonic (a counter) or not (an up-down counter)."""

    __slots__ = ()

    def add(self, amount: int, key: Key) -> None:
        point_key = (self.index, key)
        with self.owner.lock:
            for store in self.owner.stores.values():
                point = store.points.get(point_key)
                if point is None:
                    point = store.points[point_key] = _SumPoint(store.since)
                point.value += amount


class Aggregates:
    """The instruments of one meter, aggregated here and collected by every attached reader."""

    def __init__(self, resource: Resource, scope: InstrumentationScope, *, exemplars: bool) -> None:
        self.resource, self.scope, self.exemplars = resource, scope, exemplars
        self.instruments: list[_Instrument] = []
        self.stores: dict[MetricReader, _Store] = {}
        self.lock = threading.Lock()

    def histogram(self, spec: MetricSpec) -> Histogram:
        """A histogram whose ``spec.buckets`` are its explicit bucket boundaries."""
        instrument = Histogram(self, len(self.instruments), spec, SdkHistogram)
        self.instruments.append(instrument)
        return instrument

    def counter(self, spec: MetricSpec, *, monotonic: bool = True) -> Counter:
        """A counter, or an up-down counter when not ``monotonic``."""
        kind = SdkCounter if monotonic else SdkUpDownCounter
        instrument = Counter(self, len(self.instruments), spec, kind)
        self.instruments.append(instrument)
        return instrument

    def attach(self, reader: MetricReader) -> None:
        """Make ``reader`` collect these metrics too. Call after its MeterProvider registered it."""
        # The SDK annotates this callback as taking a temporality; it is called with a timeout (as below).
        original: _Collect | None = reader._collect  # type: ignore[assignment]
        if original is None:
            raise ValueError("attach a reader after its MeterProvider was created")
        preferred = reader._instrument_class_temporality
        delta = frozenset(
            kind
            for kind in _KINDS
            for cls, temporality in preferred.items()
            if issubclass(cls, kind) and temporality is AggregationTemporality.DELTA
        )
        with self.lock:
            self.stores[reader] = _Store(delta)

        def collect(reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
            return self._merge(original(reader, timeout_millis=timeout_millis), self.collect(reader))

        reader._set_collect_callback(collect)  # type: ignore[arg-type]

    def collect(self, reader: MetricReader) -> list[Metric]:
        """The reader's metrics now; the points of its delta instruments start over."""
        now = time.time_ns()
        taken: list[tuple[_Instrument, Key, Any]] = []
        with self.lock:
            store = self.stores.get(reader)
            if store is None:
                return []
            start, store.since = store.since, now
            for (index, key), point in list(store.points.items()):
                instrument = self.instruments[index]
                delta = instrument.kind in store.delta
                if isinstance(point, _HistogramPoint):
                    histogram = _histogram_point(point, key, instrument.bounds, start if delta else None, now)
                    taken.append((instrument, key, histogram))
                    point.exemplars.clear()  # like the SDK's reservoirs: each collection gets fresh ones
                else:
                    value = NumberDataPoint(dict(key), start if delta else point.start, now, point.value)
                    taken.append((instrument, key, value))
                if delta:
                    del store.points[(index, key)]
        by_instrument: dict[int, list[Any]] = {}
        for instrument, _, point in taken:
            by_instrument.setdefault(instrument.index, []).append(point)
        metrics = []
        for index, points in sorted(by_instrument.items()):
            instrument = self.instruments[index]
            temporality = (
                AggregationTemporality.DELTA
                if instrument.kind in store.delta
                else AggregationTemporality.CUMULATIVE
            )
            data: HistogramData | Sum
            if instrument.kind is SdkHistogram:
                data = HistogramData(data_points=points, aggregation_temporality=temporality)
            else:
                monotonic = instrument.kind is SdkCounter
                data = Sum(data_points=points, aggregation_temporality=temporality, is_monotonic=monotonic)
            spec = instrument.spec
            metrics.append(Metric(name=spec.name, description=spec.description, unit=spec.unit, data=data))
        return metrics

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


def _histogram_point(
    point: _HistogramPoint, key: Key, bounds: tuple[float, ...], delta_start: int | None, now: int
) -> HistogramDataPoint:
    return HistogramDataPoint(
        attributes=dict(key),
        start_time_unix_nano=point.start if delta_start is None else delta_start,
        time_unix_nano=now,
        count=point.count,
        sum=point.sum,
        bucket_counts=list(point.counts),
        explicit_bounds=bounds,
        min=point.min,
        max=point.max,
        exemplars=[
            Exemplar(None, value, at, span_id=span_id, trace_id=trace_id)
            for value, at, trace_id, span_id in point.exemplars.values()
        ],
    )


def key_of(attributes: dict[str, Any]) -> Key:
    """The hashable form of a data point's attributes."""
    return tuple(attributes.items())
