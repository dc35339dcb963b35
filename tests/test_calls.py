"""The upstream call's span, as opentelemetry-instrumentation-httpx makes it with otellama's call tracer: the
same span the SDK's tracer would have given the record, for less (otellama.sinks.otel.calls)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable

import httpx
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from otellama.observe.record import CallSpan
from otellama.sinks.otel import calls
from otellama.sinks.otel.calls import CallTracerProvider

TRACE_ID, PARENT_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331

Answer = Callable[[httpx.Request], httpx.Response]


class _Upstream(httpx.AsyncBaseTransport):
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.sent: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return self.answer(request)


class _Caught(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def call(provider: trace.TracerProvider, answer: Answer, sampled: bool = True) -> httpx.Request:
    """One upstream call through the instrumentation, inside an exchange's context; the request sent."""
    upstream = _Upstream(answer)
    parent = SpanContext(TRACE_ID, PARENT_ID, is_remote=False, trace_flags=TraceFlags(int(sampled)))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        transport = AsyncOpenTelemetryTransport(upstream, tracer_provider=provider)
        request = httpx.Request(
            "POST", "http://127.0.0.1:11434/api/chat", headers={"X-A": "1"}, content=b"{}"
        )
        with pytest.raises(httpx.ConnectError) if answer is refused else contextlib.nullcontext():
            asyncio.run(transport.handle_async_request(request))
    finally:
        otel_context.detach(token)
    return upstream.sent[0]


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"Content-Type": "application/x-ndjson"}, request=request)


def not_found(request: httpx.Request) -> httpx.Response:
    return httpx.Response(404, json={"error": "model 'x' not found"}, request=request)


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("All connection attempts failed", request=request)


def sdk_call_span(answer: Answer) -> tuple[CallSpan, httpx.Request]:
    """What the record carried when the SDK's tracer made the span (before otellama's call tracer)."""
    provider, caught = TracerProvider(), _Caught()
    provider.add_span_processor(caught)
    sent = call(provider, answer)
    (span,) = caught.spans
    assert span.context is not None and span.parent is not None
    assert span.start_time is not None and span.end_time is not None
    scope = span.instrumentation_scope
    assert scope is not None
    made = CallSpan(
        span_id=span.context.span_id,
        parent_span_id=span.parent.span_id,
        name=span.name,
        kind=span.kind.name,
        start_ns=span.start_time,
        end_ns=span.end_time,
        attributes=dict(span.attributes or {}),
        status=span.status.status_code.name,
        status_description=span.status.description,
        scope_name=scope.name,
        scope_version=scope.version,
    )
    return made, sent


@pytest.mark.parametrize("answer", [ok, not_found, refused], ids=["200", "404", "connect-error"])
def test_the_call_span_holds_what_the_sdks_span_held(answer: Answer) -> None:
    expected, _ = sdk_call_span(answer)
    provider = CallTracerProvider()
    sent = call(provider, answer)
    got = provider.pop(TRACE_ID, PARENT_ID)
    assert got is not None and provider.pop(TRACE_ID, PARENT_ID) is None
    # Ids and times are each span's own; everything the instrumentation decided is the same.
    assert dataclasses.replace(got, span_id=0, start_ns=0, end_ns=0) == dataclasses.replace(
        expected, span_id=0, start_ns=0, end_ns=0
    )
    assert got.parent_span_id == PARENT_ID and got.start_ns <= got.end_ns
    # Ollama is told the call span is the parent of what it does.
    assert sent.headers["traceparent"] == f"00-{TRACE_ID:032x}-{got.span_id:016x}-01"


def test_an_exchange_that_is_not_sampled_sends_its_decision_and_keeps_no_span() -> None:
    provider = CallTracerProvider()
    sent = call(provider, ok, sampled=False)
    trace_id, span_id, flags = sent.headers["traceparent"].split("-")[1:]
    assert (trace_id, flags) == (f"{TRACE_ID:032x}", "00") and int(span_id, 16) not in (0, PARENT_ID)
    assert provider.pop(TRACE_ID, PARENT_ID) is None


def test_spans_no_record_claims_are_forgotten_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls, "KEPT", 3)
    provider = CallTracerProvider()
    tracer = provider.get_tracer("t")
    for parent in range(1, 6):
        context = SpanContext(TRACE_ID, parent, is_remote=False, trace_flags=TraceFlags(1))
        with tracer.start_as_current_span(
            "POST", context=trace.set_span_in_context(NonRecordingSpan(context))
        ):
            pass
    kept = [provider.pop(TRACE_ID, parent) is not None for parent in range(1, 6)]
    assert kept == [False, False, True, True, True]
