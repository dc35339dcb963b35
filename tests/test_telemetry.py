"""Telemetry with in-memory providers: privacy, attribution, cardinality, cold starts and failing sinks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from otellama.app import create_app
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.exchange import Exchange
from otellama.observe.ollama import endpoint_for
from otellama.settings import Settings, Upstream
from otellama.sinks.capper import LIMIT as CARDINALITY_LIMIT
from otellama.sinks.fanout import capture_content
from otellama.sinks.otel.sink import OtelSink

CANARY = "canary-7f3a9c-do-not-log"


class Rig:
    """The emulator, otellama in front of it with in-memory exporters, and its JSONL log."""

    def __init__(
        self, serve: Callable[..., str], log_file: Path | None, token_rate: float = 0, **settings: Any
    ) -> None:
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        self.emulator = create_emulator(EmulatorSettings(token_rate=token_rate, load_seconds=0.05))
        upstream = serve(self.emulator)
        self.log_file = log_file
        app = create_app(
            Settings(upstream=Upstream.parse(upstream), log_file=log_file, **settings),
            tracer_provider=provider,
            metric_readers=[self.metrics],
        )
        self.url = serve(app)

    def settled(self, exchanges: int) -> None:
        """Wait until ``exchanges`` were recorded: otellama records after the client got its last byte."""
        deadline = time.monotonic() + 10
        while sum(s.kind == SpanKind.SERVER for s in self.finished()) < exchanges:
            assert time.monotonic() < deadline, f"{exchanges} exchanges were never recorded"
            time.sleep(0.005)

    def lines(self) -> list[dict[str, Any]]:
        assert self.log_file is not None
        return [orjson.loads(line) for line in self.log_file.read_bytes().splitlines()]

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def scrape(self) -> dict[str, Any]:
        text = httpx.get(f"{self.url}/otellama/metrics").text
        return {family.name: family for family in text_string_to_metric_families(text)}

    def chat(self, content: str, **extra: Any) -> httpx.Response:
        body = {"model": "llama3.2:3b", "messages": [{"role": "user", "content": content}], **extra}
        return httpx.post(f"{self.url}/api/chat", json=body, timeout=30)


@pytest.fixture
def rig(serve: Callable[..., str], tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    yield lambda **settings: Rig(serve, settings.pop("log_file", tmp_path / "otellama.jsonl"), **settings)


def test_prompt_and_response_text_reach_no_sink_by_default(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    caplog.set_level(logging.DEBUG)
    r = rig()
    for stream in (True, False):
        assert r.chat(f"repeat after me: {CANARY}", stream=stream).status_code == 200
    echo = httpx.post(
        f"{r.url}/api/generate", json={"model": "llama3.2:3b", "prompt": CANARY, "system": CANARY}
    )
    assert echo.status_code == 200
    r.settled(3)
    sinks = {
        "jsonl": r.log_file.read_text() if r.log_file else "",
        "spans": repr([(s.name, dict(s.attributes or {}), s.events) for s in r.finished()]),
        "prometheus": httpx.get(f"{r.url}/otellama/metrics").text,
        "own logs": caplog.text,
    }
    assert len(r.lines()) == 3 and len(r.finished()) >= 3  # the sinks did receive the exchanges
    for name, text in sinks.items():
        assert CANARY not in text, f"prompt text leaked into {name}"


def test_content_capture_is_opt_in(rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY")
    r = rig()
    r.chat(CANARY, stream=False)
    r.settled(1)
    [genai] = [s for s in r.finished() if s.name == "chat llama3.2:3b"]
    messages = orjson.loads(genai.attributes["gen_ai.input.messages"])  # type: ignore[index, arg-type]
    assert messages == [{"role": "user", "parts": [{"type": "text", "content": CANARY}]}]
    output = orjson.loads(genai.attributes["gen_ai.output.messages"])  # type: ignore[index, arg-type]
    assert output[0]["role"] == "assistant" and output[0]["parts"][0]["content"]


@pytest.mark.parametrize(
    ("value", "on"),
    [("", False), ("NO_CONTENT", False), ("false", False), ("SPAN_ONLY", True), ("span_and_event", True),
     ("EVENT_ONLY", True), ("true", True)],
)  # fmt: skip
def test_capture_setting_values(value: str, on: bool) -> None:
    assert capture_content({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": value}) is on


def test_authorization_and_cookies_are_never_recorded(rig: Callable[..., Rig]) -> None:
    r = rig()
    secret = "Bearer sk-secret-token-123"
    headers = {"Authorization": secret, "Cookie": "session=cookie-secret-456"}
    httpx.post(f"{r.url}/api/chat", headers=headers, json={"model": "llama3.2:3b", "messages": []})
    r.settled(1)
    recorded = r.log_file.read_text() if r.log_file else ""
    recorded += repr([dict(s.attributes or {}) for s in r.finished()])
    assert "sk-secret-token-123" not in recorded and "cookie-secret-456" not in recorded
    assert r.lines()  # the exchange itself was recorded


def test_client_header_attributes_the_exchange(rig: Callable[..., Rig]) -> None:
    r = rig(client_header="x-team")
    httpx.post(
        f"{r.url}/api/generate",
        headers={"X-Team": "search-bot"},
        json={"model": "llama3.2:3b", "prompt": "hi"},
    )
    r.settled(1)
    [line] = r.lines()
    assert line["client"] == "search-bot"
    requests = r.scrape()["ollama_requests"]
    assert [s.labels["otellama_client"] for s in requests.samples if s.name == "ollama_requests_total"] == [
        "search-bot"
    ]


def test_invented_model_names_cannot_grow_the_metric_store(rig: Callable[..., Rig]) -> None:
    r = rig(log_file=None)
    with httpx.Client() as client:
        for i in range(CARDINALITY_LIMIT + 30):
            client.post(f"{r.url}/api/generate", json={"model": f"invented-{i}", "prompt": "x"})
    r.settled(CARDINALITY_LIMIT + 30)
    samples = [s for s in r.scrape()["ollama_requests"].samples if s.name == "ollama_requests_total"]
    models = {s.labels["gen_ai_request_model"] for s in samples}
    assert len(models) == CARDINALITY_LIMIT + 1
    assert "other" in models
    assert sum(s.value for s in samples) == CARDINALITY_LIMIT + 30  # nothing was dropped, only relabelled


def test_cold_start_is_a_threshold_not_a_zero(serve: Callable[..., str], tmp_path: Path) -> None:
    emulator = create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.4))
    log_file = tmp_path / "otellama.jsonl"
    url = serve(create_app(Settings(upstream=Upstream.parse(serve(emulator)), log_file=log_file,
                                    cold_start_seconds=0.2)))  # fmt: skip
    for _ in range(2):
        httpx.post(f"{url}/api/generate", json={"model": "gemma3:1b", "prompt": "hi"}, timeout=10)
    deadline = time.monotonic() + 10  # recorded just after the client got its last byte
    while (
        not log_file.exists() or len(log_file.read_bytes().splitlines()) < 2
    ) and time.monotonic() < deadline:
        time.sleep(0.005)
    cold, warm = [orjson.loads(line) for line in log_file.read_bytes().splitlines()]
    assert (cold["cold_start"], warm["cold_start"]) == (True, False)
    assert warm["load_duration_ns"] > 0  # a loaded model still reports a load time: never "== 0"
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/otellama/metrics").text)}
    [cold_starts] = [s.value for s in families["ollama_cold_starts"].samples if s.name.endswith("_total")]
    assert cold_starts == 1


def test_requests_in_flight_rise_and_fall(rig: Callable[..., Rig]) -> None:
    r = rig(token_rate=50)  # a stream that is still running when we look
    with httpx.Client() as client, client.stream(
        "POST", f"{r.url}/api/chat",
        json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "x"}]},
    ) as response:  # fmt: skip
        chunks = response.iter_raw()
        next(chunks)
        during = [s.value for s in r.scrape()["ollama_requests_in_flight"].samples]
        list(chunks)
    r.settled(1)
    after = [s.value for s in r.scrape()["ollama_requests_in_flight"].samples]
    assert during == [1] and after == [0]


def test_histogram_exemplars_point_at_the_genai_span(rig: Callable[..., Rig]) -> None:
    r = rig()
    for _ in range(2):
        assert r.chat("hello", stream=False).status_code == 200
    r.settled(2)
    genai_ids = {
        (s.context.trace_id, s.context.span_id) for s in r.finished() if s.name == "chat llama3.2:3b"
    }
    data = r.metrics.get_metrics_data()
    assert data is not None and len(genai_ids) == 2
    by_name = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    [point] = by_name["gen_ai.client.operation.duration"].data.data_points  # type: ignore[union-attr]
    assert point.count == 2
    exemplars = {(e.trace_id, e.span_id) for e in point.exemplars}  # type: ignore[union-attr]
    assert exemplars and exemplars <= genai_ids  # the last exchange per bucket, linked to its trace


def test_a_disabled_sdk_records_no_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")  # the SDK's providers read it from the process
    otel = OtelSink(environ={"OTEL_SDK_DISABLED": "true"})
    otel.instruments.requests.add(1, (("outcome", "ok"),))
    assert b"ollama_requests_total" not in otel.prometheus()  # as README says of OTEL_SDK_DISABLED
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    enabled = OtelSink(environ={})
    enabled.instruments.requests.add(1, (("outcome", "ok"),))
    assert b"ollama_requests_total" in enabled.prometheus()


@pytest.mark.parametrize("sampler", ["parentbased_always_on", "parentbased_traceidratio"])
@pytest.mark.parametrize(("flags", "sampled"), [("01", True), ("00", False), (None, True)])
def test_the_callers_sampling_decision_is_kept_whichever_way_the_sampler_is_asked(
    monkeypatch: pytest.MonkeyPatch, sampler: str, flags: str | None, sampled: bool
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)  # read by the SDK's TracerProvider
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1.0")
    otel = OtelSink(tracer_provider=TracerProvider(), environ={})
    # The SDK's default sampler is decided without asking it; any other is asked (both paths tested).
    assert otel._default_sampler is (sampler == "parentbased_always_on")
    headers = [(b"traceparent", f"00-{'ab' * 16}-{'cd' * 8}-{flags}".encode())] if flags else []
    now = time.perf_counter()
    exchange = Exchange(
        method="POST",
        path="/api/chat",
        query=b"",
        request_headers=headers,
        started_at=time.time(),
        t_start=now,
    )
    ids = otel.stop(otel.start(exchange, endpoint_for("POST", "/api/chat")))
    assert ids.sampled is sampled
    assert (ids.trace_id == int("ab" * 16, 16)) is (flags is not None)


def test_openai_exchange_has_usage_but_no_ollama_durations(rig: Callable[..., Rig]) -> None:
    r = rig()
    httpx.post(
        f"{r.url}/v1/chat/completions",
        json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}], "stream": True,
              "stream_options": {"include_usage": True}},
    )  # fmt: skip
    r.settled(1)
    [line] = r.lines()
    assert line["operation"] == "chat" and line["stream"] is True and line["outcome"] == "ok"
    assert line["input_tokens"] > 0 and line["output_tokens"] > 0
    assert line["ttft_ms"] is not None
    for name in (
        "load_duration_ns",
        "eval_duration_ns",
        "total_duration_ns",
        "tokens_per_second",
        "queue_time_ms",
    ):
        assert line[name] is None, name  # /v1 carries no durations: unknown, not zero


def test_unwritable_log_never_fails_a_request(rig: Callable[..., Rig], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the log directory should be")
    r = rig(log_file=blocker / "otellama.jsonl")
    for _ in range(3):
        assert r.chat("hello", stream=False).status_code == 200
    r.settled(3)
    [failures] = [s.value for s in r.scrape()["otellama_log_failures"].samples if s.name.endswith("_total")]
    assert failures == 3
    assert len(r.finished()) >= 3  # the other sinks still got every exchange


def test_malformed_request_body_is_forwarded_and_noted(rig: Callable[..., Rig]) -> None:
    r = rig()
    response = httpx.post(f"{r.url}/api/generate", content=b'{"model": "llama3.2:3b", "prompt": ')
    assert response.status_code == 400  # Ollama's own answer to the bytes it got, untouched
    r.settled(1)
    [line] = r.lines()
    assert line["request"]["parsed"] is False
    assert (line["outcome"], line["error_type"]) == ("error", "400")
    [genai] = [s for s in r.finished() if s.name.startswith("text_completion")]
    assert genai.attributes is not None and genai.attributes["ollama.request.body_parsed"] is False
