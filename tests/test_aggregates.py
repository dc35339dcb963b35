"""otellama's own aggregation gives readers what the SDK's would, for the same measurements."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    Counter,
    Histogram,
    MeterProvider,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otellama.sinks.otel import semconv
from otellama.sinks.otel.aggregates import Aggregates, key_of

SCOPE = InstrumentationScope("otellama", "test")
RESOURCE = Resource.create({"service.name": "test"})
SPEC = semconv.CLIENT_OPERATION_DURATION  # spec buckets: 0.01 ... 81.92 s


def reader(temporality: AggregationTemporality) -> InMemoryMetricReader:
    kinds = (Histogram, Counter, UpDownCounter)
    return InMemoryMetricReader(preferred_temporality=dict.fromkeys(kinds, temporality))


def metrics(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    if data is None:
        return {}
    return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def points(metric: Metric) -> dict[tuple[tuple[str, Any], ...], HistogramDataPoint]:
    return {tuple(sorted((p.attributes or {}).items())): p for p in metric.data.data_points}  # type: ignore[union-attr]


def twins(temporality: AggregationTemporality) -> tuple[Callable[[float, dict[str, str]], None], Any, Any]:
    """The same measurements into the SDK's histogram and into ours, each read by its own reader."""
    sdk_reader, our_reader = reader(temporality), reader(temporality)
    sdk = MeterProvider(metric_readers=[sdk_reader], exemplar_filter=AlwaysOffExemplarFilter())
    sdk_histogram = sdk.get_meter("otellama").create_histogram(
        SPEC.name, unit=SPEC.unit, explicit_bucket_boundaries_advisory=list(SPEC.buckets or ())
    )
    MeterProvider(metric_readers=[our_reader], resource=RESOURCE)
    ours = Aggregates(RESOURCE, SCOPE, exemplars=False)
    ours.attach(our_reader)
    our_histogram = ours.histogram(SPEC)

    def record(value: float, attributes: dict[str, str]) -> None:
        sdk_histogram.record(value, attributes)
        our_histogram.record(value, key_of(attributes))

    return record, sdk_reader, our_reader


def assert_same(sdk_reader: InMemoryMetricReader, our_reader: InMemoryMetricReader) -> int:
    sdk, ours = metrics(sdk_reader), metrics(our_reader)
    assert set(ours) == set(sdk)
    if not sdk:
        return 0
    expected, got = points(sdk[SPEC.name]), points(ours[SPEC.name])
    assert got.keys() == expected.keys()
    for attributes, want in expected.items():
        have = got[attributes]
        assert (have.count, have.bucket_counts, list(have.explicit_bounds)) == (
            want.count,
            list(want.bucket_counts),
            list(want.explicit_bounds),
        ), attributes
        assert math.isclose(have.sum, want.sum) and (have.min, have.max) == (want.min, want.max)
    assert ours[SPEC.name].data.aggregation_temporality == sdk[SPEC.name].data.aggregation_temporality  # type: ignore[union-attr]
    assert (ours[SPEC.name].unit, ours[SPEC.name].description) == (SPEC.unit, SPEC.description)
    return sum(p.count for p in got.values())


@pytest.mark.parametrize("temporality", [AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA])
def test_points_match_the_sdks_over_several_collections(temporality: AggregationTemporality) -> None:
    record, sdk_reader, our_reader = twins(temporality)
    draw = random.Random(7)
    models = ["llama3.2:3b", "qwen3:8b", "other"]
    bounds = list(SPEC.buckets or ())
    for collection in range(3):
        for _ in range(500):
            # On-boundary values test the bucket edges: (b[i-1], b[i]] is upper-inclusive.
            value = draw.choice(bounds) if draw.random() < 0.2 else draw.expovariate(0.5)
            record(value, {"gen_ai.request.model": draw.choice(models), "outcome": "ok"})
        counted = assert_same(sdk_reader, our_reader)
        delta = temporality is AggregationTemporality.DELTA
        assert counted == (500 if delta else 500 * (collection + 1))
    # A delta interval with no measurements has no points at all, like the SDK's.
    assert assert_same(sdk_reader, our_reader) == (0 if delta else 1500)


def test_values_the_sdk_drops_are_dropped() -> None:
    record, sdk_reader, our_reader = twins(AggregationTemporality.CUMULATIVE)
    for value in (-1.0, math.nan, math.inf, 0.0, 3.0):
        record(value, {"outcome": "ok"})
    assert assert_same(sdk_reader, our_reader) == 2


def test_exemplars_keep_the_last_sampled_measurement_per_bucket() -> None:
    our_reader = reader(AggregationTemporality.CUMULATIVE)
    MeterProvider(metric_readers=[our_reader])
    histograms = Aggregates(RESOURCE, SCOPE, exemplars=True)
    histograms.attach(our_reader)
    histogram = histograms.histogram(SPEC)
    key = key_of({"outcome": "ok"})
    histogram.record(0.5, key, (1, 11))
    histogram.record(0.6, key, (2, 22))  # same bucket (0.32, 0.64]: replaces the first
    histogram.record(5.0, key, (3, 33))
    histogram.record(5.1, key)  # no sampled span: counted, no exemplar
    [point] = points(metrics(our_reader)[SPEC.name]).values()
    assert point.count == 4
    assert sorted((e.value, e.trace_id, e.span_id) for e in point.exemplars) == [(0.6, 2, 22), (5.0, 3, 33)]
    # Each collection gets the exemplars since the last one, as the SDK's reservoirs do.
    [point] = points(metrics(our_reader)[SPEC.name]).values()
    assert point.count == 4 and not point.exemplars


def test_without_exemplars_none_are_kept() -> None:
    our_reader = reader(AggregationTemporality.CUMULATIVE)
    MeterProvider(metric_readers=[our_reader])
    histograms = Aggregates(RESOURCE, SCOPE, exemplars=False)
    histograms.attach(our_reader)
    histograms.histogram(SPEC).record(0.5, key_of({"outcome": "ok"}), (1, 11))
    [point] = points(metrics(our_reader)[SPEC.name]).values()
    assert point.exemplars == []


def test_histograms_join_the_sdks_instruments_in_one_scope() -> None:
    our_reader = reader(AggregationTemporality.CUMULATIVE)
    provider = MeterProvider(metric_readers=[our_reader], resource=RESOURCE)
    histograms = Aggregates(RESOURCE, SCOPE, exemplars=False)
    histograms.attach(our_reader)
    provider.get_meter(SCOPE.name, SCOPE.version).create_counter("requests").add(1)
    histograms.histogram(SPEC).record(1.0, key_of({"outcome": "ok"}))
    data = our_reader.get_metrics_data()
    assert data is not None
    [resource_metrics] = data.resource_metrics
    assert resource_metrics.resource.attributes["service.name"] == "test"
    [scope] = resource_metrics.scope_metrics
    assert scope.scope.name == SCOPE.name
    assert sorted(m.name for m in scope.metrics) == sorted(["requests", SPEC.name])


def test_a_reader_must_belong_to_a_provider_first() -> None:
    with pytest.raises(ValueError, match="MeterProvider"):
        Aggregates(RESOURCE, SCOPE, exemplars=False).attach(InMemoryMetricReader())


@pytest.mark.parametrize("temporality", [AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA])
@pytest.mark.parametrize("monotonic", [True, False])
def test_counters_match_the_sdks(temporality: AggregationTemporality, monotonic: bool) -> None:
    spec = semconv.REQUESTS if monotonic else semconv.IN_FLIGHT
    sdk_reader, our_reader = reader(temporality), reader(temporality)
    meter = MeterProvider(metric_readers=[sdk_reader]).get_meter("otellama")
    create = meter.create_counter if monotonic else meter.create_up_down_counter
    sdk_counter = create(spec.name, unit=spec.unit, description=spec.description)
    MeterProvider(metric_readers=[our_reader])
    ours = Aggregates(RESOURCE, SCOPE, exemplars=False)
    ours.attach(our_reader)
    our_counter = ours.counter(spec, monotonic=monotonic)
    draw = random.Random(3)
    for _ in range(3):
        for _ in range(200):
            attributes = {"outcome": draw.choice(["ok", "error"])}
            amount = 1 if monotonic or draw.random() < 0.6 else -1
            sdk_counter.add(amount, attributes)
            our_counter.add(amount, key_of(attributes))
        sdk, got = metrics(sdk_reader)[spec.name], metrics(our_reader)[spec.name]
        assert (got.unit, got.description) == (sdk.unit, sdk.description)
        assert (got.data.is_monotonic, got.data.aggregation_temporality) == (  # type: ignore[union-attr]
            sdk.data.is_monotonic,  # type: ignore[union-attr]
            sdk.data.aggregation_temporality,  # type: ignore[union-attr]
        )
        values = {tuple(p.attributes.items()): p.value for p in got.data.data_points}  # type: ignore[union-attr]
        want = {tuple(p.attributes.items()): p.value for p in sdk.data.data_points}  # type: ignore[union-attr]
        assert values == want
