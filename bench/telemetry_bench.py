"""CPU that telemetry spends per exchange, measured without a network in the way, part by part.

1. **Recorder**: drives ``Telemetry.begin`` and its recording's ``observe``/``finish`` with Ollama-shaped
   bytes (a 200-chunk NDJSON chat stream and a non-streamed body) exactly as the proxy does, with every sink
   on: spans handed to a BatchSpanProcessor whose exporter drops them, metrics into the always-on Prometheus
   reader, the JSONL log on disk.
2. **Upstream call's span**: opentelemetry-instrumentation-httpx's transport around a transport that answers
   at once, minus the bare transport: what tracing the upstream HTTP call adds to the request path.
3. **OTLP encoding**: the OTLP exporter's protobuf encoding of one exchange's spans (its own three and the
   upstream call's), which the export thread does inside the proxy process.

The sum is telemetry's whole CPU per exchange. Process CPU, so other load on the machine matters little.

    .venv/bin/python bench/telemetry_bench.py [--exchanges N]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import orjson
from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from otellama.exchange import Exchange
from otellama.settings import Settings
from otellama.sinks.fanout import Telemetry
from otellama.sinks.jsonlog import JsonLog, JsonLogSink
from otellama.sinks.otel.sink import OtelSink
from otellama.sinks.stats import RollingStats


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _stream() -> list[bytes]:
    chunk = {"model": "llama3.2:3b", "created_at": "2026-11-28T12:00:00.000000Z", "done": False}
    lines = [orjson.dumps({**chunk, "message": {"role": "assistant", "content": "tok"}}) + b"\n"] * 199
    final = {
        **chunk,
        "message": {"role": "assistant", "content": ""},
        "done_reason": "stop",
        "done": True,
        "total_duration": 4_100_000_000,
        "load_duration": 12_000_000,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 80_000_000,
        "eval_count": 199,
        "eval_duration": 3_980_000_000,
    }
    return [*lines, orjson.dumps(final) + b"\n"]


def _exchange(body: bytes, content_type: bytes) -> Exchange:
    now = time.perf_counter()
    return Exchange(
        method="POST",
        path="/api/chat",
        query=b"",
        request_headers=[(b"content-type", b"application/json"), (b"x-client-name", b"bench")],
        started_at=time.time(),
        t_start=now,
        request_body=body,
        status=200,
        response_headers=[(b"content-type", content_type)],
        t_headers=now,
    )


def measure(telemetry: Telemetry, chunks: list[bytes], content_type: bytes, exchanges: int) -> float:
    """Process-CPU microseconds per exchange for begin + every chunk + finish."""
    body = orjson.dumps({"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}]})
    start = time.process_time()
    for _ in range(exchanges):
        exchange = _exchange(body, content_type)
        recording = telemetry.begin(exchange)
        feed = recording.observe(exchange)
        now = exchange.t_start
        for chunk in chunks:
            now += 0.02
            if feed is not None:
                feed(chunk, now)
        exchange.t_end = now
        recording.finish(exchange)
    return (time.process_time() - start) / exchanges * 1e6


class _Answer(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", b"2")]
        return httpx.Response(200, headers=headers, content=b"{}", request=request)


def upstream_call_span(exchanges: int) -> tuple[float, list[ReadableSpan]]:
    """CPU microseconds the httpx instrumentation adds to one upstream call, and the spans it made."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    bare = _Answer()
    traced = AsyncOpenTelemetryTransport(bare, tracer_provider=provider)
    # What the proxy sends for a typical client (ollama-python) call.
    headers = [
        (b"content-type", b"application/json"), (b"accept", b"application/json"),
        (b"user-agent", b"ollama-python/0.5.1 (x86_64 linux) Python/3.11.7"), (b"host", b"127.0.0.1:11434"),
    ]  # fmt: skip
    url = httpx.URL("http://127.0.0.1:11434/api/chat")
    parent = SpanContext(1, 2, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))

    async def run(transport: httpx.AsyncBaseTransport, n: int) -> float:
        token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
        start = time.process_time()
        for _ in range(n):
            request = httpx.Request("POST", url, headers=headers, content=b'{"model":"m"}')
            await transport.handle_async_request(request)
        elapsed = time.process_time() - start
        context.detach(token)
        return elapsed / n * 1e6

    async def compare() -> float:
        await run(traced, 200)
        await run(bare, 200)
        return await run(traced, exchanges) - await run(bare, exchanges)

    added = asyncio.run(compare())
    return added, list(spans.get_finished_spans())[-1:]


def otlp_encoding(spans: list[ReadableSpan], exchanges: int) -> float:
    """CPU microseconds to encode ``spans`` (one exchange's) as OTLP protobuf, in batches like the SDK's."""
    per_batch = max(1, 512 // len(spans))
    batch = spans * per_batch
    rounds = max(1, exchanges // per_batch)
    start = time.process_time()
    for _ in range(rounds):
        encode_spans(batch).SerializeToString()
    return (time.process_time() - start) / (rounds * per_batch) * 1e6


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--exchanges", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(_Drop(), max_queue_size=1 << 16))
        kept = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(kept))
        # The sinks otellama serve builds (app.py), with spans kept in memory instead of exported.
        otel = OtelSink(tracer_provider=provider, environ={})
        log = JsonLogSink(JsonLog(Path(tmp) / "otellama.jsonl"), otel.log_failed)
        telemetry = Telemetry(Settings(), otel, [log, otel, RollingStats()], environ={})
        stream = _stream()
        nonstream = [stream[-1].rstrip(b"\n")]
        measure(telemetry, stream, b"application/x-ndjson", 200)  # warm-up
        kept.clear()
        streamed = measure(telemetry, stream, b"application/x-ndjson", args.exchanges)
        stream_spans = list(kept.get_finished_spans())[-6:]  # server, GenAI and four phase spans
        kept.clear()
        whole = measure(telemetry, nonstream, b"application/json; charset=utf-8", args.exchanges)
        own_spans = list(kept.get_finished_spans())[-3:]  # the last exchange's server, GenAI and phase spans
        telemetry.close()
    call, call_span = upstream_call_span(args.exchanges)
    encoding = otlp_encoding(own_spans + call_span, args.exchanges)
    stream_encoding = otlp_encoding(stream_spans + call_span, args.exchanges)
    rows = [
        ("recorder (trace ids, observer, record, spans, metrics, JSONL line)", whole, streamed),
        ("the upstream call's span (opentelemetry-instrumentation-httpx)", call, call),
        ("OTLP encoding of the exchange's 4 or 7 spans (export thread)", encoding, stream_encoding),
    ]
    print("| telemetry CPU per exchange | non-streamed | 200-chunk stream |")
    print("|---|---:|---:|")
    for name, one, many in rows:
        print(f"| {name} | {one:.0f} µs | {many:.0f} µs |")
    total, stream_total = whole + call + encoding, streamed + call + stream_encoding
    print(f"| **total** | **{total:.0f} µs** | **{stream_total:.0f} µs** |")
    print(f"\nper chunk, the stream observer: {(streamed - whole) / 199:.2f} µs")


if __name__ == "__main__":
    main()
