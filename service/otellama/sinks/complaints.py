"""A failure that repeats is logged once a minute, not once per occurrence.

A dead collector or a full disk fails every exchange; a warning for each would bury the log (and cost the
proxy a write per exchange). Each sink that can fail keeps a :class:`Complaints` and tells it every time;
it logs the first time, then at most once per ``every`` seconds until :meth:`Complaints.recovered`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

#: Seconds between two warnings about the same failure.
EVERY: Final = 60.0


class Complaints:
    """Rate-limits warnings about one kind of failure to ``logger``. Thread-safe."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        every: float = EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every = every
        self._clock = clock
        self._last = float("-inf")
        self._lock = threading.Lock()

    def __call__(self, message: str, *args: object) -> bool:
        """Warn, unless a warning went out less than ``every`` seconds ago. True when it was logged."""
        now = self._clock()
        with self._lock:
            if now - self._last < self.every:
                return False
            self._last = now
        self.logger.warning(message, *args)
        return True

    def recovered(self) -> None:
        """The failure is over: the next one is news and is logged at once."""
        with self._lock:
            self._last = float("-inf")
