"""An Ollama stand-in for the demo, the tests and the benchmark.

It answers Ollama's native and OpenAI-compatible HTTP API as the Ollama server does (docs/reference.md §1 and
the fixtures in tests/data/ollama-api): NDJSON and SSE streams, ``done: true`` finals with nanosecond timings,
zero-valued fields omitted, errors with their real status codes and body shapes. Output text is made up, but
deterministically: the same settings and request always produce the same tokens.

Every inference request walks through the phases of a real model run, and each duration it reports is the
wall time that phase actually took here::

    arrival ─── load ─── wait for a slot ─── prompt eval ─── tokens ─── done
    |<─ load_duration ─>|                    |<─ prompt_eval ─>|<─ eval ─>|
    |<─────────────────────────── total_duration ────────────────────────>|

so ``total - load - prompt_eval - eval`` is exactly the time the request spent queued. The first request for a
model pays ``load_seconds``; the model then stays loaded until its keep-alive expires after its last request.
``token_rate`` paces the tokens (and prompt evaluation, ``_PROMPT_SPEEDUP`` times faster); ``token_rate=0``
removes every sleep but the cold load, which makes the emulator a fast upstream for benchmarks.

The request header ``X-Emulator-Fault`` injects failures: ``midstream-error`` ends a stream after a few chunks
with an ``{"error": ...}`` line (native) or event (``/v1``) and no final chunk. Other values are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import math
import random
import re
import time
from array import array
from base64 import b64encode
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from datetime import datetime, timedelta
from email.utils import formatdate
from typing import Any, Final, NamedTuple

import orjson
from starlette.types import Receive, Scope, Send

OLLAMA_VERSION: Final = "0.33.0"
DEFAULT_MODELS: Final = ("llama3.2:3b", "gemma3:1b", "qwen3:14b", "nomic-embed-text")
FAULT_HEADER: Final = "x-emulator-fault"
FAULT_MIDSTREAM_ERROR: Final = "midstream-error"
BUSY_MESSAGE: Final = "server busy, please try again.  maximum pending requests exceeded"
MIDSTREAM_MESSAGE: Final = "an error was encountered while running the model"

# Prompt tokens go through the model in batches, far faster than tokens are generated one by one.
_PROMPT_SPEEDUP: Final = 20
# What assigning an already loaded model costs a real server; only simulated when pacing is on.
_WARM_LOAD_SECONDS: Final = 0.003
_CHUNKS_BEFORE_FAULT: Final = 3
# A flood (token_rate=0) never sleeps; yielding now and then keeps one long stream from starving the others.
_FLOOD_YIELD_EVERY: Final = 32
# Go's time.Duration tops out near 292 years; Ollama shows "forever" keep-alives that far ahead.
_FOREVER: Final = timedelta(days=292 * 365)

_JSON_UTF8: Final = b"application/json; charset=utf-8"
_JSON: Final = b"application/json"
_NDJSON: Final = b"application/x-ndjson"
_SSE: Final = b"text/event-stream"
_PLAIN: Final = b"text/plain; charset=utf-8"
_NEWLINE: Final = orjson.OPT_APPEND_NEWLINE

_DIGEST: Final = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600,
}
_SIZE_TAG: Final = re.compile(r"e?(\d+(?:\.\d+)?)([bm])\b")
_JSON_TOKEN: Final = re.compile(r"\w+|\s+|[^\w\s]+")
_WORD: Final = re.compile(r"[A-Za-z][A-Za-z'-]+")

# (name prefix, family, parameter size when the tag does not say, embedding length); first match wins.
_FAMILIES: Final = (
    ("nomic-embed", "nomic-bert", "137M", 768),
    ("mxbai-embed", "bert", "334M", 1024),
    ("all-minilm", "bert", "23M", 384),
    ("gpt-oss", "gptoss", "20.9B", 2880),
    ("qwen3", "qwen3", "8.2B", 4096),
    ("qwen2", "qwen2", "7.6B", 3584),
    ("deepseek-r1", "qwen2", "7.6B", 3584),
    ("gemma3", "gemma3", "4.3B", 2560),
    ("gemma", "gemma", "9.2B", 3584),
    ("mistral", "llama", "7.2B", 4096),
    ("llama3.2", "llama", "3.2B", 3072),
)
_THINKERS: Final = ("qwen3", "deepseek-r1", "gpt-oss", "magistral", "qwq")
_NO_TOOLS: Final = ("gemma", "llama2", "codellama", "phi", "tinyllama", "llava")

_PROSE: Final = (
    "the sky light blue sun air short long waves scatter more than red because of tiny molecules in our "
    "atmosphere and this is why we see it during day while sunsets look orange as path grows through "
    "which colors reach eyes from every direction so answer depends on time place weather clouds dust"
)
_WORDS: Final = tuple(_PROSE.split())
_THOUGHT_OPENERS: Final = ("Okay", "Hmm", "Alright", "Let me think")


@dataclasses.dataclass(frozen=True)
class EmulatorSettings:
    """How the emulated Ollama behaves. Times are seconds, rates tokens per second.

    ``token_rate=0`` turns pacing off (tokens flood out as fast as they can be written); the cold load still
    takes ``load_seconds``. Each model runs ``parallel`` requests at once; at most ``parallel + max_queue``
    model runs (across all models) are admitted, and any more get 503. ``response_tokens`` bounds the
    natural length of an answer before any ``num_predict`` limit.
    """

    seed: int = 0
    token_rate: float = 50.0
    load_seconds: float = 2.5
    keep_alive: float = 300.0
    parallel: int = 4
    max_queue: int = 16
    models: tuple[str, ...] = DEFAULT_MODELS
    response_tokens: tuple[int, int] = (20, 40)

    def __post_init__(self) -> None:
        if self.token_rate < 0 or self.load_seconds < 0:
            raise ValueError("token_rate and load_seconds must not be negative")
        if self.parallel < 1 or self.max_queue < 0:
            raise ValueError("parallel must be at least 1 and max_queue at least 0")
        low, high = self.response_tokens
        if not 1 <= low <= high:
            raise ValueError("response_tokens must be (low, high) with 1 <= low <= high")


@dataclasses.dataclass(frozen=True)
class Cancellation:
    """A request whose client went away before its response was complete.

    ``at`` is ``time.monotonic()`` when the emulator noticed; ``chunks_sent`` counts body writes before that.
    """

    path: str
    model: str
    at: float
    chunks_sent: int


class _HTTPError(Exception):
    """Raised before a response has started; rendered as Ollama (or, under /v1, OpenAI) renders errors."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The client disconnected while its request body was still being read."""


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _created_at() -> str:
    """Now as Go marshals ``time.Now().UTC()``: nanoseconds, trailing zeros trimmed."""
    second, fraction = divmod(time.time_ns(), 1_000_000_000)
    digits = f"{fraction:09d}".rstrip("0")
    return f"{_utc_second(second)}.{digits}Z" if digits else f"{_utc_second(second)}Z"


@functools.lru_cache(maxsize=4)
def _http_date(second: int) -> bytes:
    return formatdate(second, usegmt=True).encode()


def _local_iso(when: datetime) -> str:
    # /api/tags and /api/ps carry the server's local offset, not Z.
    return when.astimezone().isoformat()


async def _sleep_until(deadline: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``deadline``.

    uvloop's timers run on a cached, millisecond clock and can fire a little early; a simulated phase must
    never report less than it was configured to take.
    """
    remaining = deadline - time.monotonic()
    while remaining > 0:
        await asyncio.sleep(remaining)
        remaining = deadline - time.monotonic()


def _tokens(text: str) -> int:
    """A tokenizer's count, roughly: four characters a token."""
    return (len(text) + 3) // 4


def _model_key(name: str) -> str:
    """Match names as Ollama does: case-insensitively, ``:latest`` implied, the default registry optional."""
    name = name.strip().lower().removeprefix("registry.ollama.ai/").removeprefix("library/")
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _keep_alive(value: object) -> float | None:
    """``keep_alive`` in seconds (negative = forever = ``math.inf``), parsed as Ollama's ``api.Duration``."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Go converts a JSON number with int(t) * time.Second: fractions of a second are dropped.
        return math.inf if value < 0 else float(int(value))
    if isinstance(value, str):
        text = value.strip()
        sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
        if body == "0":
            return 0.0
        parts = _DURATION_PART.findall(body)
        if body and "".join(number + unit for number, unit in parts) == body:
            seconds = sign * sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
            return math.inf if seconds < 0 else seconds
        raise _HTTPError(400, f'time: invalid duration "{value}"')
    raise _HTTPError(400, "json: cannot unmarshal keep_alive: expected a number or a duration string")


def _field(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _HTTPError(400, f"json: cannot unmarshal field {key!r}: unexpected {type(value).__name__}")
    return value


def _text(body: Mapping[str, Any], key: str) -> str:
    value: str = _field(body, key, str, "")
    return value


def _mapping(body: Mapping[str, Any], key: str) -> dict[str, Any]:
    value: dict[str, Any] = _field(body, key, dict, {})
    return value


def _items(body: Mapping[str, Any], key: str) -> list[Any]:
    value: list[Any] = _field(body, key, list, [])
    return value


def _flag(body: Mapping[str, Any], key: str) -> bool | None:
    value: bool | None = _field(body, key, bool, None)
    return value


def _number(body: Mapping[str, Any], key: str) -> int | None:
    value: int | float | None = _field(body, key, (int, float), None)
    return None if value is None else int(value)


def _normalized(name: str) -> str:
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclasses.dataclass(frozen=True)
class _Card:
    """What /api/tags, /api/show and /api/ps say of a model."""

    name: str
    modified_at: datetime
    family: str
    parameter_size: str
    parameters: int
    quantization: str
    size: int
    digest: str
    embedding_length: int
    capabilities: tuple[str, ...]

    @classmethod
    def guess(cls, name: str) -> _Card:
        """A plausible description from the name alone: family, size, capabilities."""
        key = _model_key(name)
        base, _, tag = key.rsplit("/", 1)[-1].partition(":")
        family, size_label, width = next(
            ((fam, label, width) for prefix, fam, label, width in _FAMILIES if base.startswith(prefix)),
            ("llama", "8.0B", 4096),
        )
        sized = _SIZE_TAG.match(tag)
        if sized:
            size_label = f"{sized[1]}{sized[2].upper()}"
        parameters = int(float(size_label[:-1]) * (1e9 if size_label.endswith("B") else 1e6))
        embedding = "embed" in base or base.startswith(("all-minilm", "bge"))
        capabilities = ["embedding"] if embedding else ["completion"]
        if not embedding and not base.startswith(_NO_TOOLS):
            capabilities.append("tools")
        if not embedding and base.startswith(_THINKERS):
            capabilities.append("thinking")
        return cls(
            name=_normalized(name),
            modified_at=datetime.now(),
            family=family,
            parameter_size=size_label,
            parameters=parameters,
            quantization="F16" if embedding else "Q4_K_M",
            size=int(parameters * (2 if embedding else 0.6)),
            digest=hashlib.sha256(key.encode()).hexdigest(),
            embedding_length=width,
            capabilities=tuple(capabilities),
        )

    @property
    def registry_name(self) -> str:
        return self.name if "/" in self.name else f"registry.ollama.ai/library/{self.name}"

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        }

    def layers(self) -> list[tuple[str, int]]:
        """The blobs a pull or push moves: the weights, then template, license and params."""
        key = _model_key(self.name)
        sizes = (self.size, 1_481, 7_711, 96)
        return [
            (f"sha256:{hashlib.sha256(f'{key}#{i}'.encode()).hexdigest()}", s) for i, s in enumerate(sizes)
        ]


class _Model:
    """An installed model and whether it is loaded.

    A model is pinned (``refs > 0``) while requests use it, and expires ``session`` seconds after the last
    one lets go, the way Ollama's scheduler keeps runners.
    """

    def __init__(self, card: _Card, parallel: int, keep_alive: float) -> None:
        self.card = card
        self.loaded = False
        self.loading: asyncio.Future[None] | None = None
        self.refs = 0
        self.session = keep_alive
        self.expires = 0.0
        self.slots = asyncio.Semaphore(parallel)

    def expire_if_due(self) -> None:
        if self.loaded and self.refs == 0 and time.monotonic() >= self.expires:
            self.loaded = False

    def pin(self, keep_alive: float) -> None:
        self.expire_if_due()
        self.session = keep_alive
        self.refs += 1

    def unpin(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.release()

    def release(self) -> None:
        """Start the keep-alive countdown (a load still in flight starts it when it completes)."""
        self.expires = time.monotonic() + self.session
        if self.session == 0:
            self.loaded = False


class _Piece(NamedTuple):
    """One step of a model run: a thinking token, a content token, or a whole tool call."""

    kind: str
    text: str
    call: dict[str, Any] | None
    tokens: int


@dataclasses.dataclass
class _Plan:
    """Everything a model run will produce, decided up front from the seed."""

    seed: int
    prompt_tokens: int
    pieces: list[_Piece]
    done_reason: str
    eval_count: int


@dataclasses.dataclass
class _Run:
    """A finished model run, as the final chunk or the non-streamed body reports it."""

    plan: _Plan
    content: str
    thinking: str
    tool_calls: list[dict[str, Any]]
    metrics: dict[str, int]

    @property
    def usage(self) -> dict[str, int]:
        prompt, completion = self.plan.prompt_tokens, self.plan.eval_count
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Exchange:
    """One HTTP request and its response writer; what the disconnect watcher needs to know of it."""

    __slots__ = (
        "chunks_sent",
        "finished",
        "loaded_ns",
        "model",
        "path",
        "receive",
        "scope",
        "send",
        "slot_ns",
        "start_ns",
        "started",
        "stream_type",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.start_ns = time.monotonic_ns()
        self.scope = scope
        self.receive = receive
        self.send = send
        self.path: str = scope["path"]
        self.model = ""
        self.chunks_sent = 0
        self.started = False
        self.finished = False
        self.stream_type = _NDJSON
        self.loaded_ns = self.start_ns
        self.slot_ns = self.start_ns

    def header(self, name: str) -> str:
        wanted = name.encode()
        for key, value in self.scope["headers"]:
            if key.lower() == wanted:
                return bytes(value).decode("latin-1").strip()
        return ""

    async def body(self) -> bytes:
        parts = []
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(parts)

    async def json(self) -> dict[str, Any]:
        raw = await self.body()
        # Ollama parses JSON whatever the Content-Type says (curl -d sends a form type).
        if not raw.strip():
            raise _HTTPError(400, "missing request body")
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _HTTPError(400, str(exc)) from None
        if not isinstance(value, dict):
            raise _HTTPError(400, f"json: cannot unmarshal {type(value).__name__} into a request object")
        return value

    async def _start(self, status: int, content_type: bytes | None, length: int | None) -> None:
        self.started = True
        headers = [(b"date", _http_date(int(time.time())))]
        if content_type is not None:
            headers.append((b"content-type", content_type))
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def respond(self, status: int, content_type: bytes | None, body: bytes) -> None:
        """Send a whole response (uvicorn drops the body of a HEAD response and keeps its length)."""
        self.finished = True
        await self._start(status, content_type, len(body))
        await self.send({"type": "http.response.body", "body": body})
        self.chunks_sent += 1

    async def write(self, data: bytes) -> None:
        # Headers go out with the first chunk, as Go's writer does: a long load delays the status line too.
        if not self.started:
            await self._start(200, self.stream_type, None)
        await self.send({"type": "http.response.body", "body": data, "more_body": True})
        self.chunks_sent += 1

    async def finish(self, data: bytes) -> None:
        self.finished = True
        if not self.started:
            await self._start(200, self.stream_type, None)
        await self.send({"type": "http.response.body", "body": data})
        self.chunks_sent += 1


def _ndjson(value: Any) -> bytes:
    return orjson.dumps(value, option=_NEWLINE)


def _sse(value: Any) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


def _openai_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _openai_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    return {
        "id": call["id"],
        "index": function["index"],
        "type": "function",
        "function": {"name": function["name"], "arguments": orjson.dumps(function["arguments"]).decode()},
    }


class _Format:
    """How one API shapes a model run: stream chunks, the final chunk(s), the non-streamed body."""

    stream_type: bytes = _NDJSON
    body_type: bytes = _JSON_UTF8

    def chunk(self, piece: _Piece) -> bytes:
        raise NotImplementedError

    def final(self, run: _Run) -> bytes:
        raise NotImplementedError

    def body(self, run: _Run) -> bytes:
        raise NotImplementedError

    def stream_error(self, message: str) -> bytes:
        return _ndjson({"error": message})


class _GenerateFormat(_Format):
    """/api/generate: ``response`` text, ``context`` token ids on the final object unless raw."""

    def __init__(self, model: str, raw: bool) -> None:
        self.model = model
        self.raw = raw

    def chunk(self, piece: _Piece) -> bytes:
        if piece.kind == "thinking":
            return _ndjson(
                {
                    "model": self.model,
                    "created_at": _created_at(),
                    "response": "",
                    "thinking": piece.text,
                    "done": False,
                }
            )
        return _ndjson(
            {"model": self.model, "created_at": _created_at(), "response": piece.text, "done": False}
        )

    def _done(self, run: _Run, response: str, thinking: str) -> dict[str, Any]:
        done: dict[str, Any] = {"model": self.model, "created_at": _created_at(), "response": response}
        if thinking:
            done["thinking"] = thinking
        done["done"] = True
        done["done_reason"] = run.plan.done_reason
        if not self.raw:
            count = run.plan.prompt_tokens + run.plan.eval_count
            done["context"] = [(run.plan.seed + i * 7919) % 128256 for i in range(count)]
        done.update(run.metrics)
        return done

    def final(self, run: _Run) -> bytes:
        return _ndjson(self._done(run, "", ""))

    def body(self, run: _Run) -> bytes:
        return orjson.dumps(self._done(run, run.content, run.thinking))


class _ChatFormat(_Format):
    """/api/chat: ``message`` chunks, a chunk per tool call, and ``done_reason`` before ``done``."""

    def __init__(self, model: str) -> None:
        self.model = model

    def chunk(self, piece: _Piece) -> bytes:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": piece.text if piece.kind == "content" else "",
        }
        if piece.kind == "thinking":
            message["thinking"] = piece.text
        elif piece.call is not None:
            message["tool_calls"] = [piece.call]
        return _ndjson({"model": self.model, "created_at": _created_at(), "message": message, "done": False})

    def _done(self, run: _Run, message: dict[str, Any]) -> dict[str, Any]:
        done: dict[str, Any] = {"model": self.model, "created_at": _created_at(), "message": message}
        done.update(done_reason=run.plan.done_reason, done=True, **run.metrics)
        return done

    def final(self, run: _Run) -> bytes:
        return _ndjson(self._done(run, {"role": "assistant", "content": ""}))

    def body(self, run: _Run) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": run.content}
        if run.thinking:
            message["thinking"] = run.thinking
        if run.tool_calls:
            message["tool_calls"] = run.tool_calls
        return orjson.dumps(self._done(run, message))


class _OpenAIFormat(_Format):
    """What /v1/chat/completions and /v1/completions share: ids, SSE framing, usage, newline-ended bodies."""

    stream_type = _SSE
    body_type = _JSON
    prefix = ""

    def __init__(self, model: str, include_usage: bool, seed: int) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = f"{self.prefix}-{seed % 999}"
        self.created = int(time.time())

    def stream_error(self, message: str) -> bytes:
        # Ollama itself would mangle a mid-stream error into an empty chunk here; an OpenAI-style error
        # event is what OpenAI clients understand, and it is equally short of a finish_reason and [DONE].
        return _sse(_openai_error(500, message))

    def _tail(self, run: _Run, last: dict[str, Any]) -> bytes:
        events = _sse(last)
        if self.include_usage:
            events += _sse({**last, "choices": [], "usage": run.usage})
        return events + b"data: [DONE]\n\n"


class _OpenAIChatFormat(_OpenAIFormat):
    prefix = "chatcmpl"

    def __init__(self, model: str, include_usage: bool, seed: int) -> None:
        super().__init__(model, include_usage, seed)
        self.tool_call_sent = False

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def chunk(self, piece: _Piece) -> bytes:
        delta: dict[str, Any] = {
            "role": "assistant",
            "content": piece.text if piece.kind == "content" else "",
        }
        if piece.kind == "thinking":
            delta["reasoning"] = piece.text
        elif piece.call is not None:
            delta["tool_calls"] = [_openai_tool_call(piece.call)]
            self.tool_call_sent = True
        return _sse(self._chunk(delta, None))

    def final(self, run: _Run) -> bytes:
        reason = "tool_calls" if self.tool_call_sent else run.plan.done_reason
        return self._tail(run, self._chunk({"role": "assistant", "content": ""}, reason))

    def body(self, run: _Run) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": run.content}
        if run.thinking:
            message["reasoning"] = run.thinking
        if run.tool_calls:
            message["tool_calls"] = [_openai_tool_call(call) for call in run.tool_calls]
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": "tool_calls" if run.tool_calls else run.plan.done_reason,
        }
        completion = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [choice],
            "usage": run.usage,
        }
        return orjson.dumps(completion, option=_NEWLINE)


class _OpenAICompletionFormat(_OpenAIFormat):
    prefix = "cmpl"

    def _chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "choices": [{"text": text, "index": 0, "finish_reason": finish_reason}],
            "model": self.model,
            "system_fingerprint": "fp_ollama",
        }
        if self.include_usage:
            # Ollama's CompleteWriter puts an all-zero usage on every chunk before the real one.
            chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return chunk

    def chunk(self, piece: _Piece) -> bytes:
        # Thinking has no place in a text completion: Ollama sends those tokens as empty-text chunks.
        return _sse(self._chunk(piece.text if piece.kind == "content" else "", None))

    def final(self, run: _Run) -> bytes:
        return self._tail(run, self._chunk("", run.plan.done_reason))

    def body(self, run: _Run) -> bytes:
        completion = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"text": run.content, "index": 0, "finish_reason": run.plan.done_reason}],
            "usage": run.usage,
        }
        return orjson.dumps(completion, option=_NEWLINE)


def _words(rng: random.Random, count: int, opener: str = "") -> list[str]:
    """``count`` tokens of plausible prose: words with leading spaces, full stops now and then."""
    tokens = [opener] if opener else []
    capital = not opener
    while len(tokens) < count:
        if tokens and not capital and rng.random() < 0.1:
            tokens.append(".")
            capital = True
            continue
        word = rng.choice(_WORDS)
        word = word.capitalize() if capital else word
        tokens.append(f" {word}" if tokens else word)
        capital = False
    if count > 1 and tokens[-2] != ".":
        tokens[-1] = "."
    return tokens


def _sample(rng: random.Random, schema: Any, text: str, depth: int = 0) -> Any:
    """A value that fits a JSON schema, strings filled with ``text``."""
    if not isinstance(schema, dict) or depth > 4:
        return text
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type", "string")
    kind = next((k for k in kind if k != "null"), "null") if isinstance(kind, list) else kind
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        required = schema.get("required")
        names = (
            [n for n in required if n in properties]
            if isinstance(required, list) and required
            else properties
        )
        return {name: _sample(rng, properties[name], text, depth + 1) for name in names}
    if kind == "array":
        return [_sample(rng, schema.get("items"), text, depth + 1)]
    if kind == "integer":
        return rng.randint(1, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    return None if kind == "null" else text


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


_Handler = Callable[[_Exchange], Awaitable[None]]


class Emulator:
    """The emulated Ollama server, an ASGI application (see the module docstring).

    Public state, for tests and the demo: :attr:`cancellations` lists requests whose client went away
    mid-response, :attr:`requests_seen` counts HTTP requests, :attr:`in_flight` the model runs admitted and
    not finished.
    """

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self.settings = settings or EmulatorSettings()
        self.cancellations: list[Cancellation] = []
        self.requests_seen = 0
        self._in_flight = 0
        self._blobs: set[str] = set()
        self._models: dict[str, _Model] = {}
        for age, name in enumerate(self.settings.models):
            card = _Card.guess(name)
            # Listed newest first, in the order given.
            self._add(dataclasses.replace(card, modified_at=card.modified_at - timedelta(hours=age)))
        self._routes: dict[str, dict[str, _Handler]] = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/generate": {"POST": self._generate},
            "/api/chat": {"POST": self._chat},
            "/api/embed": {"POST": self._embed},
            "/api/embeddings": {"POST": self._embeddings},
            "/api/pull": {"POST": self._pull},
            "/api/push": {"POST": self._push},
            "/api/create": {"POST": self._create},
            "/api/copy": {"POST": self._copy},
            "/api/delete": {"DELETE": self._delete},
            "/v1/chat/completions": {"POST": self._openai_chat},
            "/v1/completions": {"POST": self._openai_completion},
            "/v1/embeddings": {"POST": self._openai_embeddings},
            "/v1/models": {"GET": self._openai_models},
        }
        # Routes with a parameter in the path, matched by prefix when the exact lookup misses.
        self._prefixed: tuple[tuple[str, dict[str, _Handler]], ...] = (
            ("/api/blobs/", {"HEAD": self._blob_head, "POST": self._blob_upload}),
            ("/v1/models/", {"GET": self._openai_model}),
        )

    @property
    def in_flight(self) -> int:
        """Model runs admitted (running, loading or queued) and not yet finished."""
        return self._in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.requests_seen += 1
        exchange = _Exchange(scope, receive, send)
        path = exchange.path
        methods = self._routes.get(path)
        if methods is None:
            methods = next((m for prefix, m in self._prefixed if path.startswith(prefix)), None)
        if methods is None:
            await exchange.respond(404, _PLAIN, b"404 page not found")
            return
        handler = methods.get(scope["method"])
        if handler is None:
            await exchange.respond(405, _PLAIN, b"405 method not allowed")
            return
        try:
            await handler(exchange)
        except _HTTPError as exc:
            if exchange.started:
                raise
            if path.startswith("/v1/"):
                body = orjson.dumps(_openai_error(exc.status, exc.message), option=_NEWLINE)
                await exchange.respond(exc.status, _JSON, body)
            else:
                await exchange.respond(exc.status, _JSON_UTF8, orjson.dumps({"error": exc.message}))
        except _ClientGone:
            pass

    # --- the model runtime ------------------------------------------------------------------------------

    def _add(self, card: _Card) -> None:
        self._models[_model_key(card.name)] = _Model(card, self.settings.parallel, self.settings.keep_alive)

    def _find(self, name: str) -> _Model:
        if not name:
            raise _HTTPError(400, "model is required")
        model = self._models.get(_model_key(name))
        if model is None:
            raise _HTTPError(404, f'model "{name}" not found, try pulling it first')
        return model

    def _seed(self, model: str, options: Mapping[str, Any], content: bytes) -> int:
        option_seed = _number(options, "seed") or 0
        material = b"%d|%d|%s|" % (self.settings.seed, option_seed, model.encode()) + content
        return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")

    async def _guarded(self, exchange: _Exchange, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` until it finishes or the client disconnects, whichever comes first.

        uvicorn silently drops writes to a closed connection, so a generation never learns of a departed
        client from ``send``; only ``receive`` tells. Ollama stops generating as soon as its request context
        is cancelled, and so does this.
        """
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._watch(exchange))
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                # Let the run's own cleanup (slot, model pin, in-flight count) happen before we return.
                await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled():
            task.result()

    async def _watch(self, exchange: _Exchange) -> None:
        while (await exchange.receive())["type"] != "http.disconnect":
            pass
        # uvicorn also reports "disconnect" once the response is complete; that is no cancellation.
        if not exchange.finished:
            self.cancellations.append(
                Cancellation(exchange.path, exchange.model, time.monotonic(), exchange.chunks_sent)
            )

    @contextlib.asynccontextmanager
    async def _scheduled(
        self, exchange: _Exchange, model: _Model, keep_alive: float | None
    ) -> AsyncIterator[None]:
        """Admit a request, load its model, then hold one of the model's ``parallel`` slots."""
        if self._in_flight >= self.settings.parallel + self.settings.max_queue:
            raise _HTTPError(503, BUSY_MESSAGE)
        self._in_flight += 1
        model.pin(self.settings.keep_alive if keep_alive is None else keep_alive)
        try:
            await self._load(model)
            exchange.loaded_ns = time.monotonic_ns()
            async with model.slots:
                exchange.slot_ns = time.monotonic_ns()
                yield
        finally:
            self._in_flight -= 1
            model.unpin()

    async def _load(self, model: _Model) -> None:
        if model.loaded:
            if self.settings.token_rate > 0:
                await asyncio.sleep(_WARM_LOAD_SECONDS)
            return
        if model.loading is None:
            model.loading = asyncio.ensure_future(self._cold_load(model))
        # Shielded: a loading model keeps loading when the client that asked for it goes away, as in Ollama.
        await asyncio.shield(model.loading)

    async def _cold_load(self, model: _Model) -> None:
        try:
            await _sleep_until(time.monotonic() + self.settings.load_seconds)
            model.loaded = True
            if model.refs == 0:
                model.release()
        finally:
            model.loading = None

    async def _pace(self, start: float, tokens: int, index: int) -> None:
        """Sleep until ``tokens`` tokens are due, on an absolute schedule so the rate does not drift."""
        rate = self.settings.token_rate
        if rate > 0:
            await _sleep_until(start + tokens / rate)
        elif index % _FLOOD_YIELD_EVERY == _FLOOD_YIELD_EVERY - 1:
            await asyncio.sleep(0)

    async def _evaluate_prompt(self, tokens: int) -> None:
        if self.settings.token_rate > 0:
            await _sleep_until(time.monotonic() + tokens / (self.settings.token_rate * _PROMPT_SPEEDUP))

    def _metrics(
        self, exchange: _Exchange, eval_start: int, prompt_tokens: int, eval_count: int
    ) -> dict[str, int]:
        end = time.monotonic_ns()
        # A phase that took under a nanosecond still happened; Ollama never reports a warm load as zero.
        load = max(1, exchange.loaded_ns - exchange.start_ns)
        prompt = max(1, eval_start - exchange.slot_ns)
        generation = max(1, end - eval_start) if eval_count else 0
        fields = {
            "total_duration": max(end - exchange.start_ns, load + prompt + generation),
            "load_duration": load,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": prompt,
            "eval_count": eval_count,
            "eval_duration": generation,
        }
        return {key: value for key, value in fields.items() if value}

    async def _run(
        self,
        exchange: _Exchange,
        model: _Model,
        keep_alive: float | None,
        plan: _Plan,
        fmt: _Format,
        stream: bool,
    ) -> None:
        """One model run from admission to the final chunk (or the non-streamed body)."""
        faulty = exchange.header(FAULT_HEADER) == FAULT_MIDSTREAM_ERROR
        pieces = plan.pieces[:_CHUNKS_BEFORE_FAULT] if faulty else plan.pieces
        exchange.stream_type = fmt.stream_type
        async with self._scheduled(exchange, model, keep_alive):
            await self._evaluate_prompt(plan.prompt_tokens)
            eval_start = time.monotonic_ns()
            start, produced = time.monotonic(), 0
            content: list[str] = []
            thinking: list[str] = []
            calls: list[dict[str, Any]] = []
            for index, piece in enumerate(pieces):
                produced += piece.tokens
                await self._pace(start, produced, index)
                if stream:
                    await exchange.write(fmt.chunk(piece))
                elif piece.call is not None:
                    calls.append(piece.call)
                else:
                    (thinking if piece.kind == "thinking" else content).append(piece.text)
            if faulty:
                if not stream:
                    raise _HTTPError(500, MIDSTREAM_MESSAGE)
                await exchange.finish(fmt.stream_error(MIDSTREAM_MESSAGE))
                return
            metrics = self._metrics(exchange, eval_start, plan.prompt_tokens, plan.eval_count)
            run = _Run(plan, "".join(content), "".join(thinking), calls, metrics)
            if stream:
                await exchange.finish(fmt.final(run))
            else:
                await exchange.respond(200, fmt.body_type, fmt.body(run))

    async def _load_only(
        self, exchange: _Exchange, model: _Model, keep_alive: float | None, body: bytes
    ) -> None:
        """An empty prompt or message list: load the model, answer ``done_reason: "load"`` with no timings."""
        async with self._scheduled(exchange, model, keep_alive):
            pass
        await exchange.respond(200, _JSON_UTF8, body)

    def _unload(self, model: _Model) -> None:
        model.expire_if_due()
        model.session = 0
        if model.refs == 0:
            model.loaded = False

    # --- planning a model run ---------------------------------------------------------------------------

    def _thinks(self, model: _Model, name: str, think: Any) -> bool:
        capable = "thinking" in model.card.capabilities
        if think is None:
            return capable
        if not isinstance(think, bool) and think not in ("low", "medium", "high"):
            raise _HTTPError(400, f"invalid think value: {orjson.dumps(think).decode()}")
        if think and not capable:
            raise _HTTPError(400, f'"{name}" does not support thinking')
        return bool(think)

    def _plan(
        self,
        seed: int,
        prompt_tokens: int,
        options: Mapping[str, Any],
        *,
        think: bool,
        tool_calls: list[dict[str, Any]] | None = None,
        fmt: Any = None,
    ) -> _Plan:
        rng = random.Random(seed)
        low, high = self.settings.response_tokens
        pieces: list[_Piece] = []
        if think:
            thought = _words(
                rng, rng.randint(max(1, low // 2), max(1, high // 2)), rng.choice(_THOUGHT_OPENERS)
            )
            pieces += [_Piece("thinking", token, None, 1) for token in thought]
        if tool_calls:
            for call in tool_calls:
                cost = 4 + _tokens(orjson.dumps(call["function"]).decode())
                pieces.append(_Piece("tool", "", call, cost))
        elif fmt == "json" or isinstance(fmt, dict):
            schema = fmt if isinstance(fmt, dict) else {"type": "object", "properties": {"answer": {}}}
            text = orjson.dumps(_sample(rng, schema, " ".join(_words(rng, 3)).strip())).decode()
            pieces += [_Piece("content", token, None, 1) for token in _JSON_TOKEN.findall(text)]
        else:
            pieces += [_Piece("content", token, None, 1) for token in _words(rng, rng.randint(low, high))]
        limit = _number(options, "num_predict") or 0
        done_reason, produced = "stop", 0
        for index, piece in enumerate(pieces):
            if 0 < limit < produced + piece.tokens:
                # A half-generated tool call is no tool call: it is dropped, its tokens still spent.
                pieces, done_reason, produced = pieces[:index], "length", limit
                break
            produced += piece.tokens
        return _Plan(seed, prompt_tokens, pieces, done_reason, produced)

    def _tool_calls(
        self, seed: int, tools: list[Any], messages: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Calls to the first one or two offered tools, arguments filled from the user's last words."""
        if messages and messages[-1].get("role") == "tool":
            return []
        rng = random.Random(seed ^ 0x7001)
        user = next((_message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
        words = _WORD.findall(user)
        hint = words[-1].title() if words else "Berlin"
        calls = []
        for index, tool in enumerate(tools[:2]):
            function = _mapping(tool, "function") if isinstance(tool, dict) else {}
            name = _text(function, "name") or f"tool_{index}"
            arguments = _sample(rng, function.get("parameters") or {"type": "object"}, hint)
            call_id = "call_" + "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=8))
            calls.append({"id": call_id, "function": {"index": index, "name": name, "arguments": arguments}})
        return calls

    def _chat_plan(
        self,
        name: str,
        model: _Model,
        messages: list[dict[str, Any]],
        tools: list[Any],
        think: Any,
        fmt: Any,
        options: Mapping[str, Any],
    ) -> _Plan:
        # Ollama's order: thinking first, then the capabilities the scheduler checks.
        thinks = self._thinks(model, name, think)
        if "completion" not in model.card.capabilities:
            raise _HTTPError(400, f'"{name}" does not support chat')
        if tools and "tools" not in model.card.capabilities:
            raise _HTTPError(400, f"{model.card.registry_name} does not support tools")
        seed = self._seed(name, options, orjson.dumps([messages, tools, fmt]))
        prompt_tokens = 2 + sum(4 + _tokens(_message_text(m)) for m in messages)
        if tools:
            prompt_tokens += _tokens(orjson.dumps(tools).decode())
        calls = self._tool_calls(seed, tools, messages) if tools else None
        return self._plan(seed, prompt_tokens, options, think=thinks, tool_calls=calls, fmt=fmt)

    def _generate_plan(
        self, name: str, model: _Model, body: Mapping[str, Any], prompt: str, options: Mapping[str, Any]
    ) -> _Plan:
        thinks = self._thinks(model, name, body.get("think"))
        if "completion" not in model.card.capabilities:
            raise _HTTPError(400, f'"{name}" does not support generate')
        system, suffix = _text(body, "system"), _text(body, "suffix")
        fmt = body.get("format")
        seed = self._seed(name, options, orjson.dumps([system, prompt, suffix, fmt]))
        prompt_tokens = 6 + _tokens(system) + _tokens(prompt) + _tokens(suffix)
        return self._plan(seed, prompt_tokens, options, think=thinks, fmt=fmt)

    def _embedding(self, name: str, model: _Model, text: str, dimensions: int) -> list[float]:
        rng = random.Random(self._seed(name, {}, text.encode()))
        vector = [rng.random() - 0.5 for _ in range(model.card.embedding_length)]
        if 0 < dimensions < len(vector):
            vector = vector[:dimensions]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        # Through float32 and back, so values print like the float32 vectors Ollama returns.
        return array("f", [v / norm for v in vector]).tolist()

    # --- native inference endpoints ---------------------------------------------------------------------

    async def _generate(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        name = _text(body, "model")
        model = self._find(name)
        exchange.model = name
        options = _mapping(body, "options")
        keep_alive = _keep_alive(body.get("keep_alive"))
        prompt = _text(body, "prompt")
        if not prompt and keep_alive == 0:
            self._unload(model)
            await exchange.respond(200, _JSON_UTF8, _generate_done(name, "unload"))
            return
        plan = self._generate_plan(name, model, body, prompt, options)
        if not prompt:
            await self._guarded(
                exchange, self._load_only(exchange, model, keep_alive, _generate_done(name, "load"))
            )
            return
        fmt = _GenerateFormat(name, raw=_flag(body, "raw") is True)
        stream = _flag(body, "stream") is not False
        await self._guarded(exchange, self._run(exchange, model, keep_alive, plan, fmt, stream))

    async def _chat(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        name = _text(body, "model")
        model = self._find(name)
        exchange.model = name
        options = _mapping(body, "options")
        keep_alive = _keep_alive(body.get("keep_alive"))
        messages = _items(body, "messages")
        if not all(isinstance(m, dict) for m in messages):
            raise _HTTPError(400, "json: cannot unmarshal messages: each message must be an object")
        if not messages and keep_alive == 0:
            self._unload(model)
            await exchange.respond(200, _JSON_UTF8, _chat_done(name, "unload"))
            return
        tools, fmt = _items(body, "tools"), body.get("format")
        plan = self._chat_plan(name, model, messages, tools, body.get("think"), fmt, options)
        if not messages:
            await self._guarded(
                exchange, self._load_only(exchange, model, keep_alive, _chat_done(name, "load"))
            )
            return
        stream = _flag(body, "stream") is not False
        await self._guarded(exchange, self._run(exchange, model, keep_alive, plan, _ChatFormat(name), stream))

    async def _embed_run(
        self,
        exchange: _Exchange,
        body: Mapping[str, Any],
        inputs: list[str],
        render: Callable[[str, list[list[float]], dict[str, int]], bytes],
        content_type: bytes,
    ) -> None:
        """Load, queue and evaluate like a generation, then answer ``render(model, vectors, timings)``."""
        name = _text(body, "model")
        model = self._find(name)
        exchange.model = name
        dimensions = _number(body, "dimensions") or 0
        keep_alive = _keep_alive(body.get("keep_alive"))

        async def work() -> None:
            vectors: list[list[float]] = []
            metrics: dict[str, int] = {}
            async with self._scheduled(exchange, model, keep_alive):
                # An empty input only loads the model: no vectors, and so no timings either.
                if inputs:
                    tokens = sum(_tokens(text) + 2 for text in inputs)
                    await self._evaluate_prompt(tokens)
                    vectors = [self._embedding(name, model, text, dimensions) for text in inputs]
                    load = max(1, exchange.loaded_ns - exchange.start_ns)
                    total = max(time.monotonic_ns() - exchange.start_ns, load)
                    metrics = {"total_duration": total, "load_duration": load, "prompt_eval_count": tokens}
            await exchange.respond(200, content_type, render(name, vectors, metrics))

        await self._guarded(exchange, work())

    async def _embed(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        raw = body.get("input")
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            inputs: list[str] = raw
        elif isinstance(raw, str) or raw is None:
            inputs = [raw] if raw else []
        else:
            raise _HTTPError(400, "invalid input type")
        await self._embed_run(exchange, body, inputs, _embed_body, _JSON_UTF8)

    async def _embeddings(self, exchange: _Exchange) -> None:
        """The legacy endpoint: one prompt in, ``{"embedding": [...]}`` out, no timings."""
        body = await exchange.json()
        prompt = _text(body, "prompt")
        await self._embed_run(
            exchange, {**body, "dimensions": None}, [prompt] if prompt else [], _legacy_body, _JSON_UTF8
        )

    # --- native model management ------------------------------------------------------------------------

    async def _root(self, exchange: _Exchange) -> None:
        await exchange.respond(200, _PLAIN, b"Ollama is running")

    async def _version(self, exchange: _Exchange) -> None:
        await exchange.respond(200, _JSON_UTF8, orjson.dumps({"version": OLLAMA_VERSION}))

    def _listing(self) -> list[_Card]:
        return sorted(
            (model.card for model in self._models.values()), key=lambda card: card.modified_at, reverse=True
        )

    async def _tags(self, exchange: _Exchange) -> None:
        models = [
            {
                "name": card.name,
                "model": card.name,
                "modified_at": _local_iso(card.modified_at),
                "size": card.size,
                "digest": card.digest,
                "details": card.details(),
            }
            for card in self._listing()
        ]
        await exchange.respond(200, _JSON_UTF8, orjson.dumps({"models": models}))

    async def _ps(self, exchange: _Exchange) -> None:
        now, wall = time.monotonic(), datetime.now()
        running: list[tuple[float, dict[str, Any]]] = []
        for model in self._models.values():
            model.expire_if_due()
            if not model.loaded:
                continue
            # In use, a model's countdown has not started yet: Ollama shows now + keep-alive.
            remaining = model.session if model.refs else model.expires - now
            expires = wall + (_FOREVER if math.isinf(remaining) else timedelta(seconds=remaining))
            card = model.card
            entry = {
                "name": card.name,
                "model": card.name,
                "size": card.size,
                "digest": card.digest,
                "details": card.details(),
                "expires_at": _local_iso(expires),
                "size_vram": card.size,
                "context_length": 4096,
            }
            running.append((remaining, entry))
        running.sort(key=lambda item: item[0], reverse=True)
        await exchange.respond(200, _JSON_UTF8, orjson.dumps({"models": [entry for _, entry in running]}))

    async def _show(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        name = _text(body, "model") or _text(body, "name")
        if not name:
            raise _HTTPError(400, "model is required")
        model = self._models.get(_model_key(name))
        if model is None:
            raise _HTTPError(404, f"model '{name}' not found")
        card = model.card
        shown: dict[str, Any] = {
            "modelfile": (
                '# Modelfile generated by "ollama show"\n'
                "# To build a new Modelfile based on this, replace FROM with:\n"
                f"# FROM {card.name}\n\nFROM {card.name}\n"
            ),
        }
        if "completion" in card.capabilities:
            shown["template"] = "{{ .Prompt }}"
        shown["details"] = card.details()
        shown["model_info"] = {
            "general.architecture": card.family,
            "general.parameter_count": card.parameters,
            f"{card.family}.context_length": 131072,
            f"{card.family}.embedding_length": card.embedding_length,
        }
        shown["capabilities"] = list(card.capabilities)
        shown["modified_at"] = _local_iso(card.modified_at)
        await exchange.respond(200, _JSON_UTF8, orjson.dumps(shown))

    async def _progress(
        self,
        exchange: _Exchange,
        body: Mapping[str, Any],
        lines: list[dict[str, Any]],
        done: Callable[[], None],
    ) -> None:
        """Stream status lines as NDJSON, or with ``stream: false`` answer only the last one."""
        stream = _flag(body, "stream") is not False
        start = time.monotonic()
        for index, line in enumerate(lines[:-1]):
            await self._pace(start, index + 1, index)
            if stream:
                await exchange.write(_ndjson(line))
        done()
        if stream:
            await exchange.finish(_ndjson(lines[-1]))
        else:
            # Ollama's waitForStream sets a plain application/json before gin's JSON renderer runs.
            await exchange.respond(200, _JSON, orjson.dumps(lines[-1]))

    def _named(self, body: Mapping[str, Any], exchange: _Exchange) -> str:
        name = _text(body, "model") or _text(body, "name")
        if not name:
            raise _HTTPError(400, "model is required")
        exchange.model = name
        return name

    async def _pull(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        name = self._named(body, exchange)
        existing = self._models.get(_model_key(name))
        card = existing.card if existing else _Card.guess(name)
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        for digest, size in card.layers():
            status = f"pulling {digest[7:19]}"
            if existing is None:
                # A download in progress leaves "completed" out while it is still zero.
                lines.append({"status": status, "digest": digest, "total": size})
                lines.append({"status": status, "digest": digest, "total": size, "completed": size // 2})
            lines.append({"status": status, "digest": digest, "total": size, "completed": size})
        lines += [
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        done = (lambda: None) if existing else (lambda: self._add(card))
        await self._guarded(exchange, self._progress(exchange, body, lines, done))

    async def _push(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        name = self._named(body, exchange)
        model = self._models.get(_model_key(name))
        if model is None:
            raise _HTTPError(404, f'model "{name}" not found')
        lines: list[dict[str, Any]] = [{"status": "retrieving manifest"}]
        for digest, size in model.card.layers():
            status = f"pushing {digest[7:19]}"
            lines.append({"status": status, "digest": digest, "total": size, "completed": size // 2})
            lines.append({"status": status, "digest": digest, "total": size, "completed": size})
        lines += [{"status": "pushing manifest"}, {"status": "success"}]
        await self._guarded(exchange, self._progress(exchange, body, lines, lambda: None))

    async def _create(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        name = self._named(body, exchange)
        source = _text(body, "from")
        base = self._find(source).card if source else _Card.guess(name)
        card = dataclasses.replace(base, name=_normalized(name), modified_at=datetime.now())
        lines = [{"status": f"using existing layer {digest}"} for digest, _ in card.layers()]
        lines += [{"status": "writing manifest"}, {"status": "success"}]
        await self._guarded(exchange, self._progress(exchange, body, lines, lambda: self._add(card)))

    async def _copy(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        source, destination = _text(body, "source"), _text(body, "destination")
        if not source:
            raise _HTTPError(400, f'source "{source}" is invalid')
        if not destination:
            raise _HTTPError(400, f'destination "{destination}" is invalid')
        model = self._models.get(_model_key(source))
        if model is None:
            raise _HTTPError(404, f'model "{source}" not found')
        self._add(dataclasses.replace(model.card, name=_normalized(destination), modified_at=datetime.now()))
        await exchange.respond(200, None, b"")

    async def _delete(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        name = _text(body, "model") or _text(body, "name")
        if not name:
            raise _HTTPError(400, f'name "{name}" is invalid')
        if self._models.pop(_model_key(name), None) is None:
            raise _HTTPError(404, f"model '{name}' not found")
        await exchange.respond(200, None, b"")

    def _blob_digest(self, exchange: _Exchange) -> str:
        match = _DIGEST.fullmatch(exchange.path.removeprefix("/api/blobs/"))
        if match is None:
            raise _HTTPError(400, "invalid digest format")
        return f"sha256:{match[1].lower()}"

    async def _blob_head(self, exchange: _Exchange) -> None:
        digest = self._blob_digest(exchange)
        if digest not in self._blobs:
            raise _HTTPError(404, f'blob "{digest}" not found')
        await exchange.respond(200, None, b"")

    async def _blob_upload(self, exchange: _Exchange) -> None:
        """Hash the body as it arrives: a blob can be many GB and is never held in memory."""
        digest = self._blob_digest(exchange)
        known = digest in self._blobs
        hasher = hashlib.sha256()
        while True:
            message = await exchange.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            if not known:
                hasher.update(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if known:
            await exchange.respond(200, None, b"")
            return
        received = f"sha256:{hasher.hexdigest()}"
        if received != digest:
            raise _HTTPError(400, f'digest mismatch, expected "{digest}", got "{received}"')
        self._blobs.add(digest)
        await exchange.respond(201, None, b"")

    # --- OpenAI-compatible endpoints (stream defaults to false here) -------------------------------------

    async def _openai_chat(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        raw_messages = _items(body, "messages")
        if not raw_messages:
            raise _HTTPError(400, "[] is too short - 'messages'")
        messages = [_openai_message(message) for message in raw_messages]
        name = _text(body, "model")
        model = self._find(name)
        exchange.model = name
        reasoning = _mapping(body, "reasoning")
        effort = reasoning.get("effort", body.get("reasoning_effort"))
        response_format = _mapping(body, "response_format")
        fmt: Any = None
        if response_format.get("type") == "json_object":
            fmt = "json"
        elif response_format.get("type") == "json_schema":
            fmt = _mapping(_mapping(response_format, "json_schema"), "schema") or "json"
        options = _openai_options(body)
        think = None if effort is None else effort != "none"
        plan = self._chat_plan(name, model, messages, _items(body, "tools"), think, fmt, options)
        out = _OpenAIChatFormat(
            name, _mapping(body, "stream_options").get("include_usage") is True, plan.seed
        )
        await self._guarded(
            exchange, self._run(exchange, model, None, plan, out, _flag(body, "stream") is True)
        )

    async def _openai_completion(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        name = _text(body, "model")
        prompt = _text(body, "prompt")
        model = self._find(name)
        exchange.model = name
        plan = self._generate_plan(
            name, model, {"suffix": _text(body, "suffix")}, prompt, _openai_options(body)
        )
        include_usage = _mapping(body, "stream_options").get("include_usage") is True
        out = _OpenAICompletionFormat(name, include_usage, plan.seed)
        await self._guarded(
            exchange, self._run(exchange, model, None, plan, out, _flag(body, "stream") is True)
        )

    async def _openai_embeddings(self, exchange: _Exchange) -> None:
        body = await exchange.json()
        encoding = _text(body, "encoding_format").lower()
        if encoding not in ("", "float", "base64"):
            raise _HTTPError(
                400,
                f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64'].",
            )
        raw = body.get("input")
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
            inputs = raw
        else:
            raise _HTTPError(400, "invalid input")

        def render(name: str, vectors: list[list[float]], metrics: dict[str, int]) -> bytes:
            data = [
                {
                    "object": "embedding",
                    "embedding": b64encode(array("f", vector).tobytes()).decode()
                    if encoding == "base64"
                    else vector,
                    "index": index,
                }
                for index, vector in enumerate(vectors)
            ]
            tokens = metrics.get("prompt_eval_count", 0)
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            return orjson.dumps(
                {"object": "list", "data": data, "model": name, "usage": usage}, option=_NEWLINE
            )

        await self._embed_run(exchange, body, inputs, render, _JSON)

    async def _openai_models(self, exchange: _Exchange) -> None:
        data = [_openai_model_entry(card.name, card) for card in self._listing()]
        # Go's nil slice: no models marshal as "data": null.
        listing = {"object": "list", "data": data or None}
        await exchange.respond(200, _JSON, orjson.dumps(listing, option=_NEWLINE))

    async def _openai_model(self, exchange: _Exchange) -> None:
        name = exchange.path.removeprefix("/v1/models/")
        model = self._models.get(_model_key(name))
        if model is None:
            raise _HTTPError(404, f"model '{name}' not found")
        await exchange.respond(
            200, _JSON, orjson.dumps(_openai_model_entry(name, model.card), option=_NEWLINE)
        )


def _generate_done(name: str, reason: str) -> bytes:
    """The answer to a load or unload request: no text, no timings."""
    return orjson.dumps(
        {"model": name, "created_at": _created_at(), "response": "", "done": True, "done_reason": reason}
    )


def _chat_done(name: str, reason: str) -> bytes:
    message = {"role": "assistant", "content": ""}
    return orjson.dumps(
        {"model": name, "created_at": _created_at(), "message": message, "done_reason": reason, "done": True}
    )


def _embed_body(name: str, vectors: list[list[float]], metrics: dict[str, int]) -> bytes:
    return orjson.dumps({"model": name, "embeddings": vectors, **metrics})


def _legacy_body(name: str, vectors: list[list[float]], metrics: dict[str, int]) -> bytes:
    return orjson.dumps({"embedding": vectors[0] if vectors else []})


def _openai_message(message: Any) -> dict[str, Any]:
    """An OpenAI chat message as Ollama sees it: role and text (text parts of a multi-part content joined)."""
    if not isinstance(message, dict) or not isinstance(message.get("role", ""), str):
        raise _HTTPError(400, "invalid message format")
    content = message.get("content")
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(p["text"] for p in parts if isinstance(p.get("text"), str))
    elif content is not None and not isinstance(content, str):
        raise _HTTPError(400, f"invalid message content type: {type(content).__name__}")
    return {"role": message.get("role", ""), "content": content or ""}


def _openai_options(body: Mapping[str, Any]) -> dict[str, Any]:
    pairs = (
        ("seed", "seed"),
        ("max_tokens", "num_predict"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
    )
    return {option: body[key] for key, option in pairs if body.get(key) is not None}


def _openai_model_entry(name: str, card: _Card) -> dict[str, Any]:
    path = name.partition(":")[0].split("/")
    return {
        "id": name,
        "object": "model",
        "created": int(card.modified_at.timestamp()),
        "owned_by": path[-2] if len(path) > 1 else "library",
    }


def create_emulator(settings: EmulatorSettings | None = None) -> Emulator:
    """Build the emulator ASGI app; run it with ``otellama.server`` (or any ASGI server)."""
    return Emulator(settings)
