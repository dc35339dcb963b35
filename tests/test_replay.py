"""``otellama replay``: spans rebuilt from the JSONL log, sent over OTLP to real receivers.

The wire test runs otellama in front of the emulator exporting live to one receiver, then replays the JSONL it
wrote into a fresh receiver over the other protocol, and requires every span otellama made (server, GenAI and
phase spans; not the httpx instrumentation's, which is not in the record) to arrive identical: names, ids,
parents, kinds, timestamps, attributes, status and resource.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import orjson
import pytest

from otellama.app import create_app
from otellama.cli import main
from otellama.emulator import FAULT_HEADER, FAULT_MIDSTREAM_ERROR, EmulatorSettings, create_emulator
from otellama.observe.record import Record
from otellama.server import BackgroundServer
from otellama.settings import Settings, Upstream
from otellama.tools.replay import BATCH_SPANS, run
from tests import synthetic
from tests.otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver, ReceivedSpan

OTELLAMA_SCOPE = "otellama"
HTTPX_SCOPE = "opentelemetry.instrumentation.httpx"


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the outer environment's ``OTEL_*`` variables: each test sets exactly what it needs."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def grpc_receiver() -> Iterator[OtlpGrpcReceiver]:
    with OtlpGrpcReceiver() as receiver:
        yield receiver


@pytest.fixture
def http_receiver() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver() as receiver:
        yield receiver


def wait_for_lines(path: Path, count: int, timeout: float = 10.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_bytes().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, f"only {len(lines)} of {count} lines in {path}"
        time.sleep(0.01)


def live_traffic(url: str) -> int:
    """Send a varied set of exchanges through otellama; returns how many."""
    chat = {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hello"}]}
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/api/chat", json=chat, headers={"traceparent": parent, "X-Client-Name": "wire"})
        client.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "hi", "stream": False})
        client.post("/api/embed", json={"model": "nomic-embed-text", "input": ["a", "b"]})
        client.post("/api/generate", json={"model": "no-such-model", "prompt": "hi"})
        client.get("/api/tags")
        client.post("/api/chat", json=chat, headers={FAULT_HEADER: FAULT_MIDSTREAM_ERROR})
        client.post("/v1/chat/completions", json={**chat, "stream": True})
        with client.stream("POST", "/api/generate", json={"model": "llama3.2:3b", "prompt": "long"}) as r:
            next(r.iter_raw())  # then hang up mid-stream
    return 8


def test_replayed_spans_equal_the_live_ones(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    grpc_receiver: OtlpGrpcReceiver,
    http_receiver: OtlpHttpReceiver,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", grpc_receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "otellama-wire")
    log = tmp_path / "otellama.jsonl"
    emulator = create_emulator(EmulatorSettings(token_rate=200, load_seconds=0.05))
    with BackgroundServer(emulator) as upstream:
        app = create_app(Settings(upstream=Upstream.parse(upstream.url), log_file=log))
        with BackgroundServer(app) as proxy:
            exchanges = live_traffic(proxy.url)
            wait_for_lines(log, exchanges)
    # Stopping the server flushed otellama's exporter: everything live has arrived.
    records = [Record.from_json(orjson.loads(line)) for line in log.read_bytes().splitlines()]
    made = sum(2 + len(r.phases()) if r.ids.genai_span_id is not None else 1 for r in records)
    live = [s for s in grpc_receiver.spans() if s.scope_name == OTELLAMA_SCOPE]
    assert len(live) == made  # every span otellama made live
    calls = [s for s in grpc_receiver.spans() if s.scope_name == HTTPX_SCOPE]
    assert calls  # the upstream call's span: it travels in the record now, so replay sends it too
    live += calls
    names = {s.name for s in live}
    assert {"ollama.load", "ollama.prompt_eval", "ollama.eval", "chat llama3.2:3b", "POST /api/chat"} <= names
    assert {r.outcome for r in records} == {"ok", "error", "cancelled"}

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    code = main(["replay", "--endpoint", http_receiver.endpoint, "--protocol", "http/protobuf", str(log)])
    assert code == 0
    replayed = http_receiver.spans()

    def by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
        found = {s.span_id: s for s in spans}
        assert len(found) == len(spans), "a span id arrived twice"
        return found

    expected, got = by_id(live), by_id(replayed)
    assert got.keys() == expected.keys()
    for span_id, span in expected.items():
        assert got[span_id] == span, f"replayed {span.name} differs from the live one"
    continued = [s for s in replayed if s.parent_span_id == "b7ad6b7169203331"]  # the caller's traceparent
    assert [s.name for s in continued] == ["POST /api/chat"]
    assert {s.resource["service.name"] for s in replayed} == {"otellama-wire"}


@pytest.mark.parametrize("where", ["nobody listening (http)", "permission denied (grpc)"])
def test_a_refusing_endpoint_exits_1_and_names_it(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    grpc_receiver: OtlpGrpcReceiver,
) -> None:  # fmt: skip
    log = synthetic.write(tmp_path / "otellama.jsonl", synthetic.records(400, seed=2))
    if where.endswith("(http)"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # free a moment ago, nobody listens now
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
        endpoint, protocol, tried = f"http://127.0.0.1:{port}", "http/protobuf", f"127.0.0.1:{port}/v1/traces"
    else:
        grpc_receiver.fail_with = grpc.StatusCode.PERMISSION_DENIED
        endpoint, protocol, tried = grpc_receiver.endpoint, "grpc", f"127.0.0.1:{grpc_receiver.port}"
    started = time.monotonic()
    code = main(["replay", "--endpoint", endpoint, "--protocol", protocol, str(log)])
    out, err = capsys.readouterr()
    assert code == 1
    assert tried in err and "OTEL_EXPORTER_OTLP_ENDPOINT" in err and "nothing was exported" in err
    assert "replayed 0 exchanges" in out and "failed 400" in out
    assert time.monotonic() - started < 5  # gave up after the first failed batch instead of trying each
    if where.endswith("(grpc)"):
        assert grpc_receiver.attempts("traces") == 1


def test_counts_exported_unsampled_corrupt_and_outside(
    tmp_path: Path, http_receiver: OtlpHttpReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    items = synthetic.records(300, seed=5)
    unsampled = [
        Record.from_json({**item.to_json(), "trace": {**item.to_json()["trace"], "sampled": False}})
        for item in synthetic.records(7, seed=6, start_ns=items[-1].start_ns + 10**9)
    ]
    log = synthetic.write(tmp_path / "otellama.jsonl", [*items, *unsampled])
    with log.open("ab") as stream:
        stream.write(b'{"broken": \n')
        stream.write(b"not json at all\n")
    since = items[100].to_json()["timestamp"]
    code = main(["replay", "--endpoint", http_receiver.endpoint, "--since", since, str(log)])
    out = capsys.readouterr().out
    assert code == 0
    kept = items[100:]
    spans = sum(2 + len(r.phases()) if r.ids.genai_span_id is not None else 1 for r in kept)
    assert f"replayed {len(kept)} exchanges ({spans} spans)" in out
    assert "skipped 109 (7 unsampled, 2 corrupt, 100 outside the window or filters)" in out
    assert "failed 0" in out
    assert len(http_receiver.spans()) == spans
    assert http_receiver.attempts("traces") == -(-spans // BATCH_SPANS) >= 2  # batches of BATCH_SPANS


def test_no_endpoint_exits_2_saying_how_to_set_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = synthetic.write(tmp_path / "otellama.jsonl", synthetic.records(3))
    assert main(["replay", str(log)]) == 2
    err = capsys.readouterr().err
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in err and "--endpoint" in err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(tmp_path: Path, http_receiver: OtlpHttpReceiver) -> None:
    log = synthetic.write(tmp_path / "otellama.jsonl", synthetic.records(50))
    on_terminal, piped = Terminal(), io.StringIO()
    for err in (on_terminal, piped):
        code = run([str(log)], endpoint=http_receiver.endpoint, out=io.StringIO(), err=err)
        assert code == 0
    assert "\rreplaying [" in on_terminal.getvalue() and "100%" in on_terminal.getvalue()
    assert piped.getvalue() == ""


def test_replay_reads_the_configured_log_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_receiver: OtlpHttpReceiver,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    log = synthetic.write(tmp_path / "logs" / "otellama.jsonl", synthetic.records(5, seed=11))
    synthetic.write(tmp_path / "logs" / "otellama.jsonl.1", synthetic.records(4, seed=12))
    monkeypatch.setenv("OTELLAMA_LOG_FILE", str(log))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", http_receiver.endpoint)
    assert main(["replay"]) == 0
    assert "replayed 9 exchanges" in capsys.readouterr().out
    trace_ids = {orjson.loads(line)["trace_id"] for line in log.read_bytes().splitlines()}
    assert trace_ids <= {s.trace_id for s in http_receiver.spans()}
