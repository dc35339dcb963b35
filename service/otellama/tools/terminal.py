"""Drawing for the terminal: colours (only on a terminal), numbers, a progress bar, an exchange's waterfall.

Colours follow the common conventions: on when the stream is a terminal, off when ``NO_COLOR`` is set or
``TERM=dumb``, forced on by ``FORCE_COLOR``. Bars use Unicode block characters when the stream can encode
them and ``#`` otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Final, TextIO

_CODES: Final = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "cyan": "36",
}
_EIGHTHS: Final = " ▏▎▍▌▋▊▉█"


def colour_enabled(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether to colour output written to ``stream``."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and env.get("TERM") != "dumb"


def unicode_enabled(stream: TextIO) -> bool:
    """Whether ``stream`` can take block characters (a stream without an encoding takes any text)."""
    encoding = getattr(stream, "encoding", None)
    if encoding is None:
        return True
    try:
        "█▏·─░".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class Style:
    """Wraps text in ANSI colours when enabled, and leaves it alone when not."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: TextIO) -> Style:
        return cls(colour_enabled(stream))

    def __call__(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles:
            return text
        codes = ";".join(_CODES[s] for s in styles)
        return f"\x1b[{codes}m{text}\x1b[0m"


# --- numbers --------------------------------------------------------------------------------------------
def duration(ms: float | None) -> str:
    """Milliseconds for people: ``0.42 ms``, ``145 ms``, ``2.40 s``, ``3.5 min``, ``2.1 h``; ``-`` if None."""
    if ms is None:
        return "-"
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    if ms < 3_600_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:,.1f} h"


def rate(value: float | None) -> str:
    """Tokens per second: ``148.2``; ``-`` for unknown."""
    return "-" if value is None else f"{value:,.1f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} %"


# --- progress -------------------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar redrawn in place on a terminal; silent anywhere else.

    Redraws at most every ``every`` seconds, so calling :meth:`update` per item costs next to nothing.
    """

    def __init__(
        self, stream: TextIO, total: int, label: str, *, every: float = 0.1, width: int = 30
    ) -> None:
        isatty = getattr(stream, "isatty", None)
        self.active = bool(isatty and isatty()) and total > 0
        self.stream, self.total, self.label, self.every, self.width = stream, total, label, every, width
        self._next = 0.0
        self._full, self._empty = ("█", "·") if unicode_enabled(stream) else ("#", "-")

    def update(self, done: int, note: str = "") -> None:
        if not self.active:
            return
        now = time.monotonic()
        if now < self._next and done < self.total:
            return
        self._next = now + self.every
        share = min(1.0, done / self.total)
        filled = round(share * self.width)
        drawn = self._full * filled + self._empty * (self.width - filled)
        self.stream.write(f"\r{self.label} [{drawn}] {share:4.0%} {note}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """Erase the bar, leaving the line free for the summary."""
        if self.active:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# --- one exchange, to scale -----------------------------------------------------------------------------
def bar(start: float, end: float, width: int, *, fine: bool = True, fill: str = "█") -> str:
    """A bar from ``start`` to ``end`` (fractions of the axis) on ``width`` cells, to 1/8 cell with Unicode.

    A phase too short to fill an eighth still gets the thinnest mark, so that it can be seen to exist.
    """
    start, end = max(0.0, min(1.0, start)), max(0.0, min(1.0, end))
    if not fine:
        first, last = round(start * width), max(round(end * width), round(start * width) + 1)
        return (" " * first + "#" * (last - first)).ljust(width)[:width]
    begin = int(start * width)
    eighths = max(1, round((end - start) * width * 8))
    full, part = divmod(eighths, 8)
    drawn = fill * full + (_EIGHTHS[part] if part else "")
    return (" " * begin + drawn).ljust(width)[: max(width, begin + 1)]


def waterfall(
    title: str,
    total_ms: float,
    phases: Sequence[tuple[str, float, float]],
    *,
    width: int = 48,
    fine: bool = True,
    style: Style | None = None,
) -> str:
    """An exchange's phases drawn to scale: ``phases`` are (label, start_ms, end_ms) from its start."""
    style = style or Style(False)
    label_width = max([len("exchange"), *(len(label) for label, _, _ in phases)]) + 2
    axis = max(total_ms, 1e-9)
    colours = ("dim", "yellow", "cyan", "green", "blue")
    lines = [title]
    exchange = bar(0.0, 1.0, width, fine=fine, fill="░" if fine else "#")
    lines.append(f"  {'exchange':<{label_width}}{style(exchange, 'dim')}  {duration(total_ms):>9}")
    for i, (label, start, end) in enumerate(phases):
        drawn = style(bar(start / axis, end / axis, width, fine=fine), colours[(i + 1) % len(colours)])
        lines.append(f"  {label:<{label_width}}{drawn}  {duration(end - start):>9}")
    ruler = "─" if fine else "-"
    left, right = "0 ms", duration(total_ms)
    lines.append(f"  {'':<{label_width}}{left}{ruler * max(1, width - len(left) - len(right) - 1)} {right}")
    return "\n".join(lines)
