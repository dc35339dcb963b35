"""``GET /otellama/stats``: the last minutes of exchanges, summarised in memory, per model.

:class:`RollingStats` keeps the numbers :mod:`otellama.observe.summary` needs of each recorded exchange in a
ring of fixed capacity (default :data:`CAPACITY` exchanges): one ``array('d')`` per sampled quantity (NaN for
unknown), plus the end time, the model and the outcome. The ring is allocated whole at start and then
overwrites its oldest slots, so memory is fixed whatever the uptime and the traffic (a ring that grew with
traffic would read as a slow leak for the first 100,000 exchanges): about 110 bytes an exchange, ~11 MB at the
default capacity, plus the model names (at most :data:`~otellama.sinks.capper.LIMIT` distinct ones; later
newcomers are counted as ``other``, as in the metrics). Adding an exchange is a handful of array stores under
a lock (about a microsecond), done as the exporter process reads each logged line
(:mod:`otellama.exporter.live`), or by the proxy itself when it renders telemetry in-process.

A summary covers the exchanges that *ended* within the window (default 15 minutes, at most
:data:`MAX_WINDOW`). When traffic is so heavy that the ring holds less than the window, the answer says so
(``complete: false``) and ``since`` is the oldest exchange it could still see. The statistics are
computed from a copy taken under the lock, by :class:`~otellama.observe.summary.Summary`: the same fields as
``otellama report --json``.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Callable
from typing import Any, Final

from otellama.exchange import OUTCOME_CODES, OUTCOMES
from otellama.observe import summary
from otellama.observe.record import Record
from otellama.observe.times import TimeError, iso, parse_time
from otellama.sinks.capper import Capper

CAPACITY: Final = 100_000
DEFAULT_WINDOW: Final = 15 * 60.0
MAX_WINDOW: Final = 24 * 3600.0
_NAN: Final = math.nan


def samples_of(record: Record) -> tuple[float, ...]:
    """The record's :data:`~otellama.observe.summary.SAMPLED` values, as in its JSONL line."""
    measures = record.measures()
    return tuple(_NAN if (value := measures[name]) is None else value for name in summary.SAMPLED)


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
        self._cap = Capper()

    def __len__(self) -> int:
        return self._size

    def write(self, record: Record) -> None:
        """Remember one exchange (the fan-out calls it for every record)."""
        model = None if record.model is None else self._cap("model", record.model)
        values = samples_of(record)
        flags = OUTCOME_CODES.get(record.outcome, 1) | (4 if record.cold_start else 0)
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

    def close(self) -> None:
        """Nothing to release: the window lives in memory."""

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
                OUTCOMES[flag & 3],
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
    except TimeError:
        seconds = -1.0
    if not 0 < seconds <= MAX_WINDOW or not any(c.isalpha() for c in text):
        raise ValueError(f"window={text!r}: give a duration up to 24h, like 90s, 15m or 1h")
    return seconds
