"""The response observer, fed the real recordings every way a socket could cut them."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otellama.observe.ollama import Timings
from otellama.observe.stream import BODY_CAP, LINE_CAP, Observation, StreamObserver
from tests.conftest import API_FIXTURES, CAPTURES

# Capture 17 came from a fixture named .sse, but the bytes (and the file here) are NDJSON.
FRAMINGS = {".ndjson": "ndjson", ".sse": "sse", ".json": "json"}
RECORDINGS = sorted(path for path in CAPTURES.iterdir() if path.suffix in FRAMINGS)


def observe(pieces: Iterable[bytes], framing: str, capture_content: bool = False, **caps: int) -> Observation:
    observer = StreamObserver(framing, 100.0, capture_content, **caps)
    now = 100.0
    for piece in pieces:
        now += 1.0
        observer.feed(piece, now)
    return observer.finish(now + 1.0)


def untimed(observation: Observation) -> Observation:
    """The observation without its clock readings (which depend on how the bytes were cut)."""
    return dataclasses.replace(
        observation,
        started_at=0.0,
        finished_at=0.0,
        first_chunk_at=None if observation.first_chunk_at is None else 0.0,
        first_content_at=None if observation.first_content_at is None else 0.0,
    )


def lines_of(body: bytes) -> list[bytes]:
    """A stream cut as Ollama writes it: one NDJSON line or one SSE event per write."""
    separator = b"\n\n" if body.startswith(b"data:") else b"\n"
    parts = body.split(separator)
    return [part + separator for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


# -- what the recording itself says, worked out independently of the observer ----------------------------


def has_content(obj: dict[str, Any]) -> bool:
    message = obj.get("message") or {}
    texts = [obj.get("response"), obj.get("thinking"), message.get("content"), message.get("thinking")]
    calls = [message.get("tool_calls")]
    for choice in obj.get("choices", []):
        delta = choice.get("delta") or choice.get("message") or {}
        texts += [choice.get("text"), delta.get("content"), delta.get("reasoning")]
        calls.append(delta.get("tool_calls"))
    return any(texts) or any(calls)


def expected(path: Path) -> dict[str, Any]:
    body = path.read_bytes()
    framing = FRAMINGS[path.suffix]
    if framing == "json":
        obj = json.loads(body)
        error = obj.get("error")
        message = error if isinstance(error, str) else error["message"] if error else None
        final = None if message is not None else obj
        usage = obj.get("usage")
        return {
            "chunks": 1,
            "done": message is None,
            "error": message,
            "final": final,
            "content_chunks": int(has_content(obj)),
            "streamed_content": False,
            "model": obj.get("model"),
            "finish_reasons": tuple(c["finish_reason"] for c in obj.get("choices", []))
            or ((obj["done_reason"],) if "done_reason" in obj else ()),
            "usage": (usage["prompt_tokens"], usage["completion_tokens"]) if usage else None,
        }
    if framing == "ndjson":
        objs = [json.loads(line) for line in body.splitlines() if line.strip()]
        last = objs[-1]
        done = last.get("done") is True or last.get("status") == "success"
        return {
            "chunks": len(objs),
            "done": done and "error" not in last,
            "error": last.get("error"),
            "final": last if done else None,
            # Every recording has its empty chunks only before the first content and at the very end,
            # where the observer counts exactly.
            "content_chunks": sum(map(has_content, objs)),
            "streamed_content": any(map(has_content, objs)),
            "model": objs[0].get("model"),
            "finish_reasons": (last["done_reason"],) if "done_reason" in last else (),
            "usage": None,
        }
    events = [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]
    objs = [json.loads(event) for event in events if event != b"[DONE]"]
    reasons = tuple(c["finish_reason"] for o in objs for c in o["choices"] if c["finish_reason"])
    usages = [o["usage"] for o in objs if "usage" in o and not o["choices"]]
    return {
        "chunks": len(events),
        "done": events[-1] == b"[DONE]",
        "error": None,
        "final": None,
        "content_chunks": sum(map(has_content, objs)),
        "streamed_content": any(map(has_content, objs)),
        "model": objs[0]["model"],
        "finish_reasons": reasons,
        "usage": (usages[-1]["prompt_tokens"], usages[-1]["completion_tokens"]) if usages else None,
    }


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda path: path.name[:2])
def test_recording_matches_its_own_final_object(path: Path) -> None:
    body = path.read_bytes()
    observation = observe([body], FRAMINGS[path.suffix])
    want = expected(path)

    assert observation.framing == FRAMINGS[path.suffix]
    assert observation.bytes == len(body)
    assert observation.chunks == want["chunks"]
    assert observation.done is want["done"]
    assert observation.error == want["error"]
    assert observation.final == want["final"]
    assert observation.finish_reasons == want["finish_reasons"]
    assert observation.response_model == want["model"]
    assert observation.content_chunks == want["content_chunks"]
    assert (observation.first_content_at is not None) is want["streamed_content"]
    assert observation.first_chunk_at is not None
    assert not observation.truncated
    assert not observation.malformed
    assert observation.output_text is None

    final = want["final"]
    if final is None:
        assert observation.timings is None
    else:
        assert observation.timings == Timings.from_final(final)
        for field in dataclasses.fields(Timings):
            if field.name in final:
                assert getattr(observation.timings, field.name) == final[field.name], field.name
    if want["usage"] is not None:
        tokens = want["usage"]
    elif final is not None:
        timings = Timings.from_final(final)
        tokens = (timings.prompt_eval_count, timings.eval_count)
    else:
        tokens = (None, None)
    assert (observation.usage_input_tokens, observation.usage_output_tokens) == tokens


def splits(body: bytes, streamed: bool) -> Iterable[int]:
    # Streams are cut at every offset. A JSON body is parsed whole at the end whatever the cut, and parsing
    # the 76 KB embedding tens of thousands of times would take minutes: big bodies get ~200 offsets.
    if streamed or len(body) <= 4096:
        return range(1, len(body))
    return range(1, len(body), len(body) // 200)


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda path: path.name[:2])
def test_the_cut_does_not_matter(path: Path) -> None:
    body = path.read_bytes()
    framing = FRAMINGS[path.suffix]
    whole = untimed(observe([body], framing))

    assert untimed(observe(lines_of(body), framing)) == whole
    assert untimed(observe([body[i : i + 1] for i in range(len(body))], framing)) == whole
    for offset in splits(body, framing != "json"):
        assert untimed(observe([body[:offset], body[offset:]], framing)) == whole, offset


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda path: path.name[:2])
def test_capturing_content_changes_only_the_output(path: Path) -> None:
    body = path.read_bytes()
    framing = FRAMINGS[path.suffix]
    plain = observe(lines_of(body), framing)
    captured = observe(lines_of(body), framing, capture_content=True)
    assert (plain.output_text, plain.output_thinking, plain.output_tool_calls) == (None, None, None)
    assert isinstance(captured.output_text, str)
    assert isinstance(captured.output_thinking, str)
    assert isinstance(captured.output_tool_calls, tuple)
    without_output = {"output_text": None, "output_thinking": None, "output_tool_calls": None}
    assert untimed(dataclasses.replace(captured, **without_output)) == untimed(plain)


def test_captured_native_thinking_and_text() -> None:
    body = (CAPTURES / "26_chat_stream_gpt-oss_thinking.ndjson").read_bytes()
    messages = [json.loads(line)["message"] for line in body.splitlines()]
    observation = observe([body], "ndjson", capture_content=True)
    assert observation.output_text == "".join(m["content"] for m in messages)
    assert observation.output_thinking == "".join(m.get("thinking", "") for m in messages)
    assert observation.output_text.endswith("you need.")
    assert observation.output_thinking.startswith("The user says")
    assert observation.output_tool_calls == ()


def test_captured_generate_text_and_thinking() -> None:
    body = (CAPTURES / "05_generate_stream_gpt-oss-120b_thinking_CLOUD.ndjson").read_bytes()
    objs = [json.loads(line) for line in body.splitlines()]
    observation = observe([body], "ndjson", capture_content=True)
    assert observation.output_text == "".join(o["response"] for o in objs)
    assert observation.output_thinking == "".join(o.get("thinking", "") for o in objs)


def test_captured_tool_calls() -> None:
    observation = observe(
        [(CAPTURES / "24_chat_tools_stream_llama3.1_parallel.ndjson").read_bytes()], "ndjson", True
    )
    assert [call["function"]["arguments"]["location"] for call in observation.output_tool_calls or ()] == [
        "London, UK",
        "Paris, FR",
    ]
    observation = observe([(CAPTURES / "45_v1_chat_sse_qwen3_tool-call.sse").read_bytes()], "sse", True)
    assert [call["id"] for call in observation.output_tool_calls or ()] == ["call_blqyt530"]
    assert observation.output_thinking and observation.output_text == ""


def test_captured_openai_stream_and_body() -> None:
    body = (CAPTURES / "44_v1_chat_sse_qwen3_reasoning_usage.sse").read_bytes()
    observation = observe(lines_of(body), "sse", capture_content=True)
    deltas = [
        choice["delta"]
        for line in body.split(b"\n")
        if line.startswith(b"data: {")
        for choice in json.loads(line[6:])["choices"]
    ]
    assert observation.output_text == "".join(d.get("content", "") for d in deltas)
    assert observation.output_thinking == "".join(d.get("reasoning", "") for d in deltas)

    body = (CAPTURES / "46_v1_chat_nonstream_qwen3_reasoning.json").read_bytes()
    message = json.loads(body)["choices"][0]["message"]
    observation = observe([body], "json", capture_content=True)
    assert (observation.output_text, observation.output_thinking) == (
        message["content"],
        message["reasoning"],
    )


def test_time_to_first_content_skips_empty_chunks() -> None:
    # Capture 05: the first chunk carries no text at all, the second the first thinking.
    body = (CAPTURES / "05_generate_stream_gpt-oss-120b_thinking_CLOUD.ndjson").read_bytes()
    observation = observe(lines_of(body), "ndjson")
    assert observation.first_chunk_at == 101.0
    assert observation.first_content_at == 102.0
    # Capture 25: one done:true chunk that holds the whole answer is the first content.
    body = (CAPTURES / "25_chat_stream_qwen3-14b_single-chunk_inline-think.ndjson").read_bytes()
    observation = observe([body], "ndjson")
    assert observation.first_content_at == observation.first_chunk_at == 101.0
    assert (observation.content_chunks, observation.done) == (1, True)


def test_time_to_first_content_on_openai_stream() -> None:
    # The role-only first delta carries no content; qwen3's first reasoning delta does.
    events = [
        b'data: {"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
        b'data: {"model":"m","choices":[{"index":0,"delta":{"role":"assistant","reasoning":"Hm"}}]}\n\n',
        b'data: {"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    observation = observe(events, "sse")
    assert (observation.first_chunk_at, observation.first_content_at) == (101.0, 102.0)
    assert (observation.chunks, observation.content_chunks, observation.done) == (4, 1, True)
    assert observation.finish_reasons == ("stop",)
    assert observation.usage_input_tokens is None


def test_error_line_after_200() -> None:
    body = (API_FIXTURES / "error_midstream_generate.ndjson").read_bytes()
    for pieces in ([body], lines_of(body), [body[i : i + 7] for i in range(0, len(body), 7)]):
        observation = observe(pieces, "ndjson")
        assert observation.done is False
        assert observation.error == "an error was encountered while running the model"
        assert observation.final is None and observation.timings is None
        assert (observation.chunks, observation.content_chunks) == (5, 4)
        assert observation.finish_reasons == ()
        assert observation.response_model == "gemma4"


def test_error_before_content() -> None:
    lines = [b'{"status":"pulling manifest"}\n', b'{"error":"pull model manifest: file does not exist"}\n']
    observation = observe(lines, "ndjson")
    assert (observation.done, observation.error) == (False, "pull model manifest: file does not exist")


def test_stream_cut_before_done() -> None:
    body = (CAPTURES / "13_chat_stream_gemma3-1b_COLD.ndjson").read_bytes()
    lines = lines_of(body)
    cut_between_lines = observe(lines[:-1], "ndjson")
    cut_inside_a_line = observe([*lines[:-1], lines[-1][:60]], "ndjson")
    for observation in (cut_between_lines, cut_inside_a_line):
        assert observation.done is False
        assert observation.error is None
        assert observation.final is None and observation.timings is None
        assert observation.finish_reasons == ()
        assert (observation.usage_input_tokens, observation.usage_output_tokens) == (None, None)
        assert observation.chunks == observation.content_chunks == 202
        # The fragment of a cut line is neither a chunk nor garbage.
        assert not observation.malformed
    assert cut_inside_a_line.bytes == cut_between_lines.bytes + 60


def test_sse_cut_before_done() -> None:
    body = (CAPTURES / "44_v1_chat_sse_qwen3_reasoning_usage.sse").read_bytes()
    events = lines_of(body)
    assert observe(events[:-3], "sse").done is False  # no finish reason, no [DONE]
    # The finish reason arrived, then the connection dropped: the generation itself completed.
    observation = observe(events[:-2], "sse")
    assert observation.done is True
    assert observation.finish_reasons == ("stop",)
    assert observation.usage_input_tokens is None


def test_last_line_without_newline_still_counts() -> None:
    body = (CAPTURES / "01_generate_stream_gemma3-1b.ndjson").read_bytes()
    observation = observe([body.rstrip(b"\n")], "ndjson")
    assert untimed(observation) == untimed(
        dataclasses.replace(observe([body], "ndjson"), bytes=len(body) - 1)
    )


@pytest.mark.parametrize(
    "path",
    [
        API_FIXTURES / "synthetic" / "openai_chat_stream_include_usage.sse",
        CAPTURES / "44_v1_chat_sse_qwen3_reasoning_usage.sse",
        CAPTURES / "45_v1_chat_sse_qwen3_tool-call.sse",
    ],
    ids=lambda path: path.name[:12],
)
def test_sse_include_usage(path: Path) -> None:
    body = path.read_bytes()
    usage = [json.loads(line[6:]) for line in body.split(b"\n") if b'"usage"' in line][-1]["usage"]
    observation = observe(lines_of(body), "sse")
    assert observation.usage_input_tokens == usage["prompt_tokens"]
    assert observation.usage_output_tokens == usage["completion_tokens"]
    assert observation.done is True
    # Without include_usage there is no usage chunk and no token count.
    events = [event for event in lines_of(body) if b'"usage"' not in event]
    observation = observe(events, "sse")
    assert (observation.usage_input_tokens, observation.usage_output_tokens) == (None, None)
    assert observation.done is True


def test_openai_completions_stream_ignores_placeholder_usage() -> None:
    # Ollama's /v1/completions puts a zero usage on every chunk when include_usage is set.
    zero = '"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
    events = [
        f'data: {{"model":"m","choices":[{{"index":0,"text":"Hi","finish_reason":null}}],{zero}}}\n\n',
        f'data: {{"model":"m","choices":[{{"index":0,"text":"!","finish_reason":null}}],{zero}}}\n\n',
        f'data: {{"model":"m","choices":[{{"index":0,"text":"","finish_reason":"stop"}}],{zero}}}\n\n',
        'data: {"model":"m","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n',
        "data: [DONE]\n\n",
    ]
    observation = observe([event.encode() for event in events], "sse", capture_content=True)
    assert (observation.usage_input_tokens, observation.usage_output_tokens) == (7, 3)
    assert observation.output_text == "Hi!"
    assert (observation.content_chunks, observation.finish_reasons) == (2, ("stop",))


def test_sse_event_and_comment_lines_are_ignored() -> None:
    events = [
        b": keep-alive\n\n",
        b'event: message\ndata: {"model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
        b'event: message\nid: 2\ndata: {"model":"m","choices":[{"index":0,"delta":{"content":"b"}}]}\n\n',
        b'event: message\ndata: {"model":"m","choices":[{"delta":{},"finish_reason":"length"}]}\n\n',
        b"event: done\ndata: [DONE]\n\n",
    ]
    observation = observe(events, "sse")
    assert (observation.chunks, observation.content_chunks) == (4, 2)
    assert (observation.done, observation.finish_reasons, observation.malformed) == (True, ("length",), False)


def test_openai_error_event() -> None:
    events = [
        b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
        b'data: {"error":{"message":"boom","type":"api_error","param":null,"code":null}}\n\n',
    ]
    observation = observe(events, "sse")
    assert (observation.done, observation.error) == (False, "boom")


def test_error_bodies() -> None:
    observation = observe([(CAPTURES / "48_v1_error_401_CLOUD.json").read_bytes()], "json")
    assert (observation.done, observation.error, observation.final) == (False, "Unauthorized", None)
    body = (API_FIXTURES / "error_body.json").read_bytes()  # pretty-printed, as in the docs
    observation = observe([body], "json")
    assert observation.error == "the model failed to generate a response"


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        ("ndjson", b"\x00\xff garbage\n{not json}\n[1,2]\n"),
        ("ndjson", b'{"done":true\n'),
        ("sse", b"data: {nope\n\n"),
        ("sse", b'data: "a string"\n\n'),
        ("json", b"<html>502 Bad Gateway</html>"),
        ("json", b"[1,2,3]"),
        ("json", b'{"a":1}{"b":2}'),
    ],
)
def test_garbage_is_malformed(framing: str, body: bytes) -> None:
    for pieces in ([body], [body[i : i + 1] for i in range(len(body))]):
        observation = observe(pieces, framing)
        assert observation.malformed is True
        assert observation.done is False
        assert observation.final is None
        assert observation.bytes == len(body)


def test_garbage_after_content_is_malformed_in_the_tail() -> None:
    body = (CAPTURES / "01_generate_stream_gemma3-1b.ndjson").read_bytes()
    observation = observe([body, b"\x00\x01 trailing noise\n"], "ndjson")
    assert observation.malformed is True
    assert observation.done is True  # the done line came, and was kept in the tail


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(max_size=600) | st.sampled_from([path.read_bytes()[:600] for path in RECORDINGS]),
    framing=st.sampled_from(["ndjson", "sse", "json", "other", "nonsense"]),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8),
    capture=st.booleans(),
)
def test_any_bytes_any_cut_never_raise(body: bytes, framing: str, cuts: list[int], capture: bool) -> None:
    offsets = sorted({0, len(body), *(cut for cut in cuts if cut < len(body))})
    pieces = [body[a:b] for a, b in itertools.pairwise(offsets)]
    whole = observe([body], framing, capture, line_cap=256, body_cap=512)
    assert untimed(observe(pieces, framing, capture, line_cap=256, body_cap=512)) == untimed(whole)
    assert whole.bytes == len(body)


def test_over_cap_line_stops_parsing_not_counting() -> None:
    chunk = b"x" * 65536
    tracemalloc.start()
    try:
        observer = StreamObserver("ndjson", 0.0)
        for _ in range(3 * LINE_CAP // len(chunk)):
            observer.feed(chunk, 1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    observation = observer.finish(2.0)
    assert observation.truncated is True
    assert observation.bytes == 3 * LINE_CAP
    assert (observation.done, observation.chunks) == (False, 0)
    assert peak < LINE_CAP + 1024 * 1024


def test_over_cap_line_after_content() -> None:
    head = lines_of((CAPTURES / "13_chat_stream_gemma3-1b_COLD.ndjson").read_bytes())[:5]
    for pieces in ([*head, b"{" + b"1" * 5000 + b"\n"], [*head, b"{" + b"1" * 3000, b"1" * 2000, b"\n"]):
        observation = observe([*pieces, b'{"done":true}\n'], "ndjson", line_cap=4096)
        assert observation.truncated is True
        assert (observation.chunks, observation.content_chunks) == (5, 5)
        assert observation.done is False  # the done line came after parsing stopped
    # A line of exactly the cap is fine.
    observation = observe(
        [*head, b'{"done":true,"pad":"' + b"1" * (4096 - 22) + b'"}\n'], "ndjson", line_cap=4096
    )
    assert (observation.truncated, observation.done) == (False, True)


def test_over_cap_body() -> None:
    observation = observe([b'{"embeddings":[', b"0.1," * 2000, b"0.1]}"], "json", body_cap=4096)
    assert observation.truncated is True
    assert (observation.done, observation.final, observation.chunks) == (False, None, 1)
    assert observation.bytes == 15 + 8000 + 5


def test_default_body_cap_holds_the_biggest_recording() -> None:
    biggest = max((path for path in RECORDINGS if path.suffix == ".json"), key=lambda p: p.stat().st_size)
    assert biggest.stat().st_size < BODY_CAP
    assert observe([biggest.read_bytes()], "json").done is True


def test_other_framing_is_only_counted() -> None:
    observation = observe([b"Ollama is ", b"running"], "other")
    assert (observation.bytes, observation.chunks, observation.done) == (17, 1, False)
    assert observation.first_chunk_at == 101.0
    empty = observe([], "json")
    assert (empty.bytes, empty.chunks, empty.done, empty.first_chunk_at) == (0, 0, False, None)
    assert observe([b'{"done":true}\n'], "text/plain").framing == "other"


def test_finish_runs_once() -> None:
    observer = StreamObserver("ndjson", 0.0)
    observer.feed(b'{"model":"m","response":"a","done":false}\n', 1.0)
    first = observer.finish(2.0)
    observer.feed(b'{"model":"m","response":"","done":true}\n', 3.0)
    assert observer.finish(4.0) is first
    assert (first.done, first.bytes, first.finished_at) == (False, 42, 2.0)


def test_misuse_does_not_raise() -> None:
    observer = StreamObserver("ndjson", 0.0)
    observer.feed(b'{"model":"m","response":"a","done":false}\n', 1.0)
    observer.feed("not bytes", 2.0)  # type: ignore[arg-type]
    observer.feed(b'{"model":"m","response":"","done":true}\n', 3.0)
    observation = observer.finish(4.0)
    assert observation.malformed is True
    assert observation.done is False
    assert observation.chunks == 1


def test_random_cuts_of_a_long_stream() -> None:
    body = (CAPTURES / "44_v1_chat_sse_qwen3_reasoning_usage.sse").read_bytes()
    whole = untimed(observe([body], "sse", capture_content=True))
    rng = random.Random(44)
    for _ in range(50):
        offsets = sorted({0, len(body), *rng.sample(range(len(body)), 40)})
        pieces = [body[a:b] for a, b in itertools.pairwise(offsets)]
        assert untimed(observe(pieces, "sse", capture_content=True)) == whole


def test_a_stream_cut_inside_an_over_cap_line_says_so() -> None:
    # Ollama ends every line, the megabytes-long final one too: an over-cap line whose newline never came
    # was cut with the stream (the record calls it incomplete), one that ended may have been the final object.
    first = b'{"response":"Hi","done":false}\n'
    for pieces in (
        [first, b"{" + b"1" * 5000],
        [first + b"{" + b"1" * 5000],
        [first, b"{" + b"1" * 3000, b"1" * 3000],
    ):
        observation = observe(pieces, "ndjson", line_cap=4096)
        assert (observation.truncated, observation.cut_in_line, observation.chunks) == (True, True, 1)
    for pieces in ([first, b"{" + b"1" * 5000, b"1\n"], [first, b"{" + b"1" * 5000 + b"\n{}"]):
        observation = observe(pieces, "ndjson", line_cap=4096)
        assert (observation.truncated, observation.cut_in_line) == (True, False)
