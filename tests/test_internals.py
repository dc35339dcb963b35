"""The upstream internals otellama builds on, one test each, so that an upgrade says which one it broke.

``proxy/connection.py`` subclasses uvicorn's ``HttpToolsProtocol`` and relies on its parser callbacks, its
flow control, its pipeline and its per-request cycle; ``sinks/otel/aggregates.py`` wraps the OpenTelemetry
SDK's private ``MetricReader`` collect hook; ``sinks/otel/export.py`` copies a ``MetricExporter``'s private
preferences. None of these is public API. tests/test_abuse.py and tests/test_aggregates.py show *that*
otellama misbehaves when one changes; these name *which* upstream piece moved, at which installed version,
against the version ``constraints.txt`` pins (the one everything was tested with). pyproject.toml's upper
bounds keep users off untested releases.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import time
from collections import deque
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, UpDownCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricsData,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from otellama.server import BackgroundServer

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def pinned(distribution: str) -> str:
    """The version constraints.txt pins ``distribution`` to."""
    for line in CONSTRAINTS.read_text().splitlines():
        name, _, pin = line.partition("==")
        if re.sub(r"[-_.]+", "-", name.strip().lower()) == distribution:
            return pin.strip()
    raise AssertionError(f"constraints.txt pins no {distribution}")


def broke(distribution: str, what: str, user: str) -> str:
    """The failure message: which upstream piece changed, in which release, and who relies on it."""
    installed, tested = version(distribution), pinned(distribution)
    if installed == tested:  # the pinned release itself misbehaves: a patched or broken install
        return f"{distribution} {installed} (the pinned version) no longer has {what}: reinstall it"
    return (
        f"{distribution} {installed} changed {what} (it held in {tested}, the version constraints.txt pins); "
        f"{user} relies on it. Adapt {user} to the new release before moving the pin or pyproject.toml's "
        "upper bound."
    )


UVICORN = "proxy/connection.py (GuardedProtocol)"
SDK = "sinks/otel/aggregates.py (Aggregates.attach)"


# --- uvicorn's HttpToolsProtocol ---------------------------------------------------------------------------
@dataclasses.dataclass
class Seen:
    """What a probe protocol saw of uvicorn's internals on one connection."""

    callbacks: list[str] = dataclasses.field(default_factory=list)
    flow_after_connection_made: object = None
    pipeline: object = None
    longest_pipeline: int = 0
    cycle_flows: list[bool] = dataclasses.field(default_factory=list)
    cycle_fields: dict[str, bool] = dataclasses.field(default_factory=dict)
    cycle_scope_is_protocols: list[bool] = dataclasses.field(default_factory=list)
    pipeline_after_response: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    resumed_in_response_complete: list[bool] = dataclasses.field(default_factory=list)
    should_upgrade: list[bool] = dataclasses.field(default_factory=list)


class _MarkedFlow(FlowControl):
    """A replacement flow control, as connection.py installs one, that notes when it is asked to resume."""

    resumes = 0

    def resume_reading(self) -> None:
        self.resumes += 1
        super().resume_reading()


def probe(seen: Seen) -> type[HttpToolsProtocol]:
    class Probe(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            seen.flow_after_connection_made = self.flow
            seen.pipeline = self.pipeline
            self.flow = _MarkedFlow(self.transport)  # what GuardedProtocol does

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            seen.longest_pipeline = max(seen.longest_pipeline, len(self.pipeline))

        def on_message_begin(self) -> None:
            seen.callbacks.append("on_message_begin")
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            seen.callbacks.append("on_url")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            seen.callbacks.append("on_header")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            seen.callbacks.append("on_headers_complete")
            super().on_headers_complete()
            cycle = self.cycle
            seen.cycle_flows.append(cycle.flow is self.flow)
            seen.cycle_scope_is_protocols.append(cycle.scope is self.scope)
            for field in ("response_started", "response_complete", "disconnected"):
                seen.cycle_fields[field] = isinstance(getattr(cycle, field, None), bool)
            seen.cycle_fields["message_event"] = isinstance(
                getattr(cycle, "message_event", None), asyncio.Event
            )
            seen.should_upgrade.append(self.parser.should_upgrade() is False)

        def on_body(self, body: bytes) -> None:
            seen.callbacks.append("on_body")
            super().on_body(body)

        def on_message_complete(self) -> None:
            seen.callbacks.append("on_message_complete")
            super().on_message_complete()

        def on_response_complete(self) -> None:
            seen.callbacks.append("on_response_complete")
            flow = self.flow
            before, resumes = len(self.pipeline), getattr(flow, "resumes", 0)
            super().on_response_complete()
            seen.pipeline_after_response.append((before, len(self.pipeline)))
            seen.resumed_in_response_complete.append(getattr(flow, "resumes", 0) > resumes)

    return Probe


async def _slow_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(0.05)  # long enough for the rest of a pipelined burst to be parsed and queued
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def seen() -> Iterator[Seen]:
    """Three pipelined requests, one with a body, over a real socket to a uvicorn running the probe."""
    observed = Seen()
    with BackgroundServer(_slow_app, http=probe(observed), lifespan="off") as server:
        request = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n"
        upload = b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(request + upload + request)
            answers = b""
            deadline = time.monotonic() + 10
            while answers.count(b"HTTP/1.1 200") < 3 and time.monotonic() < deadline:
                answers += client.recv(65536)
        assert answers.count(b"HTTP/1.1 200") == 3, answers
    yield observed


def test_uvicorn_calls_the_parser_callbacks_a_subclass_overrides(seen: Seen) -> None:
    expected = {
        "on_message_begin": 3,
        "on_url": 3,
        "on_header": 4,
        "on_headers_complete": 3,
        "on_body": 1,
        "on_message_complete": 3,
        "on_response_complete": 3,
    }
    counts = {name: seen.callbacks.count(name) for name in expected}
    assert counts == expected, broke("uvicorn", "which HttpToolsProtocol callbacks httptools calls", UVICORN)


def test_uvicorn_makes_a_flow_control_in_connection_made(seen: Seen) -> None:
    assert type(seen.flow_after_connection_made) is FlowControl, broke(
        "uvicorn", "HttpToolsProtocol.connection_made (no longer sets self.flow to a FlowControl)", UVICORN
    )


def test_uvicorn_hands_each_request_cycle_the_protocols_current_flow_control(seen: Seen) -> None:
    # GuardedProtocol swaps self.flow after connection_made; each RequestResponseCycle must get the swap.
    assert seen.cycle_flows == [True] * 3, broke(
        "uvicorn", "where RequestResponseCycle gets its flow (no longer HttpToolsProtocol.flow)", UVICORN
    )


def test_uvicorn_flow_control_pauses_and_resumes_the_transport() -> None:
    class Transport:
        paused = False

        def pause_reading(self) -> None:
            self.paused = True

        def resume_reading(self) -> None:
            self.paused = False

    transport = Transport()
    flow = FlowControl(transport)  # type: ignore[arg-type]
    flow.pause_reading()
    paused = (flow.read_paused, transport.paused)
    flow.resume_reading()
    assert (paused, (flow.read_paused, transport.paused)) == ((True, True), (False, False)), broke(
        "uvicorn", "FlowControl (pause_reading/resume_reading/read_paused)", UVICORN
    )


def test_uvicorn_queues_pipelined_requests_in_a_deque(seen: Seen) -> None:
    assert isinstance(seen.pipeline, deque) and seen.longest_pipeline >= 1, broke(
        "uvicorn", "HttpToolsProtocol.pipeline (the queue of pipelined requests)", UVICORN
    )


def test_uvicorn_request_cycles_keep_the_fields_connection_py_reads(seen: Seen) -> None:
    fields = {
        "response_started": True,
        "response_complete": True,
        "disconnected": True,
        "message_event": True,
    }
    assert seen.cycle_fields == fields and seen.cycle_scope_is_protocols == [True] * 3, broke(
        "uvicorn",
        "RequestResponseCycle's fields (response_started, response_complete, disconnected, "
        "message_event, scope)",
        UVICORN,
    )
    assert seen.should_upgrade == [True] * 3, broke("uvicorn", "HttpToolsProtocol.parser", UVICORN)


def test_uvicorn_resumes_reading_and_starts_the_next_request_on_response_complete(seen: Seen) -> None:
    # Each answer takes the next queued request off the pipeline, and asks the flow control to read again.
    shrank = [after == max(before - 1, 0) for before, after in seen.pipeline_after_response]
    assert shrank == [True] * 3 and any(before > 0 for before, _ in seen.pipeline_after_response), broke(
        "uvicorn", "HttpToolsProtocol.on_response_complete (taking the next pipelined request)", UVICORN
    )
    assert seen.resumed_in_response_complete == [True] * 3, broke(
        "uvicorn", "HttpToolsProtocol.on_response_complete (resuming reading through self.flow)", UVICORN
    )


# --- the OpenTelemetry SDK's MetricReader and MetricExporter ----------------------------------------------
def test_sdk_readers_collect_through_the_callback_their_provider_sets() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        original = getattr(reader, "_collect", None)
        assert callable(original), broke(
            "opentelemetry-sdk", "MetricReader._collect (the provider's collect callback)", SDK
        )
        calls: list[tuple[tuple[object, ...], dict[str, Any]]] = []
        replacement = MetricsData(resource_metrics=[])

        def collect(*args: object, **kwargs: Any) -> MetricsData:
            calls.append((args, kwargs))
            return replacement

        reader._set_collect_callback(collect)  # type: ignore[arg-type]
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    assert len(calls) == 1 and calls[0][0] == (reader,) and set(calls[0][1]) == {"timeout_millis"}, broke(
        "opentelemetry-sdk",
        "how MetricReader.collect calls its collect callback (reader, timeout_millis=)",
        SDK,
    )
    assert data is replacement, broke(
        "opentelemetry-sdk",
        "MetricReader.collect (no longer passes on what the collect callback returns)",
        SDK,
    )


def test_sdk_readers_keep_their_temporality_per_instrument_class() -> None:
    preferred = {Counter: AggregationTemporality.DELTA, Histogram: AggregationTemporality.DELTA}
    reader = InMemoryMetricReader(preferred_temporality=preferred)  # type: ignore[dict-item]
    by_class = getattr(reader, "_instrument_class_temporality", {})
    delta = {
        kind
        for kind in (Counter, Histogram, UpDownCounter)
        for cls, temporality in by_class.items()
        if issubclass(cls, kind) and temporality is AggregationTemporality.DELTA
    }
    assert delta == {Counter, Histogram}, broke(
        "opentelemetry-sdk", "MetricReader._instrument_class_temporality", SDK
    )


def test_sdk_exporters_keep_their_preferences_where_telemetry_py_copies_them() -> None:
    temporality = {Counter: AggregationTemporality.DELTA}
    aggregation = {Histogram: ExplicitBucketHistogramAggregation((1.0, 2.0))}
    exporter = ConsoleMetricExporter(
        preferred_temporality=temporality,  # type: ignore[arg-type]
        preferred_aggregation=aggregation,  # type: ignore[arg-type]
    )
    kept = (getattr(exporter, "_preferred_temporality", {}), getattr(exporter, "_preferred_aggregation", {}))
    assert (
        kept[0].get(Counter) is AggregationTemporality.DELTA
        and kept[1].get(Histogram) is aggregation[Histogram]
    ), broke(
        "opentelemetry-sdk",
        "MetricExporter._preferred_temporality/_preferred_aggregation",
        "sinks/otel/export.py (CountingMetricExporter)",
    )
