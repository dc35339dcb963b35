"""The observer of a response body: what otellama learns from bytes it forwards untouched.

The proxy writes every upstream chunk to the client first, then hands it to :meth:`StreamObserver.feed`;
after the last byte it calls :meth:`StreamObserver.finish` once and gets an :class:`Observation`. The
observer reads the body by its framing (:class:`otellama.observe.ollama.Framing`, from the Content-Type):

- NDJSON (native streams): one JSON object per line; a success ends with a ``done: true`` line, a failure
  after the 200 with one ``{"error": ...}`` line instead.
- SSE (/v1 streams): ``data: {...}`` events, then ``data: [DONE]``; with ``stream_options.include_usage`` a
  chunk with ``choices: []`` and ``usage`` comes just before ``[DONE]``.
- JSON (non-streamed bodies and errors): buffered up to a cap and parsed once, in :meth:`finish`.
- other: counted, never parsed.

It is cheap per chunk because it runs for every token. Lines are parsed only until the first one carrying
content; after that a chunk is only counted and its last complete lines kept, and those are parsed in
:meth:`finish`, since everything the record needs (the final object, usage, finish reasons, a mid-stream
error) comes last. Lines split across reads and several lines per read give the same result, and the
observer never raises. It holds one unfinished line of at most ``line_cap`` bytes and the last
``TAIL_LINES`` complete ones, or one JSON body of at most ``body_cap``: past a cap it stops parsing, says
so in ``truncated``, and the proxy keeps forwarding.

What counts as content, i.e. generated output (empty strings and lists never count; Ollama sends
``"response": ""`` or ``"content": ""`` on chunks that carry nothing, such as a cloud thinking model's first
chunk, the final chunk, or a /v1 role-only or finish delta):

- native: ``response`` and ``thinking`` (/api/generate), ``message.content``, ``message.thinking`` and
  ``message.tool_calls`` (/api/chat);
- /v1: ``choices[].delta`` (``.message`` in a body) ``content``, ``reasoning``, ``reasoning_content`` and
  ``tool_calls``, and ``choices[].text`` (/v1/completions).

Thinking and tool calls count because the model spends tokens on them: the time to first content is the
time the model started producing, whatever it produced.

One module for one noun, past 500 lines: the observer is a single state machine fed a chunk at a time, and
its line splitting, parsing, skimming and conclusion all read and write that one state.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Final

import orjson

from otellama.observe.ollama import Framing, Timings, error_message, nonnegative_int

#: Longest line parsed in a stream. A native final object carries ``context`` (one number per token of
#: the context window, ~7 bytes each), so a long-context /api/generate ends with a line of megabytes.
LINE_CAP: Final = 4 * 1024 * 1024
#: Largest non-streamed body parsed (/api/show and big /api/embed batches are the large ones).
BODY_CAP: Final = 8 * 1024 * 1024
#: Complete lines kept once parsing has stopped for the middle of a stream: enough for a /v1 stream's
#: finish chunk, usage chunk and ``[DONE]`` with the blank and ``event:`` lines between them.
TAIL_LINES: Final = 8

# By value; a Framing is a str that hashes as its value, so members are found too.
_FRAMINGS: Final = {framing.value: framing for framing in Framing}


# Not frozen: a frozen dataclass sets each field through object.__setattr__, 4 us per exchange for these
# 22 fields against under 2 for plain slots. It is a value all the same: nothing assigns to an observation.
@dataclasses.dataclass(slots=True)
class Observation:
    """What one response body showed. Times are the ``now`` values the proxy passed in. A value: read it,
    never assign to it (``dataclasses.replace`` makes a changed copy)."""

    framing: str
    started_at: float
    finished_at: float
    bytes: int
    #: NDJSON lines (those starting with ``{``), SSE ``data:`` events (``[DONE]`` included), 1 for a
    #: non-empty body of another framing.
    chunks: int
    #: When the first byte arrived.
    first_chunk_at: float | None
    #: When the first chunk carrying content arrived (streams only; see the module docstring).
    first_content_at: float | None
    #: The ``done: true`` object (or a pull's ``{"status": "success"}``) of a native stream, or the whole
    #: body when it is a non-streamed JSON object that is not an error.
    final: dict[str, Any] | None
    #: Parsed from ``final``.
    timings: Timings | None
    #: The body completed by the protocol's rules: a native stream's ``done: true`` (or pull ``success``)
    #: line, a /v1 stream's ``[DONE]`` or finish reason, a JSON object that is not an error; and no error.
    done: bool
    #: A mid-stream error line's message, or an error body's.
    error: str | None
    #: /v1 ``usage`` when present, else the native ``prompt_eval_count`` / ``eval_count`` of ``timings``.
    usage_input_tokens: int | None
    usage_output_tokens: int | None
    #: The native ``done_reason``, or /v1 ``choices[].finish_reason`` in choice order.
    finish_reasons: tuple[str, ...]
    #: The first ``model`` named by the response.
    response_model: str | None
    #: Chunks that carried content, about one per token. Exact up to the first content and in the parsed
    #: tail; in between every line counts, as Ollama sends one token per line.
    content_chunks: int
    #: A line or body exceeded its cap: parsing stopped there (forwarding did not).
    truncated: bool
    #: The stream ended inside the line that exceeded the cap: its newline never came, so it was no whole
    #: object (Ollama ends every line, the megabytes-long final one included), and the stream is cut.
    cut_in_line: bool
    #: Something that should have been a JSON object was not (counted only where lines are parsed).
    malformed: bool
    #: With ``capture_content`` only, else None: the generated text, the thinking/reasoning text, and the
    #: tool calls as they arrived (each capped with the others at ``body_cap`` characters).
    output_text: str | None
    output_thinking: str | None
    output_tool_calls: tuple[dict[str, Any], ...] | None


# A tuple, not ``str | list``: that expression builds a union object at every call.
_TEXT_OR_LIST: Final = (str, list)


def _nonempty(value: object) -> bool:
    return isinstance(value, _TEXT_OR_LIST) and len(value) > 0


def _has_content(obj: dict[str, Any]) -> bool:
    # Spelled out rather than any() over the key lists: a generator costs more than the lookups, and this
    # runs for every line until content starts.
    if _nonempty(obj.get("response")) or _nonempty(obj.get("thinking")):
        return True
    message = obj.get("message")
    if isinstance(message, dict) and (
        _nonempty(message.get("content"))
        or _nonempty(message.get("thinking"))
        or _nonempty(message.get("tool_calls"))
    ):
        return True
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if _nonempty(choice.get("text")):
            return True
        delta = choice.get("delta", choice.get("message"))
        if isinstance(delta, dict) and (
            _nonempty(delta.get("content"))
            or _nonempty(delta.get("reasoning"))
            or _nonempty(delta.get("reasoning_content"))
            or _nonempty(delta.get("tool_calls"))
        ):
            return True
    return False


class StreamObserver:
    """Watches one response body; see the module docstring. Not thread-safe: one exchange, one task."""

    __slots__ = (
        "_body_cap",
        "_capture",
        "_captured",
        "_content",
        "_ended",
        "_error",
        "_final",
        "_finish_reasons",
        "_first_chunk_at",
        "_first_content_at",
        "_framing",
        "_line_cap",
        "_malformed",
        "_model",
        "_observation",
        "_open",
        "_partial",
        "_prefix",
        "_records",
        "_scanning",
        "_separator",
        "_size",
        "_sse",
        "_started_at",
        "_stopped",
        "_tail",
        "_text",
        "_thinking",
        "_tool_calls",
        "_truncated",
        "_usage",
        "_whole",
    )

    def __init__(
        self,
        framing: str,
        started_at: float,
        capture_content: bool = False,
        *,
        line_cap: int = LINE_CAP,
        body_cap: int = BODY_CAP,
    ) -> None:
        self._framing = _FRAMINGS.get(framing, Framing.OTHER)  # Framing(framing) costs ~0.5 us
        self._started_at = started_at
        self._capture = capture_content
        self._line_cap = line_cap
        self._body_cap = body_cap
        # Enum identity tests cost ~60 ns in the hot path; these booleans ~8.
        self._sse = self._framing is Framing.SSE
        self._whole = self._framing is Framing.JSON
        # A record is the line kind that carries a JSON object; counting "\n" + prefix needs no parsing.
        self._prefix = b"data:" if self._sse else b"{"
        self._separator = b"\n" + self._prefix

        self._size = 0
        self._first_chunk_at: float | None = None
        self._first_content_at: float | None = None
        self._stopped = self._framing is Framing.OTHER
        self._truncated = False
        self._open = False  # truncated inside a line whose newline has not come yet
        self._malformed = False
        self._scanning = True
        # The unfinished line of a stream, or the whole body of a JSON response.
        self._partial = bytearray()
        self._records = 0
        self._content = 0
        self._tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_LINES)

        self._final: dict[str, Any] | None = None
        self._ended = False
        self._error: str | None = None
        self._finish_reasons: dict[int, str] = {}
        self._usage: tuple[int | None, int | None] | None = None
        self._model: str | None = None

        self._text: list[str] = []
        self._thinking: list[str] = []
        self._tool_calls: list[dict[str, Any]] = []
        self._captured = 0
        self._observation: Observation | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        """Observe the next chunk of the body, already forwarded to the client. Never raises."""
        if not chunk or self._observation is not None:
            return
        if self._first_chunk_at is None:
            self._first_chunk_at = now
        self._size += len(chunk)
        if self._stopped:
            if self._open and b"\n" in chunk:
                self._open = False
            return
        try:
            # Most chunks of a stream, once content flows: whole lines, only counted and kept for the tail.
            # The same work as _split, _lines and _count do for them, without their calls per token.
            if (
                not self._scanning
                and not self._capture
                and not self._partial
                and chunk[-1] == 10  # b"\n"
                and len(chunk) <= self._line_cap
            ):
                line = chunk[:-1]
                if b"\n" in line:
                    self._count(line)
                else:  # one line, as Ollama writes a line per token: no separators to count
                    if line.startswith(self._prefix):
                        self._records += 1
                        self._content += 1
                    if line:
                        self._tail.append(line)
            elif self._whole:
                self._buffer(chunk)
            else:
                self._split(chunk, now)
        except Exception:  # an observer bug must never cost the client its bytes
            self._give_up()

    def finish(self, now: float) -> Observation:
        """Parse what is left and describe the body. Call once the body ended or was abandoned; later
        calls return the same :class:`Observation` and later feeds are ignored. Never raises."""
        if self._observation is None:
            try:
                self._conclude(now)
            except Exception:  # as in feed: the record must still be written
                self._give_up()
            self._observation = self._observe(now)
            self._partial = bytearray()
            self._tail.clear()
        return self._observation

    # -- streams ----------------------------------------------------------------------------------------

    def _split(self, chunk: bytes, now: float) -> None:
        end = chunk.rfind(b"\n")
        if end < 0:
            if len(self._partial) + len(chunk) > self._line_cap:
                self._truncate(open_line=True)
            else:
                self._partial += chunk
            return
        if self._partial:
            self._partial += memoryview(chunk)[:end]
            block = bytes(self._partial)
            self._partial.clear()
        else:
            block = chunk[:end]
        self._lines(block, now)
        if end + 1 < len(chunk) and not self._stopped:
            if len(chunk) - end - 1 > self._line_cap:
                self._truncate(open_line=True)
            else:
                self._partial += memoryview(chunk)[end + 1 :]

    def _lines(self, block: bytes, now: float) -> None:
        """Handle complete lines (``block`` has no final newline)."""
        start = 0
        while self._scanning:
            end = block.find(b"\n", start)
            line = block[start:] if end < 0 else block[start:end]
            if len(line) > self._line_cap:
                self._truncate()
                return
            self._scan(line, now)
            if end < 0:
                return
            start = end + 1
        rest = block[start:] if start else block
        if self._capture or len(rest) > self._line_cap:
            for line in rest.split(b"\n"):
                if len(line) > self._line_cap:
                    self._truncate()
                    return
                self._skim(line)
            return
        self._count(rest)

    def _count(self, rest: bytes) -> None:
        """The hot path, once content flows: count records and keep the tail, parse nothing."""
        records = rest.count(self._separator) + rest.startswith(self._prefix)
        self._records += records
        self._content += records
        if b"\n" in rest:
            self._tail.extend(filter(None, rest.split(b"\n")))
        elif rest:
            self._tail.append(rest)

    def _scan(self, line: bytes, now: float) -> None:
        """A line before any content: parse it all."""
        record = line.startswith(self._prefix)
        self._records += record
        obj = self._parse(line)
        if obj is None:
            return
        self._inspect(obj)
        if self._capture:
            self._collect(obj)
        if record and _has_content(obj):
            self._content += 1
            self._first_content_at = now
            self._scanning = False

    def _skim(self, line: bytes) -> None:
        """A line after the first content: counted as content and kept for the tail; parsed only for
        ``capture_content``, and then only for its text, so that the rest of the observation does not
        depend on whether content is captured."""
        record = line.startswith(self._prefix)
        self._records += record
        self._content += record
        if line:
            self._tail.append(line)
        if self._capture and record:
            obj = self._payload(line)
            if obj is not None:
                self._collect(obj)

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        """The object on a line, noting ``[DONE]`` and anything malformed; None if there is none."""
        if self._sse:
            if not line.startswith(b"data:"):
                return None  # event:, id:, retry:, comments and the blank lines between events
            if line[5:].strip() == b"[DONE]":
                self._ended = True
                return None
        elif not line.startswith(b"{"):
            if line.strip():
                self._malformed = True
            return None
        obj = self._payload(line)
        if obj is None:
            self._malformed = True
        return obj

    def _payload(self, line: bytes) -> dict[str, Any] | None:
        payload = line[5:] if self._sse else line
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        return obj if isinstance(obj, dict) else None

    def _whole_line(self, line: bytes) -> bool:
        if not line.startswith(self._prefix):
            return False
        return (self._sse and line[5:].strip() == b"[DONE]") or self._payload(line) is not None

    def _conclude(self, now: float) -> None:
        if self._whole:
            if not self._stopped and self._partial.strip():
                self._body(self._partial)
            return
        if self._framing is Framing.OTHER:
            return
        last = bytes(self._partial)
        # A last line without its newline: from a server that does not end its lines it is whole, from a
        # cut stream it is a fragment, neither a chunk nor malformed.
        if not self._stopped and self._whole_line(last):
            self._lines(last, now)
        for line in self._tail:
            obj = self._parse(line)
            if line.startswith(self._prefix) and (obj is None or not _has_content(obj)):
                self._content -= 1
            if obj is not None:
                self._inspect(obj)

    # -- bodies -----------------------------------------------------------------------------------------

    def _buffer(self, chunk: bytes) -> None:
        if len(self._partial) + len(chunk) > self._body_cap:
            self._truncate()
        else:
            self._partial += chunk

    def _body(self, body: bytearray) -> None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            self._malformed = True
            return
        self._inspect(obj)
        if self._capture:
            self._collect(obj)
        self._content = int(_has_content(obj))
        if self._error is None:
            self._final = obj
            self._ended = True

    # -- what an object says ----------------------------------------------------------------------------

    def _inspect(self, obj: dict[str, Any]) -> None:
        message = error_message(obj)
        if message is not None:
            if self._error is None:
                self._error = message
            return
        if self._model is None:
            model = obj.get("model")
            if isinstance(model, str):
                self._model = model
        choices = obj.get("choices")
        if isinstance(choices, list):
            for position, choice in enumerate(choices):
                reason = choice.get("finish_reason") if isinstance(choice, dict) else None
                if isinstance(reason, str):
                    index = nonnegative_int(choice.get("index"))
                    self._finish_reasons[position if index is None else index] = reason
                    self._ended = True
        usage = obj.get("usage")
        # Only the include_usage chunk (no choices) has real usage; Ollama's /v1/completions puts zeros on
        # every other chunk.
        if isinstance(usage, dict) and (not self._sse or not choices):
            self._usage = (
                nonnegative_int(usage.get("prompt_tokens")),
                nonnegative_int(usage.get("completion_tokens")),
            )
        if obj.get("done") is True or obj.get("status") == "success":
            self._final = obj
            self._ended = True

    def _collect(self, obj: dict[str, Any]) -> None:
        self._add(obj.get("response"), obj.get("thinking"), None)
        message = obj.get("message")
        if isinstance(message, dict):
            self._add(message.get("content"), message.get("thinking"), message.get("tool_calls"))
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            self._add(choice.get("text"), None, None)
            delta = choice.get("delta", choice.get("message"))
            if isinstance(delta, dict):
                reasoning = delta.get("reasoning", delta.get("reasoning_content"))
                self._add(delta.get("content"), reasoning, delta.get("tool_calls"))

    def _add(self, text: object, thinking: object, tool_calls: object) -> None:
        if self._captured > self._body_cap:
            return
        if isinstance(text, str) and text:
            self._text.append(text)
            self._captured += len(text)
        if isinstance(thinking, str) and thinking:
            self._thinking.append(thinking)
            self._captured += len(thinking)
        if isinstance(tool_calls, list):
            calls = [call for call in tool_calls if isinstance(call, dict)]
            self._tool_calls.extend(calls)
            self._captured += len(calls)

    # -- the end ----------------------------------------------------------------------------------------

    def _truncate(self, open_line: bool = False) -> None:
        self._truncated = True
        self._open = open_line
        self._stopped = True
        self._partial = bytearray()

    def _give_up(self) -> None:
        self._malformed = True
        self._stopped = True
        self._partial = bytearray()

    def _observe(self, now: float) -> Observation:
        timings = Timings.from_final(self._final) if self._final is not None else None
        if self._usage is not None:
            input_tokens, output_tokens = self._usage
        elif timings is not None:
            input_tokens, output_tokens = timings.prompt_eval_count, timings.eval_count
        else:
            input_tokens = output_tokens = None
        if self._finish_reasons:
            finish_reasons = tuple(reason for _, reason in sorted(self._finish_reasons.items()))
        elif timings is not None and timings.done_reason is not None:
            finish_reasons = (timings.done_reason,)
        else:
            finish_reasons = ()
        framing = self._framing
        capture = self._capture
        streamed = framing is Framing.NDJSON or framing is Framing.SSE
        # Positions, in the fields' order: 22 keywords cost 1.4 us more in CPython 3.11.
        return Observation(
            framing.value,  # framing
            self._started_at,  # started_at
            now,  # finished_at
            self._size,  # bytes
            self._records if streamed else int(self._size > 0),  # chunks
            self._first_chunk_at,  # first_chunk_at
            self._first_content_at,  # first_content_at
            self._final,  # final
            timings,  # timings
            self._ended and self._error is None,  # done
            self._error,  # error
            input_tokens,  # usage_input_tokens
            output_tokens,  # usage_output_tokens
            finish_reasons,  # finish_reasons
            self._model,  # response_model
            self._content,  # content_chunks
            self._truncated,  # truncated
            self._open,  # cut_in_line
            self._malformed,  # malformed
            "".join(self._text) if capture else None,  # output_text
            "".join(self._thinking) if capture else None,  # output_thinking
            tuple(self._tool_calls) if capture else None,  # output_tool_calls
        )
