"""Synthetic exchanges for the report, stats, replay and HTML tests: real :class:`Record` objects, varied.

Every line a test writes is ``Record.to_json()`` encoded as the proxy encodes it, so the readers under test
see exactly the schema the proxy writes: several models and clients, streamed and not, cold starts, queueing,
errors and cancellations, non-GenAI requests, and unknown (null) timings.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from otellama.observe import ollama
from otellama.observe.record import Record, TraceIds
from otellama.observe.request import RequestFacts
from otellama.sinks.jsonlog import encode

MODELS = ("llama3.2:3b", "qwen3:14b", "gemma3:1b")
CLIENTS = ("open-webui", "notebook", None)
PHASES = ("queue", "load", "prompt_eval", "eval")


def ids(rng: random.Random, *, genai: bool = True, sampled: bool = True, parent: bool = False) -> TraceIds:
    return TraceIds(
        trace_id=rng.getrandbits(128),
        server_span_id=rng.getrandbits(64),
        genai_span_id=rng.getrandbits(64) if genai else None,
        parent_span_id=rng.getrandbits(64) if parent else None,
        sampled=sampled,
        phase_span_ids={name: rng.getrandbits(64) for name in PHASES} if genai and sampled else {},
    )


def record(rng: random.Random, start_ns: int, **overrides: object) -> Record:
    """One plausible exchange starting at ``start_ns``; ``overrides`` replace fields."""
    kind = rng.random()
    client = rng.choice(CLIENTS)
    if kind < 0.06:
        fields: dict[str, object] = dict(
            method="GET", endpoint="/api/tags", operation=None, model=None, stream=False, status=200,
            outcome="ok", error=None, error_type=None, timings=ollama.Timings(),
            end_ns=start_ns + rng.randint(1, 4) * 10**6, ids=ids(rng, genai=False),
        )  # fmt: skip
    elif kind < 0.14:
        load = rng.randint(2, 9) * 10**6
        total = load + rng.randint(5, 40) * 10**6
        fields = dict(
            method="POST", endpoint="/api/embed", operation="embeddings", model="nomic-embed-text",
            stream=False, status=200, outcome="ok", error=None, error_type=None,
            timings=ollama.Timings(total_duration=total, load_duration=load,
                                   prompt_eval_count=rng.randint(5, 200)),
            end_ns=start_ns + total + 300_000, ids=ids(rng),
        )  # fmt: skip
    else:
        model = rng.choice(MODELS)
        cold = rng.random() < 0.05
        load = rng.randint(1500, 3000) * 10**6 if cold else rng.randint(2, 15) * 10**6
        prompt_tokens = rng.randint(5, 900)
        prompt_eval = rng.randint(10, 400) * 10**6
        tokens = rng.randint(1, 300)
        generation = int(tokens / rng.uniform(20, 160) * 1e9)
        queue = rng.randint(1, 900) * 10**6 if rng.random() < 0.2 else 0
        total = queue + load + prompt_eval + generation
        outcome = rng.choices(("ok", "error", "cancelled"), weights=(0.86, 0.08, 0.06))[0]
        stream = rng.random() < 0.7
        timings = (
            ollama.Timings(total, load, prompt_tokens, prompt_eval, tokens, generation, None, "stop", model)
            if outcome == "ok" else ollama.Timings()
        )  # fmt: skip
        end = start_ns + total + rng.randint(200_000, 2_000_000)
        first = min(start_ns + queue + load + prompt_eval + 1_000_000, end)
        operation = rng.choice(("chat", "text_completion"))
        fields = dict(
            method="POST", endpoint="/api/chat" if operation == "chat" else "/api/generate",
            operation=operation, model=model, stream=stream,
            status={"ok": 200, "error": 404 if rng.random() < 0.5 else 200, "cancelled": 200}[outcome],
            outcome=outcome,
            error={"ok": None, "error": "model runner stopped", "cancelled": "client disconnected"}[outcome],
            error_type={"ok": None, "error": "stream_error", "cancelled": "cancelled"}[outcome],
            timings=timings, end_ns=end, first_chunk_ns=first, first_content_ns=first if stream else None,
            input_tokens=prompt_tokens if outcome == "ok" else None,
            output_tokens=tokens if outcome != "error" else None,
            ids=ids(rng, parent=rng.random() < 0.2),
        )  # fmt: skip
    timings = fields["timings"]
    assert isinstance(timings, ollama.Timings)
    base: dict[str, object] = dict(
        start_ns=start_ns, done_reason=timings.done_reason, chunks=timings.eval_count or 1,
        first_chunk_ns=None, first_content_ns=None,
        cold_start=None if timings.load_duration is None else timings.load_duration > 1e9, client=client,
        input_tokens=timings.prompt_eval_count, output_tokens=timings.eval_count,
        finish_reasons=("stop",) if timings.done_reason else (), response_model=timings.model,
        request=RequestFacts(parsed=fields["operation"] is not None, model=fields["model"],  # type: ignore[arg-type]
                             stream=fields["stream"], temperature=rng.choice((None, 0.7))),  # type: ignore[arg-type]
        server_address="127.0.0.1", server_port=11434,
    )  # fmt: skip
    return Record(**{**base, **fields, **overrides})  # type: ignore[arg-type]


def records(
    count: int, *, seed: int = 1, start_ns: int = 1_780_000_000 * 10**9, step_ns: int = 10**9
) -> list[Record]:
    rng = random.Random(seed)
    return [record(rng, start_ns + i * step_ns) for i in range(count)]


def write(path: Path, items: Iterable[Record]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as stream:
        for item in items:
            stream.write(encode(item.to_json()))
    return path
