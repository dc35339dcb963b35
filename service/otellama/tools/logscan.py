"""Reading the JSONL log back: which files, which lines, grouped how.

:func:`scan` reads log files line by line (a million lines in a few seconds: each line is parsed with orjson
straight into :class:`~otellama.observe.summary.Group` columns, no :class:`~otellama.observe.record.Record` is
built), keeps the lines inside the time window and filters, and counts what it had to skip: a line that is not
JSON (a crash mid-write, a hand edit) or not an otellama record is skipped and counted, never fatal. The
statistics are :mod:`otellama.observe.summary`'s. ``otellama report``, its HTML page and ``otellama replay``
all read the log through this module.

Times: ``--since``/``--until`` take a duration back from now (``90s``, ``15m``, ``1h``, ``2d``, ``1w``,
``1h30m``) or a timestamp (``2026-08-01``, ``2026-08-01T14:00``, ``2026-08-01 14:00:00+02:00``; without an
offset it is local time). A line belongs to the window by its ``timestamp``, the start of the exchange.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import multiprocessing
import os
import re
import threading
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Final

import orjson

from otellama.exchange import OUTCOME_CODES
from otellama.observe import summary
from otellama.observe.times import TimeError, iso, parse_time
from otellama.settings import Settings, UserError
from otellama.sinks.jsonlog import JsonLog


class ReportError(UserError):
    """Something the user can fix (a bad time, a missing file); the message says what to do."""


def read_time(text: str, now: float) -> float:
    """``--since``/``--until`` as Unix seconds, or a :class:`ReportError` saying what times look like."""
    try:
        return parse_time(text, now)
    except TimeError as exc:
        raise ReportError(str(exc)) from None


def log_files(settings: Settings) -> list[Path]:
    """The configured log and its rotated backups that exist, oldest first (time order)."""
    if settings.log_file is None:
        raise ReportError("the JSONL log is off (OTELLAMA_LOG_FILE=off): name the log files to read")
    files = JsonLog(settings.log_file, backups=settings.log_backups).files()
    if not files:
        raise ReportError(
            f"no log at {settings.log_file} (set by OTELLAMA_LOG_FILE): run 'otellama serve' and send it "
            "some requests, or name the log files to read"
        )
    return files


_ROTATED: Final = re.compile(r"^(?P<base>.+)\.(?P<n>\d+)$")


def time_order(paths: Sequence[Path]) -> list[Path]:
    """``paths`` with rotated files oldest first: ``x.jsonl.10`` … ``x.jsonl.2``, ``x.jsonl.1``, ``x.jsonl``.

    A shell glob (``logs/otellama.jsonl*``) lists them in name order instead; other files keep their place
    relative to each other.
    """

    def key(path: Path) -> tuple[str, int]:
        found = _ROTATED.match(path.name)
        if found is None:
            return str(path), 0
        return str(path.with_name(found["base"])), -int(found["n"])

    return sorted(paths, key=key)


def files_text(files: Sequence[Path]) -> str:
    if len(files) <= 3:
        return ", ".join(str(f) for f in files)
    return f"{len(files)} files, {files[0]} … {files[-1]}"


@dataclasses.dataclass(frozen=True)
class Window:
    """Which lines count: a time window (Unix seconds, ``since <= start < until``) and name patterns.

    Model and client patterns are shell-style (``llama*``); a line matches if any pattern does.
    """

    since: float | None = None
    until: float | None = None
    models: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()

    def names(self, line: Mapping[str, Any]) -> bool:
        return _matches(line.get("model"), self.models) and _matches(line.get("client"), self.clients)


def _matches(value: object, patterns: Sequence[str]) -> bool:
    if not patterns:
        return True
    return isinstance(value, str) and any(fnmatch.fnmatchcase(value, p) for p in patterns)


def start_of(line: Mapping[str, Any]) -> float | None:
    """When the exchange started, in Unix seconds: ``trace.start_ns``, else the ``timestamp``."""
    trace = line.get("trace")
    if isinstance(trace, dict):
        start = trace.get("start_ns")
        if isinstance(start, int):
            return start / 1e9
    stamp = line.get("timestamp")
    if isinstance(stamp, str):
        try:
            return dt.datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            return None
    return None


@dataclasses.dataclass
class Scan:
    """What :func:`scan` found. ``times``/``outcomes`` (start and outcome code of each matched exchange,
    in file order) are only kept when asked for, for the HTML page's timeline."""

    summary: summary.Summary
    files: list[Path]
    window: Window
    lines: int = 0
    matched: int = 0
    corrupt: int = 0
    first: float | None = None
    last: float | None = None
    times: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    outcomes: array[int] = dataclasses.field(default_factory=lambda: array("b"))

    def merge(self, other: Scan) -> None:
        """Add what ``other`` (another part of the log, same grouping) found."""
        self.lines += other.lines
        self.matched += other.matched
        self.corrupt += other.corrupt
        for key, group in other.summary.groups.items():
            self.summary.group(key).merge(group)
        if other.first is not None and other.last is not None:
            self.first = other.first if self.first is None else min(self.first, other.first)
            self.last = other.last if self.last is None else max(self.last, other.last)
        self.times.extend(other.times)
        self.outcomes.extend(other.outcomes)

    def to_json(self) -> dict[str, Any]:
        """``otellama report --json``: the summary plus what was read."""
        return {
            "files": [str(path) for path in self.files],
            "since": iso(self.window.since),
            "until": iso(self.window.until),
            "first": iso(self.first),
            "last": iso(self.last),
            "lines": self.lines,
            "exchanges": self.matched,
            "corrupt": self.corrupt,
            **self.summary.to_json(),
        }


def lines_of(files: Sequence[Path], on_bytes: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """Every non-blank line of ``files``, in order, without its newline. ``on_bytes`` hears progress."""
    for path in files:
        with path.open("rb") as stream:
            for line in stream:
                if on_bytes is not None:
                    on_bytes(len(line))
                stripped = line.strip()
                if stripped:
                    yield stripped


def parse(line: bytes) -> dict[str, Any] | None:
    """A log line as a dict, or None when it is not JSON or not an otellama record."""
    try:
        parsed = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if parsed.__class__ is not dict or "outcome" not in parsed:
        return None
    return parsed


#: Logs at least this big are read by several processes at once, in parts of at least ``PART_BYTES``.
PARALLEL_BYTES: Final = 64 << 20
PART_BYTES: Final = 16 << 20


def scan(
    files: Sequence[Path],
    by: str = "model",
    window: Window | None = None,
    *,
    timeline: bool = False,
    workers: int | None = None,
    part_bytes: int = PART_BYTES,
    parallel_bytes: int = PARALLEL_BYTES,
) -> Scan:
    """Read ``files`` (oldest first) into a :class:`Scan`. Unreadable files raise :class:`ReportError`.

    A big log is cut into parts at line boundaries and read by ``workers`` processes (default: one per
    core), whose groups are then merged; the result is the same as reading it in one go. Processes are
    forked, so only a single-threaded caller (the command line) gets them; anything else reads serially.
    """
    window = window or Window()
    result = Scan(summary.Summary(by), list(files), window)
    parts: list[tuple[Path, int, int]] = []
    for path in files:
        try:
            status = path.stat()
        except OSError as exc:
            raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
        if window.since is not None and status.st_mtime < window.since:
            continue  # written to last before the window opened: every line in it started earlier
        parts.extend(
            (path, start, min(start + part_bytes, status.st_size))
            for start in range(0, max(status.st_size, 1), part_bytes)
        )
    total = sum(end - start for _, start, end in parts)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    parallel = (
        workers > 1
        and total >= parallel_bytes
        and threading.active_count() == 1
        and "fork" in multiprocessing.get_all_start_methods()
    )
    if parallel:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            found = list(
                pool.map(
                    _scan_part, *zip(*[(p, a, b, by, window, timeline) for p, a, b in parts], strict=True)
                )
            )
    else:
        found = [_scan_part(path, start, end, by, window, timeline) for path, start, end in parts]
    for part in found:
        result.merge(part)
    return result


def _scan_part(path: Path, start: int, end: int, by: str, window: Window, timeline: bool) -> Scan:
    """Read the lines of ``path`` that start in bytes ``[start, end)``."""
    result = Scan(summary.Summary(by), [path], window)
    groups = result.summary.groups
    since = window.since if window.since is not None else float("-inf")
    until = window.until if window.until is not None else float("inf")
    named = bool(window.models or window.clients)
    codes = OUTCOME_CODES
    first, last = float("inf"), float("-inf")
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    with stream:
        position = start
        if start > 0:
            stream.seek(start - 1)
            position += len(stream.readline()) - 1  # the line under way belongs to the part before
        for raw in stream:
            if position >= end:
                break
            position += len(raw)
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                if raw.strip():
                    result.lines += 1
                    result.corrupt += 1
                continue
            result.lines += 1
            if line.__class__ is not dict or "outcome" not in line:
                result.corrupt += 1
                continue
            start_s = start_of(line)
            if start_s is None:
                result.corrupt += 1
                continue
            if not since <= start_s < until or (named and not window.names(line)):
                continue
            key = line.get(by)
            if key is not None and key.__class__ is not str:
                key = str(key)
            group = groups.get(key)
            if group is None:
                group = groups[key] = summary.Group()
            group.add_line(line)
            result.matched += 1
            if start_s < first:
                first = start_s
            if start_s > last:
                last = start_s
            if timeline:
                result.times.append(start_s)
                result.outcomes.append(codes.get(line["outcome"], 1))
    if result.matched:
        result.first, result.last = first, last
    return result
