"""What a model run is, and how each API frames it on the wire.

A run is a :class:`Plan` of :class:`Piece` s, decided up front, and ends as a :class:`Run` with its timings.
A :class:`Format` turns those into one API's bytes: NDJSON objects for ``/api/generate`` and ``/api/chat``
(``done: true`` finals carrying the nanosecond timings, zero-valued fields left out), SSE events and a
``[DONE]`` for ``/v1``, and each API's non-streamed body.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from datetime import datetime
from typing import Any, Final, NamedTuple

import orjson

from otellama.emulator.exchange import JSON, JSON_UTF8, NDJSON, SSE

NEWLINE: Final = orjson.OPT_APPEND_NEWLINE


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def created_at() -> str:
    """Now as Go marshals ``time.Now().UTC()``: nanoseconds, trailing zeros trimmed."""
    second, fraction = divmod(time.time_ns(), 1_000_000_000)
    digits = f"{fraction:09d}".rstrip("0")
    return f"{_utc_second(second)}.{digits}Z" if digits else f"{_utc_second(second)}Z"


def local_iso(when: datetime) -> str:
    # /api/tags and /api/ps carry the server's local offset, not Z.
    return when.astimezone().isoformat()


def ndjson(value: Any) -> bytes:
    return orjson.dumps(value, option=NEWLINE)


def sse(value: Any) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


def openai_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def openai_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    return {
        "id": call["id"],
        "index": function["index"],
        "type": "function",
        "function": {"name": function["name"], "arguments": orjson.dumps(function["arguments"]).decode()},
    }


class Piece(NamedTuple):
    """One step of a model run: a thinking token, a content token, or a whole tool call."""

    kind: str
    text: str
    call: dict[str, Any] | None
    tokens: int


@dataclasses.dataclass
class Plan:
    """Everything a model run will produce, decided up front from the seed."""

    seed: int
    prompt_tokens: int
    pieces: list[Piece]
    done_reason: str
    eval_count: int


@dataclasses.dataclass
class Run:
    """A finished model run, as the final chunk or the non-streamed body reports it."""

    plan: Plan
    content: str
    thinking: str
    tool_calls: list[dict[str, Any]]
    metrics: dict[str, int]

    @property
    def usage(self) -> dict[str, int]:
        prompt, completion = self.plan.prompt_tokens, self.plan.eval_count
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Format:
    """How one API shapes a model run: stream chunks, the final chunk(s), the non-streamed body."""

    stream_type: bytes = NDJSON
    body_type: bytes = JSON_UTF8

    def chunk(self, piece: Piece) -> bytes:
        raise NotImplementedError

    def final(self, run: Run) -> bytes:
        raise NotImplementedError

    def body(self, run: Run) -> bytes:
        raise NotImplementedError

    def stream_error(self, message: str) -> bytes:
        return ndjson({"error": message})


class GenerateFormat(Format):
    """/api/generate: ``response`` text, ``context`` token ids on the final object unless raw."""

    def __init__(self, model: str, raw: bool) -> None:
        self.model = model
        self.raw = raw

    def chunk(self, piece: Piece) -> bytes:
        if piece.kind == "thinking":
            return ndjson(
                {
                    "model": self.model,
                    "created_at": created_at(),
                    "response": "",
                    "thinking": piece.text,
                    "done": False,
                }
            )
        return ndjson(
            {"model": self.model, "created_at": created_at(), "response": piece.text, "done": False}
        )

    def _done(self, run: Run, response: str, thinking: str) -> dict[str, Any]:
        done: dict[str, Any] = {"model": self.model, "created_at": created_at(), "response": response}
        if thinking:
            done["thinking"] = thinking
        done["done"] = True
        done["done_reason"] = run.plan.done_reason
        if not self.raw:
            count = run.plan.prompt_tokens + run.plan.eval_count
            done["context"] = [(run.plan.seed + i * 7919) % 128256 for i in range(count)]
        done.update(run.metrics)
        return done

    def final(self, run: Run) -> bytes:
        return ndjson(self._done(run, "", ""))

    def body(self, run: Run) -> bytes:
        return orjson.dumps(self._done(run, run.content, run.thinking))


class ChatFormat(Format):
    """/api/chat: ``message`` chunks, a chunk per tool call, and ``done_reason`` before ``done``."""

    def __init__(self, model: str) -> None:
        self.model = model

    def chunk(self, piece: Piece) -> bytes:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": piece.text if piece.kind == "content" else "",
        }
        if piece.kind == "thinking":
            message["thinking"] = piece.text
        elif piece.call is not None:
            message["tool_calls"] = [piece.call]
        return ndjson({"model": self.model, "created_at": created_at(), "message": message, "done": False})

    def _done(self, run: Run, message: dict[str, Any]) -> dict[str, Any]:
        done: dict[str, Any] = {"model": self.model, "created_at": created_at(), "message": message}
        done.update(done_reason=run.plan.done_reason, done=True, **run.metrics)
        return done

    def final(self, run: Run) -> bytes:
        return ndjson(self._done(run, {"role": "assistant", "content": ""}))

    def body(self, run: Run) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": run.content}
        if run.thinking:
            message["thinking"] = run.thinking
        if run.tool_calls:
            message["tool_calls"] = run.tool_calls
        return orjson.dumps(self._done(run, message))


class OpenAIFormat(Format):
    """What /v1/chat/completions and /v1/completions share: ids, SSE framing, usage, newline-ended bodies."""

    stream_type = SSE
    body_type = JSON
    prefix = ""

    def __init__(self, model: str, include_usage: bool, seed: int) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = f"{self.prefix}-{seed % 999}"
        self.created = int(time.time())

    def stream_error(self, message: str) -> bytes:
        # Ollama itself would mangle a mid-stream error into an empty chunk here; an OpenAI-style error
        # event is what OpenAI clients understand, and it is equally short of a finish_reason and [DONE].
        return sse(openai_error(500, message))

    def _tail(self, run: Run, last: dict[str, Any]) -> bytes:
        events = sse(last)
        if self.include_usage:
            events += sse({**last, "choices": [], "usage": run.usage})
        return events + b"data: [DONE]\n\n"


class OpenAIChatFormat(OpenAIFormat):
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

    def chunk(self, piece: Piece) -> bytes:
        delta: dict[str, Any] = {
            "role": "assistant",
            "content": piece.text if piece.kind == "content" else "",
        }
        if piece.kind == "thinking":
            delta["reasoning"] = piece.text
        elif piece.call is not None:
            delta["tool_calls"] = [openai_tool_call(piece.call)]
            self.tool_call_sent = True
        return sse(self._chunk(delta, None))

    def final(self, run: Run) -> bytes:
        reason = "tool_calls" if self.tool_call_sent else run.plan.done_reason
        return self._tail(run, self._chunk({"role": "assistant", "content": ""}, reason))

    def body(self, run: Run) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": run.content}
        if run.thinking:
            message["reasoning"] = run.thinking
        if run.tool_calls:
            message["tool_calls"] = [openai_tool_call(call) for call in run.tool_calls]
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
        return orjson.dumps(completion, option=NEWLINE)


class OpenAICompletionFormat(OpenAIFormat):
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

    def chunk(self, piece: Piece) -> bytes:
        # Thinking has no place in a text completion: Ollama sends those tokens as empty-text chunks.
        return sse(self._chunk(piece.text if piece.kind == "content" else "", None))

    def final(self, run: Run) -> bytes:
        return self._tail(run, self._chunk("", run.plan.done_reason))

    def body(self, run: Run) -> bytes:
        completion = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"text": run.content, "index": 0, "finish_reason": run.plan.done_reason}],
            "usage": run.usage,
        }
        return orjson.dumps(completion, option=NEWLINE)


def generate_done(name: str, reason: str) -> bytes:
    """The answer to a load or unload request: no text, no timings."""
    return orjson.dumps(
        {"model": name, "created_at": created_at(), "response": "", "done": True, "done_reason": reason}
    )


def chat_done(name: str, reason: str) -> bytes:
    message = {"role": "assistant", "content": ""}
    return orjson.dumps(
        {"model": name, "created_at": created_at(), "message": message, "done_reason": reason, "done": True}
    )
