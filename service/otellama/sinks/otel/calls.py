"""The tracer opentelemetry-instrumentation-httpx is given when the exporter process renders the spans.

Issue 12 keeps the upstream call's span, made by that library. Under ``otellama serve`` the span only has
to reach its exchange's record (:class:`~otellama.observe.record.CallSpan`): the exporter process renders
and sends it with the record's other spans. An SDK span on the way costs the proxy ~40 us a call
(bounded attributes, locks, span processors, then copying it into the record) for nothing it needs, so
the library gets this API-level tracer instead. The library still decides the span's name, kind,
attributes and status and when it starts and ends; this tracer keeps exactly the fields the record carries
and puts the finished span aside until the record takes it.

Sampling follows the parent, the exchange's own context, sampled or not by the configured sampler when the
request arrived: an exchange that is not sampled gets a span that records nothing, and ``traceparent``
says so (as the SDK's default ParentBased sampler would).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes, AttributeValue

from otellama.observe.record import CallSpan

#: Finished spans kept for records that have not claimed them yet; beyond it the oldest is forgotten (an
#: exchange whose recorder never finished never claims its span).
KEPT: Final = 10_000


class CallTracerProvider(trace.TracerProvider):
    """Hands out tracers whose spans wait, finished, for their exchange's record (:meth:`pop`)."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[int, int], _CallSpan] = {}
        self._random = random.Random()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> trace.Tracer:
        return _CallTracer(self, instrumenting_module_name, instrumenting_library_version)

    def pop(self, trace_id: int, parent_span_id: int) -> CallSpan | None:
        """The finished call span whose parent is ``parent_span_id`` in trace ``trace_id``, if any."""
        span = self._waiting.pop((trace_id, parent_span_id), None)
        return None if span is None else span.call_span()

    def _ended(self, span: _CallSpan) -> None:
        waiting = self._waiting
        if len(waiting) >= KEPT:
            del waiting[next(iter(waiting))]
        waiting[(span.get_span_context().trace_id, span.parent_span_id)] = span


class _CallTracer(trace.Tracer):
    def __init__(self, provider: CallTracerProvider, scope_name: str, scope_version: str | None) -> None:
        self._provider = provider
        self._scope = (scope_name, scope_version)

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if not parent.is_valid:  # outside an exchange: nothing would claim the span
            return trace.INVALID_SPAN
        own = SpanContext(
            parent.trace_id,
            self._provider._random.getrandbits(64),
            is_remote=False,
            trace_flags=parent.trace_flags,
            trace_state=parent.trace_state,
        )
        if not parent.trace_flags.sampled:
            return NonRecordingSpan(own)
        return _CallSpan(self._provider, self._scope, name, kind, own, parent.span_id, attributes, start_time)

    # The API types this with its private _agnosticcontextmanager, a contextmanager that also decorates.
    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(span, end_on_exit, record_exception, set_status_on_exception) as current:
            yield current


class _CallSpan(trace.Span):
    """A recording span that keeps what a :class:`CallSpan` holds, as the SDK's span would have them."""

    def __init__(
        self,
        provider: CallTracerProvider,
        scope: tuple[str, str | None],
        name: str,
        kind: SpanKind,
        context: SpanContext,
        parent_span_id: int,
        attributes: Attributes,
        start_time: int | None,
    ) -> None:
        self._provider, self._scope, self._name, self._kind = provider, scope, name, kind
        self._context, self.parent_span_id = context, parent_span_id
        self._attributes: dict[str, Any] = {}
        self._status = Status(StatusCode.UNSET)
        self._start = start_time if start_time is not None else time.time_ns()
        self._end = 0
        self._ended = False
        if attributes:
            self.set_attributes(attributes)

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._ended or not isinstance(key, str) or not key:
            return
        if isinstance(value, str | bool | int | float):
            self._attributes[key] = value
        elif isinstance(value, Sequence) and all(
            isinstance(item, str | bool | int | float) for item in value
        ):
            self._attributes[key] = list(value)
        # Anything else is no attribute value: the SDK drops it too (with a warning).

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: OK is final, UNSET changes nothing, a description only goes with ERROR.
        if self._ended or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        """Events do not travel in the record."""

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """An exception is an event: it does not travel in the record. The status says the call failed."""

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._end = end_time if end_time is not None else time.time_ns()
        # Put aside as it is: the record's CallSpan is made when the record takes it, after the last byte,
        # not here, where the call ends as Ollama's response headers arrive (on the request path).
        self._provider._ended(self)

    def call_span(self) -> CallSpan:
        """The finished span as the record carries it."""
        name, version = self._scope
        status = self._status
        return CallSpan(
            span_id=self._context.span_id,
            parent_span_id=self.parent_span_id,
            name=self._name,
            kind=self._kind.name,
            start_ns=self._start,
            end_ns=self._end,
            attributes=self._attributes,
            status=status.status_code.name,
            status_description=status.description,
            scope_name=name,
            scope_version=version,
        )
