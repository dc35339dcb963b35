"""The one record of an exchange: built once, after the last byte, and rendered three ways.

The request (parsed by :mod:`otellama.observe.request` after the response went out, so parsing never delays
a byte), what the proxy saw, and what the observed body said (Ollama's final object) become one
:class:`Record`. Spans, metrics and the JSONL line are renderings of it (:mod:`otellama.sinks.otel`,
:mod:`otellama.sinks.jsonlog`); none of them derives a number of its own. The JSONL line is
:meth:`Record.to_json`, and :meth:`Record.from_json` reads it back, so a logged exchange can be rendered
again later (replayed as traces) exactly as it was the first time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

import orjson

from otellama.exchange import CANCELLED, ERROR, OK, Exchange
from otellama.observe import ollama
from otellama.observe.request import (
    CLIENT_NAME_LIMIT,
    FIELD_LIMIT,
    LABEL_LIMIT,
    RequestFacts,
    capped,
    clip,
    endpoint_of,
    header_text,
    parse_request,
    text_message,
)
from otellama.observe.stream import Observation


# Not frozen, like the Record that holds it: two are made per exchange (at its start and its end), and a
# frozen dataclass sets each field through object.__setattr__. A value all the same: nothing assigns to it.
@dataclasses.dataclass(slots=True)
class TraceIds:
    """The ids an exchange's spans get, chosen when the request arrived so ``traceparent`` could be sent.
    A value: read it, never assign to it."""

    trace_id: int
    server_span_id: int
    #: The GenAI span; None when the request is no GenAI operation (only the server span exists).
    genai_span_id: int | None
    #: The caller's span, from an incoming ``traceparent``; None for a new trace.
    parent_span_id: int | None
    sampled: bool
    #: Ids of the phase spans (``load``, ``prompt_eval``, ``eval``, ``queue``), drawn when recording.
    phase_span_ids: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class CallSpan:
    """The span of the upstream HTTP call, as opentelemetry-instrumentation-httpx made it in the proxy.

    It travels in the record (and its JSONL line) so that the process that exports spans renders it with
    the others, and replay with them too. Attribute values are what OpenTelemetry allows (str, bool, int,
    float, or lists of one of these).
    """

    span_id: int
    parent_span_id: int
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any]
    #: ``UNSET``, ``OK`` or ``ERROR``, and the error's description.
    status: str = "UNSET"
    status_description: str | None = None
    scope_name: str = ""
    scope_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "span_id": f"{self.span_id:016x}",
            "parent_span_id": f"{self.parent_span_id:016x}",
            "name": self.name,
            "kind": self.kind,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "attributes": dict(self.attributes),
            "status": self.status,
            "status_description": self.status_description,
            "scope": {"name": self.scope_name, "version": self.scope_version},
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> CallSpan:
        scope = value.get("scope") or {}
        return cls(
            span_id=int(value["span_id"], 16),
            parent_span_id=int(value["parent_span_id"], 16),
            name=str(value["name"]),
            kind=str(value["kind"]),
            start_ns=int(value["start_ns"]),
            end_ns=int(value["end_ns"]),
            attributes=dict(value.get("attributes") or {}),
            status=str(value.get("status") or "UNSET"),
            status_description=value.get("status_description"),
            scope_name=str(scope.get("name") or ""),
            scope_version=scope.get("version"),
        )


# Ids in hex, as OpenTelemetry writes them: ``value.to_bytes(8).hex()`` is ``f"{value:016x}"`` for a 64-bit
# id (a trace id takes 16 bytes), in half the time. Every id is drawn that wide or read back from that text.
def _hex16(value: int | None) -> str | None:
    return None if value is None else value.to_bytes(8).hex()


# The second the last timestamp fell in, and its text: exchanges come many to a second, and formatting the
# date and time of day is most of what datetime's isoformat costs.
_last_second: tuple[int, str] = (0, dt.datetime.fromtimestamp(0, dt.UTC).isoformat(timespec="seconds")[:-6])


def _timestamp(epoch_ns: int) -> str:
    """``datetime.fromtimestamp(epoch_ns / 1e9, UTC).isoformat(timespec="microseconds")``, character for
    character, in a third of the time: the float is rounded to the microsecond half to even, as datetime
    rounds it, and the text of its second is reused while exchanges fall in the same second."""
    global _last_second
    fraction, whole = math.modf(epoch_ns / 1e9)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second += 1
        micros -= 1_000_000
    elif micros < 0:
        second -= 1
        micros += 1_000_000
    cached, text = _last_second
    if second != cached:
        text = dt.datetime.fromtimestamp(second, dt.UTC).isoformat(timespec="seconds")[:-6]
        _last_second = (second, text)
    return f"{text}.{micros:06d}+00:00"


def _unhex(value: object) -> int | None:
    return int(value, 16) if isinstance(value, str) and value else None


# Not frozen: a frozen dataclass sets each of these 31 fields through object.__setattr__, 7 us per
# exchange against 1 for plain slots. It is a value all the same: no sink assigns to a record.
@dataclasses.dataclass(slots=True)
class Record:
    """One exchange, as every sink sees it. Field names are the JSONL schema (README, "The JSONL log").
    A value, handed to every sink alike: read it, never assign to it (``dataclasses.replace`` makes a
    changed copy).

    Times: ``start_ns``/``end_ns`` and the other ``*_ns`` instants are Unix epoch nanoseconds; durations
    ending in ``_ns`` are Ollama's own, ``_ms`` are milliseconds. None is unknown, never an invented 0.
    """

    start_ns: int
    end_ns: int
    method: str
    endpoint: str
    operation: str | None
    model: str | None
    stream: bool | None
    status: int | None
    outcome: str
    error: str | None
    error_type: str | None
    done_reason: str | None
    chunks: int
    first_chunk_ns: int | None
    first_content_ns: int | None
    cold_start: bool | None
    client: str | None
    timings: ollama.Timings
    input_tokens: int | None
    output_tokens: int | None
    finish_reasons: tuple[str, ...]
    response_model: str | None
    request: RequestFacts
    server_address: str
    server_port: int
    ids: TraceIds
    output_messages: tuple[dict[str, Any], ...] | None = None
    #: With several upstreams: the host that answered (its configured name) and why the router chose it
    #: (:data:`~otellama.exchange.ROUTES`); None with one upstream.
    upstream: str | None = None
    route: str | None = None
    #: Hosts tried before the one that answered: (name, reason, epoch ns when it was left).
    retries: tuple[tuple[str, str, int], ...] = ()
    #: The upstream HTTP call's span, when the httpx instrumentation traced it.
    upstream_span: CallSpan | None = None

    # --- derived once, here, for every sink -------------------------------------------------------------
    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def time_to_first_chunk_s(self) -> float | None:
        return None if self.first_chunk_ns is None else (self.first_chunk_ns - self.start_ns) / 1e9

    @property
    def time_to_first_content_s(self) -> float | None:
        """Streams only: a non-streamed body's first byte is its whole answer, not a first token."""
        if self.first_content_ns is None or not self.stream:
            return None
        return (self.first_content_ns - self.start_ns) / 1e9

    @property
    def server_time_to_first_token_s(self) -> float | None:
        """Ollama's time to its first token: queue, load and prompt evaluation, from its own numbers."""
        t = self.timings
        queue = t.queue_ns
        if queue is None or t.load_duration is None or t.prompt_eval_duration is None:
            return None
        return (queue + t.load_duration + t.prompt_eval_duration) / 1e9

    @property
    def time_per_output_token_s(self) -> float | None:
        t = self.timings
        if not t.eval_count or t.eval_duration is None:
            return None
        return t.eval_duration / t.eval_count / 1e9

    def phases(self) -> list[tuple[str, int, int]]:
        """Ollama's phases as (name, start_ns, end_ns), back-dated from the final object.

        Ollama reports durations, not instants. Its work ends when it writes the final object, which is the
        last chunk, so the phases are laid end to end to finish at ``end_ns`` in the order they happen:
        waiting for a slot, loading, prompt evaluation, generation. They never overlap and are clipped to
        the exchange, so they nest inside the GenAI span whatever the clocks say.
        """
        t = self.timings
        durations = [
            (ollama.QUEUE.name, t.queue_ns or 0),
            (ollama.LOAD.name, t.load_duration or 0),
            (ollama.PROMPT_EVAL.name, t.prompt_eval_duration or 0),
            (ollama.EVAL.name, t.eval_duration or 0),
        ]
        cursor = max(self.start_ns, self.end_ns - sum(d for _, d in durations))
        spans = []
        for name, duration in durations:
            if duration <= 0:
                continue
            end = min(cursor + duration, self.end_ns)
            if end > cursor:
                spans.append((name, cursor, end))
            cursor = end
        return spans

    # --- the JSONL line -------------------------------------------------------------------------------
    def measures(self) -> dict[str, float | None]:
        """The JSONL line's derived numbers, rounded as it has them: milliseconds to the microsecond, rates
        to the hundredth. The stats window samples these very values, so it agrees with the log."""
        t = self.timings
        ttft, ttfc, queue = self.time_to_first_content_s, self.time_to_first_chunk_s, t.queue_ns
        speed, prompt_speed = t.tokens_per_second, t.prompt_tokens_per_second
        load, prompt_eval, generation = t.load_duration, t.prompt_eval_duration, t.eval_duration
        # Rounded inline rather than by helpers: nine calls cost more than the rounding. Every number is
        # the property's (or the field's); only its unit and digits change here.
        return {
            "duration_ms": round(self.duration_s * 1e3, 3),  # never None
            "ttft_ms": None if ttft is None else round(ttft * 1e3, 3),
            "queue_time_ms": None if queue is None else round(queue / 1e6, 3),
            "tokens_per_second": None if speed is None else round(speed, 2),
            "prompt_tokens_per_second": None if prompt_speed is None else round(prompt_speed, 2),
            "load_time_ms": None if load is None else round(load / 1e6, 3),
            "prompt_eval_time_ms": None if prompt_eval is None else round(prompt_eval / 1e6, 3),
            "generation_time_ms": None if generation is None else round(generation / 1e6, 3),
            "ttfc_ms": None if ttfc is None else round(ttfc * 1e3, 3),
        }

    def to_json(self) -> dict[str, Any]:
        """The JSONL line: the schema's fields, then what rebuilding the spans needs (``trace``)."""
        t, r, ids = self.timings, self.request, self.ids
        m = self.measures()
        line: dict[str, Any] = {
            "timestamp": _timestamp(self.start_ns),
            "trace_id": ids.trace_id.to_bytes(16).hex(),  # see _hex16
            "span_id": (ids.genai_span_id or ids.server_span_id).to_bytes(8).hex(),
            "method": self.method,
            "endpoint": self.endpoint,
            "operation": self.operation,
            "model": self.model,
            "stream": self.stream,
            "status": self.status,
            "outcome": self.outcome,
            "error": self.error,
            "error_type": self.error_type,
            "done_reason": self.done_reason,
            "duration_ms": m["duration_ms"],
            "ttft_ms": m["ttft_ms"],
            "chunks": self.chunks,
            "queue_time_ms": m["queue_time_ms"],
            "cold_start": self.cold_start,
            "client": self.client,
            "load_duration_ns": t.load_duration,
            "prompt_eval_count": t.prompt_eval_count,
            "prompt_eval_duration_ns": t.prompt_eval_duration,
            "eval_count": t.eval_count,
            "eval_duration_ns": t.eval_duration,
            "total_duration_ns": t.total_duration,
            "tokens_per_second": m["tokens_per_second"],
            "prompt_tokens_per_second": m["prompt_tokens_per_second"],
            "load_time_ms": m["load_time_ms"],
            "prompt_eval_time_ms": m["prompt_eval_time_ms"],
            "generation_time_ms": m["generation_time_ms"],
            # Added by otellama (the schema only grows):
            "ttfc_ms": m["ttfc_ms"],
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "finish_reasons": list(self.finish_reasons),
            "response_model": self.response_model,
            "prompt_eval_cached_count": t.prompt_eval_cached_count,
            "request": {
                "parsed": r.parsed,
                "temperature": r.temperature,
                "top_p": r.top_p,
                "top_k": r.top_k,
                "seed": r.seed,
                "max_tokens": r.max_tokens,
                "stop": list(r.stop) if r.stop is not None else None,
            },
            "server": {"address": self.server_address, "port": self.server_port},
            "upstream": self.upstream,
            "route": self.route,
            "trace": {
                "start_ns": self.start_ns,
                "end_ns": self.end_ns,
                "first_chunk_ns": self.first_chunk_ns,
                "first_content_ns": self.first_content_ns,
                "server_span_id": ids.server_span_id.to_bytes(8).hex(),
                "genai_span_id": _hex16(ids.genai_span_id),
                "parent_span_id": _hex16(ids.parent_span_id),
                "sampled": ids.sampled,
                # Drawn ids only (never None): no _hex16 call per phase.
                "phase_span_ids": {
                    name: value.to_bytes(8).hex() for name, value in ids.phase_span_ids.items()
                },
            },
        }
        if self.upstream_span is not None:
            line["trace"]["upstream_span"] = self.upstream_span.to_json()
        if r.input_messages is not None:
            line["input_messages"] = list(r.input_messages)
        if self.output_messages is not None:
            line["output_messages"] = list(self.output_messages)
        if self.retries:
            line["retries"] = [
                {"upstream": name, "reason": reason, "at_ns": at} for name, reason, at in self.retries
            ]
        return line

    @classmethod
    def from_line(cls, raw: bytes) -> Record | None:
        """A JSONL line read back, or None when it is not one of ours (not JSON, or not a record)."""
        try:
            return cls.from_json(orjson.loads(raw))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> Record:
        """Read a JSONL line back. Raises KeyError/TypeError/ValueError on a line that is not one of ours."""
        trace, request, server = line["trace"], line["request"], line["server"]
        phase_ids = {name: _unhex(value) for name, value in (trace.get("phase_span_ids") or {}).items()}
        stop = request.get("stop")
        # Positions, in the fields' order (each named in its comment): the exporter reads every line, and
        # keywords cost CPython 3.11 2 us more for the record's 31 fields, 1 us more for the rest.
        return cls(
            int(trace["start_ns"]),  # start_ns
            int(trace["end_ns"]),  # end_ns
            line["method"],  # method
            line["endpoint"],  # endpoint
            line["operation"],  # operation
            line["model"],  # model
            line["stream"],  # stream
            line["status"],  # status
            line["outcome"],  # outcome
            line["error"],  # error
            line["error_type"],  # error_type
            line["done_reason"],  # done_reason
            line["chunks"],  # chunks
            trace["first_chunk_ns"],  # first_chunk_ns
            trace["first_content_ns"],  # first_content_ns
            line["cold_start"],  # cold_start
            line["client"],  # client
            ollama.Timings(  # timings
                line["total_duration_ns"],  # total_duration
                line["load_duration_ns"],  # load_duration
                line["prompt_eval_count"],  # prompt_eval_count
                line["prompt_eval_duration_ns"],  # prompt_eval_duration
                line["eval_count"],  # eval_count
                line["eval_duration_ns"],  # eval_duration
                line.get("prompt_eval_cached_count"),  # prompt_eval_cached_count
                line["done_reason"],  # done_reason
                line["response_model"],  # model
            ),
            line["input_tokens"],  # input_tokens
            line["output_tokens"],  # output_tokens
            tuple(line["finish_reasons"]),  # finish_reasons
            line["response_model"],  # response_model
            RequestFacts(  # request
                request["parsed"],  # parsed
                line["model"],  # model
                line["stream"],  # stream
                request["temperature"],  # temperature
                request["top_p"],  # top_p
                request["top_k"],  # top_k
                request["seed"],  # seed
                request["max_tokens"],  # max_tokens
                tuple(stop) if stop is not None else None,  # stop
                tuple(line["input_messages"]) if "input_messages" in line else None,  # input_messages
            ),
            server["address"],  # server_address
            server["port"],  # server_port
            TraceIds(  # ids
                int(line["trace_id"], 16),  # trace_id
                int(trace["server_span_id"], 16),  # server_span_id
                _unhex(trace["genai_span_id"]),  # genai_span_id
                _unhex(trace["parent_span_id"]),  # parent_span_id
                bool(trace["sampled"]),  # sampled
                {k: v for k, v in phase_ids.items() if v is not None},  # phase_span_ids
            ),
            tuple(line["output_messages"]) if "output_messages" in line else None,  # output_messages
            line.get("upstream"),  # upstream
            line.get("route"),  # route
            tuple(  # retries
                (str(retry["upstream"]), str(retry["reason"]), int(retry["at_ns"]))
                for retry in line.get("retries") or ()
            ),
            CallSpan.from_json(trace["upstream_span"])
            if trace.get("upstream_span")
            else None,  # upstream_span
        )


def _outcome(
    exchange: Exchange, observation: Observation | None, genai: bool
) -> tuple[str, str | None, str | None]:
    """(outcome, error message, error.type): transport facts first, then HTTP status, then the body.

    A body is judged by what explains the exchange best: the client leaving or the transport failing, then
    Ollama's own error (a status, an ``{"error"}`` line), then bytes that are not Ollama's protocol, then a
    stream that ended early. Malformed comes before incomplete because garbage is the likelier cause of a
    missing final object (the error text says whether the final object came).
    """
    if exchange.outcome != OK:
        return exchange.outcome, exchange.error, exchange.error_type
    body_error = observation.error if observation is not None else None
    status = exchange.status or 0
    if status >= 400:
        return ERROR, body_error or f"HTTP {status}", str(status)
    if observation is None:
        return OK, None, None
    if body_error is not None:
        return ERROR, body_error, "stream_error"  # Ollama's {"error"} line after a 200
    streamed = observation.framing in (ollama.Framing.NDJSON, ollama.Framing.SSE)
    # The client got the bytes as they came, but an exchange that carried something other than Ollama's
    # protocol is no clean success: the answer may be missing a part, or something else is answering.
    # Streams are held to the protocol on every path (as for incomplete_stream); a non-streamed body only
    # on the GenAI endpoints, whose answer Ollama documents as an object: an unknown path may answer a JSON
    # array. Lines past a cap are never malformed (``truncated``: a huge final object is still Ollama's).
    if observation.malformed and (streamed or genai):
        if not streamed:
            return ERROR, "malformed body from upstream: not a JSON object", "malformed_body"
        what = "an SSE data event" if observation.framing == ollama.Framing.SSE else "an NDJSON line"
        ending = "the stream still ended with" if observation.done else "the stream ended without"
        message = f"malformed stream from upstream: {what} was not a JSON object; {ending} a final object"
        return ERROR, message, "malformed_stream"
    if streamed and not observation.done and not observation.truncated:
        return ERROR, "stream ended without a final object", "incomplete_stream"
    if streamed and not observation.done and observation.cut_in_line:
        message = "stream ended inside a line longer than otellama parses, without a final object"
        return ERROR, message, "incomplete_stream"
    return OK, None, None


def _streamed(observation: Observation | None) -> bool | None:
    if observation is None or observation.framing == ollama.Framing.OTHER:
        return None
    return observation.framing in (ollama.Framing.NDJSON, ollama.Framing.SSE)


def build(
    exchange: Exchange,
    observation: Observation | None,
    ids: TraceIds,
    *,
    server_address: str,
    server_port: int,
    client_header: bytes,
    cold_start_seconds: float,
    capture_content: bool,
    upstream_span: CallSpan | None = None,
) -> Record:
    """Make the record of a finished exchange. Pure: the same inputs give the same record."""
    # Runs for every exchange: the observation is branched on once, and instants are converted inline.
    endpoint = ollama.endpoint_for(exchange.method, exchange.path)
    request = parse_request(endpoint, exchange.request_body, capture=capture_content)
    outcome, error, error_type = _outcome(exchange, observation, endpoint is not None)
    start_ns = round(exchange.started_at * 1e9)
    t_start = exchange.t_start
    output_messages = None
    if observation is None:
        timings = ollama.Timings()
        response_model: str | None = None
        first_content_ns: int | None = None
        input_tokens: int | None = None
        output_tokens: int | None = None
        finish_reasons: tuple[str, ...] = ()
        chunks = exchange.chunks
    else:
        if exchange.outcome == CANCELLED and observation.content_chunks:
            error = f"client disconnected after {observation.content_chunks} content chunks"
        timings = observation.timings or ollama.Timings()
        done_reason, answered_by = timings.done_reason, timings.model
        if (done_reason is not None and len(done_reason) > LABEL_LIMIT) or (
            answered_by is not None and len(answered_by) > FIELD_LIMIT
        ):
            timings = dataclasses.replace(
                timings,
                done_reason=None if done_reason is None else clip(done_reason, LABEL_LIMIT),
                model=None if answered_by is None else clip(answered_by),
            )
        response_model = observation.response_model
        if response_model is not None:
            response_model = clip(response_model)
        finish_reasons = observation.finish_reasons
        for label in finish_reasons:
            if len(label) > LABEL_LIMIT:
                finish_reasons = tuple(clip(reason, LABEL_LIMIT) for reason in finish_reasons)
                break
        if capture_content and observation.output_text is not None:
            reason = finish_reasons[0] if finish_reasons else None
            output_messages = capped(
                [text_message("assistant", observation.output_text, finish_reason=reason)], newest=False
            )
        first_content_at = observation.first_content_at
        first_content_ns = (
            None if first_content_at is None else start_ns + round((first_content_at - t_start) * 1e9)
        )
        input_tokens = observation.usage_input_tokens
        output_tokens = observation.usage_output_tokens
        if output_tokens is None and outcome == CANCELLED:
            # Tokens seen before the client left (about one a chunk).
            output_tokens = observation.content_chunks or None
        chunks = observation.chunks
    client = None
    for name, value in exchange.request_headers:
        if name == client_header:
            client = value
            break
    first_byte = exchange.t_first_byte
    load = timings.load_duration
    upstream_address = exchange.upstream_address
    # Every field as a local (named after it, but for endpoint, client, upstream and route), then one call
    # with the fields in their order: 31 keywords cost 2 us more than positions in CPython 3.11
    # (tests/test_record.py holds the order).
    end_ns = start_ns + round((exchange.t_end - t_start) * 1e9) or start_ns
    method = clip(exchange.method)
    path = clip(endpoint_of(exchange.path))
    operation = endpoint.operation if endpoint is not None else None
    # The model asked for, else the one that answered (an unparsed body still has a response).
    model = request.model or response_model
    stream = request.stream if request.parsed else _streamed(observation)
    status = exchange.status
    if error is not None:
        error = clip(error)
    done_reason = timings.done_reason
    first_chunk_ns = None if first_byte is None else start_ns + round((first_byte - t_start) * 1e9)
    cold_start = None if load is None else load > cold_start_seconds * 1e9
    client_name = header_text(client)[:CLIENT_NAME_LIMIT] if client else None
    # With several upstreams the host that answered, else the one configured.
    if upstream_address:
        server_address, server_port = upstream_address
    retries = (
        tuple(
            (retry.upstream, retry.reason, start_ns + round((retry.at - t_start) * 1e9) or start_ns)
            for retry in exchange.retries
        )
        if exchange.retries
        else ()
    )
    return Record(
        start_ns,
        end_ns,
        method,
        path,  # endpoint
        operation,
        model,
        stream,
        status,
        outcome,
        error,
        error_type,
        done_reason,
        chunks,
        first_chunk_ns,
        first_content_ns,
        cold_start,
        client_name,  # client
        timings,
        input_tokens,
        output_tokens,
        finish_reasons,
        response_model,
        request,
        server_address,
        server_port,
        ids,
        output_messages,
        exchange.upstream,  # upstream
        exchange.route,  # route
        retries,
        upstream_span,
    )
