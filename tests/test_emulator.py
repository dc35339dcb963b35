"""The Ollama emulator, over a real socket, against the API fixtures and Ollama's documented behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from otellama.emulator import (
    BUSY_MESSAGE,
    FAULT_HEADER,
    FAULT_MIDSTREAM_ERROR,
    MIDSTREAM_MESSAGE,
    Emulator,
    EmulatorSettings,
    create_emulator,
)
from otellama.server import BackgroundServer
from tests.conftest import API_FIXTURES

TIMINGS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
QUESTION = [{"role": "user", "content": "why is the sky blue?"}]
# Pacing off and a near-instant load: fast enough for tests that do not measure time.
FAST = EmulatorSettings(load_seconds=0.01, token_rate=0)


@contextlib.contextmanager
def running(app: Emulator) -> Iterator[str]:
    """``app`` on a real socket for the duration of a ``with`` block; yields its base URL."""
    with BackgroundServer(app) as server:
        yield server.url


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """One fast emulator shared by the tests that neither time it nor inspect its state."""
    with running(create_emulator(FAST)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as http:
        yield http


def serve(settings: EmulatorSettings) -> AbstractContextManager[str]:
    """A dedicated emulator for a test whose settings or recorded state must not be shared."""
    return running(create_emulator(settings))


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines()]


def sse(response: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of an event stream, ``[DONE]`` kept as the string."""
    assert response.text.endswith("\n\n")
    events = [block.removeprefix("data: ") for block in response.text.split("\n\n") if block]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


def queue_ns(final: dict[str, Any]) -> int:
    """Time spent waiting for a slot, which Ollama counts in total_duration only (docs/reference.md §1)."""
    return int(final["total_duration"] - sum(final.get(key, 0) for key in TIMINGS[1:]))


# --- replaying the documented requests --------------------------------------------------------------------


def shape(value: Any) -> Any:
    """Keys and JSON types, recursively; a list by its first element."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def current(fixture: dict[str, Any], *, thinking: bool = False) -> Any:
    """The shape of a documented response as the current server (docs/reference.md §1) sends it.

    The docs span several Ollama eras: finals written before ``done_reason`` existed lack it (current servers
    always send it, ``"load"``/``"unload"`` included); old chat chunks carry ``"images": null``, now omitted;
    doc tool calls lack the ``id`` and ``function.index`` current code adds (INDEX.md, synthetic/README.md);
    the /api/embed examples predate its ``total_duration``, ``load_duration`` and ``prompt_eval_count``.
    """
    expected = shape(fixture)
    if "embeddings" in fixture:  # /api/embed examples from before it reported timings
        expected.update(total_duration="int", load_duration="int", prompt_eval_count="int")
    if fixture.get("done") is True:
        expected.setdefault("done_reason", "str")
    message = expected.get("message")
    if isinstance(message, dict):
        message.pop("images", None)
        if thinking:
            message["thinking"] = "str"
        for call in message.get("tool_calls", []):
            call["id"] = "str"
            call["function"]["index"] = "int"
    return expected


def load_fixture(path: Path) -> Any:
    text = path.read_text()
    if path.suffix == ".jsonc":
        text = re.sub(r"^\s*//.*$", "", text, flags=re.MULTILINE)
    if path.suffix == ".ndjson":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


# Every request fixture, the endpoint it is for, and the response fixtures its answer must look like.
# Requests without a documented response borrow one of the same kind (noted).
REPLAYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "chat_load_request.json": ("/api/chat", ("chat_load_response.json",)),
    "chat_nostream_request.json": ("/api/chat", ("chat_nostream_response.json",)),
    "chat_nostream_tools_request.json": ("/api/chat", ("chat_nostream_tools_response.json",)),
    "chat_stream_request.json": (
        "/api/chat",
        ("chat_stream_response_chunk.json", "chat_stream_response_final.json"),
    ),
    "chat_stream_tools_request.json": (
        "/api/chat",
        ("chat_stream_tools_response_chunk.json", "chat_stream_tools_response_final.json"),
    ),
    "chat_structured_request.json": ("/api/chat", ("chat_structured_response.json",)),
    # Thinking requests have no documented response; the synthetic stream shows the current shape.
    "chat_thinking_level_request.json": ("/api/chat", ("synthetic/chat_thinking_stream_response.ndjson",)),
    "chat_thinking_request.json": ("/api/chat", ("chat_nostream_response.json",)),
    "chat_tool_history_request.jsonc": ("/api/chat", ("chat_tool_history_response.json",)),
    "chat_tool_single_request.json": ("/api/chat", ("chat_nostream_tools_response.json",)),
    "chat_tool_single_result_request.json": ("/api/chat", ("chat_tool_history_response.json",)),
    "chat_unload_request.json": ("/api/chat", ("chat_unload_response.json",)),
    "embed_multi_request.json": ("/api/embed", ("embed_multi_response.json",)),
    "embed_request.json": ("/api/embed", ("embed_response.json",)),
    "embeddings_legacy_request.json": ("/api/embeddings", ("embeddings_legacy_response.json",)),
    "generate_json_mode_request.json": ("/api/generate", ("generate_json_mode_response.json",)),
    "generate_load_request.json": ("/api/generate", ("generate_load_response.json",)),
    "generate_nostream_request.json": ("/api/generate", ("generate_nostream_response.json",)),
    "generate_options_request.json": ("/api/generate", ("generate_options_response.json",)),
    # Raw mode has no context: the newer usage doc example (no context) is its shape.
    "generate_raw_request.json": ("/api/generate", ("generate_nostream_response_usage.json",)),
    "generate_stream_request.json": (
        "/api/generate",
        ("generate_stream_response_chunk.json", "generate_stream_response_final.json"),
    ),
    "generate_structured_request.json": ("/api/generate", ("generate_structured_response.json",)),
    "generate_suffix_request.json": ("/api/generate", ("generate_nostream_response.json",)),
    "generate_unload_request.json": ("/api/generate", ("generate_unload_response.json",)),
    "pull_request.json": ("/api/pull", ("pull_stream_progress_line.json",)),
}


def test_every_request_fixture_is_replayed() -> None:
    found = {path.name for path in API_FIXTURES.glob("*_request.json*")}
    assert found == set(REPLAYS)


@pytest.fixture(scope="module")
def replay_client() -> Iterator[httpx.Client]:
    models = {load_fixture(API_FIXTURES / name)["model"] for name in REPLAYS}
    with (
        serve(EmulatorSettings(load_seconds=0.01, token_rate=0, models=tuple(sorted(models)))) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        yield client


@pytest.mark.parametrize("name", sorted(REPLAYS))
def test_replayed_request_matches_documented_shape(replay_client: httpx.Client, name: str) -> None:
    endpoint, expected_names = REPLAYS[name]
    request = load_fixture(API_FIXTURES / name)
    response = replay_client.post(endpoint, json=request)
    assert response.status_code == 200, response.text
    expected = [load_fixture(API_FIXTURES / expected_name) for expected_name in expected_names]
    # Thinking-capable models think unless the request says otherwise (Ollama's ChatHandler defaults think).
    thinking = request.get("think", request["model"].startswith(("qwen3", "gpt-oss"))) not in (None, False)

    if endpoint == "/api/pull":
        lines = ndjson(response)
        assert lines[-1] == {"status": "success"}
        assert shape(expected[0]) in [shape(line) for line in lines]
        return

    # Load and unload requests (no prompt, no messages) answer with one JSON object even when streaming.
    inference = endpoint in ("/api/chat", "/api/generate")
    streamed = (
        inference and request.get("stream", True) and (request.get("prompt") or request.get("messages"))
    )
    if not streamed:
        assert response.headers["content-type"] == "application/json; charset=utf-8"
        assert not response.text.endswith("\n")
        body = response.json()
        assert shape(body) == current(expected[0], thinking=thinking)
        if "model" in request and "model" in body:
            assert body["model"] == request["model"]
        return

    assert response.headers["content-type"] == "application/x-ndjson"
    *chunks, final = ndjson(response)
    assert chunks and final["done"] is True and all(chunk["done"] is False for chunk in chunks)
    if len(expected) == 1:  # a whole documented stream: each of our chunks looks like one of its chunks
        *documented_chunks, documented_final = expected[0]
        documented = [current(chunk) for chunk in documented_chunks]
        assert all(shape(chunk) in documented for chunk in chunks)
        assert {json.dumps(shape(c), sort_keys=True) for c in chunks} >= {
            json.dumps(d, sort_keys=True) for d in documented
        }
        assert shape(final) == current(documented_final)
    else:
        chunk_fixture, final_fixture = expected
        assert all(shape(chunk) == current(chunk_fixture) for chunk in chunks)
        assert shape(final) == current(final_fixture)


# --- timings ----------------------------------------------------------------------------------------------


def test_cold_load_then_warm_then_unloaded_by_keep_alive_zero() -> None:
    settings = EmulatorSettings(load_seconds=0.2, token_rate=0)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=10) as client:
        ask = {"model": "gemma3:1b", "prompt": "hello", "stream": False}
        cold = client.post("/api/generate", json=ask).json()
        warm = client.post("/api/generate", json=ask).json()
        assert cold["load_duration"] >= 0.2e9
        # Warm is small but never zero (docs/reference.md §1: "warm = load_duration == 0" is wrong).
        assert 0 < warm["load_duration"] < 0.05e9
        assert [m["name"] for m in client.get("/api/ps").json()["models"]] == ["gemma3:1b"]

        last = client.post("/api/generate", json={**ask, "keep_alive": 0}).json()
        assert last["load_duration"] < 0.05e9
        assert client.get("/api/ps").json() == {"models": []}
        assert client.post("/api/generate", json=ask).json()["load_duration"] >= 0.2e9


def test_max_loaded_unloads_the_least_recently_used_idle_model() -> None:
    settings = EmulatorSettings(load_seconds=0.1, token_rate=0, max_loaded=2)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=10) as client:
        for model in ("gemma3:1b", "llama3.2:3b", "gemma3:1b", "qwen3:14b"):
            client.post("/api/generate", json={"model": model, "prompt": "hi", "stream": False})
        # llama3.2 was used least recently: it made room for qwen3; a model used again is not reloaded.
        assert {m["name"] for m in client.get("/api/ps").json()["models"]} == {"gemma3:1b", "qwen3:14b"}
        again = client.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "hi", "stream": False})
        assert again.json()["load_duration"] >= 0.1e9


def test_keep_alive_expires_and_unload_request() -> None:
    with serve(EmulatorSettings(load_seconds=0.1, token_rate=0)) as url, httpx.Client(base_url=url) as client:
        loaded = client.post("/api/generate", json={"model": "gemma3:1b", "keep_alive": "150ms"})
        assert loaded.json()["done_reason"] == "load"
        (entry,) = client.get("/api/ps").json()["models"]
        assert set(entry) >= {"expires_at", "size_vram", "size", "digest", "details"}
        wait_until(lambda: client.get("/api/ps").json() == {"models": []}, timeout=1.0)

        client.post("/api/generate", json={"model": "gemma3:1b", "keep_alive": -1})
        assert client.get("/api/ps").json()["models"][0]["expires_at"] > "2200"
        unloaded = client.post("/api/generate", json={"model": "gemma3:1b", "keep_alive": 0})
        assert unloaded.json()["done_reason"] == "unload"
        assert client.get("/api/ps").json() == {"models": []}


def test_paced_tokens_and_prompt_eval_grow_with_work() -> None:
    settings = EmulatorSettings(load_seconds=0, token_rate=200, response_tokens=(20, 20))
    with serve(settings) as url, httpx.Client(base_url=url, timeout=10) as client:
        short = client.post(
            "/api/generate", json={"model": "gemma3:1b", "prompt": "hi", "stream": False}
        ).json()
        long_prompt = "why is the sky blue? " * 200
        long = client.post(
            "/api/generate", json={"model": "gemma3:1b", "prompt": long_prompt, "stream": False}
        ).json()
    assert long["prompt_eval_count"] > 10 * short["prompt_eval_count"]
    assert long["prompt_eval_duration"] > 5 * short["prompt_eval_duration"]
    # 20 tokens at 200 tokens/s.
    assert 0.09e9 < short["eval_duration"] < 0.3e9
    assert short["eval_count"] == 20


async def test_queue_time_counts_in_total_and_a_full_queue_is_503() -> None:
    settings = EmulatorSettings(
        load_seconds=0, token_rate=100, parallel=1, max_queue=1, response_tokens=(20, 20)
    )
    emulator = create_emulator(settings)
    with running(emulator) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            ask = {"model": "gemma3:1b", "prompt": "hi", "stream": False}
            first = asyncio.create_task(client.post("/api/generate", json=ask))
            await asyncio.to_thread(wait_until, lambda: emulator.in_flight == 1)
            second = asyncio.create_task(client.post("/api/generate", json=ask))
            await asyncio.to_thread(wait_until, lambda: emulator.in_flight == 2)
            busy = await client.post("/api/generate", json=ask)
            assert busy.status_code == 503
            assert busy.json() == {"error": BUSY_MESSAGE}
            assert BUSY_MESSAGE == "server busy, please try again.  maximum pending requests exceeded"
            ran, waited = (await first).json(), (await second).json()
    for final in (ran, waited):
        assert (
            final["total_duration"]
            >= final["load_duration"] + final["prompt_eval_duration"] + final["eval_duration"]
        )
    # The second waited for the first's 20 tokens at 100 tokens/s.
    assert queue_ns(waited) > 0.15e9
    assert queue_ns(ran) < 0.05e9


def test_zero_valued_fields_are_omitted(client: httpx.Client) -> None:
    load = client.post("/api/generate", json={"model": "gemma3:1b"}).json()
    assert set(load) == {"model", "created_at", "response", "done", "done_reason"}
    assert client.post("/api/embed", json={"model": "nomic-embed-text", "input": ""}).json() == {
        "model": "nomic-embed-text",
        "embeddings": [],
    }
    final = client.post(
        "/api/chat", json={"model": "gemma3:1b", "messages": QUESTION, "stream": False}
    ).json()
    assert all(final[key] > 0 for key in (*TIMINGS, "prompt_eval_count", "eval_count"))


def test_done_reason_length_when_num_predict_is_hit(client: httpx.Client) -> None:
    ask = {"model": "llama3.2:3b", "prompt": "count to fifty", "options": {"num_predict": 5}}
    *chunks, final = ndjson(client.post("/api/generate", json=ask))
    assert len(chunks) == 5
    assert final["done_reason"] == "length"
    assert final["eval_count"] == 5
    unlimited = client.post("/api/generate", json={**ask, "options": {"num_predict": 1000}, "stream": False})
    assert unlimited.json()["done_reason"] == "stop"
    assert 20 <= unlimited.json()["eval_count"] <= 40


# --- content ----------------------------------------------------------------------------------------------


def test_output_is_deterministic_per_seed() -> None:
    def answer(client: httpx.Client, options: dict[str, Any]) -> str:
        ask = {"model": "gemma3:1b", "prompt": "tell me", "stream": False, "options": options}
        return str(client.post("/api/generate", json=ask).json()["response"])

    with serve(FAST) as url, httpx.Client(base_url=url) as client:
        first = answer(client, {})
        assert answer(client, {}) == first
        assert answer(client, {"seed": 7}) != first
    with (
        serve(EmulatorSettings(seed=1, load_seconds=0, token_rate=0)) as url,
        httpx.Client(base_url=url) as client,
    ):
        assert answer(client, {}) != first


def test_thinking_streams_before_content(client: httpx.Client) -> None:
    *chunks, final = ndjson(
        client.post("/api/chat", json={"model": "qwen3:14b", "messages": QUESTION, "think": True})
    )
    kinds = ["thinking" if "thinking" in c["message"] else "content" for c in chunks]
    thought = kinds.index("content")
    assert thought > 0 and set(kinds[:thought]) == {"thinking"} and set(kinds[thought:]) == {"content"}
    assert final["eval_count"] == len(chunks)
    # Thinking models think unless told not to; others refuse to (Ollama's 400).
    no_think = ndjson(
        client.post("/api/chat", json={"model": "qwen3:14b", "messages": QUESTION, "think": False})
    )
    assert all("thinking" not in line["message"] for line in no_think)
    refused = client.post("/api/chat", json={"model": "gemma3:1b", "messages": QUESTION, "think": True})
    assert refused.status_code == 400
    assert refused.json() == {"error": '"gemma3:1b" does not support thinking'}


def test_tool_calls_each_in_own_chunk_and_deterministic(client: httpx.Client) -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": name, "parameters": {"type": "object", "properties": params}},
        }
        for name, params in (
            ("weather", {"city": {"type": "string"}}),
            ("search", {"query": {"type": "string"}}),
        )
    ]
    ask = {
        "model": "llama3.2:3b",
        "messages": [{"role": "user", "content": "Weather in Detroit?"}],
        "tools": tools,
    }
    *chunks, final = ndjson(client.post("/api/chat", json=ask))
    assert [len(chunk["message"]["tool_calls"]) for chunk in chunks] == [1, 1]
    calls = [chunk["message"]["tool_calls"][0] for chunk in chunks]
    assert [call["function"]["name"] for call in calls] == ["weather", "search"]
    assert [call["function"]["index"] for call in calls] == [0, 1]
    assert calls[0]["function"]["arguments"] == {"city": "Detroit"}
    assert all(re.fullmatch(r"call_[a-z0-9]{8}", call["id"]) for call in calls)
    assert final["done_reason"] == "stop"
    again = ndjson(client.post("/api/chat", json=ask))[:-1]
    assert [chunk["message"] for chunk in again] == [chunk["message"] for chunk in chunks]
    refused = client.post("/api/chat", json={**ask, "model": "gemma3:1b"})
    assert refused.status_code == 400
    assert refused.json() == {"error": "registry.ollama.ai/library/gemma3:1b does not support tools"}


def test_structured_output_follows_the_schema(client: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"age": {"type": "integer"}, "available": {"type": "boolean"}},
        "required": ["age", "available"],
    }
    ask = {"model": "llama3.2:3b", "messages": QUESTION, "format": schema, "stream": False}
    answer = json.loads(client.post("/api/chat", json=ask).json()["message"]["content"])
    assert set(answer) == {"age", "available"}
    assert isinstance(answer["age"], int) and isinstance(answer["available"], bool)
    json_mode = client.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "hi", "format": "json"})
    assert isinstance(json.loads("".join(line["response"] for line in ndjson(json_mode))), dict)


def test_embeddings(client: httpx.Client) -> None:
    single = client.post("/api/embed", json={"model": "nomic-embed-text", "input": "hello"}).json()
    assert len(single["embeddings"]) == 1 and len(single["embeddings"][0]) == 768
    assert sum(v * v for v in single["embeddings"][0]) == pytest.approx(1.0, rel=1e-5)
    batch = client.post(
        "/api/embed", json={"model": "nomic-embed-text", "input": ["hello", "you"], "dimensions": 64}
    )
    vectors = batch.json()["embeddings"]
    assert [len(v) for v in vectors] == [64, 64] and vectors[0] != vectors[1]
    assert set(batch.json()) == {
        "model",
        "embeddings",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
    }
    legacy = client.post("/api/embeddings", json={"model": "nomic-embed-text", "prompt": "hello"}).json()
    assert list(legacy) == ["embedding"] and len(legacy["embedding"]) == 768
    assert client.post("/api/embed", json={"model": "nomic-embed-text", "input": [1]}).status_code == 400


# --- the OpenAI-compatible API ----------------------------------------------------------------------------


def test_v1_chat_sse_with_include_usage(client: httpx.Client) -> None:
    ask = {
        "model": "llama3.2:3b",
        "messages": QUESTION,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = client.post("/v1/chat/completions", json=ask)
    assert response.headers["content-type"] == "text/event-stream"
    *chunks, finish, usage, done = sse(response)
    assert done == "[DONE]"
    assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
    assert usage["usage"]["completion_tokens"] == len(chunks)
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + len(chunks)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert all(chunk["choices"][0]["finish_reason"] is None and "usage" not in chunk for chunk in chunks)
    assert set(chunks[0]) == {"id", "object", "created", "model", "system_fingerprint", "choices"}
    without_usage = sse(client.post("/v1/chat/completions", json={**ask, "stream_options": None}))
    assert without_usage[-2]["choices"][0]["finish_reason"] == "stop" and without_usage[-1] == "[DONE]"


def test_v1_completions_stream_and_body(client: httpx.Client) -> None:
    ask = {"model": "llama3.2:3b", "prompt": "Say hi", "max_tokens": 3, "stream": True}
    *chunks, finish, done = sse(client.post("/v1/completions", json=ask))
    assert done == "[DONE]" and len(chunks) == 3
    assert finish["choices"][0]["finish_reason"] == "length" and finish["object"] == "text_completion"
    body = client.post("/v1/completions", json={**ask, "stream": False})
    assert body.text.endswith("}\n")
    assert body.json()["choices"][0]["text"] == "".join(chunk["choices"][0]["text"] for chunk in chunks)


def test_v1_non_streamed_bodies_end_with_a_newline(client: httpx.Client) -> None:
    chat = client.post("/v1/chat/completions", json={"model": "qwen3:14b", "messages": QUESTION})
    assert chat.headers["content-type"] == "application/json"
    assert chat.text.endswith("}\n") and chat.text.count("\n") == 1
    body = chat.json()
    assert body["object"] == "chat.completion" and body["system_fingerprint"] == "fp_ollama"
    assert set(body["choices"][0]["message"]) == {"role", "content", "reasoning"}
    embeddings = client.post("/v1/embeddings", json={"model": "nomic-embed-text", "input": ["a", "b"]})
    assert embeddings.text.endswith("}\n")
    assert [item["index"] for item in embeddings.json()["data"]] == [0, 1]
    models = client.get("/v1/models")
    assert models.text.endswith("}\n")
    assert "llama3.2:3b" in [model["id"] for model in models.json()["data"]]
    assert client.get("/v1/models/llama3.2:3b").json()["owned_by"] == "library"


def test_v1_with_the_openai_client(url: str) -> None:
    tools: Any = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages: Any = QUESTION
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as api:
        reply = api.chat.completions.create(model="llama3.2:3b", messages=messages, tools=tools)
        stream = api.chat.completions.create(
            model="gemma3:1b", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.tool_calls and reply.choices[0].message.tool_calls[0].type == "function"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(chunks) - 2


# --- errors -----------------------------------------------------------------------------------------------


def test_native_errors(client: httpx.Client) -> None:
    missing = client.post("/api/chat", json={"model": "nope", "messages": QUESTION})
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json; charset=utf-8"
    assert missing.json() == {"error": 'model "nope" not found, try pulling it first'}
    assert client.post("/api/generate", content=b'{"model": ').status_code == 400
    assert "error" in client.post("/api/generate", content=b'{"model": ').json()
    assert client.post("/api/generate", json={"prompt": "hi"}).json() == {"error": "model is required"}
    assert client.post("/api/generate", content=b"").json() == {"error": "missing request body"}
    # curl -d sends a form content type; Ollama parses the JSON anyway.
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = json.dumps({"model": "gemma3:1b", "stream": False, "prompt": "hi"})
    assert client.post("/api/generate", content=body, headers=form).json()["done"] is True
    assert (
        client.post("/api/chat", json={"model": "nomic-embed-text", "messages": QUESTION}).status_code == 400
    )
    assert client.get("/api/chat").status_code == 405
    assert client.get("/api/nothing-here").status_code == 404


def test_v1_errors(client: httpx.Client) -> None:
    missing = client.post("/v1/chat/completions", json={"model": "nope", "messages": QUESTION})
    assert missing.status_code == 404
    assert missing.text.endswith("}\n")
    error = missing.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "not_found_error" and error["param"] is None and error["code"] is None
    empty = client.post("/v1/chat/completions", json={"model": "gemma3:1b", "messages": []})
    assert empty.status_code == 400 and empty.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/models/nope").json()["error"]["message"] == "model 'nope' not found"


def test_midstream_error_after_a_200(client: httpx.Client) -> None:
    fault = {FAULT_HEADER: FAULT_MIDSTREAM_ERROR}
    native = client.post("/api/chat", json={"model": "gemma3:1b", "messages": QUESTION}, headers=fault)
    assert native.status_code == 200 and native.headers["content-type"] == "application/x-ndjson"
    *chunks, error = ndjson(native)
    assert error == {"error": MIDSTREAM_MESSAGE}
    assert chunks and not any(chunk["done"] for chunk in chunks)

    events = sse(
        client.post(
            "/v1/chat/completions",
            json={"model": "gemma3:1b", "messages": QUESTION, "stream": True},
            headers=fault,
        )
    )
    assert events[-1]["error"]["message"] == MIDSTREAM_MESSAGE and "[DONE]" not in events
    not_streamed = client.post(
        "/api/generate", json={"model": "gemma3:1b", "prompt": "x", "stream": False}, headers=fault
    )
    assert not_streamed.status_code == 500 and not_streamed.json() == {"error": MIDSTREAM_MESSAGE}
    ignored = client.post(
        "/api/generate", json={"model": "gemma3:1b", "prompt": "x"}, headers={FAULT_HEADER: "later"}
    )
    assert ndjson(ignored)[-1]["done"] is True


def test_cancellation_is_recorded_when_the_client_disconnects() -> None:
    settings = EmulatorSettings(load_seconds=0, token_rate=20, parallel=1)
    emulator = create_emulator(settings)
    with running(emulator) as url, httpx.Client(base_url=url, timeout=10) as client:
        ask = {"model": "gemma3:1b", "messages": QUESTION}
        with client.stream("POST", "/api/chat", json=ask) as response:
            lines = response.iter_lines()
            received = [next(lines), next(lines)]
            left = time.monotonic()
        wait_until(lambda: bool(emulator.cancellations), timeout=2.0)
        (cancellation,) = emulator.cancellations
        assert cancellation.path == "/api/chat" and cancellation.model == "gemma3:1b"
        assert cancellation.at - left < 0.1
        assert len(received) <= cancellation.chunks_sent <= len(received) + 3
        # Generation stopped: the slot is free, and the one-slot model answers the next request at once.
        assert emulator.in_flight == 0
        started = time.monotonic()
        assert (
            client.post("/api/chat", json={**ask, "options": {"num_predict": 1}, "stream": False}).status_code
            == 200
        )
        assert time.monotonic() - started < 0.5


# --- model management -------------------------------------------------------------------------------------


def test_health_version_tags_show(client: httpx.Client) -> None:
    for method in ("GET", "HEAD"):
        root = client.request(method, "/")
        assert root.status_code == 200 and root.headers["content-type"] == "text/plain; charset=utf-8"
    assert client.get("/").text == "Ollama is running"
    assert set(client.get("/api/version").json()) == {"version"}
    names = [model["name"] for model in client.get("/api/tags").json()["models"]]
    assert {"llama3.2:3b", "gemma3:1b", "qwen3:14b", "nomic-embed-text:latest"} <= set(names)
    shown = client.post("/api/show", json={"name": "qwen3:14b"}).json()  # the legacy key
    assert {"completion", "tools", "thinking"} <= set(shown["capabilities"])
    assert client.post("/api/show", json={"model": "nomic-embed-text"}).json()["capabilities"] == [
        "embedding"
    ]
    assert client.post("/api/show", json={"model": "nope"}).status_code == 404


def test_pull_streams_progress_and_adds_the_model(client: httpx.Client) -> None:
    lines = ndjson(client.post("/api/pull", json={"model": "smollm2:1.7b"}))
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    progress = [line for line in lines if "digest" in line]
    assert progress and all(line.get("completed", 0) <= line["total"] for line in progress)
    assert any("completed" not in line for line in progress)  # omitted while zero
    assert "smollm2:1.7b" in [model["name"] for model in client.get("/api/tags").json()["models"]]
    again = client.post("/api/pull", json={"model": "smollm2:1.7b", "stream": False})
    assert again.text == '{"status":"success"}'
    assert ndjson(client.post("/api/push", json={"model": "smollm2:1.7b"}))[-1] == {"status": "success"}
    created = ndjson(client.post("/api/create", json={"model": "mine", "from": "qwen3:14b"}))
    assert created[-1] == {"status": "success"}
    assert "thinking" in client.post("/api/show", json={"model": "mine"}).json()["capabilities"]


def test_copy_and_delete_answer_with_empty_bodies(client: httpx.Client) -> None:
    copied = client.post("/api/copy", json={"source": "gemma3:1b", "destination": "gemma-copy"})
    assert copied.status_code == 200 and copied.content == b"" and copied.headers["content-length"] == "0"
    assert "gemma-copy:latest" in [model["name"] for model in client.get("/api/tags").json()["models"]]
    deleted = client.request("DELETE", "/api/delete", json={"model": "gemma-copy"})
    assert deleted.status_code == 200 and deleted.content == b""
    assert client.request("DELETE", "/api/delete", json={"model": "gemma-copy"}).status_code == 404
    assert client.post("/api/copy", json={"source": "nope", "destination": "x"}).status_code == 404


def test_blob_upload_checks_the_digest_of_a_streamed_body(client: httpx.Client) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 17)
    digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(blob), 256 * 1024):
            yield blob[start : start + 256 * 1024]

    assert client.head(f"/api/blobs/{digest}").status_code == 404
    wrong = f"sha256:{'0' * 64}"
    mismatch = client.post(f"/api/blobs/{wrong}", content=chunks())
    assert mismatch.status_code == 400
    assert mismatch.json() == {"error": f'digest mismatch, expected "{wrong}", got "{digest}"'}
    created = client.post(f"/api/blobs/{digest}", content=chunks())
    assert created.status_code == 201 and created.content == b""
    assert client.head(f"/api/blobs/{digest}").status_code == 200
    assert client.post(f"/api/blobs/{digest}", content=chunks()).status_code == 200
    assert client.head("/api/blobs/sha256:xyz").status_code == 400


def test_the_official_ollama_client(url: str, tmp_path: Path) -> None:
    with ollama.Client(host=url) as api:
        parts = list(api.chat(model="qwen3:14b", messages=QUESTION, stream=True))
        assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count
        assert any(part.message.thinking for part in parts)
        reply = api.generate(model="llama3.2:3b", prompt="hi", options={"num_predict": 4})
        assert reply.done_reason == "length" and reply.eval_count == 4 and reply.context
        assert len(api.embed(model="nomic-embed-text", input=["a", "b"]).embeddings) == 2
        assert "llama3.2:3b" in [model.model for model in api.list().models]
        assert api.show("llama3.2:3b").capabilities == ["completion", "tools"]
        running_models = api.ps().models
        assert running_models and all(model.expires_at and model.size_vram for model in running_models)
        assert api.copy("llama3.2:3b", "copied").status == "success"
        assert api.delete("copied").status == "success"
        assert [progress.status for progress in api.pull("tinyllama", stream=True)][-1] == "success"
        path = tmp_path / "blob.bin"
        path.write_bytes(os.urandom(100_000))
        assert api.create_blob(path) == f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
        with pytest.raises(ollama.ResponseError) as missing:
            api.chat(model="nope", messages=QUESTION)
        assert missing.value.status_code == 404


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="parallel"):
        EmulatorSettings(parallel=0)
    with pytest.raises(ValueError, match="response_tokens"):
        EmulatorSettings(response_tokens=(5, 1))
