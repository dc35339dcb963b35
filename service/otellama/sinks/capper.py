"""The bounds on label values: each is cut to :data:`LENGTH` characters, and the first :data:`LIMIT` distinct
values of an attribute are kept while later newcomers become :data:`OVERFLOW`.

A client inventing model or client names must not be able to grow the metric store, a Prometheus scrape or
the stats window without bound: the count bounds how many values, the length how long each is (25 model
names of 900 KB once made one scrape 405 MB). Every sink that groups by a value taken from a request or
from Ollama bounds it here.
"""

from __future__ import annotations

import threading
from typing import Final

from otellama.observe.request import clip

#: Distinct values kept per attribute.
LIMIT: Final = 100
#: What a value past the limit is counted as.
OVERFLOW: Final = "other"
#: Longest label value, in characters; longer ones end in ``…`` (the record's cut mark).
LENGTH: Final = 128


def cut(value: str) -> str:
    """``value`` cut to :data:`LENGTH` characters: for labels that need no count cap (``error.type``)."""
    return clip(value, LENGTH)


class Capper:
    """Cuts each value to :data:`LENGTH` and keeps at most ``limit`` distinct values per attribute key;
    later newcomers become ``other``."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, value: str) -> str:
        if len(value) > LENGTH:
            value = cut(value)
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
