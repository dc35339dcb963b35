"""What otellama knows about Ollama's HTTP protocol. No I/O here: only names, shapes and arithmetic.

- :func:`endpoint_for`: which requests are GenAI operations, and which (docs/reference.md §2).
- :func:`framing_for`: how a response body is framed, from its Content-Type (never from the request).
- :class:`Timings`: the durations and counts of a final object, with the rule for the fields Ollama omits.
- :func:`error_message`: the text of a native ``{"error": "..."}`` or a /v1 ``{"error": {"message": ...}}``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, Final

import orjson

# The GenAI semantic conventions' gen_ai.operation.name values for what each endpoint does. Spelled here
# because observation knows no OpenTelemetry; tests/test_ollama.py checks them against the semconv package.
CHAT: Final = "chat"
TEXT_COMPLETION: Final = "text_completion"
EMBEDDINGS: Final = "embeddings"


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """A generation or embedding endpoint: the only requests whose body otellama parses for telemetry."""

    path: str
    #: ``gen_ai.operation.name``.
    operation: str
    #: Part of the OpenAI-compatible ``/v1`` API (token counts in ``usage``, no durations, SSE streams).
    openai: bool
    #: Whether the response streams when the request body has no ``stream`` field.
    streams_by_default: bool


ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    Endpoint("/api/chat", CHAT, openai=False, streams_by_default=True),
    Endpoint("/api/generate", TEXT_COMPLETION, openai=False, streams_by_default=True),
    Endpoint("/api/embed", EMBEDDINGS, openai=False, streams_by_default=False),
    Endpoint("/api/embeddings", EMBEDDINGS, openai=False, streams_by_default=False),
    Endpoint("/v1/chat/completions", CHAT, openai=True, streams_by_default=False),
    Endpoint("/v1/completions", TEXT_COMPLETION, openai=True, streams_by_default=False),
    Endpoint("/v1/embeddings", EMBEDDINGS, openai=True, streams_by_default=False),
)
_BY_PATH: Final[Mapping[str, Endpoint]] = {endpoint.path: endpoint for endpoint in ENDPOINTS}


def endpoint_for(method: str, path: str) -> Endpoint | None:
    """The :class:`Endpoint` a request targets, or None for everything else (pass it through untouched).

    ``path`` is the URL path without the query string. Ollama routes exactly (a trailing slash gets a
    redirect, another method a 404/405), so only an exact ``POST`` match is an operation; unknown and future
    paths, including ``/v1/responses`` and ``/v1/messages``, are None.
    """
    return _BY_PATH.get(path) if method == "POST" else None


@dataclasses.dataclass(frozen=True, slots=True)
class Phase:
    """One of the phases Ollama's timings describe, with every name otellama gives it."""

    #: In :meth:`~otellama.observe.record.Record.phases` and span names (``ollama.<name>``), after the
    #: ``*_duration`` field Ollama reports it in.
    name: str
    #: For people: charts, the demo's waterfall.
    label: str
    #: Its JSONL field, in milliseconds (names kept from the log otellama grew from).
    column: str

    @property
    def key(self) -> str:
        """Its key in summaries (``time_ms``): the JSONL field without ``_time_ms``."""
        return self.column.removesuffix("_time_ms")


#: Ollama's phases in the order they happen: waiting for a slot, loading, prompt evaluation, generation.
PHASES: Final = (
    Phase("queue", "queue", "queue_time_ms"),
    Phase("load", "load", "load_time_ms"),
    Phase("prompt_eval", "prompt eval", "prompt_eval_time_ms"),
    Phase("eval", "generation", "generation_time_ms"),
)
QUEUE, LOAD, PROMPT_EVAL, EVAL = PHASES


class Framing(enum.StrEnum):
    """How a response body is framed, decided by its Content-Type alone."""

    #: ``application/x-ndjson``: a native stream, one JSON object per line.
    NDJSON = "ndjson"
    #: ``text/event-stream``: a /v1 stream of ``data: {...}`` events ending with ``data: [DONE]``.
    SSE = "sse"
    #: ``application/json``: one JSON document (native and /v1 non-streamed bodies, errors).
    JSON = "json"
    #: Anything else (``text/plain`` health checks, empty bodies, blobs): counted, never parsed.
    OTHER = "other"


_FRAMINGS: Final[Mapping[str, Framing]] = {
    "application/x-ndjson": Framing.NDJSON,
    "application/ndjson": Framing.NDJSON,
    "text/event-stream": Framing.SSE,
    "application/json": Framing.JSON,
}


def framing_for(content_type: str | None) -> Framing:
    """The framing of a response with this Content-Type header value (parameters and case ignored)."""
    if not content_type:
        return Framing.OTHER
    media_type = content_type.partition(";")[0].strip().lower()
    return _FRAMINGS.get(media_type, Framing.OTHER)


_GENERATION_FIELDS: Final = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
# /api/embed's response type defines only these; its other timings do not exist, they are not zero.
_EMBED_FIELDS: Final = ("total_duration", "load_duration", "prompt_eval_count")


def nonnegative_int(value: object) -> int | None:
    """``value`` if it is a JSON count or duration (a non-negative integer), else None."""
    # bool is an int in Python; a true/false where a count belongs is garbage, not 1/0.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _rate(count: int | None, duration_ns: int | None) -> float | None:
    if count is None or not duration_ns:
        return None
    return count / duration_ns * 1e9


# Not frozen, like the Record that holds it: frozen fields are set through object.__setattr__, 1.6 us of
# the 2 that making one took. A value all the same: nothing assigns to it (dataclasses.replace copies).
@dataclasses.dataclass(slots=True)
class Timings:
    """Ollama's own measurements from a final object (``done: true``) or a non-streamed body. A value:
    read it, never assign to it.

    Durations are nanoseconds. None always means *unknown*, never zero.

    Ollama omits every zero-valued field, but cloud-backed models and older servers also omit fields they
    never measured (capture 05 has counts but no ``load_duration``, ``prompt_eval_duration`` or
    ``eval_duration``; a 0.3-era ``/api/embed`` has no timings at all). The object itself tells which case
    applies, because a local server always sends ``load_duration``: it is measured from the request's
    arrival and is never 0 ns, even for a loaded model. So:

    - With ``load_duration`` present, every field the response type defines and the object omits is 0 (a
      warm model's fully cached prompt omits ``prompt_eval_duration``). A generation result (it has
      ``done``) defines all six; an ``/api/embed`` result (it has ``embeddings``) defines
      ``total_duration``, ``load_duration`` and ``prompt_eval_count`` only.
    - Without it (cloud models, old servers, load/unload answers, /v1 bodies), a missing field is None.
    - ``prompt_eval_cached_count`` is sent whenever known, zero included, so missing is always None.
    - A value that is not a non-negative integer is None.
    """

    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    prompt_eval_cached_count: int | None = None
    #: ``stop``, ``length``, ``load``, ``unload``; None when absent (e.g. the client went away).
    done_reason: str | None = None
    #: The model named in the response.
    model: str | None = None

    @classmethod
    def from_final(cls, obj: Mapping[str, Any]) -> Timings:
        """Read the timings of a final object or body by the rule in the class docstring."""
        get = obj.get
        # nonnegative_int inlined, as an exact type test (half the cost of isinstance and two identity tests
        # against bool, which is an int in Python and garbage here): parsed JSON holds plain ints only, and
        # this runs for every record.
        values = [
            value if type(value) is int and value >= 0 else None for value in map(get, _GENERATION_FIELDS)
        ]
        if values[1] is not None and None in values:  # load_duration: a local server, see above
            defined = _GENERATION_FIELDS if "done" in obj else _EMBED_FIELDS if "embeddings" in obj else ()
            for position, name in enumerate(_GENERATION_FIELDS):
                if values[position] is None and name in defined and name not in obj:
                    values[position] = 0
        total, load, prompt_eval_count, prompt_eval_duration, eval_count, eval_duration = values
        done_reason = get("done_reason")
        model = get("model")
        # Positions, in the fields' order: keywords cost 0.5 us more in CPython 3.11.
        return cls(
            total,
            load,
            prompt_eval_count,
            prompt_eval_duration,
            eval_count,
            eval_duration,
            nonnegative_int(get("prompt_eval_cached_count")),
            done_reason if isinstance(done_reason, str) else None,
            model if isinstance(model, str) else None,
        )

    @property
    def queue_ns(self) -> int | None:
        """Time spent waiting for a free slot, which Ollama counts only in ``total_duration``.

        ``total - load - prompt_eval - eval`` durations, at least 0; None if any of them is unknown.
        """
        total, load = self.total_duration, self.load_duration
        prompt_eval, generation = self.prompt_eval_duration, self.eval_duration
        if total is None or load is None or prompt_eval is None or generation is None:
            return None
        return max(0, total - load - prompt_eval - generation)

    @property
    def tokens_per_second(self) -> float | None:
        """Generation speed, ``eval_count / eval_duration`` per second.

        None when either is unknown or the duration is 0.
        """
        return _rate(self.eval_count, self.eval_duration)

    @property
    def prompt_tokens_per_second(self) -> float | None:
        """Prompt processing speed, ``prompt_eval_count / prompt_eval_duration`` per second.

        None when either is unknown or the duration is 0.
        """
        return _rate(self.prompt_eval_count, self.prompt_eval_duration)


def error_message(obj: object) -> str | None:
    """The message of an error object (a parsed JSON value), or None if ``obj`` is not one.

    Native errors are ``{"error": "..."}`` (a whole body, or one more NDJSON line mid-stream); /v1 errors are
    ``{"error": {"message", "type", "param", "code"}}``. Only the structure is examined: wording varies by
    Ollama version, so it classifies nothing. A /v1 error object without a string message is rendered as
    JSON text; an empty message stays empty (test for None, not for falsiness).
    """
    if not isinstance(obj, dict):
        return None
    error = obj.get("error")
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        message = error.get("message")
        return message if isinstance(message, str) else orjson.dumps(error).decode()
    return None
