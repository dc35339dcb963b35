"""Properties of the response observer over generated Ollama-shaped streams, cut anywhere.

tests/test_stream.py checks every real recording at every single cut and random bytes at random cuts. This
file generates *structured* streams (content, empty and thinking chunks, tool calls, finals with timings,
error lines, garbage and non-object lines, SSE comments and ``[DONE]``, a last line without its newline)
so the parsing paths, not just the garbage path, meet arbitrary cuts, and checks what the stream says
against an oracle computed here; plus the memory bound on a line that never ends.
"""

from __future__ import annotations

import itertools
import tracemalloc
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otellama.observe.stream import Observation, StreamObserver
from tests.test_stream import untimed


def observe(pieces: list[bytes], framing: str, capture: bool = False, **caps: int) -> Observation:
    observer = StreamObserver(framing, 0.0, capture, **caps)
    for number, piece in enumerate(pieces, start=1):
        observer.feed(piece, float(number))
    return observer.finish(float(len(pieces) + 1))


def cut(body: bytes, offsets: list[int]) -> list[bytes]:
    points = sorted({0, len(body), *(o % (len(body) + 1) for o in offsets)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


# --- native NDJSON streams ---------------------------------------------------------------------------------
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
content_chunk = st.builds(lambda t: {"model": "m", "response": t, "done": False}, text.filter(bool))
empty_chunk = st.just({"model": "m", "response": "", "done": False})
thinking_chunk = st.builds(
    lambda t: {"model": "m", "message": {"role": "assistant", "content": "", "thinking": t}, "done": False},
    text.filter(bool),
)
CALL = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}
tool_chunk = st.just({"model": "m", "message": CALL, "done": False})
final = st.builds(
    lambda reason, evals, duration: {
        "model": "m", "response": "", "done": True, "done_reason": reason, "eval_count": evals,
        "eval_duration": duration, "total_duration": duration * 2, "prompt_eval_count": 3,
    },
    st.sampled_from(["stop", "length"]), st.integers(1, 10_000), st.integers(1, 10**12),
)  # fmt: skip
error_line = st.builds(lambda t: {"error": t}, text)
noise = st.sampled_from([b"[1,2,3]", b'"a string"', b"{not json", b"\x00\xff\xfe", b"garbage", b"{}x"])


@st.composite
def ndjson_streams(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A native stream and what it says: chunks, content chunks, how it ended."""
    body_objects = draw(
        st.lists(st.one_of(content_chunk, empty_chunk, thinking_chunk, tool_chunk), max_size=30)
    )
    ending = draw(st.sampled_from(["final", "error", "cut", "final-unterminated", "noise"]))
    lines = [orjson.dumps(obj) for obj in body_objects]
    want: dict[str, Any] = {
        "chunks": len(lines),
        "done": False,
        "error": None,
        "malformed": False,
        "final": None,
    }
    if ending.startswith("final"):
        last = draw(final)
        lines.append(orjson.dumps(last))
        want.update(chunks=len(lines), done=True, final=last)
    elif ending == "error":
        err = draw(error_line)
        lines.append(orjson.dumps(err))
        want.update(chunks=len(lines), error=err["error"])
    elif ending == "noise":
        junk = draw(noise)
        lines.append(junk)
        want.update(malformed=True, chunks=len(lines) - (not junk.startswith(b"{")))
    body = b"\n".join(lines) + (b"\n" if lines and ending != "final-unterminated" else b"")
    if ending == "cut" and lines:
        body = body[: draw(st.integers(0, len(body)))]
        want = {"cut": True}
    message: dict[str, Any] = {}
    content = sum(
        1
        for obj in body_objects
        if obj.get("response")
        or obj.get("message", message).get("thinking")
        or "tool_calls" in obj.get("message", message)
    )
    want["content_chunks"] = content
    want["objects"] = body_objects
    return body, want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=ndjson_streams(), offsets=st.lists(st.integers(0, 10_000), max_size=12), capture=st.booleans())
def test_native_streams_cut_anywhere_say_the_same(
    stream: tuple[bytes, dict[str, Any]], offsets: list[int], capture: bool
) -> None:
    body, want = stream
    whole = observe([body], "ndjson", capture)
    pieces = cut(body, offsets)
    assert untimed(observe(pieces, "ndjson", capture)) == untimed(whole)
    assert untimed(observe([body[i : i + 1] for i in range(len(body))], "ndjson", capture)) == untimed(whole)
    assert whole.bytes == len(body)
    assert not whole.truncated
    if want.get("cut"):
        return  # a stream cut anywhere: only "never raises, same whatever the cut"
    assert whole.chunks == want["chunks"]
    assert whole.done is want["done"]
    assert whole.error == want["error"]
    assert whole.malformed is want["malformed"]
    assert whole.final == want["final"]
    if want["final"] is not None:
        assert whole.timings is not None and whole.timings.eval_count == want["final"]["eval_count"]
        assert whole.usage_output_tokens == want["final"]["eval_count"]
        assert whole.finish_reasons == (want["final"]["done_reason"],)
    if capture:
        assert whole.output_text == "".join(str(o.get("response", "")) for o in want["objects"])
    if not want["malformed"]:
        # Documented: exact up to the first content and in the tail, every line counts in between.
        assert want["content_chunks"] <= whole.content_chunks <= whole.chunks
        assert (whole.first_content_at is not None) is (want["content_chunks"] > 0)


# --- /v1 SSE streams ---------------------------------------------------------------------------------------
delta = st.builds(
    lambda t: {"model": "m", "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}, text
)
finish = st.builds(
    lambda r: {"model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": r}]},
    st.sampled_from(["stop", "length", "tool_calls"]),
)
usage = st.builds(
    lambda p, c: {"model": "m", "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c}},
    st.integers(0, 10**6), st.integers(0, 10**6),
)  # fmt: skip
extra_lines = st.sampled_from([b": keep-alive\n\n", b"event: message\n", b"id: 7\n", b"retry: 10\n", b"\n"])


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    events: list[bytes] = []
    deltas = draw(st.lists(delta, max_size=20))
    for obj in deltas:
        if draw(st.booleans()):
            events.append(draw(extra_lines))
        events.append(b"data: " + orjson.dumps(obj) + b"\n\n")
    want: dict[str, Any] = {"finish": None, "usage": None, "done": False}
    if draw(st.booleans()):
        f = draw(finish)
        events.append(b"data: " + orjson.dumps(f) + b"\n\n")
        want.update(finish=f["choices"][0]["finish_reason"], done=True)
    if draw(st.booleans()):
        u = draw(usage)
        events.append(b"data:" + orjson.dumps(u) + b"\n\n")  # no space after the colon is valid SSE
        want["usage"] = (u["usage"]["prompt_tokens"], u["usage"]["completion_tokens"])
    if draw(st.booleans()):
        events.append(b"data: [DONE]\n\n")
        want["done"] = True
    want["content_chunks"] = sum(1 for obj in deltas if obj["choices"][0]["delta"]["content"])
    want["text"] = "".join(obj["choices"][0]["delta"]["content"] for obj in deltas)
    return b"".join(events), want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=sse_streams(), offsets=st.lists(st.integers(0, 10_000), max_size=12), capture=st.booleans())
def test_openai_streams_cut_anywhere_say_the_same(
    stream: tuple[bytes, dict[str, Any]], offsets: list[int], capture: bool
) -> None:
    body, want = stream
    whole = observe([body], "sse", capture)
    assert untimed(observe(cut(body, offsets), "sse", capture)) == untimed(whole)
    assert whole.bytes == len(body)
    assert whole.done is want["done"]
    assert whole.finish_reasons == ((want["finish"],) if want["finish"] else ())
    assert (whole.usage_input_tokens, whole.usage_output_tokens) == (want["usage"] or (None, None))
    assert want["content_chunks"] <= whole.content_chunks <= whole.chunks
    assert (whole.first_content_at is not None) is (want["content_chunks"] > 0)
    assert not whole.malformed and whole.error is None
    assert whole.output_text == (want["text"] if capture else None)


# --- a line that never ends --------------------------------------------------------------------------------
CAP = 64 * 1024


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(CAP + 1, 32 * CAP),
    sizes=st.lists(st.integers(1, 3 * CAP), min_size=1, max_size=8),
    framing=st.sampled_from(["ndjson", "sse", "json"]),
    head=st.booleans(),
)
def test_a_line_without_end_is_held_only_up_to_the_cap(
    length: int, sizes: list[int], framing: str, head: bool
) -> None:
    prefix = b'{"model":"m","response":"a","done":false}\n' if head and framing == "ndjson" else b""
    body = prefix + b"{" + b"1" * (length - 1)
    pieces, offset = [], 0
    for size in itertools.cycle(sizes):  # prepared before measuring: only the observer is measured
        if offset >= len(body):
            break
        pieces.append(body[offset : offset + size])
        offset += size
    observer = StreamObserver(framing, 0.0, line_cap=CAP, body_cap=CAP)
    tracemalloc.start()
    try:
        for piece in pieces:
            observer.feed(piece, 1.0)
        observation = observer.finish(2.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert observation.truncated is True  # parsing stopped at the cap...
    assert observation.bytes == len(body)  # ...counting did not (and the proxy kept forwarding)
    assert peak < 3 * CAP + 3 * max(sizes), peak  # never the whole line: it is up to 32 caps long
    assert observation.done is False
