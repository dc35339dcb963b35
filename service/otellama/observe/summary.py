"""Per-group statistics of exchanges: the one place that computes what ``otellama report``,
``GET /otellama/stats`` and the HTML page show.

A :class:`Group` collects the exchanges of one model (or client, operation, endpoint): counts, and one column
of samples per measured quantity, named as in the JSONL log (:data:`SAMPLED`). A value that is null (unknown)
is left out of its column, never counted as 0, so each statistic says how many samples it rests on.
:meth:`Group.stats` turns the columns into the numbers, percentiles rather than averages:

**Percentiles** are computed by linear interpolation between closest ranks (Hyndman and Fan's type 7, numpy's
default, ``statistics.quantiles(method="inclusive")``): with the ``n`` samples sorted as ``x[0] <= ... <=
x[n-1]``, the p-th percentile sits at position ``h = (n - 1) * p / 100`` and is ``x[floor(h)] + (h - floor(h))
* (x[floor(h) + 1] - x[floor(h)])``. One sample is every percentile of itself; no sample gives null.

Columns are ``array('d')`` (8 bytes a sample), so a million exchanges fit in tens of megabytes.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from otellama.exchange import CANCELLED, ERROR
from otellama.observe import ollama

#: The JSONL fields sampled into columns, in column order.
SAMPLED: Final = (
    "ttft_ms",
    "tokens_per_second",
    "prompt_tokens_per_second",
    "load_time_ms",
    "queue_time_ms",
    "duration_ms",
    "prompt_eval_time_ms",
    "generation_time_ms",
)
TTFT, TPS, PROMPT_TPS, LOAD, QUEUE, DURATION, PROMPT_EVAL, GENERATION = range(len(SAMPLED))

#: What each summary reports of a column: (JSON name, column, statistics). ``pNN`` is a percentile.
REPORTED: Final[tuple[tuple[str, int, tuple[str, ...]], ...]] = (
    ("ttft_ms", TTFT, ("p50", "p95", "p99")),
    ("tokens_per_second", TPS, ("p50", "p95")),
    ("prompt_tokens_per_second", PROMPT_TPS, ("p50",)),
    ("load_time_ms", LOAD, ("p50", "max")),
    ("queue_time_ms", QUEUE, ("p95",)),
    ("duration_ms", DURATION, ("p50", "p95", "p99")),
)
#: Ollama's phases, in the order they happen, and their columns: where a model's time goes.
PHASES: Final = tuple((phase, SAMPLED.index(phase.column)) for phase in ollama.PHASES)
#: The ``--by`` choices: JSONL fields that name a group.
GROUPINGS: Final = ("model", "client", "operation", "endpoint")


_NUMBER: Final = frozenset((int, float))  # by exact class: a bool is no number here


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0-100) of already sorted samples, by the method in the module docstring."""
    n = len(ordered)
    if n == 0:
        return None
    position = (n - 1) * p / 100
    low = math.floor(position)
    if low + 1 >= n:
        return float(ordered[n - 1])
    fraction = position - low
    return ordered[low] + fraction * (ordered[low + 1] - ordered[low])


def _percent(part: int, whole: int) -> float | None:
    return None if whole == 0 else 100 * part / whole


class Group:
    """The exchanges of one group: counts, token sums, and a column of samples per :data:`SAMPLED` field."""

    __slots__ = ("cancelled", "cold_starts", "columns", "errors", "input_tokens", "output_tokens", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.cancelled = 0
        self.cold_starts = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.columns: tuple[array[float], ...] = tuple(array("d") for _ in SAMPLED)

    def add(
        self,
        outcome: str,
        cold_start: bool | None,
        input_tokens: int | None,
        output_tokens: int | None,
        values: Iterable[float | None],
    ) -> None:
        """Count one exchange; ``values`` follow :data:`SAMPLED` (None or NaN: unknown)."""
        self.requests += 1
        if outcome == ERROR:
            self.errors += 1
        elif outcome == CANCELLED:
            self.cancelled += 1
        if cold_start:
            self.cold_starts += 1
        if input_tokens is not None:
            self.input_tokens += input_tokens
        if output_tokens is not None:
            self.output_tokens += output_tokens
        for column, value in zip(self.columns, values, strict=True):
            if value is not None and value == value:  # NaN != NaN
                column.append(value)

    def add_line(self, line: Mapping[str, Any]) -> None:
        """Count one JSONL line (a parsed dict). Values of the wrong type are unknown, like nulls.

        The hot loop of ``otellama report``: it reads a million lines in a few seconds, so it is written
        out rather than built on :meth:`add`.
        """
        self.requests += 1
        outcome = line.get("outcome")
        if outcome == ERROR:
            self.errors += 1
        elif outcome == CANCELLED:
            self.cancelled += 1
        if line.get("cold_start") is True:
            self.cold_starts += 1
        tokens = line.get("input_tokens")
        if tokens.__class__ is int:
            self.input_tokens += tokens
        tokens = line.get("output_tokens")
        if tokens.__class__ is int:
            self.output_tokens += tokens
        for column, name in zip(self.columns, SAMPLED):  # noqa: B905 - both have len(SAMPLED) items
            value = line.get(name)
            if value.__class__ in _NUMBER:
                column.append(value)  # type: ignore[arg-type]  # an int or a float

    def merge(self, other: Group) -> None:
        """Add ``other``'s exchanges to this group."""
        self.requests += other.requests
        self.errors += other.errors
        self.cancelled += other.cancelled
        self.cold_starts += other.cold_starts
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        for mine, theirs in zip(self.columns, other.columns, strict=True):
            mine.extend(theirs)

    def stats(self) -> dict[str, Any]:
        """The group's numbers as JSON-ready data (the ``groups`` items of ``otellama report --json``)."""
        result: dict[str, Any] = {
            "requests": self.requests,
            "errors": self.errors,
            "error_pct": _percent(self.errors, self.requests),
            "cancelled": self.cancelled,
            "cancelled_pct": _percent(self.cancelled, self.requests),
            "cold_starts": self.cold_starts,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }
        for name, index, wanted in REPORTED:
            ordered = sorted(self.columns[index])
            numbers: dict[str, Any] = {"count": len(ordered)}
            for statistic in wanted:
                if statistic == "max":
                    numbers[statistic] = ordered[-1] if ordered else None
                else:
                    numbers[statistic] = percentile(ordered, float(statistic[1:]))
            result[name] = numbers
        result["time_ms"] = {phase.key: math.fsum(self.columns[index]) for phase, index in PHASES}
        return result


class Summary:
    """Exchanges grouped by one JSONL field (:data:`GROUPINGS`); the key None collects "no value"."""

    def __init__(self, by: str = "model") -> None:
        if by not in GROUPINGS:
            raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(GROUPINGS)}")
        self.by = by
        self.groups: dict[str | None, Group] = {}

    def group(self, key: str | None) -> Group:
        """The group named ``key``, created empty the first time."""
        found = self.groups.get(key)
        if found is None:
            found = self.groups[key] = Group()
        return found

    def ordered(self) -> list[tuple[str | None, Group]]:
        """Groups by number of requests, most first, then by name (no value last)."""
        return sorted(
            self.groups.items(), key=lambda item: (-item[1].requests, item[0] is None, item[0] or "")
        )

    def total(self) -> Group:
        """Every exchange in one group."""
        everything = Group()
        for group in self.groups.values():
            everything.merge(group)
        return everything

    def to_json(self) -> dict[str, Any]:
        """``{"by", "groups": [{"group": name, ...stats}], "total": {...stats}}``."""
        groups = [{"group": key, **group.stats()} for key, group in self.ordered()]
        # With one group the total is that group: no need to sort its samples again.
        total = {**groups[0], "group": None} if len(groups) == 1 else {"group": None, **self.total().stats()}
        return {"by": self.by, "groups": groups, "total": total}
