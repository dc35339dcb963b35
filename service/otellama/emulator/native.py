"""Ollama's native inference routes: ``/api/generate``, ``/api/chat``, ``/api/embed`` and ``/api/embeddings``.

Each is a function of the :class:`~otellama.emulator.runtime.Runtime` and the exchange. An empty prompt (or
message list) only loads the model, and with ``keep_alive: 0`` unloads it, answering with no timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from otellama.emulator.exchange import (
    JSON_UTF8,
    Exchange,
    HTTPError,
    bool_field,
    dict_field,
    int_field,
    keep_alive_seconds,
    list_field,
    text_field,
)
from otellama.emulator.generation import chat_plan, count_tokens, embedding, generate_plan
from otellama.emulator.runtime import Runtime
from otellama.emulator.wire import ChatFormat, GenerateFormat, chat_done, generate_done


async def generate(runtime: Runtime, exchange: Exchange) -> None:
    body = await exchange.json()
    name = text_field(body, "model")
    model = runtime.find(name)
    exchange.model = name
    options = dict_field(body, "options")
    keep_alive = keep_alive_seconds(body.get("keep_alive"))
    prompt = text_field(body, "prompt")
    if not prompt and keep_alive == 0:
        runtime.unload(model)
        await exchange.respond(200, JSON_UTF8, generate_done(name, "unload"))
        return
    plan = generate_plan(runtime.settings, name, model.card, body, prompt, options)
    if not prompt:
        await runtime.guarded(
            exchange, runtime.load_only(exchange, model, keep_alive, generate_done(name, "load"))
        )
        return
    fmt = GenerateFormat(name, raw=bool_field(body, "raw") is True)
    stream = bool_field(body, "stream") is not False
    await runtime.guarded(exchange, runtime.run(exchange, model, keep_alive, plan, fmt, stream))


async def chat(runtime: Runtime, exchange: Exchange) -> None:
    body = await exchange.json()
    name = text_field(body, "model")
    model = runtime.find(name)
    exchange.model = name
    options = dict_field(body, "options")
    keep_alive = keep_alive_seconds(body.get("keep_alive"))
    messages = list_field(body, "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise HTTPError(400, "json: cannot unmarshal messages: each message must be an object")
    if not messages and keep_alive == 0:
        runtime.unload(model)
        await exchange.respond(200, JSON_UTF8, chat_done(name, "unload"))
        return
    tools, fmt = list_field(body, "tools"), body.get("format")
    plan = chat_plan(runtime.settings, name, model.card, messages, tools, body.get("think"), fmt, options)
    if not messages:
        await runtime.guarded(
            exchange, runtime.load_only(exchange, model, keep_alive, chat_done(name, "load"))
        )
        return
    stream = bool_field(body, "stream") is not False
    await runtime.guarded(exchange, runtime.run(exchange, model, keep_alive, plan, ChatFormat(name), stream))


async def embed_run(
    runtime: Runtime,
    exchange: Exchange,
    body: Mapping[str, Any],
    inputs: list[str],
    render: Callable[[str, list[list[float]], dict[str, int]], bytes],
    content_type: bytes,
) -> None:
    """Load, queue and evaluate like a generation, then answer ``render(model, vectors, timings)``."""
    name = text_field(body, "model")
    model = runtime.find(name)
    exchange.model = name
    dimensions = int_field(body, "dimensions") or 0
    keep_alive = keep_alive_seconds(body.get("keep_alive"))

    async def work() -> None:
        vectors: list[list[float]] = []
        metrics: dict[str, int] = {}
        async with runtime.scheduled(exchange, model, keep_alive):
            # An empty input only loads the model: no vectors, and so no timings either.
            if inputs:
                tokens = sum(count_tokens(text) + 2 for text in inputs)
                await runtime.evaluate_prompt(tokens)
                vectors = [embedding(runtime.settings, name, model.card, text, dimensions) for text in inputs]
                load = max(1, exchange.loaded_ns - exchange.start_ns)
                total = max(time.monotonic_ns() - exchange.start_ns, load)
                metrics = {"total_duration": total, "load_duration": load, "prompt_eval_count": tokens}
        await exchange.respond(200, content_type, render(name, vectors, metrics))

    await runtime.guarded(exchange, work())


async def embed(runtime: Runtime, exchange: Exchange) -> None:
    body = await exchange.json()
    raw = body.get("input")
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        inputs: list[str] = raw
    elif isinstance(raw, str) or raw is None:
        inputs = [raw] if raw else []
    else:
        raise HTTPError(400, "invalid input type")
    await embed_run(runtime, exchange, body, inputs, _embed_body, JSON_UTF8)


async def embeddings(runtime: Runtime, exchange: Exchange) -> None:
    """The legacy endpoint: one prompt in, ``{"embedding": [...]}`` out, no timings."""
    body = await exchange.json()
    prompt = text_field(body, "prompt")
    await embed_run(
        runtime, exchange, {**body, "dimensions": None}, [prompt] if prompt else [], _legacy_body, JSON_UTF8
    )


def _embed_body(name: str, vectors: list[list[float]], metrics: dict[str, int]) -> bytes:
    return orjson.dumps({"model": name, "embeddings": vectors, **metrics})


def _legacy_body(name: str, vectors: list[list[float]], metrics: dict[str, int]) -> bytes:
    return orjson.dumps({"embedding": vectors[0] if vectors else []})
