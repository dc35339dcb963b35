"""The one record of an exchange, built from real recordings fed through the observer: no servers."""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import inspect
import itertools
import json
import random
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from otellama.exchange import CANCELLED, ERROR, Exchange
from otellama.observe import ollama
from otellama.observe.record import Record, TraceIds, build
from otellama.observe.request import (
    CLIENT_NAME_LIMIT,
    CONTENT_LIMIT,
    CUT_MARK,
    FIELD_LIMIT,
    LABEL_LIMIT,
    capped,
    endpoint_of,
    parse_request,
)
from otellama.observe.stream import BODY_CAP, LINE_CAP, Observation, StreamObserver
from tests import captures
from tests.conftest import API_FIXTURES

ALL = captures.load()
BY_NUMBER = {capture.name[:2]: capture for capture in ALL}

NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"
JSON = b"application/json; charset=utf-8"

STARTED_AT = 1_750_000_000.25  # wall clock when the request arrived
T0 = 1000.0  # perf_counter when the request arrived
HEADERS_AT = T0 + 0.010
STEP = 0.001  # between two chunks
COLD_START_SECONDS = 1.0

IDS = TraceIds(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    server_span_id=0xB7AD6B7169203331,
    genai_span_id=0x00F067AA0BA902B7,
    parent_span_id=0x53995C3F42CD8AD8,
    sampled=True,
    phase_span_ids={"load": 0x1111111111111111, "eval": 0x2222222222222222},
)
NON_GENAI_IDS = dataclasses.replace(IDS, genai_span_id=None, parent_span_id=None, phase_span_ids={})

#: The JSONL fields the issue asks for, by these exact names (the old log's: docs/reference.md §5).
SCHEMA = (
    "timestamp",
    "trace_id",
    "span_id",
    "method",
    "endpoint",
    "operation",
    "model",
    "stream",
    "status",
    "outcome",
    "error",
    "error_type",
    "done_reason",
    "duration_ms",
    "ttft_ms",
    "chunks",
    "queue_time_ms",
    "cold_start",
    "client",
    "load_duration_ns",
    "prompt_eval_count",
    "prompt_eval_duration_ns",
    "eval_count",
    "eval_duration_ns",
    "total_duration_ns",
    "tokens_per_second",
    "prompt_tokens_per_second",
    "load_time_ms",
    "prompt_eval_time_ms",
    "generation_time_ms",
)
TIMING_FIELDS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
OPERATIONS = {
    "/api/chat": "chat",
    "/v1/chat/completions": "chat",
    "/api/generate": "text_completion",
    "/v1/completions": "text_completion",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
    "/v1/embeddings": "embeddings",
}


def at(index: int) -> float:
    """When the proxy relayed body chunk ``index`` (perf_counter)."""
    return HEADERS_AT + STEP * (index + 1)


def observe(chunks: Sequence[bytes], content_type: bytes, *, capture_content: bool = False) -> Observation:
    observer = StreamObserver(ollama.framing_for(content_type.decode()), HEADERS_AT, capture_content)
    for index, chunk in enumerate(chunks):
        observer.feed(chunk, at(index))
    return observer.finish(at(len(chunks)))


def exchange(
    method: str,
    path: str,
    body: bytes | None,
    chunks: Sequence[bytes] = (),
    *,
    status: int | None = 200,
    content_type: bytes = JSON,
    headers: Sequence[tuple[bytes, bytes]] = (),
    **facts: Any,
) -> Exchange:
    return Exchange(
        method=method,
        path=path,
        query=b"",
        request_headers=list(headers),
        started_at=STARTED_AT,
        t_start=T0,
        request_body=body,
        request_size=len(body or b""),
        status=status,
        response_headers=[(b"content-type", content_type)] if status is not None else [],
        t_headers=HEADERS_AT if status is not None else None,
        t_first_byte=at(0) if chunks else None,
        t_end=at(len(chunks)),
        response_size=sum(map(len, chunks)),
        chunks=len(chunks),
        **facts,
    )


def make(
    ex: Exchange, observation: Observation | None, *, capture_content: bool = False, ids: TraceIds = IDS
) -> Record:
    return build(
        ex,
        observation,
        ids,
        server_address="127.0.0.1",
        server_port=11434,
        client_header=b"x-client-name",
        cold_start_seconds=COLD_START_SECONDS,
        capture_content=capture_content,
    )


def record_of(
    capture: captures.Capture, *, capture_content: bool = False, chunks: Sequence[bytes] | None = None
) -> Record:
    """The record of a capture's exchange, its body relayed one line (or event) per chunk."""
    chunks = capture.chunks() if chunks is None else chunks
    observation = observe(chunks, capture.content_type, capture_content=capture_content)
    ex = exchange(
        capture.method,
        capture.endpoint,
        capture.request_body,
        chunks,
        status=capture.status,
        content_type=capture.content_type,
    )
    ids = IDS if capture.endpoint in OPERATIONS else NON_GENAI_IDS
    return make(ex, observation, capture_content=capture_content, ids=ids)


def generation(**fields: Any) -> dict[str, Any]:
    """A native non-streamed /api/generate answer with these timings."""
    return {"model": "llama3.2", "response": "Hi", "done": True, "done_reason": "stop", **fields}


def record_of_body(
    body: dict[str, Any], *, request: bytes = b'{"model":"llama3.2","stream":false}'
) -> Record:
    raw = orjson.dumps(body)
    return make(exchange("POST", "/api/generate", request, [raw]), observe([raw], JSON))


# -- what each recording says, worked out here from its own bytes ------------------------------------------


def final_object(capture: captures.Capture) -> dict[str, Any] | None:
    """The recording's own final object: a native stream's last ``done``/``success`` line, a body that is
    not an error; None for /v1 streams (no final object) and error bodies."""
    if capture.content_type == SSE:
        return None
    if capture.content_type == JSON:
        obj: dict[str, Any] = json.loads(capture.body)
        return None if "error" in obj else obj
    lines = [json.loads(line) for line in capture.body.splitlines() if line.strip()]
    return next((o for o in reversed(lines) if o.get("done") is True or o.get("status") == "success"), None)


def timing(final: dict[str, Any] | None, name: str) -> int | None:
    """docs/reference.md §1, ``ollama.Timings``: a local server always sends load_duration; then a field its
    response type defines but omits is 0; without load_duration a missing field is unknown (None)."""
    if final is None:
        return None
    if name in final:
        value: int = final[name]
        return value
    defined = TIMING_FIELDS if "done" in final else TIMING_FIELDS[:3] if "embeddings" in final else ()
    return 0 if "load_duration" in final and name in defined else None


def request_json(capture: captures.Capture) -> dict[str, Any] | None:
    try:
        data = json.loads(capture.request_body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def first_response_model(capture: captures.Capture) -> str | None:
    if capture.content_type == JSON:
        objects = [json.loads(capture.body)]
    else:
        prefix = b"data: " if capture.content_type == SSE else b""
        objects = [
            json.loads(line[len(prefix) :])
            for line in capture.body.splitlines()
            if line.startswith(prefix + b"{")
        ]
    return next((o["model"] for o in objects if isinstance(o.get("model"), str)), None)


def records_in(capture: captures.Capture) -> int:
    """NDJSON lines, SSE ``data:`` events ([DONE] included), or 1 for a body."""
    if capture.content_type == JSON:
        return 1
    prefix = b"data:" if capture.content_type == SSE else b"{"
    return sum(line.startswith(prefix) for line in capture.body.splitlines())


def ms(ns: int | None) -> Any:
    return None if ns is None else pytest.approx(ns / 1e6, abs=1e-3)


def rate(count: int | None, duration: int | None) -> float | None:
    return None if count is None or not duration else round(count / duration * 1e9, 2)


def well_formed(phases: list[tuple[str, int, int]], start: int, end: int) -> None:
    """Laid end to end inside the exchange, none empty, in the order Ollama works."""
    order = ["queue", "load", "prompt_eval", "eval"]
    assert [name for name, _, _ in phases] == sorted((n for n, _, _ in phases), key=order.index)
    for (_, _, previous_end), (_, next_start, _) in itertools.pairwise(phases):
        assert next_start == previous_end
    for _, phase_start, phase_end in phases:
        assert start <= phase_start < phase_end <= end


# -- 1. every recording, against its own final object ------------------------------------------------------


@pytest.mark.parametrize("capture", ALL, ids=[c.name for c in ALL])
def test_record_of_each_recording_matches_its_final_object(capture: captures.Capture) -> None:
    line = record_of(capture).to_json()
    final = final_object(capture)
    t = {name: timing(final, name) for name in TIMING_FIELDS}

    assert line["load_duration_ns"] == t["load_duration"]
    assert line["prompt_eval_count"] == t["prompt_eval_count"]
    assert line["prompt_eval_duration_ns"] == t["prompt_eval_duration"]
    assert line["eval_count"] == t["eval_count"]
    assert line["eval_duration_ns"] == t["eval_duration"]
    assert line["total_duration_ns"] == t["total_duration"]
    assert line["tokens_per_second"] == rate(t["eval_count"], t["eval_duration"])
    assert line["prompt_tokens_per_second"] == rate(t["prompt_eval_count"], t["prompt_eval_duration"])
    assert line["load_time_ms"] == ms(t["load_duration"])
    assert line["prompt_eval_time_ms"] == ms(t["prompt_eval_duration"])
    assert line["generation_time_ms"] == ms(t["eval_duration"])
    total, load, prompt_eval, generation_ = (
        t[name] for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
    )
    known = None not in (total, load, prompt_eval, generation_)
    queue = max(0, total - load - prompt_eval - generation_) if known else None  # type: ignore[operator]
    assert line["queue_time_ms"] == ms(queue)
    assert line["done_reason"] == (final or {}).get("done_reason")
    assert line["cold_start"] == (None if load is None else load > COLD_START_SECONDS * 1e9)

    if capture.status >= 400:
        error = json.loads(capture.body)["error"]
        assert (line["outcome"], line["error_type"]) == ("error", str(capture.status))
        assert line["error"] == (error if isinstance(error, str) else error["message"])
    else:
        assert (line["outcome"], line["error"], line["error_type"]) == ("ok", None, None)
    assert line["status"] == capture.status

    operation = OPERATIONS.get(capture.endpoint)
    assert line["operation"] == operation
    request = request_json(capture) if operation is not None else None
    asked = request.get("model") if request is not None else None
    assert line["model"] == (asked or first_response_model(capture))
    if request is not None:
        streams_by_default = capture.endpoint in ("/api/chat", "/api/generate")
        assert line["stream"] == request.get("stream", streams_by_default)
    else:
        assert line["stream"] == capture.streamed
    assert line["chunks"] == records_in(capture)
    assert line["endpoint"] == capture.endpoint
    assert line["method"] == capture.method


@pytest.mark.parametrize(
    ("number", "unknown"),
    [
        ("05", ("load_duration_ns", "prompt_eval_duration_ns", "eval_duration_ns")),  # cloud model
        ("31", ("load_duration_ns", "prompt_eval_count", "total_duration_ns")),  # 0.3-era /api/embed
        ("33", ("load_duration_ns", "prompt_eval_count", "total_duration_ns")),  # legacy /api/embeddings
    ],
)
def test_timings_a_response_never_sent_are_null_never_zero(number: str, unknown: tuple[str, ...]) -> None:
    line = record_of(BY_NUMBER[number]).to_json()
    for name in unknown:
        assert line[name] is None, name
    for derived in ("queue_time_ms", "load_time_ms", "cold_start", "prompt_tokens_per_second"):
        assert line[derived] is None, derived


def test_cloud_recording_keeps_the_counts_it_did_send() -> None:
    line = record_of(BY_NUMBER["05"]).to_json()
    assert (line["prompt_eval_count"], line["eval_count"], line["total_duration_ns"]) == (81, 48, 832757752)
    assert line["tokens_per_second"] is None  # no eval_duration: no rate, not a division by an invented 0


def test_warm_embed_defines_only_its_own_timings() -> None:
    line = record_of(BY_NUMBER["30"]).to_json()
    assert (line["load_duration_ns"], line["prompt_eval_count"]) == (8437500, 9)
    assert (line["eval_count"], line["eval_duration_ns"], line["prompt_eval_duration_ns"]) == (
        None,
        None,
        None,
    )


def test_v1_records_carry_usage_but_no_ollama_durations() -> None:
    record = record_of(BY_NUMBER["44"])
    assert (record.input_tokens, record.output_tokens) == (17, 289)
    assert record.finish_reasons == ("stop",)
    assert record.to_json()["total_duration_ns"] is None
    assert record.phases() == []


def test_model_is_the_one_asked_for_and_the_answering_one_is_kept_apart() -> None:
    record = record_of_body(generation(model="llama3.2:latest"), request=b'{"model":"llama3.2"}')
    assert (record.model, record.response_model) == ("llama3.2", "llama3.2:latest")
    assert record.to_json()["model"] == "llama3.2"
    unparsed = record_of_body(generation(model="llama3.2:latest"), request=b"")
    assert unparsed.model == "llama3.2:latest"


# -- 2. the JSONL schema -----------------------------------------------------------------------------------


def test_line_has_every_field_of_the_schema_by_its_exact_name() -> None:
    line = record_of(BY_NUMBER["01"]).to_json()
    missing = [name for name in SCHEMA if name not in line]
    assert missing == []
    assert set(line["trace"]) >= {"start_ns", "end_ns", "server_span_id", "genai_span_id", "parent_span_id"}


def test_line_identifies_the_exchange_and_its_spans() -> None:
    record = record_of(BY_NUMBER["01"])
    line = record.to_json()
    timestamp = dt.datetime.fromisoformat(line["timestamp"])
    assert timestamp.utcoffset() == dt.timedelta(0)
    assert timestamp == dt.datetime(2025, 6, 15, 15, 6, 40, 250000, tzinfo=dt.UTC)  # STARTED_AT
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert line["span_id"] == "00f067aa0ba902b7"  # the GenAI span
    trace = line["trace"]
    assert trace["start_ns"] == record.start_ns == pytest.approx(STARTED_AT * 1e9, abs=1e3)
    assert trace["end_ns"] - trace["start_ns"] == pytest.approx(
        (at(len(BY_NUMBER["01"].chunks())) - T0) * 1e9
    )
    assert trace["server_span_id"] == "b7ad6b7169203331"
    assert trace["genai_span_id"] == "00f067aa0ba902b7"
    assert trace["parent_span_id"] == "53995c3f42cd8ad8"
    assert trace["phase_span_ids"] == {"load": "1111111111111111", "eval": "2222222222222222"}
    assert line["duration_ms"] == pytest.approx((at(len(BY_NUMBER["01"].chunks())) - T0) * 1e3, abs=1e-3)


def test_span_id_of_a_non_genai_exchange_is_the_server_span() -> None:
    line = record_of(BY_NUMBER["34"]).to_json()
    assert line["span_id"] == "b7ad6b7169203331"
    assert (line["trace"]["genai_span_id"], line["trace"]["parent_span_id"]) == (None, None)


def test_ttft_is_measured_to_the_first_content_chunk_not_the_first_chunk() -> None:
    capture = BY_NUMBER["05"]  # its first line is {"response": "", ...}: no text yet
    chunks = capture.chunks()
    assert json.loads(chunks[0])["response"] == ""
    assert json.loads(chunks[1])["thinking"]
    line = record_of(capture).to_json()
    assert line["ttfc_ms"] == pytest.approx((at(0) - T0) * 1e3, abs=1e-3)
    assert line["ttft_ms"] == pytest.approx((at(1) - T0) * 1e3, abs=1e-3)


def test_ttft_of_a_v1_stream_counts_a_reasoning_delta_as_content() -> None:
    capture = BY_NUMBER["44"]  # first event: content "" but reasoning "Okay"
    line = record_of(capture).to_json()
    assert line["ttft_ms"] == pytest.approx((at(0) - T0) * 1e3, abs=1e-3)


@pytest.mark.parametrize("number", ["06", "18", "46"])
def test_ttft_is_null_for_a_non_streamed_body(number: str) -> None:
    record = record_of(BY_NUMBER[number])
    assert record.to_json()["ttft_ms"] is None
    assert record.to_json()["ttfc_ms"] is not None
    # Even if a first content time were known, a whole body's first byte is not a first token.
    assert dataclasses.replace(record, first_content_ns=record.start_ns + 5).to_json()["ttft_ms"] is None


# -- 3. the line reads back -------------------------------------------------------------------------------


@pytest.mark.parametrize("capture_content", [False, True], ids=["no-content", "content"])
@pytest.mark.parametrize("capture", ALL, ids=[c.name for c in ALL])
def test_line_round_trips_through_from_json(capture: captures.Capture, capture_content: bool) -> None:
    line = record_of(capture, capture_content=capture_content).to_json()
    written = orjson.loads(orjson.dumps(line))  # as it sits in the JSONL file
    assert Record.from_json(written).to_json() == line
    assert Record.from_json(line).to_json() == line


def test_round_trip_keeps_captured_messages() -> None:
    line = record_of(BY_NUMBER["13"], capture_content=True).to_json()
    assert line["input_messages"][0]["role"] == "user"
    assert line["input_messages"][0]["parts"][0]["content"] == "How many feet are in a nautical mile?"
    assert line["output_messages"][0]["role"] == "assistant"
    assert line["output_messages"][0]["finish_reason"] == "stop"
    again = Record.from_json(orjson.loads(orjson.dumps(line))).to_json()
    assert again["input_messages"] == line["input_messages"]
    assert again["output_messages"] == line["output_messages"]


def test_round_trip_keeps_the_cached_prompt_count() -> None:
    record = record_of_body(generation(load_duration=9, prompt_eval_count=30, prompt_eval_cached_count=24))
    line = record.to_json()
    assert line["prompt_eval_cached_count"] == 24
    assert Record.from_json(orjson.loads(orjson.dumps(line))).to_json() == line


def test_round_trip_of_a_cancelled_exchange_without_a_response() -> None:
    ex = exchange("POST", "/api/chat", b'{"model":"m"}', status=None, outcome=CANCELLED)
    ex.error, ex.error_type = "client disconnected", CANCELLED
    line = make(ex, None).to_json()
    assert line["status"] is None
    assert Record.from_json(orjson.loads(orjson.dumps(line))).to_json() == line


# -- 4. phases ---------------------------------------------------------------------------------------------

START = 1_750_000_000_000_000_000
MS = 1_000_000


def with_timings(start: int, end: int, **timings: int) -> Record:
    return dataclasses.replace(
        record_of(BY_NUMBER["06"]), start_ns=start, end_ns=end, timings=ollama.Timings(**timings)
    )


def test_phases_are_laid_end_to_end_finishing_at_the_last_byte() -> None:
    end = START + 1000 * MS
    record = with_timings(
        START,
        end,
        total_duration=600 * MS,
        load_duration=100 * MS,
        prompt_eval_duration=100 * MS,
        eval_duration=300 * MS,
    )
    assert record.phases() == [
        ("queue", end - 600 * MS, end - 500 * MS),
        ("load", end - 500 * MS, end - 400 * MS),
        ("prompt_eval", end - 400 * MS, end - 300 * MS),
        ("eval", end - 300 * MS, end),
    ]


def test_zero_length_phases_are_skipped() -> None:
    end = START + 1000 * MS
    # A warm, fully cached prompt: no queue (total is the sum), no prompt evaluation.
    record = with_timings(
        START,
        end,
        total_duration=400 * MS,
        load_duration=50 * MS,
        prompt_eval_duration=0,
        eval_duration=350 * MS,
    )
    assert record.phases() == [("load", end - 400 * MS, end - 350 * MS), ("eval", end - 350 * MS, end)]


def test_phases_longer_than_the_exchange_are_clipped_into_it() -> None:
    end = START + 1000 * MS  # the proxy saw 1 s; Ollama says it worked 3 s (clock skew)
    record = with_timings(
        START,
        end,
        total_duration=3000 * MS,
        load_duration=500 * MS,
        prompt_eval_duration=700 * MS,
        eval_duration=1500 * MS,
    )
    phases = record.phases()
    well_formed(phases, START, end)
    assert phases[0][1] == START
    assert phases[-1][2] == end
    assert [name for name, _, _ in phases][:2] == ["queue", "load"]


@pytest.mark.parametrize(
    "timings",
    [
        {},
        {"total_duration": 832757752, "prompt_eval_count": 81, "eval_count": 48},  # capture 05, cloud
    ],
    ids=["none", "cloud"],
)
def test_unknown_timings_make_no_phases(timings: dict[str, int]) -> None:
    assert with_timings(START, START + 1000 * MS, **timings).phases() == []


@pytest.mark.parametrize("capture", ALL, ids=[c.name for c in ALL])
def test_phases_of_every_recording_nest_in_the_exchange(capture: captures.Capture) -> None:
    record = record_of(capture)
    phases = record.phases()
    well_formed(phases, record.start_ns, record.end_ns)
    if phases:
        assert phases[-1][2] == record.end_ns


def test_phases_fit_when_the_exchange_is_long_enough() -> None:
    capture = BY_NUMBER["02"]  # cold: 1.93 s of Ollama's time, far more than the test clock's exchange
    record = dataclasses.replace(record_of(capture), end_ns=record_of(capture).start_ns + 5_000 * MS)
    phases = record.phases()
    well_formed(phases, record.start_ns, record.end_ns)
    durations = {name: end - start for name, start, end in phases}
    assert durations == {
        "queue": 1926263700 - 1667241100 - 123822500 - 133173800,
        "load": 1667241100,
        "prompt_eval": 123822500,
        "eval": 133173800,
    }


# -- 5. cold start -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load_duration", "cold"),
    [
        (1_667_241_100, True),  # capture 02
        (51_316_000, False),  # capture 03: warm, small but not 0
        (1, False),
        (0, False),
    ],
)
def test_cold_start_is_load_duration_over_the_threshold(load_duration: int, cold: bool) -> None:
    record = record_of_body(generation(total_duration=2 * 10**9, load_duration=load_duration))
    assert record.cold_start is cold
    assert record.to_json()["cold_start"] is cold


def test_cold_start_is_unknown_without_load_duration() -> None:
    assert record_of_body(generation(total_duration=10**9, eval_count=3)).cold_start is None
    assert record_of(BY_NUMBER["05"]).cold_start is None


def test_cold_start_uses_the_configured_threshold() -> None:
    raw = orjson.dumps(generation(load_duration=51_316_000))
    ex = exchange("POST", "/api/generate", b"{}", [raw])
    kwargs: dict[str, Any] = {"server_address": "h", "server_port": 1, "client_header": b"x-client-name"}
    low = build(ex, observe([raw], JSON), IDS, cold_start_seconds=0.05, capture_content=False, **kwargs)
    high = build(ex, observe([raw], JSON), IDS, cold_start_seconds=0.06, capture_content=False, **kwargs)
    assert (low.cold_start, high.cold_start) == (True, False)


# -- 6. outcome --------------------------------------------------------------------------------------------


def content_lines(chunks: Sequence[bytes]) -> int:
    return sum(bool(json.loads(chunk).get("response")) for chunk in chunks)


def test_cancelled_by_the_client_mid_stream() -> None:
    capture = BY_NUMBER["01"]
    seen = capture.chunks()[:6]
    ex = exchange(
        "POST", capture.endpoint, capture.request_body, seen, content_type=NDJSON, outcome=CANCELLED
    )
    ex.error, ex.error_type = "client disconnected", CANCELLED
    record = make(ex, observe(seen, NDJSON))
    assert (record.outcome, record.error_type) == (CANCELLED, CANCELLED)
    assert content_lines(seen) > 0
    assert record.output_tokens == content_lines(seen)
    assert record.input_tokens is None
    assert record.error is not None and str(content_lines(seen)) in record.error
    assert record.to_json()["eval_count"] is None


def test_cancelled_before_the_response_started() -> None:
    ex = exchange("POST", "/api/chat", b'{"model":"m"}', status=None, outcome=CANCELLED)
    ex.error, ex.error_type = "client disconnected", CANCELLED
    record = make(ex, None)
    assert (record.outcome, record.error_type, record.output_tokens, record.chunks) == (
        CANCELLED,
        CANCELLED,
        None,
        0,
    )


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (503, b'{"error":"server busy"}', "server busy"),
        (404, b'{"error":{"message":"model \\"x\\" not found","type":"api_error"}}', 'model "x" not found'),
    ],
)
def test_http_error_status_is_an_error_named_by_its_code(status: int, body: bytes, message: str) -> None:
    ex = exchange("POST", "/api/chat", b'{"model":"x"}', [body], status=status)
    record = make(ex, observe([body], JSON))
    assert (record.outcome, record.error_type, record.error) == (ERROR, str(status), message)


def test_http_error_with_an_empty_body_still_says_what_happened() -> None:
    ex = exchange("POST", "/api/chat", b'{"model":"x"}', status=403)  # Ollama refusing an Origin
    record = make(ex, observe([], JSON))
    assert (record.outcome, record.error_type) == (ERROR, "403")
    assert record.error


def test_error_line_after_a_200_is_a_stream_error() -> None:
    body = (API_FIXTURES / "error_midstream_generate.ndjson").read_bytes()
    chunks = [line + b"\n" for line in body.splitlines()]
    ex = exchange("POST", "/api/generate", b'{"model":"gemma4"}', chunks, content_type=NDJSON)
    record = make(ex, observe(chunks, NDJSON))
    assert (record.status, record.outcome, record.error_type) == (200, ERROR, "stream_error")
    assert record.error == "an error was encountered while running the model"


@pytest.mark.parametrize("cut", [1, 5])
def test_stream_cut_before_done_is_incomplete(cut: int) -> None:
    capture = BY_NUMBER["01"]
    chunks = capture.chunks()[:-cut]
    record = record_of(capture, chunks=chunks)
    assert (record.outcome, record.error_type) == (ERROR, "incomplete_stream")
    assert record.error


def test_stream_cut_inside_its_final_line_is_incomplete() -> None:
    capture = BY_NUMBER["01"]
    chunks = capture.chunks()
    record = record_of(capture, chunks=[*chunks[:-1], chunks[-1][:40]])
    assert (record.outcome, record.error_type) == (ERROR, "incomplete_stream")


def test_v1_stream_cut_before_its_finish_is_incomplete() -> None:
    capture = BY_NUMBER["44"]
    record = record_of(capture, chunks=capture.chunks()[:3])
    assert (record.outcome, record.error_type) == (ERROR, "incomplete_stream")


GARBAGE = [b"not json at all\n", b'{"model":"m","response":"b",\n', b"\x00\xff\xfe\n", b"[1,2,3]\n"]


def ndjson_stream(*garbage: bytes, final: bool = True) -> list[bytes]:
    """A native stream of a few tokens with ``garbage`` lines among them, and its final object."""
    tokens = [orjson.dumps({"model": "m", "response": t, "done": False}) + b"\n" for t in ("It", " is", ".")]
    ending = [orjson.dumps(generation(response="", load_duration=1, eval_count=3)) + b"\n"] if final else []
    return [tokens[0], *garbage, *tokens[1:], *ending]


@pytest.mark.parametrize("garbage", GARBAGE, ids=["text", "torn-object", "binary", "array"])
def test_garbage_then_a_final_object_is_a_malformed_stream(garbage: bytes) -> None:
    chunks = ndjson_stream(garbage)
    observation = observe(chunks, NDJSON)
    assert observation.done and observation.malformed  # the observer saw both
    record = make(
        exchange("POST", "/api/generate", b'{"model":"m"}', chunks, content_type=NDJSON), observation
    )
    assert (record.status, record.outcome, record.error_type) == (200, ERROR, "malformed_stream")
    assert record.error == (
        "malformed stream from upstream: an NDJSON line was not a JSON object; "
        "the stream still ended with a final object"
    )
    assert (record.output_tokens, record.done_reason) == (3, "stop")  # the final object's facts stay
    line = record.to_json()
    assert Record.from_json(orjson.loads(orjson.dumps(line))).to_json() == line


def test_garbage_without_a_final_object_is_malformed_and_says_it_ended_early() -> None:
    chunks = ndjson_stream(*GARBAGE, final=False)
    ex = exchange("POST", "/api/generate", b'{"model":"m"}', chunks, content_type=NDJSON)
    record = make(ex, observe(chunks, NDJSON))
    assert (record.outcome, record.error_type) == (ERROR, "malformed_stream")
    assert record.error is not None and record.error.endswith("the stream ended without a final object")


def test_garbage_before_the_first_content_is_malformed_too() -> None:
    chunks = [b"<html>502 Bad Gateway</html>\n", *ndjson_stream()]
    ex = exchange("POST", "/api/generate", b'{"model":"m"}', chunks, content_type=NDJSON)
    assert make(ex, observe(chunks, NDJSON)).error_type == "malformed_stream"


def test_a_v1_stream_with_a_garbage_event_is_malformed() -> None:
    capture = BY_NUMBER["44"]
    chunks = capture.chunks()
    chunks.insert(len(chunks) - 2, b"data: {not json\n\n")
    record = record_of(capture, chunks=chunks)
    assert (record.outcome, record.error_type) == (ERROR, "malformed_stream")
    assert record.error is not None and "an SSE data event was not a JSON object" in record.error
    assert "still ended with" in record.error


@pytest.mark.parametrize(
    ("path", "error_type"),
    [("/api/chat", "malformed_body"), ("/api/embed", "malformed_body"), ("/api/future", None)],
)
def test_a_body_that_is_no_json_object_is_malformed_on_genai_endpoints(
    path: str, error_type: str | None
) -> None:
    for body in (b"<html>oops</html>", b'{"model":"m","message":', b"[0.1,0.2]"):
        record = make(exchange("POST", path, b'{"model":"m"}', [body]), observe([body], JSON))
        # An unknown path may well answer a JSON array: only the GenAI endpoints promise an object.
        assert (record.outcome, record.error_type) == ((ERROR, error_type) if error_type else ("ok", None))


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"outcome": CANCELLED, "error": "client disconnected", "error_type": CANCELLED}, CANCELLED),
        ({"outcome": ERROR, "error": "otellama: ... timed out", "error_type": "timeout"}, "timeout"),
    ],
)
def test_the_client_leaving_or_a_transport_failure_explains_garbage_first(
    facts: dict[str, Any], expected: str
) -> None:
    chunks = ndjson_stream(*GARBAGE, final=False)
    ex = exchange("POST", "/api/generate", b'{"model":"m"}', chunks, content_type=NDJSON, **facts)
    assert make(ex, observe(chunks, NDJSON)).error_type == expected


def test_ollamas_own_error_explains_garbage_first() -> None:
    error_line = b'{"error":"an error was encountered while running the model"}\n'
    chunks = [*ndjson_stream(*GARBAGE, final=False), error_line]
    ex = exchange("POST", "/api/generate", b'{"model":"m"}', chunks, content_type=NDJSON)
    assert make(ex, observe(chunks, NDJSON)).error_type == "stream_error"
    ex = exchange("POST", "/api/chat", b'{"model":"m"}', [b"<html>"], status=502)
    assert make(ex, observe([b"<html>"], JSON)).error_type == "502"


def test_lines_and_bodies_past_the_caps_are_not_malformed() -> None:
    # A long-context final object carries "context" (megabytes), a big embedding batch is a big body: both
    # are Ollama's data, parsed only up to a cap (truncated), never malformed.
    final = orjson.dumps(generation(response="", load_duration=1, context=list(range(700_000)))) + b"\n"
    assert len(final) > LINE_CAP
    chunks = [*ndjson_stream(final=False), final[:1000], final[1000:]]
    observation = observe(chunks, NDJSON)
    assert (observation.truncated, observation.malformed) == (True, False)
    ex = exchange("POST", "/api/generate", b'{"model":"m"}', chunks, content_type=NDJSON)
    record = make(ex, observation)
    assert (record.outcome, record.error) == ("ok", None)
    body = orjson.dumps({"model": "m", "embeddings": [[0.123456789] * 1024] * 700})
    assert len(body) > BODY_CAP
    observation = observe([body[: len(body) // 2], body[len(body) // 2 :]], JSON)
    assert (observation.truncated, observation.malformed) == (True, False)
    record = make(exchange("POST", "/api/embed", b'{"model":"m"}', [body]), observation)
    assert (record.outcome, record.error_type) == ("ok", None)


@pytest.mark.parametrize("capture", ALL, ids=[c.name for c in ALL])
def test_no_real_recording_is_malformed(capture: captures.Capture) -> None:
    for capture_content in (False, True):
        observation = observe(capture.chunks(), capture.content_type, capture_content=capture_content)
        assert (observation.malformed, observation.truncated) == (False, False)
    assert record_of(capture).error_type not in ("malformed_stream", "malformed_body")


def test_transport_failure_from_the_proxy_passes_through() -> None:
    body = b'{"error":"otellama: cannot reach Ollama"}'
    ex = exchange("POST", "/api/chat", b'{"model":"m"}', [body], status=502, outcome=ERROR)
    ex.error, ex.error_type = "otellama: cannot reach Ollama at http://127.0.0.1:1", "connect_error"
    record = make(ex, observe([body], JSON))
    assert (record.outcome, record.error_type) == (ERROR, "connect_error")
    assert record.error == "otellama: cannot reach Ollama at http://127.0.0.1:1"


# -- 7. parse_request --------------------------------------------------------------------------------------

CHAT = ollama.endpoint_for("POST", "/api/chat")
GENERATE = ollama.endpoint_for("POST", "/api/generate")
V1_CHAT = ollama.endpoint_for("POST", "/v1/chat/completions")


def test_native_options_are_read() -> None:
    body = orjson.dumps(
        {
            "model": "llama3.2",
            "options": {
                "temperature": 0.2,
                "top_p": 0.9,
                "top_k": 40,
                "seed": 7,
                "num_predict": 128,
                "stop": "\n",
            },
        }
    )
    facts = parse_request(GENERATE, body)
    assert facts.parsed
    assert (facts.model, facts.temperature, facts.top_p, facts.top_k, facts.seed) == (
        "llama3.2",
        0.2,
        0.9,
        40,
        7,
    )
    assert (facts.max_tokens, facts.stop) == (128, ("\n",))


def test_native_stop_list_and_ignored_top_level_sampling() -> None:
    body = b'{"model":"m","temperature":0.5,"max_tokens":9,"options":{"stop":["a","b"],"max_tokens":3}}'
    facts = parse_request(CHAT, body)
    # Ollama reads sampling from "options" only, and its length limit is num_predict.
    assert (facts.stop, facts.temperature, facts.max_tokens) == (("a", "b"), None, None)


@pytest.mark.parametrize(
    ("params", "max_tokens"),
    [
        ({"max_tokens": 64}, 64),
        ({"max_completion_tokens": 32}, 32),
        ({"max_tokens": None, "max_completion_tokens": 8}, 8),
        ({}, None),
    ],
)
def test_v1_parameters_are_top_level(params: dict[str, Any], max_tokens: int | None) -> None:
    body = orjson.dumps(
        {"model": "qwen3", "temperature": 0.7, "top_p": 0.5, "seed": 1, "stop": ["x"], **params}
    )
    facts = parse_request(V1_CHAT, body)
    assert (facts.temperature, facts.top_p, facts.seed, facts.stop, facts.max_tokens) == (
        0.7,
        0.5,
        1,
        ("x",),
        max_tokens,
    )


def test_v1_stop_as_a_string() -> None:
    assert parse_request(V1_CHAT, b'{"model":"q","stop":"END"}').stop == ("END",)


def test_values_of_the_wrong_type_are_dropped() -> None:
    options = b'{"temperature":true,"top_k":40.5,"seed":"7","num_predict":false}'
    body = b'{"model":3,"stream":"yes","options":' + options + b"}"
    facts = parse_request(CHAT, body)
    assert facts.parsed
    assert (facts.model, facts.temperature, facts.top_k, facts.seed, facts.max_tokens) == (None,) * 5
    assert facts.stream is True  # not a bool: the endpoint's default


@pytest.mark.parametrize(
    ("path", "default"),
    [
        ("/api/chat", True),
        ("/api/generate", True),
        ("/api/embed", False),
        ("/v1/chat/completions", False),
        ("/v1/completions", False),
    ],
)
def test_stream_defaults_per_endpoint(path: str, default: bool) -> None:
    endpoint = ollama.endpoint_for("POST", path)
    assert parse_request(endpoint, b'{"model":"m"}').stream is default
    assert parse_request(endpoint, b'{"model":"m","stream":false}').stream is False
    assert parse_request(endpoint, b'{"model":"m","stream":true}').stream is True


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"not json", b"[1,2]", b'"text"', b"null", b'{"model":"\xff"}', b"\xff\xfe{}", None],
    ids=["empty", "torn", "text", "array", "string", "null", "bad-utf8-inside", "bad-utf8", "over-cap"],
)
def test_unreadable_bodies_are_not_parsed_and_never_raise(body: bytes | None) -> None:
    assert parse_request(CHAT, body, capture=True).parsed is False
    record = make(exchange("POST", "/api/chat", body), None, capture_content=True)
    assert record.request.parsed is False
    assert record.to_json()["request"]["parsed"] is False
    assert "input_messages" not in record.to_json()


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/pull"), ("POST", "/api/show"), ("GET", "/api/chat"), ("POST", "/v1/responses")],
)
def test_non_genai_endpoints_are_never_parsed(method: str, path: str) -> None:
    body = b'{"model":"m","stream":false,"options":{"temperature":0.1},"messages":[{"content":"hi"}]}'
    record = make(exchange(method, path, body), None, capture_content=True)
    assert record.request.parsed is False
    assert (record.operation, record.model, record.request.temperature) == (None, None, None)
    assert "input_messages" not in record.to_json()


def test_without_content_capture_no_messages_are_kept() -> None:
    body = b'{"model":"m","system":"be brief","messages":[{"role":"user","content":"secret plan"}]}'
    facts = parse_request(CHAT, body, capture=False)
    assert facts.parsed and facts.input_messages is None
    capture = BY_NUMBER["13"]
    line = record_of(capture).to_json()
    assert "input_messages" not in line and "output_messages" not in line
    assert b"nautical" not in orjson.dumps(line)


def test_with_content_capture_the_prompt_becomes_input_messages() -> None:
    body = (
        b'{"model":"m","system":"be brief","messages":[{"role":"user","content":"hi"},{"role":"assistant"}]}'
    )
    messages = parse_request(CHAT, body, capture=True).input_messages
    assert messages == (
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "hi"}]},
        {"role": "assistant", "parts": [{"type": "text", "content": ""}]},
    )
    prompt = parse_request(GENERATE, b'{"model":"m","prompt":"Why?"}', capture=True).input_messages
    assert prompt == ({"role": "user", "parts": [{"type": "text", "content": "Why?"}]},)


def size_of(messages: Sequence[dict[str, Any]] | None) -> int:
    """Bytes of a captured list as the span attribute and the JSONL line encode it (UTF-8)."""
    return len(orjson.dumps(list(messages or ())))


def texts(messages: Sequence[dict[str, Any]] | None) -> list[str]:
    return [m["parts"][0]["content"] for m in messages or ()]


def chat_body(contents: Sequence[str], **fields: Any) -> bytes:
    roles = itertools.cycle(("user", "assistant"))
    messages = [{"role": role, "content": text} for role, text in zip(roles, contents, strict=False)]
    return orjson.dumps({"model": "m", "messages": messages, **fields})


def shaped(messages: Sequence[dict[str, Any]]) -> bool:
    """The GenAI message shape: a role and one text part each."""
    return all(
        isinstance(m["role"], str)
        and [(part["type"], type(part["content"])) for part in m["parts"]] == [("text", str)]
        for m in messages
    )


def test_a_prompt_of_many_messages_is_capped_per_attribute_keeping_the_latest() -> None:
    contents = [f"{i:03d}" + "m" * (10 * 1024 - 3) for i in range(200)]  # 2 MB of history
    body = chat_body(contents, system="be brief")
    messages = parse_request(CHAT, body, capture=True).input_messages or ()
    encoded = orjson.dumps(list(messages))
    assert CONTENT_LIMIT - 11 * 1024 < len(encoded) <= CONTENT_LIMIT  # the budget is used, not wasted
    assert orjson.loads(encoded) == list(messages) and shaped(messages)
    kept = texts(messages)
    assert kept[-1] == contents[-1] and kept[1:] == contents[-len(kept) + 1 :]  # the latest turns, whole
    assert kept[0].startswith("…") and contents[-len(kept)].endswith(kept[0][1:])  # the oldest: its end
    roles = ["user", "assistant"] * 100
    assert [m["role"] for m in messages] == roles[-len(kept) :]
    # The same list reaches the JSONL line and reads back.
    record = make(exchange("POST", "/api/chat", body), None, capture_content=True)
    line = record.to_json()
    assert line["input_messages"] == list(messages) and size_of(line["input_messages"]) <= CONTENT_LIMIT
    assert Record.from_json(orjson.loads(orjson.dumps(line))).to_json() == line


def test_one_huge_message_keeps_its_end_within_the_limit() -> None:
    question = "... so which of these clauses applies?"
    body = orjson.dumps({"model": "m", "prompt": "d" * (900 * 1024) + question})
    (message,) = parse_request(GENERATE, body, capture=True).input_messages or ()
    assert CONTENT_LIMIT - 8 <= size_of([message]) <= CONTENT_LIMIT
    text = message["parts"][0]["content"]
    assert text.startswith("…d") and text.endswith(question)


@pytest.mark.parametrize(
    "unit",
    ["a", "é", "€", "🦙", '"', "\\", "\n", "\x01", "a" * 50 + "\x01"],
    ids=["ascii", "2-byte", "3-byte", "4-byte", "quote", "backslash", "newline", "control", "mixed"],
)
def test_the_cap_counts_encoded_bytes_not_characters(unit: str) -> None:
    huge = unit * (CONTENT_LIMIT // len(unit) + 7)
    for contents in ([huge], [huge, "the question"], ["x" * 999, huge, huge, "the question"]):
        messages = parse_request(CHAT, chat_body(contents), capture=True).input_messages or ()
        assert CONTENT_LIMIT - 3 * 8 <= size_of(messages) <= CONTENT_LIMIT  # within a character or two
        assert shaped(messages) and texts(messages)[0].startswith("…")


@pytest.mark.parametrize("newest", [True, False], ids=["prompt", "answer"])
def test_escapes_bunched_at_the_kept_end_still_fit_and_use_the_room(newest: bool) -> None:
    # 6 bytes a character at the end that is kept, 1 at the end that is cut: cutting in proportion to the
    # excess keeps cutting too little; cutting a character per byte too many fits at once.
    heavy, light = "\x01" * 1000, "a" * (2 * CONTENT_LIMIT)
    text = light + heavy if newest else heavy + light
    (message,) = capped([{"role": "user", "parts": [{"type": "text", "content": text}]}], newest=newest)
    kept = message["parts"][0]["content"]
    assert CONTENT_LIMIT - 8 <= size_of([message]) <= CONTENT_LIMIT
    assert kept.endswith(heavy) if newest else kept.startswith(heavy)


def test_a_prompt_that_fits_exactly_is_kept_whole_and_one_byte_more_is_cut() -> None:
    overhead = size_of([{"role": "user", "parts": [{"type": "text", "content": ""}]}])
    exact = "e" * (CONTENT_LIMIT - overhead)
    (kept,) = (
        parse_request(GENERATE, orjson.dumps({"model": "m", "prompt": exact}), capture=True).input_messages
        or ()
    )
    assert kept["parts"][0]["content"] == exact and size_of([kept]) == CONTENT_LIMIT
    over = exact + "f"
    (cut,) = (
        parse_request(GENERATE, orjson.dumps({"model": "m", "prompt": over}), capture=True).input_messages
        or ()
    )
    assert cut["parts"][0]["content"].startswith("…") and cut["parts"][0]["content"].endswith("f")
    assert size_of([cut]) <= CONTENT_LIMIT


def test_a_prompt_under_the_limit_is_captured_untouched() -> None:
    contents = ["s" * 20_000, "t" * 20_000, "u" * 20_000]
    messages = parse_request(CHAT, chat_body(contents), capture=True).input_messages
    assert texts(messages) == contents


def test_the_cap_keeps_a_suffix_of_the_conversation_whatever_the_sizes() -> None:
    rng = random.Random(20250613)
    alphabet = 'ab é€🦙"\\\n\x00'
    for _ in range(60):
        contents = [
            "".join(rng.choices(alphabet, k=rng.choice((0, 5, 300, 4_000, 30_000, 70_000))))
            for _ in range(rng.randint(1, 40))
        ]
        messages = parse_request(CHAT, chat_body(contents), capture=True).input_messages or ()
        assert size_of(messages) <= CONTENT_LIMIT and shaped(messages)
        kept = texts(messages)
        if kept == contents:
            continue  # all of it fit
        assert kept[0].startswith("…") and contents[-len(kept)].endswith(kept[0][1:])
        assert kept[1:] == contents[len(contents) - len(kept) + 1 :]


def test_roles_are_capped_too() -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "r" * CONTENT_LIMIT, "content": "hi"}]})
    (message,) = parse_request(CHAT, body, capture=True).input_messages or ()
    assert message["role"] == "r" * LABEL_LIMIT and message["parts"][0]["content"] == "hi"


def test_without_content_capture_nothing_is_captured_however_big() -> None:
    body = chat_body(["m" * 10 * 1024] * 200)
    assert parse_request(CHAT, body, capture=False).input_messages is None
    line = make(exchange("POST", "/api/chat", body), None).to_json()
    assert "input_messages" not in line and "output_messages" not in line
    assert b"mmmm" not in orjson.dumps(line)


def test_captured_output_keeps_the_start_of_the_answer_within_the_limit() -> None:
    answer = "Once upon a time " + "z" * (CONTENT_LIMIT * 2) + " the end."
    raw = orjson.dumps(generation(response=answer, load_duration=1))
    ex = exchange("POST", "/api/generate", b'{"model":"m","stream":false}', [raw])
    record = make(ex, observe([raw], JSON, capture_content=True), capture_content=True)
    (message,) = record.output_messages or ()
    text = message["parts"][0]["content"]
    assert text.startswith("Once upon a time zzz") and text.endswith("z…")
    assert message["finish_reason"] == "stop"
    assert CONTENT_LIMIT - 8 <= size_of(record.output_messages) <= CONTENT_LIMIT
    assert size_of(record.to_json()["output_messages"]) <= CONTENT_LIMIT


def test_captured_streamed_output_is_capped_too() -> None:
    chunks = [orjson.dumps({"model": "m", "response": "€" * 1000, "done": False}) + b"\n" for _ in range(100)]
    chunks.append(orjson.dumps(generation(response="", load_duration=1)) + b"\n")
    ex = exchange("POST", "/api/generate", b'{"model":"m"}', chunks, content_type=NDJSON)
    record = make(ex, observe(chunks, NDJSON, capture_content=True), capture_content=True)
    assert record.outcome == "ok"
    assert CONTENT_LIMIT - 8 <= size_of(record.output_messages) <= CONTENT_LIMIT  # 300 KB of answer


# A "messages" value that is no list (a number, a boolean) once made parse_request raise with capture on.
@pytest.mark.parametrize("messages", [b"5", b"true"])
def test_odd_messages_value_with_capture_never_raises(messages: bytes) -> None:
    body = b'{"model":"m","messages":' + messages + b"}"
    facts = parse_request(CHAT, body, capture=True)
    assert facts.parsed and facts.model == "m"


# -- 8. client attribution and secrets ---------------------------------------------------------------------


def test_client_header_names_the_client() -> None:
    headers = [(b"x-client-name", b"open-webui")]
    assert (
        make(exchange("POST", "/api/chat", b"{}", headers=headers), None).to_json()["client"] == "open-webui"
    )
    assert make(exchange("POST", "/api/chat", b"{}"), None).client is None


def test_client_name_is_clipped() -> None:
    headers = [(b"x-client-name", b"c" * (CLIENT_NAME_LIMIT + 50))]
    record = make(exchange("GET", "/api/tags", None, headers=headers), None, ids=NON_GENAI_IDS)
    assert record.client == "c" * CLIENT_NAME_LIMIT


def test_credentials_never_reach_the_line() -> None:
    capture = BY_NUMBER["13"]
    secrets = [b"sk-very-secret-token-1234", b"session=cookie-secret-5678", b"proxy-secret-9012"]
    headers = [
        (b"authorization", b"Bearer " + secrets[0]),
        (b"cookie", secrets[1]),
        (b"proxy-authorization", b"Basic " + secrets[2]),
        (b"x-client-name", b"my-app"),
    ]
    chunks = capture.chunks()
    ex = exchange(
        "POST", capture.endpoint, capture.request_body, chunks, content_type=NDJSON, headers=headers
    )
    line = orjson.dumps(
        make(ex, observe(chunks, NDJSON, capture_content=True), capture_content=True).to_json()
    )
    assert b"my-app" in line
    for secret in [*secrets, b"cookie-secret", b"Bearer"]:
        assert secret not in line


# -- 9. endpoint_of ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        (
            "/api/blobs/sha256:29fdb92e57cf0827ded04ae6461b5931d01fa595843f55d36f5b275a52087dd2",
            "/api/blobs/{digest}",
        ),
        ("/api/blobs/sha256:0", "/api/blobs/{digest}"),
        ("/v1/models/llama3.2:latest", "/v1/models/{model}"),
        ("/v1/models/hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "/v1/models/{model}"),
        ("/v1/models", "/v1/models"),
        ("/api/blobs/", "/api/blobs/"),
        ("/api/chat", "/api/chat"),
        ("/", "/"),
        ("/api/experimental/whatever", "/api/experimental/whatever"),
    ],
)
def test_endpoint_of_names_free_form_paths(path: str, endpoint: str) -> None:
    assert endpoint_of(path) == endpoint


def test_record_endpoint_is_normalised() -> None:
    record = make(exchange("HEAD", "/api/blobs/sha256:abc", None, status=200), None, ids=NON_GENAI_IDS)
    assert (record.endpoint, record.operation) == ("/api/blobs/{digest}", None)


def test_build_is_pure() -> None:
    capture = BY_NUMBER["23"]
    assert record_of(capture, capture_content=True) == record_of(capture, capture_content=True)


def test_what_a_request_or_ollama_chose_is_kept_within_the_field_limits() -> None:
    # A 1 MB body can name a 900 KB model, and Ollama's error line or final object can say anything: the
    # record (and so every span attribute and the JSONL line) keeps at most FIELD_LIMIT characters of each.
    huge = "m" * 900_000
    error_line = orjson.dumps({"error": "e" * 2_000_000}) + b"\n"
    chunks = [*ndjson_stream(final=False), error_line]
    body = orjson.dumps({"model": huge, "prompt": "hi", "options": {"stop": ["s" * 50_000]}})
    record = make(
        exchange("POST", "/api/generate", body, chunks, content_type=NDJSON), observe(chunks, NDJSON)
    )
    assert record.error_type == "stream_error"
    assert record.model == huge[: FIELD_LIMIT - 1] + CUT_MARK
    assert len(record.error or "") == FIELD_LIMIT and record.request.stop == (
        "s" * (FIELD_LIMIT - 1) + CUT_MARK,
    )
    final = orjson.dumps(generation(model=huge, done_reason="r" * 10_000, response="")) + b"\n"
    record = make(
        exchange("POST", "/api/generate", None, [final], content_type=NDJSON), observe([final], NDJSON)
    )
    assert len(record.model or "") == len(record.response_model or "") == FIELD_LIMIT
    assert len(record.done_reason or "") == LABEL_LIMIT and [len(r) for r in record.finish_reasons] == [
        LABEL_LIMIT
    ]
    assert len(orjson.dumps(record.to_json())) < 8 * 1024


def test_build_passes_the_fields_in_their_order() -> None:
    """build() calls Record with positions (keywords cost 2 us): each is a local named after its field,
    but for the four the comment in build names."""
    call = next(
        node
        for node in ast.walk(ast.parse(inspect.getsource(build)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Record"
    )
    names = [ast.unparse(arg) for arg in call.args]
    renamed = {
        "path": "endpoint",
        "client_name": "client",
        "exchange.upstream": "upstream",
        "exchange.route": "route",
    }
    assert [renamed.get(name, name) for name in names] == [f.name for f in dataclasses.fields(Record)]
