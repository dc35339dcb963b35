"""Protocol knowledge: endpoints, framing, the timings of final objects, error bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from otellama.observe.ollama import (
    CHAT,
    EMBEDDINGS,
    ENDPOINTS,
    TEXT_COMPLETION,
    Framing,
    Timings,
    endpoint_for,
    error_message,
    framing_for,
)
from tests.conftest import API_FIXTURES, CAPTURES


def capture_final(name: str) -> dict[str, Any]:
    """The last object of a recording: the final line of a stream, or the whole body."""
    path = next(CAPTURES.glob(f"{name}_*"))
    last = path.read_bytes().strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(last)
    return result


def test_operation_names_are_the_spec_values() -> None:
    assert (CHAT, TEXT_COMPLETION, EMBEDDINGS) == ("chat", "text_completion", "embeddings")


@pytest.mark.parametrize(
    ("method", "path", "operation"),
    [
        ("POST", "/api/chat", "chat"),
        ("POST", "/api/generate", "text_completion"),
        ("POST", "/api/embed", "embeddings"),
        ("POST", "/api/embeddings", "embeddings"),
        ("POST", "/v1/chat/completions", "chat"),
        ("POST", "/v1/completions", "text_completion"),
        ("POST", "/v1/embeddings", "embeddings"),
        # Everything else in docs/reference.md §1 is passed through without a GenAI operation.
        ("GET", "/", None),
        ("HEAD", "/", None),
        ("GET", "/api/version", None),
        ("HEAD", "/api/version", None),
        ("GET", "/api/tags", None),
        ("HEAD", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("POST", "/api/show", None),
        ("POST", "/api/pull", None),
        ("POST", "/api/push", None),
        ("POST", "/api/create", None),
        ("POST", "/api/copy", None),
        ("DELETE", "/api/delete", None),
        ("HEAD", "/api/blobs/sha256:" + "0" * 64, None),
        ("POST", "/api/blobs/sha256:" + "0" * 64, None),
        ("POST", "/api/experimental/web_search", None),
        ("GET", "/api/status", None),
        ("POST", "/api/me", None),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/llama3.2", None),
        ("POST", "/v1/responses", None),
        ("POST", "/v1/messages", None),
        # Ollama routes exactly: another method, a trailing slash or a future path is not an operation.
        ("GET", "/api/chat", None),
        ("HEAD", "/api/generate", None),
        ("POST", "/api/chat/", None),
        ("POST", "/api/Chat", None),
        ("POST", "/api/chat2", None),
        ("POST", "/v2/chat/completions", None),
    ],
)
def test_endpoint_for_names_the_operation(method: str, path: str, operation: str | None) -> None:
    endpoint = endpoint_for(method, path)
    assert (endpoint.operation if endpoint else None) == operation


def test_endpoints_know_their_api_and_stream_default() -> None:
    table = {e.path: (e.openai, e.streams_by_default) for e in ENDPOINTS}
    assert table == {
        "/api/chat": (False, True),
        "/api/generate": (False, True),
        "/api/embed": (False, False),
        "/api/embeddings": (False, False),
        "/v1/chat/completions": (True, False),
        "/v1/completions": (True, False),
        "/v1/embeddings": (True, False),
    }


@pytest.mark.parametrize(
    ("content_type", "framing"),
    [
        ("application/x-ndjson", Framing.NDJSON),
        ("application/x-ndjson; charset=utf-8", Framing.NDJSON),
        ("text/event-stream", Framing.SSE),
        ("text/event-stream; charset=utf-8", Framing.SSE),
        ("application/json; charset=utf-8", Framing.JSON),
        ("application/json", Framing.JSON),
        ("Application/JSON ; charset=UTF-8", Framing.JSON),
        ("text/plain; charset=utf-8", Framing.OTHER),
        ("application/octet-stream", Framing.OTHER),
        ("", Framing.OTHER),
        (None, Framing.OTHER),
    ],
)
def test_framing_for(content_type: str | None, framing: Framing) -> None:
    assert framing_for(content_type) is framing
    assert framing_for(content_type) == framing.value  # a str, as the observer takes it


def test_timings_of_a_local_stream() -> None:
    timings = Timings.from_final(capture_final("01"))
    assert timings == Timings(
        total_duration=190084083,
        load_duration=40691625,
        prompt_eval_count=16,
        prompt_eval_duration=40168500,
        eval_count=22,
        eval_duration=108922125,
        done_reason="stop",
        model="gemma3:1b",
    )
    assert timings.queue_ns == 190084083 - 40691625 - 40168500 - 108922125
    assert timings.tokens_per_second == pytest.approx(22 / 0.108922125)
    assert timings.prompt_tokens_per_second == pytest.approx(16 / 0.0401685)


def test_cloud_model_omits_what_it_did_not_measure() -> None:
    # Capture 05 (ollama.com): counts, a total, and no load/prompt/eval durations. Unknown, not zero.
    timings = Timings.from_final(capture_final("05"))
    assert timings.total_duration == 832757752
    assert (timings.prompt_eval_count, timings.eval_count) == (81, 48)
    assert timings.load_duration is None
    assert timings.prompt_eval_duration is None
    assert timings.eval_duration is None
    assert timings.queue_ns is None
    assert timings.tokens_per_second is None
    assert timings.prompt_tokens_per_second is None


def test_old_embed_has_no_timings_at_all() -> None:
    timings = Timings.from_final(capture_final("31"))
    assert timings == Timings(model="mxbai-embed-large")


def test_embed_defines_only_its_own_fields() -> None:
    # /api/embed never reports prompt_eval_duration or eval_*: they must not become zeros (and a queue).
    timings = Timings.from_final(capture_final("29"))
    assert (timings.total_duration, timings.load_duration, timings.prompt_eval_count) == (
        3837614291,
        3810732958,
        4,
    )
    assert (timings.prompt_eval_duration, timings.eval_count, timings.eval_duration) == (None, None, None)
    assert timings.queue_ns is None
    assert timings.prompt_tokens_per_second is None


def test_legacy_embeddings_has_nothing() -> None:
    assert Timings.from_final(capture_final("33")) == Timings()


def test_millisecond_rounded_durations() -> None:
    timings = Timings.from_final(capture_final("11"))
    assert (timings.prompt_eval_duration, timings.eval_duration) == (126000000, 417000000)
    assert timings.tokens_per_second == pytest.approx(23 / 0.417)
    assert timings.prompt_tokens_per_second == pytest.approx(39 / 0.126)
    assert timings.queue_ns == 579515000 - 35352208 - 126000000 - 417000000


def test_local_server_omits_zeros() -> None:
    # A warm model, fully cached prompt: Ollama omits prompt_eval_duration (and here the count too).
    final = {
        "model": "m",
        "done": True,
        "done_reason": "stop",
        "total_duration": 1000,
        "load_duration": 100,
        "eval_count": 5,
        "eval_duration": 800,
    }
    timings = Timings.from_final(final)
    assert (timings.prompt_eval_count, timings.prompt_eval_duration) == (0, 0)
    assert timings.prompt_tokens_per_second is None  # 0 tokens in 0 ns is no speed
    assert timings.queue_ns == 100
    assert timings.tokens_per_second == pytest.approx(5 / 800 * 1e9)
    assert timings.prompt_eval_cached_count is None  # sent whenever known: missing is unknown


def test_prompt_eval_cached_count() -> None:
    final = {"done": True, "load_duration": 1, "prompt_eval_count": 40, "prompt_eval_cached_count": 32}
    assert Timings.from_final(final).prompt_eval_cached_count == 32
    assert Timings.from_final({**final, "prompt_eval_cached_count": 0}).prompt_eval_cached_count == 0


def test_load_and_unload_answers_carry_no_timings() -> None:
    for name in ("chat_load_response.json", "generate_unload_response.json"):
        final = json.loads((API_FIXTURES / name).read_bytes())
        timings = Timings.from_final(final)
        assert timings == Timings(done_reason=final["done_reason"], model="llama3.2")
    # The docs' older load answer has not even a done_reason.
    final = json.loads((API_FIXTURES / "generate_load_response.json").read_bytes())
    assert Timings.from_final(final) == Timings(model="llama3.2")


def test_queue_is_clamped_at_zero() -> None:
    final = {
        "done": True,
        "total_duration": 100,
        "load_duration": 50,
        "prompt_eval_duration": 30,
        "eval_duration": 30,
    }
    assert Timings.from_final(final).queue_ns == 0


@pytest.mark.parametrize("garbage", ["12", True, False, -5, 1.5, None, [1], {"a": 1}])
def test_values_that_are_not_counts_are_unknown(garbage: object) -> None:
    final = {"done": True, "load_duration": 10, "total_duration": garbage, "eval_count": garbage}
    timings = Timings.from_final(final)
    assert timings.total_duration is None
    assert timings.eval_count is None
    assert timings.load_duration == 10


def test_done_reason_and_model_must_be_strings() -> None:
    assert Timings.from_final({"done": True, "done_reason": 1, "model": ["m"]}) == Timings()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("41", "registry.ollama.ai/library/gemma3:1b does not support tools"),
        ("42", 'model "nomic-embed-text" not found, try pulling it first'),
        ("43", "model 'llama3' not found, try pulling it first"),
        ("48", "Unauthorized"),
    ],
)
def test_error_message_of_recorded_errors(name: str, message: str) -> None:
    assert error_message(capture_final(name)) == message


def test_error_message_of_doc_fixtures() -> None:
    body = json.loads((API_FIXTURES / "error_body.json").read_bytes())
    assert error_message(body) == "the model failed to generate a response"
    body = json.loads((API_FIXTURES / "synthetic" / "openai_error_404.json").read_bytes())
    assert error_message(body) == "model 'nope' not found"
    line = (API_FIXTURES / "error_midstream_generate.ndjson").read_bytes().splitlines()[-1]
    assert error_message(json.loads(line)) == "an error was encountered while running the model"


def test_error_message_by_structure_only() -> None:
    # No message: still an error; say what there is.
    assert error_message({"error": {"type": "api_error", "code": None}}) == '{"type":"api_error","code":null}'
    assert error_message({"error": ""}) == ""
    # Not errors, whatever the words.
    assert error_message({"error": None}) is None
    assert error_message({"response": "error: model not found", "done": True}) is None
    assert error_message(capture_final("06")) is None
    assert error_message(capture_final("46")) is None
    assert error_message(["error"]) is None
    assert error_message("error") is None
    assert error_message(None) is None


def test_operation_names_are_the_genai_semantic_conventions_values() -> None:
    from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import GenAiOperationNameValues

    from otellama.observe.ollama import CHAT, EMBEDDINGS, TEXT_COMPLETION

    assert (
        GenAiOperationNameValues.CHAT.value,
        GenAiOperationNameValues.TEXT_COMPLETION.value,
        GenAiOperationNameValues.EMBEDDINGS.value,
    ) == (CHAT, TEXT_COMPLETION, EMBEDDINGS)
