"""The OpenAI-compatible routes under ``/v1``: chat completions, completions, embeddings and models.

As in Ollama, each translates the request into the native run (so the same plan and pacing), and renders
OpenAI's shapes: SSE events and ``[DONE]``, ``usage``, newline-ended bodies. ``stream`` defaults to false
here.
"""

from __future__ import annotations

from array import array
from base64 import b64encode
from collections.abc import Mapping
from typing import Any

import orjson

from otellama.emulator.catalogue import Card, model_key
from otellama.emulator.exchange import (
    JSON,
    Exchange,
    HTTPError,
    bool_field,
    dict_field,
    list_field,
    text_field,
)
from otellama.emulator.generation import chat_plan, generate_plan
from otellama.emulator.native import embed_run
from otellama.emulator.runtime import Runtime
from otellama.emulator.wire import NEWLINE, OpenAIChatFormat, OpenAICompletionFormat


async def chat_completions(runtime: Runtime, exchange: Exchange) -> None:
    body = await exchange.json()
    raw_messages = list_field(body, "messages")
    if not raw_messages:
        raise HTTPError(400, "[] is too short - 'messages'")
    messages = [_message(message) for message in raw_messages]
    name = text_field(body, "model")
    model = runtime.find(name)
    exchange.model = name
    reasoning = dict_field(body, "reasoning")
    effort = reasoning.get("effort", body.get("reasoning_effort"))
    response_format = dict_field(body, "response_format")
    fmt: Any = None
    if response_format.get("type") == "json_object":
        fmt = "json"
    elif response_format.get("type") == "json_schema":
        fmt = dict_field(dict_field(response_format, "json_schema"), "schema") or "json"
    options = _options(body)
    think = None if effort is None else effort != "none"
    plan = chat_plan(
        runtime.settings, name, model.card, messages, list_field(body, "tools"), think, fmt, options
    )
    out = OpenAIChatFormat(name, dict_field(body, "stream_options").get("include_usage") is True, plan.seed)
    await runtime.guarded(
        exchange, runtime.run(exchange, model, None, plan, out, bool_field(body, "stream") is True)
    )


async def completions(runtime: Runtime, exchange: Exchange) -> None:
    body = await exchange.json()
    name = text_field(body, "model")
    prompt = text_field(body, "prompt")
    model = runtime.find(name)
    exchange.model = name
    plan = generate_plan(
        runtime.settings, name, model.card, {"suffix": text_field(body, "suffix")}, prompt, _options(body)
    )
    include_usage = dict_field(body, "stream_options").get("include_usage") is True
    out = OpenAICompletionFormat(name, include_usage, plan.seed)
    await runtime.guarded(
        exchange, runtime.run(exchange, model, None, plan, out, bool_field(body, "stream") is True)
    )


async def embeddings(runtime: Runtime, exchange: Exchange) -> None:
    body = await exchange.json()
    encoding = text_field(body, "encoding_format").lower()
    if encoding not in ("", "float", "base64"):
        raise HTTPError(
            400,
            f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64'].",
        )
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        inputs = raw
    else:
        raise HTTPError(400, "invalid input")

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
        return orjson.dumps({"object": "list", "data": data, "model": name, "usage": usage}, option=NEWLINE)

    await embed_run(runtime, exchange, body, inputs, render, JSON)


async def list_models(runtime: Runtime, exchange: Exchange) -> None:
    data = [_model_entry(card.name, card) for card in runtime.listing()]
    # Go's nil slice: no models marshal as "data": null.
    listing = {"object": "list", "data": data or None}
    await exchange.respond(200, JSON, orjson.dumps(listing, option=NEWLINE))


async def show_model(runtime: Runtime, exchange: Exchange) -> None:
    name = exchange.path.removeprefix("/v1/models/")
    model = runtime.models.get(model_key(name))
    if model is None:
        raise HTTPError(404, f"model '{name}' not found")
    await exchange.respond(200, JSON, orjson.dumps(_model_entry(name, model.card), option=NEWLINE))


def _message(message: Any) -> dict[str, Any]:
    """An OpenAI chat message as Ollama sees it: role and text (text parts of a multi-part content joined)."""
    if not isinstance(message, dict) or not isinstance(message.get("role", ""), str):
        raise HTTPError(400, "invalid message format")
    content = message.get("content")
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(p["text"] for p in parts if isinstance(p.get("text"), str))
    elif content is not None and not isinstance(content, str):
        raise HTTPError(400, f"invalid message content type: {type(content).__name__}")
    return {"role": message.get("role", ""), "content": content or ""}


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    pairs = (
        ("seed", "seed"),
        ("max_tokens", "num_predict"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
    )
    return {option: body[key] for key, option in pairs if body.get(key) is not None}


def _model_entry(name: str, card: Card) -> dict[str, Any]:
    path = name.partition(":")[0].split("/")
    return {
        "id": name,
        "object": "model",
        "created": int(card.modified_at.timestamp()),
        "owned_by": path[-2] if len(path) > 1 else "library",
    }
