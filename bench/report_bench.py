"""How fast ``otellama report`` reads a big JSONL log: the issue's target is 1,000,000 lines in under 10 s.

The log is made of real :class:`otellama.observe.record.Record` lines (``Record.to_json``, encoded as the
proxy encodes them): three chat models and an embedding model, four clients, streamed and non-streamed calls,
cold starts, errors, cancellations, non-GenAI requests and unknown (null) timings, spread over a day and
rotated into files of ``OTELLAMA_LOG_MAX_BYTES`` as the proxy rotates them. Each command then runs as a
fresh process (``python -m otellama report ...``), as a user runs it, and is timed wall-clock, best of
``--repeat``.

  .venv/bin/python bench/report_bench.py                       # 1,000,000 lines, prints the table
  .venv/bin/python bench/report_bench.py --lines 100000        # quicker
  .venv/bin/python bench/report_bench.py --write BENCHMARKS.md # replaces the report-bench section

``--write`` replaces the text between ``<!-- report-bench:start -->`` and ``<!-- report-bench:end -->``
(appending the section if it is missing) and leaves the rest of the file alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from otellama.observe import ollama
from otellama.observe.record import Record, TraceIds
from otellama.observe.request import RequestFacts
from otellama.sinks.jsonlog import JsonLog, encode

START, END = "<!-- report-bench:start -->", "<!-- report-bench:end -->"
MODELS = (("llama3.2:3b", 0.5, 95.0), ("qwen3:14b", 0.2, 28.0), ("gemma3:1b", 0.2, 160.0))
CLIENTS = ("open-webui", "notebook", "batch-job", None)
DAY_NS = 86_400 * 10**9


def make_record(rng: random.Random, start_ns: int) -> Record:
    """One plausible exchange."""
    roll = rng.random()
    ids = TraceIds(
        trace_id=rng.getrandbits(128),
        server_span_id=rng.getrandbits(64),
        genai_span_id=rng.getrandbits(64),
        parent_span_id=None,
        sampled=True,
        phase_span_ids={name: rng.getrandbits(64) for name in ("queue", "load", "prompt_eval", "eval")},
    )
    client = rng.choice(CLIENTS)
    if roll < 0.05:  # model management and health checks: no GenAI operation
        return _record(
            rng,
            start_ns,
            start_ns + rng.randint(1, 5) * 10**6,
            "GET",
            "/api/tags",
            None,
            None,
            False,
            "ok",
            ollama.Timings(),
            client,
            TraceIds(ids.trace_id, ids.server_span_id, None, None, True),
        )
    if roll < 0.15:  # embeddings
        load = rng.randint(2, 9) * 10**6
        total = load + rng.randint(5, 40) * 10**6
        timings = ollama.Timings(
            total_duration=total, load_duration=load, prompt_eval_count=rng.randint(5, 500)
        )
        return _record(
            rng,
            start_ns,
            start_ns + total + 400_000,
            "POST",
            "/api/embed",
            "embeddings",
            "nomic-embed-text",
            False,
            "ok",
            timings,
            client,
            ids,
        )
    model, _, speed = rng.choices(MODELS, weights=[m[1] for m in MODELS])[0]
    stream = rng.random() < 0.7
    cold = rng.random() < 0.01
    load = rng.randint(1_500, 9_000) * 10**6 if cold else rng.randint(2, 15) * 10**6
    prompt_tokens = rng.randint(10, 3000)
    prompt_eval = int(prompt_tokens / (speed * 25) * 1e9)
    tokens = rng.randint(5, 800)
    generation = int(tokens / rng.gauss(speed, speed / 10) * 1e9)
    queue = int(rng.expovariate(2.0) * 1e9) if rng.random() < 0.2 else 0
    total = queue + load + prompt_eval + generation
    outcome = rng.choices(("ok", "error", "cancelled"), weights=(0.95, 0.03, 0.02))[0]
    if outcome == "ok":
        timings = ollama.Timings(
            total, load, prompt_tokens, prompt_eval, tokens, generation, None, "stop", model
        )
    else:
        timings = ollama.Timings()
    end = start_ns + total + rng.randint(300_000, 3_000_000)
    operation = rng.choice(("chat", "text_completion"))
    path = "/api/chat" if operation == "chat" else "/api/generate"
    return _record(
        rng,
        start_ns,
        end,
        "POST",
        path,
        operation,
        model,
        stream,
        outcome,
        timings,
        client,
        ids,
        first=start_ns + queue + load + prompt_eval + 2_000_000,
    )


def _record(
    rng: random.Random,
    start: int,
    end: int,
    method: str,
    endpoint: str,
    operation: str | None,
    model: str | None,
    stream: bool,
    outcome: str,
    timings: ollama.Timings,
    client: str | None,
    ids: TraceIds,
    first: int | None = None,
) -> Record:
    error = {"ok": None, "error": "model runner has unexpectedly stopped", "cancelled": "client disconnected"}
    return Record(
        start_ns=start,
        end_ns=end,
        method=method,
        endpoint=endpoint,
        operation=operation,
        model=model,
        stream=stream,
        status=200 if outcome != "error" else 500,
        outcome=outcome,
        error=error[outcome],
        error_type={"ok": None, "error": "500", "cancelled": "cancelled"}[outcome],
        done_reason=timings.done_reason,
        chunks=timings.eval_count or 1,
        first_chunk_ns=min(first or end, end),
        first_content_ns=min(first, end) if first and stream else None,
        cold_start=None if timings.load_duration is None else timings.load_duration > 1e9,
        client=client,
        timings=timings,
        input_tokens=timings.prompt_eval_count,
        output_tokens=timings.eval_count,
        finish_reasons=("stop",) if timings.done_reason else (),
        response_model=timings.model,
        request=RequestFacts(
            parsed=operation is not None, model=model, stream=stream, temperature=rng.choice((None, 0.7, 0.2))
        ),
        server_address="127.0.0.1",
        server_port=11434,
        ids=ids,
    )


def write_log(directory: Path, lines: int, seed: int = 7, max_bytes: int = 50_000_000) -> list[Path]:
    """``lines`` records over the last day into ``directory/otellama.jsonl`` and its rotated backups."""
    rng = random.Random(seed)
    path = directory / "otellama.jsonl"
    log = JsonLog(path, max_bytes=max_bytes, backups=10_000)
    now = time.time_ns()
    step = DAY_NS // lines
    for i in range(lines):
        log.write(encode(make_record(rng, now - DAY_NS + i * step).to_json()))
    log.close()
    return log.files()


def timed(command: list[str], repeat: int) -> tuple[float, str]:
    """Best wall time of ``repeat`` runs of ``command`` and its last output."""
    best, output = float("inf"), ""
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        best = min(best, time.perf_counter() - started)
        output = done.stdout
    return best, output


def write_section(path: Path, text: str) -> None:
    current = path.read_text() if path.exists() else ""
    section = f"{START}\n{text.rstrip()}\n{END}"
    if START in current and END in current:
        head, rest = current.split(START, 1)
        _, tail = rest.split(END, 1)
        current = head + section + tail
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    path.write_text(current)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=1_000_000, help="log lines (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command; the best counts (default 3)")
    parser.add_argument("--write", type=Path, help="replace the report-bench section of this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="otellama-report-bench-") as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        files = write_log(directory, args.lines)
        size = sum(f.stat().st_size for f in files)
        print(
            f"wrote {args.lines:,} lines ({size / 1e6:,.0f} MB, {len(files)} files) "
            f"in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )
        env_command = [sys.executable, "-m", "otellama", "report", *map(str, files)]
        commands = {
            "`otellama report` (table, by model)": env_command,
            "`otellama report --json --by client`": [*env_command, "--json", "--by", "client"],
            "`otellama report --since 6h --model 'llama*'`": [
                *env_command,
                "--since",
                "6h",
                "--model",
                "llama*",
            ],
            "`otellama report --html report.html`": [*env_command, "--html", str(directory / "report.html")],
        }
        rows = []
        for label, command in commands.items():
            seconds, _ = timed(command, args.repeat)
            rows.append(f"| {label} | {seconds:.2f} s | {args.lines / seconds / 1e3:,.0f}k |")
            print(rows[-1], file=sys.stderr)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    text = "\n".join(
        [
            "## `otellama report` on a big log",
            "",
            f"{args.lines:,} log lines ({size / 1e6:,.0f} MB in {len(files)} rotated files of 50 MB), "
            f"each command run as a fresh process, best of {args.repeat}; target: under 10 s. A log this big "
            "is read by one process per core (orjson straight into per-group columns), then each group's "
            "samples are sorted once for its percentiles.",
            f"Machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}.",
            "Reproduce: `.venv/bin/python bench/report_bench.py --write BENCHMARKS.md`.",
            "",
            "| command | wall time | lines/s |",
            "|---|---:|---:|",
            *rows,
        ]
    )
    print(text)
    if args.write:
        write_section(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
