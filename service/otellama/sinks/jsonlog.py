"""The local JSONL log: one line per exchange, appended whole, rotated by size, never in the caller's way.

Each line is written with a single ``os.write`` to a file opened with ``O_APPEND``: there is no buffer to
flush, a line is visible to readers as soon as :meth:`JsonLog.write` returns, a crash loses only lines not
yet written, and writers appending to the same file never interleave. A short write (the disk filled up
mid-line) is cut back off with ``ftruncate``, so the file never holds a torn line.

Rotation follows :class:`logging.handlers.RotatingFileHandler`'s naming: before a line that would take
``otellama.jsonl`` past ``max_bytes``, ``.N-1`` becomes ``.N`` (the old ``.N`` is gone), ..., ``.1`` becomes
``.2`` and the file becomes ``.1``; with ``backups=0`` the file is simply started over. The size is counted
here, not stat'ed per line, and re-read with ``fstat`` whenever the file is (re)opened or looks full.

Writing the log must never break a request, so an unwritable log (a missing directory is created first; a
full disk, no permission, a directory or a file in the way) raises nothing: the line is dropped and
counted, the reason is logged once as a warning (again at most once a minute while it lasts), and the file
is reopened on the first write after a back-off of a few seconds, so fixing the cause resumes logging
without a restart (an info message says so). Opening, rotating and writing are blocking calls on the
event loop; for one small append (1 to 2 µs) that is cheaper than any hand-off to a thread.

Rotation assumes one process owns the file. Another process renaming or deleting it (logrotate without
``copytruncate``) is noticed only at the next rotation or reopen; until then lines go to the old file.
Truncation (``copytruncate``) is fine: appends follow the new end, and the size is re-read before rotating.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import orjson

from otellama.observe.record import Record
from otellama.sinks.complaints import Complaints

__all__ = ["JsonLog", "encode"]

log = logging.getLogger(__name__)


_OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def encode(record: Mapping[str, object]) -> bytes:
    """One log line: ``record`` as compact JSON ending in a newline.

    Raises :class:`TypeError` for a value JSON cannot represent (that is a bug in the caller's record,
    not a logging failure).
    """
    return orjson.dumps(
        record if isinstance(record, dict) else dict(record), option=orjson.OPT_APPEND_NEWLINE
    )


class JsonLog:
    """An append-only JSONL file with size rotation that drops lines rather than raise.

    ``max_bytes <= 0`` never rotates; a file that is not a regular file (``/dev/stdout``, a FIFO) is never
    rotated either. ``retry_after`` is the back-off in seconds before reopening a failed log, measured with
    ``clock``; ``write_fd`` stands in for ``os.write``. Safe to use from several threads.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 50_000_000,
        backups: int = 5,
        retry_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        write_fd: Callable[[int, bytes], int] = os.write,
    ) -> None:
        if backups < 0:
            raise ValueError(f"backups must be 0 or more, not {backups}")
        self._path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._retry_after = retry_after
        self._clock = clock
        self._write_fd = write_fd
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._rotates = False
        self._closed = False
        self._retry_at = float("-inf")
        self._complain = Complaints(log, clock=clock)
        self._failing = False
        self._failures = 0
        self._dropped = 0
        self._written = 0

    @property
    def path(self) -> Path:
        """The current file; backups sit next to it as ``<name>.1`` (newest) to ``<name>.<backups>``."""
        return self._path

    @property
    def failures(self) -> int:
        """Failed attempts to open, rotate or write. Lines dropped during the back-off are not attempts."""
        return self._failures

    @property
    def dropped(self) -> int:
        """Lines not written: failed, skipped during the back-off, or offered after :meth:`close`."""
        return self._dropped

    @property
    def written(self) -> int:
        """Lines written whole."""
        return self._written

    def write(self, line: bytes) -> bool:
        """Append one encoded JSON object (a newline is added if missing). True when it was written.

        Never raises for an unwritable log: the line is dropped and counted instead.
        """
        if not line.endswith(b"\n"):
            line += b"\n"
        with self._lock:
            if self._fd is None and (self._closed or self._clock() < self._retry_at):
                self._dropped += 1
                return False
            try:
                fd = self._open() if self._fd is None else self._fd
                if self._rotates and self._size + len(line) > self._max_bytes:
                    fd = self._rotate(fd, len(line))
                count = self._write_fd(fd, line)
                if count < len(line):
                    self._cut_back(fd, count)
                    self._fail(f"short write: {count} of {len(line)} bytes (is the disk full?)")
                    return False
            except OSError as exc:
                self._fail(exc)
                return False
            self._size += count
            self._written += 1
            if self._failing:
                self._failing = False
                self._complain.recovered()
                log.info("writing the log %s again (%d lines dropped so far)", self._path, self._dropped)
            return True

    def close(self) -> None:
        """Close the file. Later writes are dropped; closing twice is harmless."""
        with self._lock:
            self._closed = True
            self._close_fd()

    def files(self) -> list[Path]:
        """The backups that exist and the current file if it exists, oldest first (time order)."""
        candidates = [self._backup(n) for n in range(self._backups, 0, -1)] + [self._path]
        return [path for path in candidates if path.exists()]

    def _backup(self, n: int) -> Path:
        return self._path.with_name(f"{self._path.name}.{n}")

    def _open(self) -> int:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = fd = os.open(self._path, _OPEN_FLAGS, 0o644)
        status = os.fstat(fd)
        self._size = status.st_size
        self._rotates = self._max_bytes > 0 and stat.S_ISREG(status.st_mode)
        return fd

    def _rotate(self, fd: int, incoming: int) -> int:
        # Our count can be stale (copytruncate, another writer): trust the file before moving it.
        self._size = os.fstat(fd).st_size
        if self._size == 0 or self._size + incoming <= self._max_bytes:
            return fd
        for n in range(self._backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._backup(n), self._backup(n + 1))
        # Someone else may have moved or deleted the file already; reopening makes a fresh one either way.
        with contextlib.suppress(FileNotFoundError):
            if self._backups:
                os.replace(self._path, self._backup(1))
            else:
                os.unlink(self._path)
        self._close_fd()
        return self._open()

    def _cut_back(self, fd: int, count: int) -> None:
        # Only the torn tail goes: appends by others before ours stay, whatever our count says.
        self._size = os.fstat(fd).st_size - count
        os.ftruncate(fd, self._size)

    def _fail(self, reason: object) -> None:
        self._failures += 1
        self._dropped += 1
        self._close_fd()
        self._retry_at = self._clock() + self._retry_after
        self._complain(
            "cannot write the log %s: %s; dropping lines and retrying in %gs (%d dropped so far)",
            self._path,
            reason,
            self._retry_after,
            self._dropped,
        )
        self._failing = True

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class JsonLogSink:
    """The JSONL log as a sink: each record's :meth:`~otellama.observe.record.Record.to_json`, one line.

    ``on_failure`` is told of every line that could not be written (the metrics count them).
    """

    def __init__(self, log: JsonLog, on_failure: Callable[[], None] = lambda: None) -> None:
        self.log = log
        self._on_failure = on_failure

    def write(self, record: Record) -> None:
        if not self.log.write(encode(record.to_json())):
            self._on_failure()

    def close(self) -> None:
        self.log.close()
