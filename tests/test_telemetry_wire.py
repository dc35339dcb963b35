"""Telemetry on the wire: otellama in front of the emulator, exporting over OTLP to real receivers.

Every test configures export the way a user does, with the standard ``OTEL_*`` variables read when the app
is created, drives traffic with real clients, and checks what crossed the socket (OTLP gRPC or HTTP/protobuf,
the Prometheus scrape, the JSONL file) against what the clients and the upstream saw. The three sinks render
one record per exchange, so their numbers must agree everywhere.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message, Receive, Scope, Send

from otellama.app import App, create_app
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.server import BackgroundServer
from otellama.settings import Settings, Upstream
from tests.otlp_receiver import (
    OtlpGrpcReceiver,
    OtlpHttpReceiver,
    OtlpReceiver,
    ReceivedMetric,
    ReceivedSpan,
)

T = TypeVar("T")

MODEL = "llama3.2:3b"
PROTOCOLS: dict[str, type[OtlpReceiver[Any]]] = {"grpc": OtlpGrpcReceiver, "http/protobuf": OtlpHttpReceiver}

# The spec's bucket advice, restated from docs/reference.md §2 on purpose (not imported from semconv.py).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5)
SPEC_BUCKETS = {
    "gen_ai.client.operation.duration": DURATION_BUCKETS,
    "gen_ai.client.token.usage": TOKEN_BUCKETS,
    "gen_ai.client.operation.time_to_first_chunk": DURATION_BUCKETS,
    "gen_ai.server.request.duration": DURATION_BUCKETS,
    "gen_ai.server.time_to_first_token": TTFT_BUCKETS,
    "gen_ai.server.time_per_output_token": TPOT_BUCKETS,
}
OLLAMA_HISTOGRAMS = (
    "ollama.load.duration",
    "ollama.prompt_eval.duration",
    "ollama.eval.duration",
    "ollama.queue.duration",
    "ollama.generation.throughput",
    "ollama.prompt.throughput",
)
COUNTERS = ("ollama.cold_starts", "ollama.requests", "ollama.requests.in_flight")
# The OpenTelemetry SDK's default boundaries: useless for seconds (docs/reference.md §2), never acceptable.
SDK_DEFAULT_BUCKETS = (0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)
METRIC_ATTRIBUTE_KEYS = {
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "otellama.outcome",
    "error.type",
    "otellama.client",
    "gen_ai.token.type",
}
# The SDK's own span export queue metrics (exportqueue.py turns them on), with the SDK's attributes.
PHASES = ("ollama.queue", "ollama.load", "ollama.prompt_eval", "ollama.eval")
PHASE_NS = {
    "ollama.queue": "ollama.queue_duration_ns",
    "ollama.load": "ollama.load_duration_ns",
    "ollama.prompt_eval": "ollama.prompt_eval_duration_ns",
    "ollama.eval": "ollama.eval_duration_ns",
}
HTTPX_SCOPE = "opentelemetry.instrumentation.httpx"


# --- helpers ----------------------------------------------------------------------------------------------
def eventually(check: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {result!r})")
        time.sleep(0.01)


def otel_env(mp: pytest.MonkeyPatch, **variables: str) -> None:
    """Forget every ``OTEL_*`` variable of the outer environment, then set exactly ``variables``."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            mp.delenv(name)
    for name, value in variables.items():
        mp.setenv(name, value)


def export_env(receiver_endpoint: str, protocol: str, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **extra,
    }


def closed_port() -> int:
    with socket.socket() as sock:  # free a moment ago, nobody listens now
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    *complete, _partial = path.read_bytes().split(b"\n")  # a line still being written is not read yet
    return [orjson.loads(line) for line in complete]


def wait_for_lines(path: Path, count: int) -> list[dict[str, Any]]:
    eventually(lambda: len(read_jsonl(path)) >= count, f"{count} JSONL lines in {path}")
    return read_jsonl(path)


def latest(points: list[ReceivedMetric]) -> dict[frozenset[tuple[str, Any]], ReceivedMetric]:
    """The newest point of each series (cumulative metrics are re-sent on every export)."""
    newest: dict[frozenset[tuple[str, Any]], ReceivedMetric] = {}
    for point in points:
        newest[frozenset((k, repr(v)) for k, v in point.attributes.items())] = point
    return newest


def total(receiver: OtlpReceiver[Any], name: str, **where: str) -> float:
    """The current value of counter ``name`` summed over the series whose attributes match ``where``."""
    return sum(
        p.value or 0
        for p in latest(receiver.metrics(name)).values()
        if all(p.attributes.get(k) == v for k, v in where.items())
    )


def histogram_totals(receiver: OtlpReceiver[Any], name: str, **where: str) -> tuple[int, float]:
    """(count, sum) of histogram ``name`` over the series whose attributes match ``where``."""
    points = [
        p
        for p in latest(receiver.metrics(name)).values()
        if all(p.attributes.get(k) == v for k, v in where.items())
    ]
    return sum(p.count or 0 for p in points), sum(p.sum or 0.0 for p in points)


def scrape(url: str) -> dict[str, Any]:
    text = httpx.get(f"{url}/otellama/metrics").text
    return {family.name: family for family in text_string_to_metric_families(text)}


def requests_scraped(url: str) -> float:
    found = scrape(url).get("ollama_requests")
    return sum(s.value for s in found.samples if s.name == "ollama_requests_total") if found else 0.0


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


@dataclasses.dataclass
class UpstreamRequest:
    path: str
    headers: dict[bytes, bytes]
    headers_ns: int | None = None  # wall clock when the upstream sent its response headers
    last_body_ns: int | None = None  # wall clock when it handed its last non-empty body chunk over


class Recording:
    """Wraps the emulator: records each request's headers and when its response parts went out."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any]) -> None:
        self.app = app
        self.requests: list[UpstreamRequest] = []
        self._lock = threading.Lock()

    def seen(self, path: str) -> list[UpstreamRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/api/version":  # the health probe is not traffic
            await self.app(scope, receive, send)
            return
        seen = UpstreamRequest(scope["path"], dict(scope["headers"]))
        with self._lock:
            self.requests.append(seen)

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen.headers_ns = time.time_ns()
            elif message["type"] == "http.response.body" and message.get("body"):
                seen.last_body_ns = time.time_ns()
            await send(message)

        await self.app(scope, receive, timed)


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app``; stopping it runs otellama's lifespan shutdown, which flushes its exporters."""
    server = BackgroundServer(app).start()
    try:
        yield server.url
    finally:
        server.stop()


def fast_emulator() -> Any:
    """An emulator that floods its tokens and loads a model in 50 ms."""
    return create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.05))


def make_app(upstream_url: str, log_file: Path, **settings: Any) -> App:
    return create_app(Settings(upstream=Upstream.parse(upstream_url), log_file=log_file, **settings))


def cancel_after_first_chunk(url: str, path: str, body: bytes) -> bytes:
    """Send a streamed request on a raw socket and hang up as soon as the first token arrived."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        received = b""
        while b'"response"' not in received:  # the headers may arrive on their own
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


# --- 1-3: one chat stream and one generate, over gRPC and over HTTP ----------------------------------------
@dataclasses.dataclass
class Scenario:
    protocol: str
    receiver: OtlpReceiver[Any]
    upstream: Recording
    upstream_port: int
    url: str
    log_file: Path
    incoming_trace_id: str
    incoming_span_id: str
    chat_final: ollama.ChatResponse
    chat_chunks: int
    generated: ollama.GenerateResponse
    prompt: str


@pytest.fixture(scope="module", params=sorted(PROTOCOLS))
def scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """A paced (50 tokens/s) streamed chat carrying a caller's traceparent, then a non-streamed generate.

    The first request finds the model cold (load 0.2 s, cold start threshold 0.1 s), the second warm.
    """
    protocol: str = request.param
    log_file = tmp_path_factory.mktemp("scenario") / "otellama.jsonl"
    emulator = create_emulator(EmulatorSettings(token_rate=50, load_seconds=0.2, response_tokens=(15, 20)))
    upstream = Recording(emulator)
    prompt = f"why is the sky blue {secrets.token_hex(4)}"
    incoming_trace_id, incoming_span_id = secrets.token_hex(16), secrets.token_hex(8)
    with (
        PROTOCOLS[protocol]() as receiver,
        running(upstream) as upstream_url,
        pytest.MonkeyPatch.context() as mp,
    ):
        otel_env(mp, **export_env(receiver.endpoint, protocol))
        app = make_app(upstream_url, log_file, cold_start_seconds=0.1)
        with running(app) as url:
            headers = {
                "traceparent": traceparent(incoming_trace_id, incoming_span_id),
                "X-Client-Name": "wire",
            }
            with ollama.Client(host=url, headers=headers) as client:
                chunks = list(client.chat(MODEL, [{"role": "user", "content": prompt}], stream=True))
            with ollama.Client(host=url) as client:
                generated = client.generate(MODEL, prompt, stream=False)
            yield Scenario(
                protocol=protocol,
                receiver=receiver,
                upstream=upstream,
                upstream_port=Upstream.parse(upstream_url).port,
                url=url,
                log_file=log_file,
                incoming_trace_id=incoming_trace_id,
                incoming_span_id=incoming_span_id,
                chat_final=chunks[-1],
                chat_chunks=len(chunks),
                generated=generated,
                prompt=prompt,
            )


def _spans_of(receiver: OtlpReceiver[Any], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in receiver.spans() if s.trace_id == trace_id]


def _check_exchange(
    s: Scenario, server: ReceivedSpan, name: str, final: ollama.ChatResponse | ollama.GenerateResponse
) -> ReceivedSpan:
    """The GenAI span of ``server``'s exchange, with everything that must hold for any exchange checked."""
    spans = _spans_of(s.receiver, server.trace_id)
    [genai] = [x for x in spans if x.parent_span_id == server.span_id]
    assert (genai.name, genai.kind, genai.status_code) == (name, "CLIENT", "UNSET")
    assert server.start_ns <= genai.start_ns <= genai.end_ns <= server.end_ns
    a = genai.attributes
    operation, _, model = name.partition(" ")
    assert a["gen_ai.operation.name"] == operation
    assert a["gen_ai.provider.name"] == "ollama"
    assert a["gen_ai.request.model"] == model
    assert a["gen_ai.response.finish_reasons"] == [final.done_reason] == ["stop"]
    assert a["gen_ai.usage.input_tokens"] == final.prompt_eval_count > 0
    assert a["gen_ai.usage.output_tokens"] == final.eval_count > 0
    ttfc = a["gen_ai.response.time_to_first_chunk"]
    assert isinstance(ttfc, float) and 0 < ttfc * 1e9 <= genai.duration_ns
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", s.upstream_port)
    assert a["ollama.load_duration_ns"] == final.load_duration
    assert a["ollama.prompt_eval_duration_ns"] == final.prompt_eval_duration
    assert a["ollama.eval_duration_ns"] == final.eval_duration
    assert a["ollama.total_duration_ns"] == final.total_duration
    queue = final.total_duration - final.load_duration - final.prompt_eval_duration - final.eval_duration
    assert a["ollama.queue_duration_ns"] == queue >= 0
    assert s.prompt not in str(a)  # content capture is opt-in and off

    # Ollama's phases: children of the GenAI span, inside it, end to end without overlapping.
    phases = sorted((x for x in spans if x.name in PHASES), key=lambda x: x.start_ns)
    expected = [p for p in PHASES if p != "ollama.queue" or queue > 0]
    assert sorted(p.name for p in phases) == sorted(expected)
    for phase in phases:
        assert (phase.parent_span_id, phase.kind) == (genai.span_id, "INTERNAL")
        assert genai.start_ns <= phase.start_ns <= phase.end_ns <= genai.end_ns
        assert phase.duration_ns == a[PHASE_NS[phase.name]]
    for earlier, later in itertools.pairwise(phases):
        assert earlier.end_ns <= later.start_ns

    # The upstream call, traced by opentelemetry-instrumentation-httpx under the GenAI span, and the
    # traceparent it sent to Ollama naming exactly that span.
    [outgoing] = [x for x in spans if x.scope_name == HTTPX_SCOPE]
    assert (outgoing.kind, outgoing.parent_span_id) == ("CLIENT", genai.span_id)
    assert genai.start_ns <= outgoing.start_ns <= outgoing.end_ns <= genai.end_ns
    path = "/api/chat" if operation == "chat" else "/api/generate"
    [upstream_request] = [
        r for r in s.upstream.seen(path) if server.trace_id.encode() in r.headers.get(b"traceparent", b"")
    ]
    assert upstream_request.headers[b"traceparent"] == traceparent(server.trace_id, outgoing.span_id).encode()
    assert len(spans) == 3 + len(phases)  # server, GenAI, httpx, phases: nothing else in the trace
    assert all(x.resource.get("service.name") == "otellama" for x in spans)
    return genai


def test_spans_continue_the_callers_trace_and_nest_correctly(scenario: Scenario) -> None:
    s = scenario
    # The server span is ended last and spans are exported in order: once it is here, its trace is whole.
    servers = s.receiver.wait_for_spans(lambda x: x.kind == "SERVER", count=2)
    assert len(servers) == 2
    [chat_server] = [x for x in servers if x.attributes["http.route"] == "/api/chat"]
    [generate_server] = [x for x in servers if x.attributes["http.route"] == "/api/generate"]

    # The caller's traceparent is continued; a request without one starts a trace of its own.
    assert chat_server.trace_id == s.incoming_trace_id
    assert chat_server.parent_span_id == s.incoming_span_id
    assert generate_server.parent_span_id is None
    assert generate_server.trace_id != s.incoming_trace_id
    for server in servers:
        assert server.status_code == "UNSET"
        assert server.attributes["http.request.method"] == "POST"
        assert server.attributes["http.response.status_code"] == 200
        assert server.attributes["otellama.outcome"] == "ok"

    chat = _check_exchange(s, chat_server, f"chat {MODEL}", s.chat_final)
    assert chat.attributes["gen_ai.request.stream"] is True
    assert chat.attributes["ollama.chunks"] == s.chat_chunks
    assert chat.attributes["otellama.client"] == "wire"
    assert chat.attributes["ollama.cold_start"] is True
    generate = _check_exchange(s, generate_server, f"text_completion {MODEL}", s.generated)
    assert generate.attributes["gen_ai.request.stream"] is False
    assert generate.attributes["ollama.cold_start"] is False

    # The GenAI span ends with the stream, not with the response headers.
    [chat_upstream] = s.upstream.seen("/api/chat")
    assert chat_upstream.headers_ns is not None and chat_upstream.last_body_ns is not None
    assert chat.end_ns >= chat_upstream.last_body_ns
    assert chat.end_ns - chat_upstream.headers_ns > 0.2e9  # 15+ tokens at 50/s
    assert chat.attributes["gen_ai.response.time_to_first_chunk"] < (chat.duration_ns / 1e9) - 0.2

    # The JSONL line names the same spans.
    lines = {line["trace_id"]: line for line in wait_for_lines(s.log_file, 2)}
    assert lines[chat.trace_id]["span_id"] == chat.span_id
    assert lines[chat.trace_id]["trace"]["parent_span_id"] == s.incoming_span_id
    assert lines[generate.trace_id]["span_id"] == generate.span_id


def _metrics_complete(receiver: OtlpReceiver[Any]) -> bool:
    names = {p.name for p in receiver.metrics()}
    wanted = set(SPEC_BUCKETS) | set(OLLAMA_HISTOGRAMS) | set(COUNTERS)
    return wanted <= names and total(receiver, "ollama.requests") == 2


def test_metrics_arrive_with_spec_buckets_low_cardinality_attributes_and_exemplars(
    scenario: Scenario,
) -> None:
    s, receiver = scenario, scenario.receiver
    eventually(lambda: _metrics_complete(receiver), "every instrument, with both requests counted")
    servers = receiver.wait_for_spans(lambda x: x.kind == "SERVER", count=2)
    genai = {
        x.trace_id: x.span_id for x in receiver.spans() if x.parent_span_id in {v.span_id for v in servers}
    }
    assert len(genai) == 2

    points = receiver.metrics()
    for name, buckets in SPEC_BUCKETS.items():
        histogram = [p for p in points if p.name == name]
        assert {p.kind for p in histogram} == {"histogram"}, name
        for point in histogram:
            assert point.explicit_bounds == pytest.approx(buckets, rel=1e-12), name
    for name in OLLAMA_HISTOGRAMS:
        for point in (p for p in points if p.name == name):
            assert point.kind == "histogram"
            bounds = list(point.explicit_bounds)
            assert bounds == sorted(set(bounds)) and len(bounds) > 5, name
            assert bounds != list(SDK_DEFAULT_BUCKETS), f"{name} has the SDK's default buckets"
    units = {name: "s" for name in (*SPEC_BUCKETS, *OLLAMA_HISTOGRAMS)}
    units.update({"gen_ai.client.token.usage": "{token}"})
    units.update(dict.fromkeys(("ollama.generation.throughput", "ollama.prompt.throughput"), "{token}/s"))
    for name, unit in units.items():
        assert {p.unit for p in points if p.name == name} == {unit}, name

    # Low cardinality: only the agreed keys, and nothing per request (no ids, no prompt text).
    for point in points:
        assert point.resource["service.name"] == "otellama"
        assert set(point.attributes) <= METRIC_ATTRIBUTE_KEYS, (point.name, point.attributes)
        for value in point.attributes.values():
            assert s.prompt not in str(value)
            assert not any(trace_id in str(value) for trace_id in genai)

    # The numbers: two operations, their tokens, one cold start, nothing left in flight.
    assert total(receiver, "ollama.requests", **{"otellama.outcome": "ok"}) == 2
    assert histogram_totals(receiver, "gen_ai.client.operation.duration")[0] == 2
    assert histogram_totals(receiver, "gen_ai.client.operation.time_to_first_chunk")[0] == 1  # streams only
    inputs = s.chat_final.prompt_eval_count + s.generated.prompt_eval_count
    outputs = s.chat_final.eval_count + s.generated.eval_count
    assert histogram_totals(receiver, "gen_ai.client.token.usage", **{"gen_ai.token.type": "input"}) == (
        2,
        inputs,
    )
    assert histogram_totals(receiver, "gen_ai.client.token.usage", **{"gen_ai.token.type": "output"}) == (
        2,
        outputs,
    )
    chat_op = {"gen_ai.operation.name": "chat", "gen_ai.request.model": MODEL, "otellama.client": "wire"}
    assert total(receiver, "ollama.cold_starts") == 1
    assert total(receiver, "ollama.cold_starts", **chat_op) == 1
    # The proxy tells the exporter process the in-flight gauge once a second: it reaches 0 soon after.
    eventually(lambda: latest(receiver.metrics("ollama.requests.in_flight")), "the in-flight gauge")
    eventually(lambda: total(receiver, "ollama.requests.in_flight") == 0, "nothing in flight")
    # The exporter process exported every span once and dropped nothing (its counters, on the scrape).
    exported = lambda: scrape(s.url)["otellama_exporter_spans"].samples[0].value  # noqa: E731
    eventually(lambda: exported() == len(receiver.spans()), "the exporter's count of the spans received")
    assert scrape(s.url)["otellama_exporter_dropped_bytes"].samples[0].value == 0
    eval_seconds = (s.chat_final.eval_duration + s.generated.eval_duration) / 1e9
    assert histogram_totals(receiver, "ollama.eval.duration")[1] == pytest.approx(eval_seconds)

    # Exemplars (OTLP exports them) point at the GenAI span of the measured exchange.
    for name in (*SPEC_BUCKETS, *OLLAMA_HISTOGRAMS):
        exemplars = [e for p in points if p.name == name for e in p.exemplars]
        assert exemplars, f"{name} carries no exemplar"
        for exemplar in exemplars:
            assert exemplar["trace_id"] in genai, name
            assert exemplar["span_id"] == genai[str(exemplar["trace_id"])], name


def _buckets(family: Any) -> dict[frozenset[tuple[str, str]], list[tuple[float, float]]]:
    found: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = collections.defaultdict(list)
    for sample in family.samples:
        if sample.name.endswith("_bucket"):
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "le")
            found[labels].append((float(sample.labels["le"]), sample.value))
    return found


def test_prometheus_scrape_has_the_same_histograms_and_counts(scenario: Scenario) -> None:
    eventually(lambda: requests_scraped(scenario.url) == 2, "both requests in the scrape")
    families = scrape(scenario.url)
    expected = {
        "gen_ai_client_operation_duration_seconds": DURATION_BUCKETS,
        "gen_ai_client_token_usage": TOKEN_BUCKETS,
        "gen_ai_client_operation_time_to_first_chunk_seconds": DURATION_BUCKETS,
        "gen_ai_server_request_duration_seconds": DURATION_BUCKETS,
        "gen_ai_server_time_to_first_token_seconds": TTFT_BUCKETS,
        "gen_ai_server_time_per_output_token_seconds": TPOT_BUCKETS,
    }
    for name, bounds in expected.items():
        assert families[name].type == "histogram", name
        series = _buckets(families[name])
        assert series, name
        for buckets in series.values():
            assert [le for le, _ in buckets] == pytest.approx([*bounds, float("inf")], rel=1e-12), name
            counts = [count for _, count in buckets]
            assert counts == sorted(counts)  # cumulative

    duration = families["gen_ai_client_operation_duration_seconds"]
    by_operation = {
        s.labels["gen_ai_operation_name"]: s.value
        for s in duration.samples
        if s.name == "gen_ai_client_operation_duration_seconds_count"
    }
    assert by_operation == {"chat": 1, "text_completion": 1}
    usage = families["gen_ai_client_token_usage"]
    sums = collections.Counter[str]()
    for sample in usage.samples:
        if sample.name == "gen_ai_client_token_usage_sum":
            sums[sample.labels["gen_ai_token_type"]] += sample.value
    final, generated = scenario.chat_final, scenario.generated
    assert sums == {
        "input": final.prompt_eval_count + generated.prompt_eval_count,
        "output": final.eval_count + generated.eval_count,
    }
    requests = families["ollama_requests"]
    assert requests.type == "counter"
    totals = [s for s in requests.samples if s.name == "ollama_requests_total"]
    assert sum(s.value for s in totals) == 2
    assert {s.labels["otellama_outcome"] for s in totals} == {"ok"}
    assert {s.labels["gen_ai_request_model"] for s in totals} == {MODEL}
    # The exporter process's place in the log, on the scrape: nothing left behind, nothing dropped.
    eventually(
        lambda: scrape(scenario.url)["otellama_exporter_backlog_bytes"].samples[0].value == 0, "no backlog"
    )
    assert families["otellama_exporter_dropped_bytes"].samples[0].value == 0


# --- 4: a dozen mixed exchanges, three renderings that agree ---------------------------------------------
def test_jsonl_spans_and_metrics_describe_the_same_exchanges(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    emulator = create_emulator(EmulatorSettings(token_rate=200, load_seconds=0.05, response_tokens=(8, 16)))
    chat = [{"role": "user", "content": "hello"}]
    with OtlpHttpReceiver() as receiver, running(emulator) as upstream_url:
        otel_env(monkeypatch, **export_env(receiver.endpoint, "http/protobuf"))
        with running(make_app(upstream_url, log_file)) as url:
            with ollama.Client(host=url) as client:
                assert list(client.chat(MODEL, chat, stream=True))[-1].done
                assert client.chat("gemma3:1b", chat, stream=False).done
                assert list(client.generate(MODEL, "hi", stream=True))[-1].done
                assert client.generate(MODEL, "hi", stream=False).done
                assert len(client.embed("nomic-embed-text", ["one", "two"]).embeddings) == 2
                with pytest.raises(ollama.ResponseError) as missing:
                    client.chat("no-such-model:7b", chat, stream=False)
                assert missing.value.status_code == 404
            native = httpx.post(
                f"{url}/api/generate",
                json={"model": MODEL, "prompt": "hi", "options": {"num_predict": 5}},
                headers={"X-Client-Name": "raw"},
            )
            assert native.status_code == 200 and orjson.loads(native.content.splitlines()[-1])["done"]
            faulty = httpx.post(
                f"{url}/api/chat",
                json={"model": MODEL, "messages": chat},
                headers={"X-Emulator-Fault": "midstream-error"},
            )
            assert faulty.status_code == 200 and "error" in orjson.loads(faulty.content.splitlines()[-1])
            body = orjson.dumps({"model": MODEL, "prompt": "a long story", "options": {"num_predict": 400}})
            assert b'"response"' in cancel_after_first_chunk(url, "/api/generate", body)
            with openai.OpenAI(base_url=f"{url}/v1", api_key="ollama", max_retries=0) as oai:
                completion = oai.chat.completions.create(model=MODEL, messages=chat)
                assert completion.usage is not None and completion.usage.completion_tokens > 0
                stream = oai.chat.completions.create(
                    model=MODEL,
                    messages=chat,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                assert [c for c in stream if c.usage is not None]
            with ollama.Client(host=url) as client:
                assert client.embed("nomic-embed-text", "three").embeddings

            n = 12
            lines = wait_for_lines(log_file, n)
            assert len(lines) == n
            servers = receiver.wait_for_spans(lambda x: x.kind == "SERVER", count=n)

            input_sum = sum(line["input_tokens"] or 0 for line in lines)
            input_usage = {"gen_ai.token.type": "input"}

            def metrics_settled() -> bool:
                usage = histogram_totals(receiver, "gen_ai.client.token.usage", **input_usage)
                return total(receiver, "ollama.requests") == n and usage[1] == input_sum

            eventually(metrics_settled, "ollama.requests to count every exchange")
            assert len(read_jsonl(log_file)) == n  # nothing counted twice, nothing late

    # Outcomes, as the clients saw them.
    assert collections.Counter(line["outcome"] for line in lines) == {"ok": 9, "error": 2, "cancelled": 1}
    by_error = {line["error_type"]: line for line in lines if line["error_type"]}
    assert set(by_error) == {"404", "stream_error", "cancelled"}
    assert by_error["404"]["model"] == "no-such-model:7b" and by_error["404"]["status"] == 404
    assert by_error["stream_error"]["endpoint"] == "/api/chat"
    assert by_error["cancelled"]["endpoint"] == "/api/generate"

    # Spans: the same N exchanges, the same ids, the same numbers.
    assert len(servers) == n
    assert {x.trace_id for x in servers} == {line["trace_id"] for line in lines}
    spans = {x.span_id: x for x in receiver.spans()}
    server_of = {x.trace_id: x for x in servers}
    for line in lines:
        server = server_of[line["trace_id"]]
        assert server.span_id == line["trace"]["server_span_id"]
        assert server.attributes["http.route"] == line["endpoint"]
        assert server.attributes.get("http.response.status_code") == line["status"]
        assert server.attributes["otellama.outcome"] == line["outcome"]
        genai = spans[line["span_id"]]
        assert (genai.trace_id, genai.parent_span_id, genai.kind) == (
            line["trace_id"],
            server.span_id,
            "CLIENT",
        )
        assert genai.name == f"{line['operation']} {line['model']}"
        assert genai.attributes.get("gen_ai.usage.input_tokens") == line["input_tokens"]
        assert genai.attributes.get("gen_ai.usage.output_tokens") == line["output_tokens"]
        assert genai.attributes.get("ollama.eval_count") == line["eval_count"]
        if line["endpoint"].startswith("/api/") and line["eval_count"] is not None:
            assert genai.attributes["gen_ai.usage.output_tokens"] == line["eval_count"]
        for span in (server, genai):
            assert span.attributes.get("error.type") == line["error_type"]
            assert span.status_code == ("UNSET" if line["outcome"] == "ok" else "ERROR")

    # Metrics: the counter per outcome and error type, the token sums per type.
    for outcome, count in collections.Counter(line["outcome"] for line in lines).items():
        assert total(receiver, "ollama.requests", **{"otellama.outcome": outcome}) == count
    for error_type, line in by_error.items():
        assert total(receiver, "ollama.requests", **{"error.type": error_type}) == 1, line
    for kind in ("input", "output"):
        values = [line[f"{kind}_tokens"] for line in lines if line[f"{kind}_tokens"] is not None]
        usage = histogram_totals(receiver, "gen_ai.client.token.usage", **{"gen_ai.token.type": kind})
        assert usage == (len(values), sum(values)), kind
    assert histogram_totals(receiver, "gen_ai.client.operation.duration")[0] == n
    assert total(receiver, "ollama.requests", **{"otellama.client": "raw"}) == 1


# --- 5: a collector that is down or slow costs nothing but a counter and one warning ------------------------
@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("collector", ["down", "slow"])
def test_a_down_or_slow_collector_never_touches_requests(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    collector: str,
    protocol: str,
) -> None:
    caplog.set_level(logging.WARNING)
    log_file = tmp_path / "otellama.jsonl"
    hello = [{"role": "user", "content": "hi"}]
    emulator = fast_emulator()
    with PROTOCOLS[protocol]() as receiver, running(emulator) as upstream_url:
        endpoint = f"http://127.0.0.1:{closed_port()}" if collector == "down" else receiver.endpoint
        receiver.delay = 4.0  # only reached when slow: longer than the exporter waits
        otel_env(monkeypatch, **export_env(endpoint, protocol, OTEL_EXPORTER_OTLP_TIMEOUT="0.3"))
        with ollama.Client(host=upstream_url) as direct:  # the emulator is deterministic: same answers
            expected_chat = "".join(c.message.content or "" for c in direct.chat(MODEL, hello, stream=True))
            expected_text = direct.generate(MODEL, "hi", stream=False).response
        with running(make_app(upstream_url, log_file)) as url:
            started = time.monotonic()
            with ollama.Client(host=url) as client:
                for _ in range(3):
                    chunks = list(client.chat(MODEL, hello, stream=True))
                    assert chunks[-1].done and chunks[-1].eval_count
                    assert "".join(c.message.content or "" for c in chunks) == expected_chat
                    assert client.generate(MODEL, "hi", stream=False).response == expected_text
            assert time.monotonic() - started < 2.0  # export trouble never slows the requests down
            assert len(wait_for_lines(log_file, 6)) == 6

            def failed() -> dict[str, float]:
                family = scrape(url).get("otellama_export_failures")
                samples = family.samples if family else []
                return {
                    s.labels["otellama_signal"]: s.value
                    for s in samples
                    if s.name == "otellama_export_failures_total" and s.value > 0
                }

            eventually(lambda: set(failed()) == {"traces", "metrics"}, "both signals to count failures")
            eventually(lambda: requests_scraped(url) == 6, "every request in the scrape")
            # One line, whoever logs it: the exporter process (its stderr) or this one (caplog).
            complaints = [
                r.getMessage()
                for r in caplog.records
                if r.name.startswith(("otellama", "opentelemetry")) and r.levelno >= logging.WARNING
            ]
            complaints += [
                line
                for line in capfd.readouterr().err.splitlines()
                if re.search(r" (WARNING|ERROR|CRITICAL) (otellama|opentelemetry)", line)
            ]
            assert len(complaints) == 1, complaints
            assert "export" in complaints[0]
            if collector == "slow":
                assert receiver.attempts() > 0  # it did reach the collector, which answered too late
    assert len(read_jsonl(log_file)) == 6


# --- 6: export is off unless asked for -------------------------------------------------------------------
@pytest.fixture
def exporters_created(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the OTLP exporters constructed during the test, by any code path."""
    from opentelemetry.exporter.otlp.proto.grpc import metric_exporter as grpc_metrics
    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_traces
    from opentelemetry.exporter.otlp.proto.http import metric_exporter as http_metrics
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_traces

    created: list[str] = []
    for module, name in (
        (grpc_traces, "OTLPSpanExporter"),
        (grpc_metrics, "OTLPMetricExporter"),
        (http_traces, "OTLPSpanExporter"),
        (http_metrics, "OTLPMetricExporter"),
    ):
        cls = getattr(module, name)
        original = cls.__init__

        def spy(self: Any, *args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> None:
            created.append(f"{_name} ({type(self).__module__})")
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", spy)
    return created


def test_no_endpoint_means_no_exporter_and_no_complaint(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    exporters_created: list[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    otel_env(monkeypatch)
    log_file = tmp_path / "otellama.jsonl"
    with running(fast_emulator()) as upstream_url:
        app = make_app(upstream_url, log_file)
        assert app.otel is not None and not app.otel.tracing
        with running(app) as url:
            with ollama.Client(host=url) as client:
                assert client.chat(MODEL, [{"role": "user", "content": "hi"}], stream=False).done
            eventually(lambda: requests_scraped(url) == 1, "the request in the scrape")
            assert "gen_ai_client_operation_duration_seconds" in scrape(url)
        assert len(read_jsonl(log_file)) == 1
    assert exporters_created == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_sdk_disabled_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exporters_created: list[str]
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    with OtlpHttpReceiver() as receiver, running(fast_emulator()) as upstream:
        otel_env(monkeypatch, **export_env(receiver.endpoint, "http/protobuf", OTEL_SDK_DISABLED="true"))
        with running(make_app(upstream, log_file)) as url, ollama.Client(host=url) as client:
            assert client.generate(MODEL, "hi", stream=False).done
            assert list(client.chat(MODEL, [{"role": "user", "content": "hi"}], stream=True))[-1].done
            wait_for_lines(log_file, 2)
        # The server stopped: its shutdown flushed whatever exporter there was. There was none.
        assert receiver.attempts() == 0
    assert exporters_created == []
    assert len(read_jsonl(log_file)) == 2


# --- 7: resource and sampler from the environment ----------------------------------------------------------
@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        (
            {
                "OTEL_SERVICE_NAME": "gateway",
                "OTEL_RESOURCE_ATTRIBUTES": "team=ml,deployment.environment.name=t",
            },
            {"service.name": "gateway", "team": "ml", "deployment.environment.name": "t"},
        ),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,team=ml"}, {"service.name": "from-attrs"}),
        # A key that merely ends in "service.name" is another key: the default stays.
        ({"OTEL_RESOURCE_ATTRIBUTES": "app.service.name=billing,team=ml"}, {"service.name": "otellama"}),
        # An empty OTEL_SERVICE_NAME counts as unset (OpenTelemetry's rule for environment variables).
        ({"OTEL_SERVICE_NAME": "", "OTEL_RESOURCE_ATTRIBUTES": "team=ml"}, {"service.name": "otellama"}),
    ],
    ids=[
        "service-name-and-attributes",
        "service-name-in-attributes",
        "unrelated-key-ending-in-service-name",
        "empty-service-name",
    ],
)
def test_resource_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variables: dict[str, str], expected: dict[str, str]
) -> None:
    with OtlpGrpcReceiver() as receiver, running(fast_emulator()) as upstream:
        otel_env(monkeypatch, **export_env(receiver.endpoint, "grpc", **variables))
        with (
            running(make_app(upstream, tmp_path / "otellama.jsonl")) as url,
            ollama.Client(host=url) as client,
        ):
            assert client.generate(MODEL, "hi", stream=False).done
            spans = receiver.wait_for_spans(lambda x: x.kind == "SERVER")
            points = receiver.wait_for_metrics("ollama.requests")
    for resource in (spans[0].resource, points[0].resource):
        assert {k: resource.get(k) for k in expected} == expected
        assert resource["service.version"]


def test_the_resource_hashed_once_is_the_resource_the_sdk_would_build() -> None:
    from opentelemetry.sdk.resources import Resource

    from otellama.sinks.otel.export import resource

    ours = resource({})
    plain = Resource(dict(ours.attributes), ours.schema_url)
    # The OTLP encoders group spans by resource: ours must group, compare and hash like the SDK's own.
    assert ours == plain and hash(ours) == hash(plain)
    assert {ours: 1, plain: 2} == {ours: 2}


def test_sampler_always_off_exports_no_spans_but_keeps_logs_and_metrics(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    upstream = Recording(fast_emulator())
    with OtlpGrpcReceiver() as receiver, running(upstream) as upstream_url:
        otel_env(monkeypatch, **export_env(receiver.endpoint, "grpc", OTEL_TRACES_SAMPLER="always_off"))
        with running(make_app(upstream_url, log_file)) as url, ollama.Client(host=url) as client:
            for _ in range(3):
                assert list(client.chat(MODEL, [{"role": "user", "content": "hi"}], stream=True))[-1].done
            eventually(lambda: total(receiver, "ollama.requests") == 3, "three requests counted over OTLP")
            assert histogram_totals(receiver, "gen_ai.client.operation.duration")[0] == 3
            lines = wait_for_lines(log_file, 3)
        # Shutdown flushed the span processor: still nothing, and no exemplar points at an unexported trace.
        assert receiver.spans() == []
        assert receiver.attempts("traces") == 0
        assert not [e for p in receiver.metrics() for e in p.exemplars if e["trace_id"]]
    assert len(lines) == 3 and all(line["trace"]["sampled"] is False for line in lines)
    assert all(line["eval_count"] for line in lines)
    # Ollama is told not to sample either.
    for request in upstream.seen("/api/chat"):
        assert request.headers[b"traceparent"].endswith(b"-00")
