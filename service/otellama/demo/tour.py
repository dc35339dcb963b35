"""``otellama demo``: the emulator and the proxy on free ports, a realistic workload, and what otellama saw.

The workload goes through the official ``ollama`` client, as an application would send it: a cold start and
then warm requests on two chat models, streamed and non-streamed chat and generate, embeddings, a stream the
client abandons half way, a stream that fails in the middle (the emulator's ``X-Emulator-Fault`` header), an
unknown model, and a burst of concurrent streams that have to queue for the model's slots. Then it prints
the ``otellama report`` table, where the JSONL log and the HTML page are, one exchange's phases drawn to
scale, and how to put otellama in front of a real Ollama. With ``otlp`` it also exports to a collector.

What it asks for (models, prompts, clients) is the workload it shares with the traffic generator
(:mod:`otellama.demo.workload`).

Needs the official ``ollama`` client (``pip install 'otellama[demo]'``; ``make demo`` installs it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from otellama.app import create_app
from otellama.demo.workload import (
    CHAT_MODEL,
    CHAT_PROMPT,
    CLIENTS,
    CONCURRENT,
    EMBED_INPUT,
    EMBED_MODEL,
    GREETING,
    LINES_BEFORE_HANGUP,
    MIDSTREAM_FAULT,
    QUESTION,
    SHORT_PROMPT,
    SMALL_MODEL,
    STEADY,
    STEADY_CLIENTS,
    UNKNOWN_MODEL,
    client_headers,
)
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.observe.ollama import PHASES
from otellama.observe.record import Record
from otellama.server import BackgroundServer
from otellama.settings import Settings, Upstream
from otellama.tools import charts, logscan, report, terminal

_LABELS = {phase.name: phase.label for phase in PHASES}


@dataclasses.dataclass
class Step:
    label: str
    call: Callable[[], str]
    exchanges: int = 1


def _together(work: Callable[[int], None], clients: int) -> None:
    """Run ``work(0)`` … ``work(clients - 1)`` at once, as that many clients would, and wait for all."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, range(clients)))  # list(): re-raises a client's failure here


def _script(client: Any, failing: Any, url: str) -> list[Step]:
    import ollama

    def stream_generate(model: str) -> Callable[[], str]:
        def call() -> str:
            parts = [c["response"] for c in client.generate(model=model, prompt=QUESTION, stream=True)]
            return f"{len(parts)} chunks: {''.join(parts)[:38]!r}…"

        return call

    def generate(model: str) -> Callable[[], str]:
        def call() -> str:
            reply = client.generate(model=model, prompt=SHORT_PROMPT, options={"temperature": 0.2})
            return f"{reply['eval_count']} tokens in {reply['eval_duration'] / 1e6:.0f} ms"

        return call

    def stream_chat(model: str) -> Callable[[], str]:
        def call() -> str:
            messages = [{"role": "user", "content": CHAT_PROMPT}]
            parts = [
                c["message"]["content"] for c in client.chat(model=model, messages=messages, stream=True)
            ]
            return f"{len(parts)} chunks: {''.join(parts)[:38]!r}…"

        return call

    def chat() -> str:
        reply = client.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": GREETING}])
        return f"{reply['eval_count']} tokens, done_reason {reply['done_reason']}"

    def embed() -> str:
        reply = client.embed(model=EMBED_MODEL, input=list(EMBED_INPUT))
        return f"{len(reply['embeddings'])} vectors of {len(reply['embeddings'][0])} dimensions"

    def cancelled() -> str:
        stream = client.generate(model=CHAT_MODEL, prompt=QUESTION, stream=True)
        seen = [next(stream)["response"] for _ in range(LINES_BEFORE_HANGUP)]
        stream.close()  # closes the connection mid-stream, as a user pressing Ctrl-C does
        return f"hung up after {len(seen)} chunks"

    def midstream_error() -> str:
        chunks = 0
        try:
            for _ in failing.chat(
                model=CHAT_MODEL, messages=[{"role": "user", "content": CHAT_PROMPT}], stream=True
            ):
                chunks += 1
        except ollama.ResponseError as exc:
            return f"ResponseError after {chunks} chunks: {exc.error}"
        return "unexpectedly succeeded"

    def unknown() -> str:
        try:
            client.generate(model=UNKNOWN_MODEL, prompt=GREETING)
        except ollama.ResponseError as exc:
            return f"ResponseError {exc.status_code}: {exc.error}"
        return "unexpectedly succeeded"

    def concurrent() -> str:
        counts: list[int] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            with ollama.Client(host=url, headers=client_headers(CLIENTS[i % len(CLIENTS)])) as own:
                messages = [{"role": "user", "content": f"Summarise document {i}."}]
                n = sum(1 for _ in own.chat(model=CHAT_MODEL, messages=messages, stream=True))
            with lock:
                counts.append(n)

        _together(one, CONCURRENT)
        return f"{len(counts)} streams, {sum(counts)} chunks"

    def steady() -> str:
        """Several clients at once, prompts and answers of varied length, on both chat models."""
        lock = threading.Lock()
        done: list[str] = []

        def worker(i: int) -> None:
            with ollama.Client(host=url, headers=client_headers(CLIENTS[i % len(CLIENTS)])) as own:
                for j in range(STEADY // STEADY_CLIENTS):
                    model = (CHAT_MODEL, SMALL_MODEL)[(i + j) % 2]
                    prompt = "Summarise this: " + "lorem ipsum dolor " * (5 + 40 * ((i * 7 + j * 3) % 5))
                    options = {"num_predict": 12 + 10 * ((i + j) % 6)}
                    if j % 2:
                        own.generate(model=model, prompt=prompt, options=options)
                    else:
                        messages = [{"role": "user", "content": prompt}]
                        for _ in own.chat(model=model, messages=messages, stream=True, options=options):
                            pass
                    with lock:
                        done.append(model)

        _together(worker, STEADY_CLIENTS)
        return f"{len(done)} requests from {STEADY_CLIENTS} clients"

    def tags() -> str:
        return ", ".join(m["model"] for m in client.list()["models"])

    return [
        Step(f"{CHAT_MODEL}: generate, streamed (cold start)", stream_generate(CHAT_MODEL)),
        Step(f"{CHAT_MODEL}: generate", generate(CHAT_MODEL)),
        Step(f"{CHAT_MODEL}: chat, streamed", stream_chat(CHAT_MODEL)),
        Step(f"{CHAT_MODEL}: chat", chat),
        Step(f"{SMALL_MODEL}: chat, streamed (cold start)", stream_chat(SMALL_MODEL)),
        Step(f"{SMALL_MODEL}: generate, streamed", stream_generate(SMALL_MODEL)),
        Step(f"{SMALL_MODEL}: generate", generate(SMALL_MODEL)),
        Step(f"{EMBED_MODEL}: embed (cold start)", embed),
        Step(f"{CHAT_MODEL}: stream cancelled by the client", cancelled),
        Step(f"{CHAT_MODEL}: stream that fails midway", midstream_error),
        Step(f"{UNKNOWN_MODEL}: generate", unknown),
        Step(f"{CHAT_MODEL}: {CONCURRENT} concurrent streams", concurrent, CONCURRENT),
        Step(f"both models: {STEADY} requests, {STEADY_CLIENTS} clients at once", steady, STEADY),
        Step("list models", tags),
    ]


@contextlib.contextmanager
def _exporting(endpoint: str | None) -> Iterator[None]:
    """Point OTLP export at ``endpoint`` for the demo's proxy, and put the environment back afterwards."""
    if endpoint is None:
        yield
        return
    names = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_METRIC_EXPORT_INTERVAL")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    os.environ.pop("OTEL_SDK_DISABLED", None)
    os.environ.setdefault("OTEL_METRIC_EXPORT_INTERVAL", "5000")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _lines(path: Path) -> list[dict[str, Any]]:
    found = []
    for raw in path.read_bytes().splitlines():
        line = logscan.parse(raw)
        if line is not None:
            found.append(line)
    return found


def _wait_for_lines(path: Path, count: int, timeout: float = 10.0) -> None:
    """otellama writes a line just after the client had its last byte: wait for the stragglers."""
    deadline = time.monotonic() + timeout
    while (not path.exists() or len(path.read_bytes().splitlines()) < count) and time.monotonic() < deadline:
        time.sleep(0.01)


def pick_exchange(lines: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The exchange whose waterfall teaches the most: a cold start, else the one with the most phases."""
    generations = [line for line in lines if line.get("operation") and line.get("load_time_ms") is not None]
    cold = [line for line in generations if line.get("cold_start") and line.get("generation_time_ms")]
    if cold:
        return cold[0]
    return max(generations, key=lambda line: line.get("duration_ms") or 0, default=None)


def exchange_waterfall(
    line: dict[str, Any], *, fine: bool = True, style: terminal.Style | None = None
) -> str:
    """One logged exchange's phases (queue, load, prompt eval, generation), drawn to scale."""
    record = Record.from_json(line)
    total_ms = (record.end_ns - record.start_ns) / 1e6
    phases = [
        (_LABELS[name], (start - record.start_ns) / 1e6, (end - record.start_ns) / 1e6)
        for name, start, end in record.phases()
    ]
    kind = "streamed" if record.stream else "not streamed"
    title = (
        f"One exchange to scale: {record.operation} {record.model}, {kind}, "
        f"{terminal.duration(total_ms)} end to end (trace {line['trace_id']})"
    )
    return terminal.waterfall(title, total_ms, phases, fine=fine, style=style)


def run(
    *,
    otlp: str | None = None,
    log_file: Path | None = None,
    html: Path | None = None,
    load_seconds: float = 2.0,
    token_rate: float = 120.0,
    out: TextIO | None = None,
) -> int:
    """Run the demo; returns the exit code."""
    out = out or sys.stdout
    try:
        import ollama
    except ImportError:
        print("otellama demo needs the official ollama client: pip install 'otellama[demo]'", file=sys.stderr)
        return 1
    style = terminal.Style.for_stream(out)
    fine = terminal.unicode_enabled(out)
    log_file = log_file or Path(tempfile.mkdtemp(prefix="otellama-demo-")) / "otellama.jsonl"
    html = html or log_file.with_name("report.html")
    emulator = create_emulator(
        EmulatorSettings(
            load_seconds=load_seconds, token_rate=token_rate, parallel=2, response_tokens=(30, 80)
        )
    )
    started = time.perf_counter()
    steps = 0
    with _exporting(otlp), BackgroundServer(emulator) as upstream:
        # A shortened load (the tests') is still a cold start: the threshold follows it down.
        cold = min(Settings().cold_start_seconds, load_seconds / 2)
        settings = Settings(upstream=Upstream.parse(upstream.url), log_file=log_file, cold_start_seconds=cold)
        with BackgroundServer(create_app(settings)) as proxy:
            out.write(
                style("otellama demo", "bold") + f": an Ollama emulator on {upstream.url}, otellama on "
                f"{proxy.url} in front of it" + (f", exporting OTLP to {otlp}" if otlp else "") + "\n\n"
            )
            headers = client_headers(CLIENTS[0])
            with (
                ollama.Client(host=proxy.url, headers=headers) as client,
                ollama.Client(host=proxy.url, headers=headers | MIDSTREAM_FAULT) as failing,
            ):
                for step in _script(client, failing, proxy.url):
                    began = time.perf_counter()
                    outcome = step.call()
                    steps += step.exchanges
                    out.write(
                        f"  {step.label:<48}{time.perf_counter() - began:6.2f} s  {style(outcome, 'dim')}\n"
                    )
            _wait_for_lines(log_file, steps)
    lines = _lines(log_file)
    result = logscan.scan([log_file], "model", timeline=True)
    html.write_text(charts.page(result, "otellama demo report"), encoding="utf-8")
    out.write(
        f"\nThe workload took {time.perf_counter() - started:.1f} s. What otellama recorded, as "
        f"'otellama report {log_file}' prints it:\n\n"
    )
    out.write(report.table(result, style))
    out.write(f"\n{style('The JSONL log', 'bold')}: {log_file} ({len(lines)} lines, one per exchange)\n")
    out.write(f"{style('The HTML report', 'bold')}: {html} (open it in a browser; no network needed)\n\n")
    chosen = pick_exchange(lines)
    if chosen is not None:
        out.write(exchange_waterfall(chosen, fine=fine, style=style) + "\n\n")
    out.write(
        style("Put otellama in front of a real Ollama", "bold") + ":\n"
        "  otellama serve --upstream 127.0.0.1:11434       # listens on 127.0.0.1:11435\n"
        "  OLLAMA_HOST=127.0.0.1:11435 ollama run llama3.2  # or any client: base URL http://127.0.0.1:11435\n"
        "  otellama report --since 1h                       # then see what happened\n"
        "  OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 otellama serve   # and export to a collector\n"
    )
    return 0
