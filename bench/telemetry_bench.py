"""CPU that telemetry spends per exchange, measured without a network in the way.

Drives ``Telemetry.begin``/``observe``/``finish`` with Ollama-shaped bytes (a 200-chunk NDJSON chat stream
and a non-streamed body) exactly as the proxy does, with every sink on: spans through a BatchSpanProcessor
into an exporter that drops them (export runs on the SDK thread, off the request path, not measured here),
metrics into the always-on Prometheus reader, and the JSONL log on disk. Reports process CPU per exchange.

    .venv/bin/python bench/telemetry_bench.py [--exchanges N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from otellama.proxy import Exchange
from otellama.settings import Settings
from otellama.telemetry import Telemetry


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
        telemetry.begin(exchange)
        feed = telemetry.observe(exchange)
        now = exchange.t_start
        for chunk in chunks:
            now += 0.02
            if feed is not None:
                feed(chunk, now)
        exchange.t_end = now
        telemetry.finish(exchange)
    return (time.process_time() - start) / exchanges * 1e6


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--exchanges", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(_Drop(), max_queue_size=1 << 16))
        telemetry = Telemetry(
            Settings(log_file=Path(tmp) / "otellama.jsonl"), tracer_provider=provider, environ={}
        )
        stream = _stream()
        nonstream = [stream[-1].rstrip(b"\n")]
        measure(telemetry, stream, b"application/x-ndjson", 200)  # warm-up
        streamed = measure(telemetry, stream, b"application/x-ndjson", args.exchanges)
        whole = measure(telemetry, nonstream, b"application/json; charset=utf-8", args.exchanges)
        telemetry.shutdown()
    print(f"telemetry CPU per streamed exchange (200 chunks, all sinks): {streamed:.0f} µs")
    print(f"of which per chunk, observer: {(streamed - whole) / 199:.2f} µs")
    print(f"telemetry CPU per non-streamed exchange (all sinks): {whole:.0f} µs")


if __name__ == "__main__":
    main()
