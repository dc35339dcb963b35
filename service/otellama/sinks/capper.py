"""The cap on distinct label values: the first :data:`LIMIT` values of an attribute are kept, later
newcomers become :data:`OVERFLOW`.

A client inventing model or client names must not be able to grow the metric store, a Prometheus scrape or
the stats window without bound. Every sink that groups by a value taken from a request caps it here.
"""

from __future__ import annotations

import threading
from typing import Final

#: Distinct values kept per attribute.
LIMIT: Final = 100
#: What a value past the limit is counted as.
OVERFLOW: Final = "other"


class Capper:
    """Keeps at most ``limit`` distinct values per attribute key; later newcomers become ``other``."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, value: str) -> str:
        seen = self._seen.get(key)
        if seen is not None and value in seen:
            return value  # the common case, without the lock: sets are safe to read while another adds
        with self._lock:
            seen = self._seen.setdefault(key, set())
            if value in seen:
                return value
            if len(seen) >= self.limit:
                return OVERFLOW
            seen.add(value)
            return value
