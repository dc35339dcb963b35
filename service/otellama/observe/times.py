"""Times as people write them (``15m``, ``2026-08-01T14:00Z``) and as the log writes them (ISO 8601 UTC).

Shared by ``otellama report``, ``otellama replay`` and ``GET /otellama/stats?window=``.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Final

_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class TimeError(ValueError):
    """A time that cannot be read; the message says which forms can."""


def parse_time(text: str, now: float | None = None) -> float:
    """``--since``/``--until`` as Unix seconds: a duration back from ``now`` or a timestamp."""
    value = text.strip()
    now = time.time() if now is None else now
    compact = value.replace(" ", "").lower()
    if compact and _DURATION.sub("", compact) == "":
        return now - sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(compact))
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TimeError(
            f"cannot read the time {text!r}: give a duration back from now (15m, 1h, 2d, 1h30m) "
            "or a timestamp (2026-08-01, 2026-08-01T14:00, 2026-08-01T14:00:00Z)"
        ) from None
    return when.timestamp()  # a naive timestamp is local time, as datetime takes it


def iso(seconds: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC, to the microsecond, like the log's ``timestamp``."""
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="microseconds")
