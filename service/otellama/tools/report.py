"""``otellama report``: what the JSONL log says, per model (or client, operation, endpoint), in the terminal.

The log is read by :mod:`otellama.tools.logscan`; this module prints what it found: a table per group, or
JSON, or (``--html``) the page drawn by :mod:`otellama.tools.charts`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import orjson

from otellama.settings import Settings
from otellama.tools import terminal
from otellama.tools.logscan import (
    ReportError,
    Scan,
    Window,
    files_text,
    log_files,
    read_time,
    scan,
    time_order,
)

# --- the table ------------------------------------------------------------------------------------------
_COLUMNS: Final = ("p50", "p95", "p99", "max")


def _rows(stats: Mapping[str, Any]) -> list[tuple[str, dict[str, str]]]:
    def cells(name: str, fmt: Callable[[float | None], str]) -> dict[str, str]:
        numbers = stats[name]
        return {k: fmt(v) for k, v in numbers.items() if k != "count"}

    return [
        ("time to first token", cells("ttft_ms", terminal.duration)),
        ("generation tokens/s", cells("tokens_per_second", terminal.rate)),
        ("prompt tokens/s", cells("prompt_tokens_per_second", terminal.rate)),
        ("load time", cells("load_time_ms", terminal.duration)),
        ("queue time", cells("queue_time_ms", terminal.duration)),
        ("end to end", cells("duration_ms", terminal.duration)),
    ]


def group_table(name: str, stats: Mapping[str, Any], style: terminal.Style) -> str:
    """One group's table: counts on top, then a row per measure with its percentiles."""
    errors = f"errors {stats['errors']:,} ({terminal.percent(stats['error_pct'])})"
    cancelled = f"cancelled {stats['cancelled']:,} ({terminal.percent(stats['cancelled_pct'])})"
    lines = [
        style(name, "bold"),
        f"  requests {stats['requests']:,}   "
        + (style(errors, "red") if stats["errors"] else errors)
        + "   "
        + (style(cancelled, "yellow") if stats["cancelled"] else cancelled)
        + f"   cold starts {stats['cold_starts']:,}",
        style(f"  {'':<22}" + "".join(f"{c:>11}" for c in _COLUMNS), "dim"),
    ]
    for label, cells in _rows(stats):
        if all(value == "-" for value in cells.values()):
            continue  # nothing measured (embeddings have no tokens/s, /api/tags no Ollama timings)
        lines.append((f"  {label:<22}" + "".join(f"{cells.get(c, ''):>11}" for c in _COLUMNS)).rstrip())
    lines.append(f"  {'tokens':<22}{stats['input_tokens']:>11,} in, {stats['output_tokens']:,} out")
    return "\n".join(lines)


def table(result: Scan, style: terminal.Style | None = None) -> str:
    """The whole report as text: a heading, a table per group, and the total when there are several."""
    style = style or terminal.Style(False)
    data = result.summary.to_json()
    heading = f"{result.matched:,} exchanges"
    if result.first is not None and result.last is not None:
        heading += f" from {_local(result.first)} to {_local(result.last)}"
    heading += f", by {data['by']}"
    parts = [style(heading, "bold")]
    skipped = f"; {result.corrupt:,} corrupt lines skipped" if result.corrupt else ""
    parts.append(style(f"read {result.lines:,} lines from {files_text(result.files)}{skipped}", "dim"))
    if not data["groups"]:
        parts.append("\nno exchanges match" + _filters(result.window))
        return "\n".join(parts) + "\n"
    for item in data["groups"]:
        parts.append("")
        parts.append(group_table(item["group"] or f"(no {data['by']})", item, style))
    if len(data["groups"]) > 1:
        parts.append("")
        parts.append(group_table("all", data["total"], style))
    return "\n".join(parts) + "\n"


def _local(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _filters(window: Window) -> str:
    said = [
        f"since {_local(window.since)}" if window.since is not None else "",
        f"until {_local(window.until)}" if window.until is not None else "",
        f"model {' or '.join(window.models)}" if window.models else "",
        f"client {' or '.join(window.clients)}" if window.clients else "",
    ]
    shown = ", ".join(s for s in said if s)
    return f" ({shown})" if shown else ""


# --- the command ----------------------------------------------------------------------------------------
def run(
    files: Sequence[str],
    *,
    since: str | None = None,
    until: str | None = None,
    models: Sequence[str] = (),
    clients: Sequence[str] = (),
    by: str = "model",
    as_json: bool = False,
    html: str | None = None,
    out: TextIO,
    err: TextIO,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``otellama report``; returns the exit code (0 printed, 2 nothing could be read)."""
    now = time.time()
    window = Window(
        since=read_time(since, now) if since else None,
        until=read_time(until, now) if until else None,
        models=tuple(models),
        clients=tuple(clients),
    )
    paths = time_order([Path(f) for f in files]) if files else log_files(Settings.from_env(environ))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ReportError(f"no such log file: {', '.join(missing)}")
    result = scan(paths, by, window, timeline=html is not None)
    if result.corrupt:
        err.write(f"otellama report: skipped {result.corrupt:,} corrupt or foreign lines\n")
    if html is not None:
        from otellama.tools import charts

        target = Path(html)
        try:
            target.write_text(charts.page(result), encoding="utf-8")
        except OSError as exc:
            raise ReportError(f"cannot write {target}: {exc.strerror or exc}") from None
        err.write(f"otellama report: wrote {target}\n")
    if as_json:
        out.write(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(table(result, terminal.Style.for_stream(out)))
    return 0
