"""What a request says, as the record keeps it: the model, stream flag and sampling options of a GenAI
request body (:func:`parse_request`), and with content capture its prompt as GenAI messages (:func:`capped`);
the endpoint its path names and the client its header names.

Everything here was chosen by the client (or, for an answer's text and labels, by Ollama), so every string is
cut to a limit before the record keeps it: :func:`clip` and the limits below are the record's bounds.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from otellama.observe import ollama

#: Longest client name kept; the header is the client's to fill.
CLIENT_NAME_LIMIT: Final = 64
#: Longest text the record keeps of any other string a request or Ollama chose (model names, error
#: messages, stop sequences, the endpoint): spans and the JSONL line hold at most this many characters of
#: each, so a 900 KB model name costs a line no more than a short one. Longer ones end in :data:`CUT_MARK`.
FIELD_LIMIT: Final = 1024
#: Largest captured message list, in bytes of its JSON encoding (UTF-8), when content capture is on: each of
#: ``gen_ai.input.messages`` and ``gen_ai.output.messages`` (and the JSONL fields they come from) is at most
#: this long, however many messages the request had.
CONTENT_LIMIT: Final = 64 * 1024
#: Longest role or finish reason kept in a captured message; the client (or upstream) fills them.
LABEL_LIMIT: Final = 64
#: Marks where captured content was cut: at the start of the oldest prompt message kept, at the end of
#: the answer kept.
CUT_MARK: Final = "…"

_BLOB = re.compile(r"^/api/blobs/[^/]+$")


def clip(text: str, limit: int = FIELD_LIMIT) -> str:
    """``text`` cut to at most ``limit`` characters, ending in :data:`CUT_MARK` when it was cut."""
    return text if len(text) <= limit else text[: limit - len(CUT_MARK)] + CUT_MARK


def header_text(value: bytes) -> str:
    """A header value as text: UTF-8 where it is valid (clients send names in it), else latin-1, as
    RFC 9110 reads the bytes of old clients."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


_V1_MODEL = re.compile(r"^/v1/models/.+$")


def endpoint_of(path: str) -> str:
    """The path with its free-form part named, so that logs group by endpoint (blob digests vary)."""
    if not path.startswith(("/api/blobs/", "/v1/models/")):  # most paths: no regex run for them
        return path
    if _BLOB.match(path):
        return "/api/blobs/{digest}"
    if _V1_MODEL.match(path):
        return "/v1/models/{model}"
    return path


# Not frozen, like the Record that holds it: frozen fields are set through object.__setattr__, most of
# what making one costs. A value all the same: nothing assigns to it (dataclasses.replace copies).
@dataclasses.dataclass(slots=True)
class RequestFacts:
    """What the request body said, for GenAI endpoints whose body was small and valid JSON. A value: read
    it, never assign to it."""

    parsed: bool = False
    model: str | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    #: With content capture only: the prompt as GenAI ``input.messages``, cut to CONTENT_LIMIT (``capped``).
    input_messages: tuple[dict[str, Any], ...] | None = None


# A tuple, not ``int | float``: that expression builds a union object at every call.
_NUMBER: Final = (int, float)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, _NUMBER) and not isinstance(value, bool) else None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def text_message(role: str, content: object, **extra: object) -> dict[str, Any]:
    """A GenAI message of one text part; the text is whole here, :func:`capped` cuts what does not fit."""
    text = content if isinstance(content, str) else orjson.dumps(content).decode()
    return {"role": role[:LABEL_LIMIT], "parts": [{"type": "text", "content": text}], **extra}


def _text(message: Mapping[str, Any]) -> str:
    text: str = message["parts"][0]["content"]
    return text


def _with_text(message: Mapping[str, Any], text: str) -> dict[str, Any]:
    return {**message, "parts": [{**message["parts"][0], "content": text}]}


def _fit(text: str, room: int, *, keep_end: bool) -> str:
    """Close to the longest start (or end) of ``text`` whose JSON string encoding, quotes aside, fits in
    ``room`` bytes."""
    # Every character takes at least one byte (orjson writes UTF-8 and escapes only '"', '\\' and control
    # characters), so no more than ``room`` characters can fit: a huge text is never encoded whole. For the
    # same reason, cutting as many characters as there are bytes too many always fits: ``safe``. The
    # proportional cut is usually closer (non-ASCII text takes 2-4 bytes a character), so it is tried first,
    # a few times at most, never below ``safe``.
    length = min(len(text), room)
    safe = 0
    for _ in range(4):
        part = text[len(text) - length :] if keep_end else text[:length]
        size = len(orjson.dumps(part)) - 2
        if size <= room:
            return part
        safe = max(safe, length - (size - room))
        length = max(safe, min(length - 1, length * room // size))
    return text[len(text) - safe :] if keep_end else text[:safe]


def capped(messages: Sequence[Mapping[str, Any]], *, newest: bool) -> tuple[dict[str, Any], ...]:
    """``messages`` (one text part each), cut so that their JSON list takes at most CONTENT_LIMIT bytes.

    What is kept is what lies nearest the boundary between prompt and answer. For the prompt
    (``newest=True``), the latest messages: the last turn is what the model was asked to answer, and the
    history before it is what a chat client resends every turn, so the record of an earlier exchange already
    holds it. For the answer (``newest=False``), its beginning, which is how an answer is read. The message
    where the budget runs out keeps the part of its text on that side (its end for the prompt, its start for
    the answer) and the kept message furthest from the boundary carries :data:`CUT_MARK` on its cut side, so
    a reader sees that content is missing. Cheap by construction: the budget goes down as messages are kept,
    each kept message is encoded once, and nothing past the cut is encoded at all.
    """
    mark = len(CUT_MARK.encode())
    order = list(reversed(messages)) if newest else list(messages)
    # "[" and "]", and the mark's bytes, held back in case anything has to go.
    budget = CONTENT_LIMIT - 2 - mark
    kept: list[dict[str, Any]] = []
    cut = False
    for position, message in enumerate(order):
        comma = 1 if kept else 0
        text = _text(message)
        if len(text) + comma <= budget + mark:  # at one byte a character it may fit whole
            size = len(orjson.dumps(message)) + comma
            last = position == len(order) - 1
            # The last message needs no mark when it fits: nothing is left out after it.
            if size <= budget or (last and size <= budget + mark):
                kept.append(dict(message))
                budget -= size
                continue
        cut = True
        room = budget - comma - len(orjson.dumps(_with_text(message, "")))
        if room > 0:
            kept.append(_with_text(message, _fit(text, room, keep_end=newest)))
        break
    if cut and kept:
        far = kept[-1]
        marked = CUT_MARK + _text(far) if newest else _text(far) + CUT_MARK
        kept[-1] = _with_text(far, marked)
    return tuple(reversed(kept)) if newest else tuple(kept)


def parse_request(
    endpoint: ollama.Endpoint | None, body: bytes | None, *, capture: bool = False
) -> RequestFacts:
    """Read model, stream flag and sampling options from a GenAI request body; never raises.

    Only generation and embedding endpoints are parsed, and only when the proxy kept the body (it keeps
    bodies up to a cap). Anything else gives ``parsed=False``: the body was forwarded all the same.
    """
    if endpoint is None or body is None:
        return RequestFacts()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return RequestFacts()
    if not isinstance(data, dict):
        return RequestFacts()
    messages: tuple[dict[str, Any], ...] | None = None
    if capture:
        found: list[dict[str, Any]] = []
        if isinstance(data.get("system"), str):
            found.append(text_message("system", data["system"]))
        items = data.get("messages")
        found.extend(
            text_message(str(item.get("role", "user")), item.get("content", ""))
            for item in (items if isinstance(items, list) else ())
            if isinstance(item, dict)
        )
        found.extend(text_message("user", data[key]) for key in ("prompt", "input") if key in data)
        messages = capped(found, newest=True)
    model = data.get("model")
    model = clip(model) if isinstance(model, str) else None
    stream = data.get("stream")
    stream = stream if isinstance(stream, bool) else endpoint.streams_by_default
    options = data.get("options") if not endpoint.openai else data
    # Positions, in the fields' order (ten keywords cost 0.5 us more in CPython 3.11): parsed, model,
    # stream, then the options (temperature, top_p, top_k, seed, max_tokens, stop), then input_messages.
    if not isinstance(options, dict) or not options:  # most native requests: no option to read
        return RequestFacts(True, model, stream, None, None, None, None, None, None, messages)
    stop = options.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    max_tokens = options.get("max_tokens")
    if max_tokens is None:
        max_tokens = options.get("max_completion_tokens")
    if not endpoint.openai:
        max_tokens = options.get("num_predict")
    return RequestFacts(
        True,
        model,
        stream,
        _number(options.get("temperature")),
        _number(options.get("top_p")),
        _integer(options.get("top_k")),
        _integer(options.get("seed")),
        _integer(max_tokens),
        tuple(clip(s) for s in stop if isinstance(s, str)) if isinstance(stop, list) else None,
        messages,
    )
