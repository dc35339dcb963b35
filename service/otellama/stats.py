"""``GET /otellama/stats``: the last minutes of exchanges, summarised in memory, per model.

:class:`RollingStats` keeps the numbers :mod:`otellama.summary` needs of each recorded exchange in a ring of
fixed capacity (default :data:`CAPACITY` exchanges): one ``array('d')`` per sampled quantity (NaN for
unknown), plus the end time, the model and the outcome. The ring is allocated whole at start and then
overwrites its oldest slots, so memory is fixed whatever the uptime and the traffic (a ring that grew
with traffic would read as a slow leak for the first 100,000 exchanges): about 110 bytes an exchange,
~11 MB at the default capacity, plus the model names (at most :data:`MODEL_LIMIT` distinct ones; later
newcomers are counted as ``other``, as in the metrics). Adding an exchange is a handful of array stores
under a lock (about a microsecond), done when the proxy records it.

A summary covers the exchanges that *ended* within the window (default 15 minutes, at most
:data:`MAX_WINDOW`). When traffic is so heavy that the ring holds less than the window, the answer says so
(``complete: false``) and ``since`` is the oldest exchange it could still see. The statistics are
computed from a copy taken under the lock, by :class:`~otellama.summary.Summary`: the same fields as
``otellama report --json``.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Callable
from typing import Any, Final

from otellama import summary
from otellama.record import Record, metric_value
from otellama.report import ReportError, iso, parse_time

CAPACITY: Final = 100_000
MODEL_LIMIT: Final = 100
OVERFLOW: Final = "other"
DEFAULT_WINDOW: Final = 15 * 60.0
MAX_WINDOW: Final = 24 * 3600.0
_NAN: Final = math.nan
_OUTCOMES: Final = (summary.OK, summary.ERROR, summary.CANCELLED)
_CODES: Final = {name: code for code, name in enumerate(_OUTCOMES)}


def _ms(ns: int | None) -> float:
    return _NAN if ns is None else round(ns / 1e6, 3)


def _value(value: float | None, digits: int) -> float:
    return _NAN if value is None else round(value, digits)


def samples_of(record: Record) -> tuple[float, ...]:
    """The record's :data:`~otellama.summary.SAMPLED` values as its JSONL line has them (NaN for null)."""
    t = record.timings
    ttft = record.time_to_first_content_s
    return (
        _NAN if ttft is None else round(ttft * 1e3, 3),
        _value(t.tokens_per_second, 2),
        _value(t.prompt_tokens_per_second, 2),
        _ms(t.load_duration),
        _ms(t.queue_ns),
        round(record.duration_s * 1e3, 3),
        _ms(t.prompt_eval_duration),
        _ms(t.eval_duration),
    )


class RollingStats:
    """A bounded, in-memory window of recent exchanges; see the module docstring. Thread-safe."""

    def __init__(self, capacity: int = CAPACITY, *, clock: Callable[[], float] = time.time) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.clock = clock
        self._lock = threading.Lock()
        self._next = 0  # slot the next exchange goes to
        self._size = 0  # slots [0, size) hold exchanges
        self._ends = array("d", [_NAN]) * capacity
        self._columns = tuple(array("d", [_NAN]) * capacity for _ in summary.SAMPLED)
        self._tokens = (
            array("q", [-1]) * capacity,
            array("q", [-1]) * capacity,
        )  # input, output; -1: unknown
        self._flags = array("b", [0]) * capacity  # outcome code | 4 if cold start
        self._models: list[str | None] = [None] * capacity
        self._known: set[str] = set()

    def __len__(self) -> int:
        return self._size

    def add(self, record: Record) -> None:
        """Remember one exchange (called by telemetry for every record)."""
        model = None if record.model is None else metric_value(record.model)  # as the metrics name it
        if model is not None and model not in self._known:
            if len(self._known) >= MODEL_LIMIT:
                model = OVERFLOW
            else:
                self._known.add(model)
        values = samples_of(record)
        flags = _CODES.get(record.outcome, 1) | (4 if record.cold_start else 0)
        tokens_in = -1 if record.input_tokens is None else record.input_tokens
        tokens_out = -1 if record.output_tokens is None else record.output_tokens
        end = record.end_ns / 1e9
        with self._lock:
            slot = self._next
            self._ends[slot] = end
            for column, value in zip(self._columns, values, strict=True):
                column[slot] = value
            self._tokens[0][slot] = tokens_in
            self._tokens[1][slot] = tokens_out
            self._flags[slot] = flags
            self._models[slot] = model
            self._next = (slot + 1) % self.capacity
            self._size = min(self._size + 1, self.capacity)

    def summary(self, window: float = DEFAULT_WINDOW) -> dict[str, Any]:
        """The exchanges that ended in the last ``window`` seconds, per model, as JSON-ready data."""
        window = min(max(window, 0.0), MAX_WINDOW)
        now = self.clock()
        since = now - window
        with self._lock:
            size = self._size
            ends = self._ends[:size]
            columns = [column[:size] for column in self._columns]
            tokens_in, tokens_out = self._tokens[0][:size], self._tokens[1][:size]
            flags, models = self._flags[:size], self._models[:size]
            full = size == self.capacity
        result = summary.Summary("model")
        oldest = math.inf
        matched = 0
        for i, end in enumerate(ends):
            if end < oldest:
                oldest = end
            if end < since:
                continue
            matched += 1
            flag = flags[i]
            result.group(models[i]).add(
                _OUTCOMES[flag & 3],
                bool(flag & 4),
                tokens_in[i] if tokens_in[i] >= 0 else None,
                tokens_out[i] if tokens_out[i] >= 0 else None,
                [column[i] for column in columns],
            )
        complete = not full or oldest < since
        return {
            "window_seconds": window,
            "since": iso(since if complete else oldest),
            "until": iso(now),
            "complete": complete,
            "capacity": self.capacity,
            "exchanges": matched,
            **result.to_json(),
        }


def parse_window(text: str | None) -> float:
    """``?window=`` as seconds: a duration like ``15m``, ``1h``, ``90s`` (default 15 minutes).

    Raises ValueError with a message for the client on anything else.
    """
    if text is None or not text.strip():
        return DEFAULT_WINDOW
    try:
        seconds = -parse_time(text, now=0.0)
    except ReportError:
        seconds = -1.0
    if not 0 < seconds <= MAX_WINDOW or not any(c.isalpha() for c in text):
        raise ValueError(f"window={text!r}: give a duration up to 24h, like 90s, 15m or 1h")
    return seconds
