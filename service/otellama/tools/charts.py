"""``otellama report --html``: one self-contained page of charts, drawn here as inline SVG.

No script, no stylesheet, font or image from anywhere: the page is one file that opens offline and that a
Content-Security-Policy forbids to load anything. The charts are built from the same
:class:`~otellama.tools.logscan.Scan` as the terminal table, per group (per model by default):

- requests and errors over time (stacked columns: ok, error, cancelled);
- the distribution of time to first token (log scale) and of generation tokens per second, with the p50
  and p95 marked;
- where Ollama's time goes: the share of queue, load, prompt evaluation and generation.

Histograms count from sorted samples with :func:`bisect.bisect_left`, so a million samples cost a sort.
The outermost 0.5 % on each side are folded into the end bins, so one outlier cannot squash the chart.
"""

from __future__ import annotations

import bisect
import datetime as dt
import html
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Final

from otellama.exchange import CANCELLED, ERROR, OK, OUTCOME_CODES
from otellama.observe import ollama, summary
from otellama.tools import terminal
from otellama.tools.logscan import Scan, files_text

#: Groups drawn at most (the most requested); the table lists them all.
MAX_GROUPS: Final = 12
BINS: Final = 28
PHASE_COLOURS: Final = {
    ollama.QUEUE: "#8e6cc4",
    ollama.LOAD: "#e8862a",
    ollama.PROMPT_EVAL: "#3a8fd9",
    ollama.EVAL: "#3aa76d",
}
OUTCOME_COLOURS: Final = {OK: "#3a8fd9", ERROR: "#d64545", CANCELLED: "#e0a030"}
_STEPS: Final = (1, 5, 10, 30, 60, 300, 600, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)

_CSS: Final = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 24px auto; max-width: 1320px; padding: 0 20px; color: #1d232b; background: #f6f7f9; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 4px; }
p.lead, p.note { color: #5a6472; margin: 0 0 12px; }
section.card { background: #fff; border: 1px solid #e1e4e8; border-radius: 8px; padding: 14px 16px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(370px, 1fr)); gap: 14px; }
.grid figure { margin: 0; background: #fff; border: 1px solid #e1e4e8; border-radius: 8px; padding: 10px; }
figcaption { font-weight: 600; margin: 0 0 4px; overflow-wrap: anywhere; }
figcaption span { font-weight: 400; color: #5a6472; }
svg.chart { display: block; max-width: 100%; height: auto; }
svg.wide { width: 100%; }
svg text.halo { fill: #1d232b; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
           fill: #4a5360; }
table { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums;
        background: #fff; }
th, td { padding: 4px 6px; text-align: right; border-bottom: 1px solid #eceef1; white-space: nowrap; }
th { font-weight: 600; color: #4a5360; } th.group, td.group { text-align: left; }
thead tr.top th { border-bottom: none; color: #1d232b; }
td.bad { color: #c23030; font-weight: 600; }
.scroll { overflow-x: auto; border: 1px solid #e1e4e8; border-radius: 8px; }
.legend { display: flex; gap: 16px; flex-wrap: wrap; margin: 2px 0 8px; color: #4a5360; }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px;
            vertical-align: -1px; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _svg(kind: str, label: str, width: int, height: int, body: Sequence[str], *, wide: bool = False) -> str:
    classes = "chart wide" if wide else "chart"
    return (
        f'<svg class="{classes}" data-chart="{_e(kind)}" role="img" aria-label="{_e(label)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">{"".join(body)}</svg>'
    )


def _nice(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value)


def _linear_ticks(high: float, count: int = 4, *, whole: bool = False) -> list[float]:
    """Round ticks from 0 to ``high``; ``whole`` keeps them integers (counts of requests)."""
    step = _nice(high / count)
    if whole:
        step = max(1.0, round(step))
    return [i * step for i in range(int(high / step + 1e-9) + 1)]


def _number(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:g}k" if value % 1000 == 0 else f"{value:,.0f}"
    return f"{value:g}"


# --- histograms -----------------------------------------------------------------------------------------
def _edges(ordered: Sequence[float], log: bool) -> list[float]:
    low = summary.percentile(ordered, 0.5) or 0.0
    high = summary.percentile(ordered, 99.5) or 0.0
    if log:
        low, high = max(low, 1e-3), max(high, 1e-3)
        if high <= low * 1.01:
            low, high = low / 1.5, high * 1.5
        a, b = math.log10(low), math.log10(high)
        return [10 ** (a + (b - a) * i / BINS) for i in range(BINS + 1)]
    if high <= low:
        low, high = low - max(abs(low) * 0.1, 0.5), high + max(abs(high) * 0.1, 0.5)
    return [low + (high - low) * i / BINS for i in range(BINS + 1)]


def _counts(ordered: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Samples per bin; everything below the first edge is in the first bin, above the last in the last."""
    cuts = [0] + [bisect.bisect_left(ordered, edge) for edge in edges[1:-1]] + [len(ordered)]
    return [b - a for a, b in itertools.pairwise(cuts)]


def _log_ticks(low: float, high: float) -> list[float]:
    ticks: list[float] = []
    for power in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        ticks.extend(m * 10**power for m in (1, 2, 5))
    return [t for t in ticks if low <= t <= high]


def _spaced(ticks: Sequence[float], position: Callable[[float], float], room: float = 58) -> list[float]:
    """Ticks at least ``room`` pixels apart, so that their labels never overlap."""
    kept: list[float] = []
    for tick in ticks:
        if not kept or position(tick) - position(kept[-1]) >= room:
            kept.append(tick)
    return kept


def histogram(
    kind: str,
    label: str,
    values: Sequence[float],
    *,
    log: bool,
    unit: Callable[[float], str],
    colour: str,
    tick_format: Callable[[float], str] | None = None,
    width: int = 360,
    height: int = 190,
) -> str:
    """A histogram of ``values`` with the p50 and p95 marked; ``tick_format`` labels the x axis (default
    ``unit``)."""
    ordered = sorted(values)
    left, right, top, bottom = 44, 12, 18, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    body: list[str] = []
    if not ordered:
        body.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no samples</text>')
        return _svg(kind, label, width, height, body)
    edges = _edges(ordered, log)
    counts = _counts(ordered, edges)
    peak = max(counts) or 1
    y_top = max(_nice(peak), 2.0)
    scale = (lambda v: math.log10(max(v, 1e-12))) if log else (lambda v: v)
    x0, x1 = scale(edges[0]), scale(edges[-1])

    def x(value: float) -> float:
        return left + (scale(value) - x0) / (x1 - x0) * plot_w

    def y(value: float) -> float:
        return top + plot_h - value / y_top * plot_h

    for tick in _linear_ticks(y_top, whole=True):
        body.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eceef1"/>'
        )
        body.append(f'<text x="{left - 5}" y="{y(tick) + 4:.1f}" text-anchor="end">{_number(tick)}</text>')
    bar_w = plot_w / len(counts)
    for i, n in enumerate(counts):
        if n:
            h = max(n / y_top * plot_h, 1.0)
            body.append(
                f'<rect class="bar" x="{left + i * bar_w + 0.5:.1f}" y="{top + plot_h - h:.1f}" '
                f'width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{_e(unit(edges[i]))} to {_e(unit(edges[i + 1]))}: {n:,}</title></rect>"
            )
    ticks = _log_ticks(edges[0], edges[-1]) if log else _linear_ticks(edges[-1] - edges[0])
    if not log:
        base = edges[0]
        step = _nice((edges[-1] - edges[0]) / 4)
        ticks = [math.ceil(base / step) * step + i * step for i in range(6)]
        ticks = [t for t in ticks if edges[0] <= t <= edges[-1]]
    for tick in _spaced(ticks, x):
        body.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
            'stroke="#8a93a0"/>'
        )
        body.append(
            f'<text x="{x(tick):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
            f"{_e((tick_format or unit)(tick))}</text>"
        )
    body.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#8a93a0"/>'
    )
    for name, p, dash in (("p50", 50.0, "4 3"), ("p95", 95.0, "2 2")):
        value = summary.percentile(ordered, p)
        if value is None:
            continue
        px = min(max(x(value), left), left + plot_w)
        body.append(
            f'<line class="marker" x1="{px:.1f}" x2="{px:.1f}" y1="{top - 2}" y2="{top + plot_h}" '
            f'stroke="#1d232b" stroke-dasharray="{dash}"/>'
        )
        anchor = "end" if px > left + plot_w * 0.8 else "start"
        shift = -3 if anchor == "end" else 3
        body.append(
            f'<text x="{px + shift:.1f}" y="{top + 8 if name == "p50" else top + 20}" '
            f'text-anchor="{anchor}" class="halo">{name} {_e(unit(value))}</text>'
        )
    return _svg(kind, label, width, height, body)


# --- where the time goes --------------------------------------------------------------------------------
def phase_split(groups: Sequence[tuple[str, summary.Group]], width: int = 1100) -> str:
    """Per group, a bar split into the shares of queue, load, prompt evaluation and generation."""
    row_h, gap, left, right, top = 26, 12, 190, 130, 8
    rows = [(name, [(phase, math.fsum(g.columns[i])) for phase, i in summary.PHASES]) for name, g in groups]
    rows = [(name, phases) for name, phases in rows if sum(v for _, v in phases) > 0]
    height = top + max(len(rows), 1) * (row_h + gap) + 20
    plot_w = width - left - right
    body: list[str] = []
    if not rows:
        body.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no Ollama timings</text>')
    for r, (name, phases) in enumerate(rows):
        y = top + r * (row_h + gap)
        total = sum(v for _, v in phases)
        body.append(
            f'<text x="{left - 8}" y="{y + row_h / 2 + 4}" text-anchor="end">{_e(_clip(name, 28))}</text>'
        )
        cursor = float(left)
        for phase, value in phases:
            if value <= 0:
                continue
            w = value / total * plot_w
            share = 100 * value / total
            body.append(
                f'<rect class="bar" x="{cursor:.1f}" y="{y}" width="{max(w, 0.8):.1f}" height="{row_h}" '
                f'fill="{PHASE_COLOURS[phase]}"><title>{_e(phase.label)}: {share:.1f} % '
                f"({_e(terminal.duration(value))} in all)</title></rect>"
            )
            text = f"{phase.label} {share:.0f} %"
            if w > len(text) * 6.6 + 10:
                body.append(
                    f'<text x="{cursor + 6:.1f}" y="{y + row_h / 2 + 4}" style="fill:#fff">{_e(text)}</text>'
                )
            cursor += w
        body.append(
            f'<text x="{left + plot_w + 8}" y="{y + row_h / 2 + 4}">{_e(terminal.duration(total))} '
            "in all</text>"
        )
    axis_y = top + len(rows) * (row_h + gap)
    for pct in (0, 25, 50, 75, 100):
        x = left + plot_w * pct / 100
        body.append(f'<text x="{x:.1f}" y="{axis_y + 8}" text-anchor="middle">{pct} %</text>')
    return _svg("phases", "share of Ollama's time per phase", width, height, body, wide=True)


def _clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


# --- over time ------------------------------------------------------------------------------------------
def timeline(scan: Scan, width: int = 1100, height: int = 230) -> str:
    """Requests per time bucket, stacked by outcome."""
    left, right, top, bottom = 52, 16, 12, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    body: list[str] = []
    if not scan.times:
        body.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no exchanges</text>')
        return _svg("timeline", "requests over time", width, height, body, wide=True)
    first, last = min(scan.times), max(scan.times)
    step = next((s for s in _STEPS if (last - first) / s <= 90), _STEPS[-1])
    origin = math.floor(first / step) * step
    buckets = int((last - origin) // step) + 1
    counts = [[0, 0, 0] for _ in range(buckets)]
    for when, code in zip(scan.times, scan.outcomes, strict=True):
        counts[int((when - origin) // step)][code] += 1
    peak = max(sum(c) for c in counts)
    y_top = max(_nice(peak), 2.0)

    def y(value: float) -> float:
        return top + plot_h - value / y_top * plot_h

    for tick in _linear_ticks(y_top, whole=True):
        body.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eceef1"/>'
        )
        body.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{_number(tick)}</text>')
    bar_w = plot_w / buckets
    names = {code: name for name, code in OUTCOME_CODES.items()}
    for i, bucket in enumerate(counts):
        base = 0
        start = dt.datetime.fromtimestamp(origin + i * step).astimezone()
        for code in (0, 2, 1):
            n = bucket[code]
            if not n:
                continue
            x = left + i * bar_w
            h = max(n / y_top * plot_h, 1.0)
            body.append(
                f'<rect class="bar" x="{x + 0.5:.1f}" y="{y(base) - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="{OUTCOME_COLOURS[names[code]]}"><title>{start:%Y-%m-%d %H:%M:%S}: '
                f"{n:,} {names[code]}</title></rect>"
            )
            base += n
    labels = max(1, math.ceil(buckets / 9))
    shown_day = None
    for i in range(0, buckets, labels):
        moment = dt.datetime.fromtimestamp(origin + i * step).astimezone()
        if step >= 86400:
            text = moment.strftime("%Y-%m-%d")
        else:
            text = moment.strftime("%H:%M:%S" if step < 60 else "%H:%M")
            if (i > 0 and moment.date() != shown_day) or (i == 0 and first // 86400 != last // 86400):
                text = moment.strftime("%m-%d ") + text
            shown_day = moment.date()
        x = left + (i + 0.5) * bar_w
        body.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_e(text)}</text>')
    body.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#8a93a0"/>'
    )
    every = terminal.duration(step * 1000).replace(".00", "")
    body.append(
        f'<text x="{left + plot_w}" y="{top + plot_h + 30}" text-anchor="end">one column = {_e(every)}</text>'
    )
    return _svg("timeline", "requests over time, by outcome", width, height, body, wide=True)


# --- the page -------------------------------------------------------------------------------------------
def _legend(items: Sequence[tuple[str, str]]) -> str:
    return (
        '<div class="legend">'
        + "".join(f'<span><i style="background:{c}"></i>{_e(n)}</span>' for n, c in items)
        + "</div>"
    )


def _table(scan: Scan) -> str:
    data = scan.summary.to_json()
    rows = [*data["groups"], *([data["total"]] if len(data["groups"]) > 1 else [])]
    d, r = terminal.duration, terminal.rate
    head = (
        '<thead><tr class="top"><th></th><th colspan="3">requests</th>'
        '<th colspan="3">time to first token</th><th colspan="2">generation tok/s</th>'
        '<th>prompt tok/s</th><th colspan="2">load time</th><th>cold</th>'
        '<th>queue</th><th colspan="3">end to end</th><th colspan="2">tokens</th></tr>'
        f'<tr><th class="group">{_e(data["by"])}</th><th>n</th><th>error</th><th>cancelled</th>'
        "<th>p50</th><th>p95</th><th>p99</th><th>p50</th><th>p95</th><th>p50</th><th>p50</th><th>max</th>"
        "<th>starts</th><th>p95</th><th>p50</th><th>p95</th><th>p99</th><th>in</th><th>out</th></tr></thead>"
    )
    lines = []
    for row in rows:
        name = "all" if row is data["total"] else row["group"] or f"(no {data['by']})"
        error_class = ' class="bad"' if row["errors"] else ""
        cells = [
            f'<td class="group">{_e(name)}</td>',
            f"<td>{row['requests']:,}</td>",
            f"<td{error_class}>{_e(terminal.percent(row['error_pct']))}</td>",
            f"<td>{_e(terminal.percent(row['cancelled_pct']))}</td>",
            *(f"<td>{_e(d(row['ttft_ms'][p]))}</td>" for p in ("p50", "p95", "p99")),
            *(f"<td>{_e(r(row['tokens_per_second'][p]))}</td>" for p in ("p50", "p95")),
            f"<td>{_e(r(row['prompt_tokens_per_second']['p50']))}</td>",
            *(f"<td>{_e(d(row['load_time_ms'][p]))}</td>" for p in ("p50", "max")),
            f"<td>{row['cold_starts']:,}</td>",
            f"<td>{_e(d(row['queue_time_ms']['p95']))}</td>",
            *(f"<td>{_e(d(row['duration_ms'][p]))}</td>" for p in ("p50", "p95", "p99")),
            f'<td title="{row["input_tokens"]:,}">{_compact(row["input_tokens"])}</td>',
            f'<td title="{row["output_tokens"]:,}">{_compact(row["output_tokens"])}</td>',
        ]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table>{head}<tbody>{"".join(lines)}</tbody></table></div>'


def page(scan: Scan, title: str = "otellama report") -> str:
    """The whole page."""
    by = scan.summary.by
    groups = [(key or f"(no {by})", group) for key, group in scan.summary.ordered()][:MAX_GROUPS]
    span = ""
    if scan.first is not None and scan.last is not None:
        first = dt.datetime.fromtimestamp(scan.first).astimezone()
        last = dt.datetime.fromtimestamp(scan.last).astimezone()
        span = f" from {first:%Y-%m-%d %H:%M:%S} to {last:%Y-%m-%d %H:%M:%S %Z}"
    files = files_text(scan.files)
    corrupt = f"; {scan.corrupt:,} corrupt lines skipped" if scan.corrupt else ""
    more = len(scan.summary.groups) - len(groups)
    omitted = (
        f" The charts show the {MAX_GROUPS} busiest groups; {more} more are in the table." if more > 0 else ""
    )
    ttft = [
        _figure(name, f"{len(g.columns[summary.TTFT]):,} streamed", histogram(
            "ttft", f"time to first token, {name}", g.columns[summary.TTFT], log=True,
            unit=terminal.duration, colour="#3a8fd9", tick_format=_tick_duration))
        for name, g in groups
        if g.columns[summary.TTFT]
    ]  # fmt: skip
    tps = [
        _figure(name, f"{len(g.columns[summary.TPS]):,} generations", histogram(
            "tokens_per_second", f"generation tokens per second, {name}", g.columns[summary.TPS], log=False,
            unit=_per_second, colour="#3aa76d", tick_format=_per_second_tick))
        for name, g in groups
        if g.columns[summary.TPS]
    ]  # fmt: skip
    none = '<p class="note">No samples in this log.</p>'
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'\">",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{_e(title)}</h1>",
            f'<p class="lead">{scan.matched:,} exchanges{_e(span)}, by {_e(by)}. '
            f"Read {scan.lines:,} lines from {_e(files)}{_e(corrupt)}.{_e(omitted)}</p>",
            _table(scan),
            "<h2>Requests over time</h2>",
            _legend([(name, OUTCOME_COLOURS[name]) for name in (OK, CANCELLED, ERROR)]),
            f'<section class="card">{timeline(scan)}</section>',
            "<h2>Time to first token</h2>",
            '<p class="note">Streamed requests: request to first content, log scale; dashed lines mark p50 '
            "and p95.</p>",
            f'<div class="grid">{"".join(ttft)}</div>' if ttft else none,
            "<h2>Generation speed</h2>",
            '<p class="note">Tokens per second while generating (Ollama\'s eval_count / eval_duration).</p>',
            f'<div class="grid">{"".join(tps)}</div>' if tps else none,
            "<h2>Where Ollama's time goes</h2>",
            '<p class="note">Share of Ollama\'s reported time spent waiting for a slot, loading the model, '
            "evaluating the prompt and generating.</p>",
            _legend([(p.label, PHASE_COLOURS[p]) for p, _ in summary.PHASES]),
            f'<section class="card">{phase_split(groups)}</section>',
            f'<p class="note">Made by otellama at {dt.datetime.now().astimezone():%Y-%m-%d %H:%M:%S %Z}.</p>',
            "</body></html>",
        ]
    )


def _figure(name: str, note: str, chart: str) -> str:
    return f"<figure><figcaption>{_e(name)} <span>{_e(note)}</span></figcaption>{chart}</figure>"


def _compact(value: int) -> str:
    """``950``, ``54.1 k``, ``135.0 M``: token sums fit a table cell."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if value >= size:
            return f"{value / size:,.1f} {suffix}"
    return f"{value:,}"


def _tick_duration(ms: float) -> str:
    """Axis labels at round values: ``20 ms``, ``1 s``, ``2.5 s``."""
    return f"{ms:g} ms" if ms < 1000 else f"{ms / 1000:g} s"


def _per_second_tick(value: float) -> str:
    return f"{value:.6g}/s"


def _per_second(value: float) -> str:
    return f"{value:,.0f}/s" if value >= 10 else f"{value:.1f}/s"
