"""A record's spans: the SERVER span of the request, the GenAI CLIENT span under it, one span per Ollama
phase.

:func:`render_spans` builds them finished, from the record alone, so live export and ``otellama replay``
render a logged exchange identically. Attribute names come from :mod:`~otellama.sinks.otel.semconv`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from otellama import __version__
from otellama.exchange import OK
from otellama.observe.record import Record
from otellama.sinks.otel import semconv

#: The span of each Ollama phase, by the phase's name in :meth:`Record.phases`.
PHASE_SPANS: Final = {
    "queue": semconv.SPAN_QUEUE,
    "load": semconv.SPAN_LOAD,
    "prompt_eval": semconv.SPAN_PROMPT_EVAL,
    "eval": semconv.SPAN_EVAL,
}

#: The instrumentation scope of everything otellama records.
SCOPE: Final = InstrumentationScope("otellama", __version__)
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_UNSET: Final = Status(StatusCode.UNSET)


def render_spans(record: Record, resource: Resource) -> list[ReadableSpan]:
    """The exchange's finished spans, with the ids chosen when the request arrived; none if unsampled.

    SERVER span for the request; under it the GenAI CLIENT span ``{operation} {model}``; under that one span
    per Ollama phase. They are built complete, as the SDK's span processors receive them at ``on_end``,
    rather than started and ended through a tracer: the exchange is over, its ids were drawn (and sent to
    Ollama in ``traceparent``) before it began, and its sampling decision was made then too, so a tracer's
    sampler, id generator and attribute copying would only cost time (~25 µs a span). Used live and by
    replay: the spans depend on the record alone.
    """
    ids = record.ids
    if not ids.sampled:
        return []
    parent = None
    if ids.parent_span_id is not None:
        parent = SpanContext(ids.trace_id, ids.parent_span_id, is_remote=True, trace_flags=_SAMPLED)
    failed = record.outcome != OK
    status = Status(StatusCode.ERROR, record.error) if failed else _UNSET

    def ours(span_id: int) -> SpanContext:
        return SpanContext(ids.trace_id, span_id, is_remote=False, trace_flags=_SAMPLED)

    server = ours(ids.server_span_id)

    def span(
        name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
        attributes: dict[str, Any] | None, start: int, end: int, status: Status = _UNSET,
    ) -> ReadableSpan:  # fmt: skip
        return ReadableSpan(
            name, context, parent, resource, attributes, kind=kind, status=status,
            start_time=start, end_time=end, instrumentation_scope=SCOPE,
        )  # fmt: skip

    server_attributes = attributes_of(
        (semconv.HTTP_METHOD, record.method),
        (semconv.HTTP_ROUTE, record.endpoint),
        (semconv.HTTP_STATUS, record.status),
        (semconv.ERROR_TYPE, record.error_type),
        (semconv.OUTCOME, record.outcome),
        (semconv.CLIENT_NAME, record.client),
        (semconv.UPSTREAM, record.upstream),
        (semconv.ROUTE, record.route),
    )
    name = f"{record.method} {record.endpoint}"
    server_span = span(
        name, server, parent, SpanKind.SERVER, server_attributes, record.start_ns, record.end_ns, status
    )
    if record.retries:
        # Each host tried before the one that answered, when it was given up on and why.
        server_span = ReadableSpan(
            name, server, parent, resource, server_attributes, kind=SpanKind.SERVER, status=status,
            start_time=record.start_ns, end_time=record.end_ns, instrumentation_scope=SCOPE,
            events=[
                Event(semconv.RETRY_EVENT, {semconv.UPSTREAM: host, semconv.RETRY_REASON: reason}, at)
                for host, reason, at in record.retries
            ],
        )  # fmt: skip
    spans = [server_span]
    if ids.genai_span_id is not None and record.operation is not None:
        genai = ours(ids.genai_span_id)
        name = f"{record.operation} {record.model}" if record.model else record.operation
        attributes = genai_attributes(record)
        spans.append(
            span(name, genai, server, SpanKind.CLIENT, attributes, record.start_ns, record.end_ns, status)
        )
        for phase, start, end in record.phases():
            span_id = ids.phase_span_ids.get(phase)
            if span_id is not None:
                spans.append(
                    span(PHASE_SPANS[phase], ours(span_id), genai, SpanKind.INTERNAL, None, start, end)
                )
    call = record.upstream_span
    if call is not None:
        spans.append(
            ReadableSpan(
                call.name, ours(call.span_id), ours(call.parent_span_id), resource, dict(call.attributes),
                kind=_KINDS.get(call.kind, SpanKind.CLIENT),
                status=Status(_STATUS.get(call.status, StatusCode.UNSET), call.status_description),
                start_time=call.start_ns, end_time=call.end_ns,
                instrumentation_scope=InstrumentationScope(call.scope_name, call.scope_version),
            )
        )  # fmt: skip
    return spans


_KINDS: Final = {kind.name: kind for kind in SpanKind}
_STATUS: Final = {code.name: code for code in StatusCode}


def attributes_of(*pairs: tuple[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in pairs if value is not None}


def genai_attributes(record: Record) -> dict[str, Any]:
    """The GenAI span's attributes (docs/reference.md §2) plus Ollama's raw numbers as ``ollama.*``."""
    t, r = record.timings, record.request
    attributes = attributes_of(
        (semconv.OPERATION, record.operation),
        (semconv.PROVIDER, semconv.PROVIDER_OLLAMA),
        (semconv.REQUEST_MODEL, record.model),
        (semconv.RESPONSE_MODEL, record.response_model),
        (semconv.REQUEST_STREAM, record.stream),
        (semconv.REQUEST_TEMPERATURE, r.temperature),
        (semconv.REQUEST_TOP_P, r.top_p),
        (semconv.REQUEST_TOP_K, r.top_k),
        (semconv.REQUEST_SEED, r.seed),
        (semconv.REQUEST_MAX_TOKENS, r.max_tokens),
        (semconv.REQUEST_STOP_SEQUENCES, tuple(r.stop) if r.stop else None),
        (semconv.FINISH_REASONS, tuple(record.finish_reasons) if record.finish_reasons else None),
        (semconv.INPUT_TOKENS, record.input_tokens),
        (semconv.OUTPUT_TOKENS, record.output_tokens),
        (semconv.TIME_TO_FIRST_CHUNK, record.time_to_first_chunk_s),
        (semconv.SERVER_ADDRESS, record.server_address),
        (semconv.SERVER_PORT, record.server_port),
        (semconv.ERROR_TYPE, record.error_type),
        (semconv.OLLAMA_LOAD_NS, t.load_duration),
        (semconv.OLLAMA_PROMPT_EVAL_NS, t.prompt_eval_duration),
        (semconv.OLLAMA_EVAL_NS, t.eval_duration),
        (semconv.OLLAMA_TOTAL_NS, t.total_duration),
        (semconv.OLLAMA_QUEUE_NS, t.queue_ns),
        (semconv.OLLAMA_PROMPT_EVAL_COUNT, t.prompt_eval_count),
        (semconv.OLLAMA_EVAL_COUNT, t.eval_count),
        (semconv.OLLAMA_TOKENS_PER_SECOND, t.tokens_per_second),
        (semconv.OLLAMA_PROMPT_TOKENS_PER_SECOND, t.prompt_tokens_per_second),
        (semconv.OLLAMA_COLD_START, record.cold_start),
        (semconv.OLLAMA_DONE_REASON, record.done_reason),
        (semconv.OLLAMA_CHUNKS, record.chunks),
        (semconv.OLLAMA_BODY_PARSED, r.parsed),
        (semconv.CLIENT_NAME, record.client),
        (semconv.UPSTREAM, record.upstream),
        (semconv.ROUTE, record.route),
    )
    if r.input_messages is not None:
        attributes[semconv.INPUT_MESSAGES] = encode_json(r.input_messages)
    if record.output_messages is not None:
        attributes[semconv.OUTPUT_MESSAGES] = encode_json(record.output_messages)
    return attributes


def encode_json(value: Sequence[Mapping[str, Any]]) -> str:
    return orjson.dumps(list(value)).decode()
