"""Following the JSONL log across rotation, with a saved position.

The position is the log file's inode and an offset into it, saved (atomically: a temporary file renamed over
the old one) in a hidden file beside the log, ``.<name>.position``, so that ``otellama.jsonl*`` globs never
pick it up. The follower keeps the file it reads open: a rotation renames it (same inode, so it reads on to
its end) and may even delete it (an open file stays readable). When a file is read to its end and the log's
path names another inode, the writer has moved on and the follower opens the next file in time order.

Bounds: the disk is bounded by the log's own rotation (``OTELLAMA_LOG_MAX_BYTES`` x ``OTELLAMA_LOG_BACKUPS``),
memory by one batch. Files rotated away before they were read are lost; their bytes are counted
(:attr:`LogFollower.dropped_bytes`) and logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import Final, NamedTuple

import orjson

from otellama.sinks.complaints import Complaints

log = logging.getLogger(__name__)

#: The longest line the follower reads; longer ones (never written by otellama) are skipped and counted.
MAX_LINE: Final = 16 * 1024 * 1024
_CHUNK: Final = 1 << 20
_HEAD: Final = 64


class Position(NamedTuple):
    """Where in the log the next unread line starts: the file's inode and a byte offset."""

    inode: int
    offset: int


def state_path(log_path: Path) -> Path:
    """The file beside the log where the exporter keeps its position."""
    return log_path.with_name(f".{log_path.name}.position")


def save_position(path: Path, position: Position) -> None:
    """Write ``position`` to ``path`` atomically (readers see the old one or the new one, never half)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(orjson.dumps({"inode": position.inode, "offset": position.offset}))
    os.replace(temporary, path)


def load_position(path: Path) -> Position | None:
    """The saved position, or None when there is none (or it is unreadable)."""
    try:
        value = orjson.loads(path.read_bytes())
        return Position(int(value["inode"]), int(value["offset"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_end(log_path: Path) -> None:
    """Save "the end of the log as it is now" unless a position is saved: a first start exports from here
    on, not the history of a log that existed before (that is ``otellama replay``'s job)."""
    state = state_path(log_path)
    if load_position(state) is not None:
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    status = os.stat(log_path)
    save_position(state, Position(status.st_ino, status.st_size))


class LogFollower:
    """Reads complete lines from the log at ``path`` (rotated as :class:`~otellama.sinks.jsonlog.JsonLog`
    rotates it, ``backups`` files kept), starting at the saved position; :meth:`commit` saves a new one.

    A follower given ``start`` begins there instead and keeps no saved position (it never commits): the
    exporter's live view of the metrics and the stats window, which only has to be current.
    """

    def __init__(self, path: Path, backups: int, start: Position | None = None) -> None:
        self.path = path
        self.backups = backups
        self.state = state_path(path)
        self.dropped_bytes = 0
        self.dropped_files = 0
        self.skipped_lines = 0
        self._complain = Complaints(log)
        self._fd: int | None = None
        self._inode = 0
        self._offset = 0  # of the first byte not yet returned as part of a line
        self._buffer = b""
        self._known: list[tuple[tuple[int, bytes], int]] = []  # the files as last listed, oldest first
        self._resume(start)

    # --- reading ---------------------------------------------------------------------------------------
    def read(self, max_lines: int) -> tuple[list[bytes], Position]:
        """Up to ``max_lines`` complete lines (without their newline) and the position after them."""
        lines: list[bytes] = []
        while True:
            # Lines are cut out by index and the rest kept once per pass: cutting the buffer after every
            # line copied up to a megabyte per line (20 us a line when catching up).
            buffer, start = self._buffer, 0
            while len(lines) < max_lines and (newline := buffer.find(b"\n", start)) >= 0:
                line = buffer[start:newline]
                start = newline + 1
                if line.strip():
                    lines.append(line)
            if start:
                self._offset += start
                self._buffer = buffer[start:]
            if len(lines) >= max_lines:
                break
            if len(self._buffer) > MAX_LINE:  # not ours: skip to the next newline
                self._offset += len(self._buffer)
                self._buffer = b""
                self.skipped_lines += 1
            if not self._fill() and not self._next_file():
                break
        return lines, Position(self._inode, self._offset)

    def behind(self) -> int:
        """Bytes in the log not yet read (the current file and those after it), roughly."""
        files = [(ident[0], size) for ident, size in self.refresh()]
        inodes = [inode for inode, _ in files]
        behind = 0
        if self._fd is not None:
            # From the saved position: lines read into a batch that is not exported yet are still behind.
            start = self._committed.offset if self._committed.inode == self._inode else 0
            with contextlib.suppress(OSError):
                behind += os.fstat(self._fd).st_size - min(start, self._offset)
        if self._inode in inodes:
            behind += sum(size for _, size in files[inodes.index(self._inode) + 1 :])
        return max(behind, 0)

    def commit(self, position: Position) -> None:
        """Save ``position``: every line before it was exported. An unwritable state file is logged and
        skipped: the lines are exported all the same, and sent again after a restart (at least once)."""
        try:
            save_position(self.state, position)
        except OSError as exc:
            self._complain("cannot save the exporter's place in the log to %s: %s", self.state, exc)
        self._committed = position

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- files -----------------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        names = [self.path.with_name(f"{self.path.name}.{n}") for n in range(self.backups, 0, -1)]
        return [*names, self.path]

    def _identify(self) -> list[tuple[tuple[int, bytes], int]]:
        """((inode, first bytes), size) of each log file, oldest first. Inodes alone do not name a file:
        a deleted backup's inode is soon reused by a new one; a line's first bytes (a timestamp) do."""
        found: list[tuple[tuple[int, bytes], int]] = []
        for path in self._files():
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    status = os.fstat(fd)
                    # A log that is no regular file (/dev/full, a FIFO) holds nothing to read back: a device
                    # would hand out bytes for ever.
                    if stat.S_ISREG(status.st_mode):
                        found.append(((status.st_ino, os.pread(fd, _HEAD, 0)), status.st_size))
                finally:
                    os.close(fd)
        return found

    def _open(self, inode: int, offset: int) -> bool:
        for path in self._files():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            status = os.fstat(fd)
            if status.st_ino == inode and stat.S_ISREG(status.st_mode):
                self.close()
                self._fd, self._inode, self._offset, self._buffer = fd, inode, offset, b""
                os.lseek(fd, offset, os.SEEK_SET)
                return True
            os.close(fd)
        return False

    def _resume(self, start: Position | None) -> None:
        saved = start or load_position(self.state)
        self._committed = saved or Position(0, 0)
        self._known = self._identify()
        if saved is not None and self._open(saved.inode, saved.offset):
            return
        if saved is not None:
            # The file we were in was rotated away while we were not running: what it held after our
            # position, and any file between, is gone. Its size is unknown now; count the files.
            self.dropped_files += 1
            log.warning(
                "the exporter's place in the log (inode %d) was rotated away; exporting from the oldest "
                "file left (raise OTELLAMA_LOG_MAX_BYTES or OTELLAMA_LOG_BACKUPS to keep more)",
                saved.inode,
            )
        if self._known:
            self._open(self._known[0][0][0], 0)

    def _fill(self) -> bool:
        """Read more of the current file; False at its end."""
        if self._fd is None:
            return False
        chunk = os.read(self._fd, _CHUNK)
        if not chunk:
            if os.fstat(self._fd).st_size < self._offset + len(self._buffer):
                # Truncated under us (logrotate's copytruncate): what is there now is new; start over.
                os.lseek(self._fd, 0, os.SEEK_SET)
                self._offset, self._buffer = 0, b""
                return self._fill()
            return False
        self._buffer += chunk
        return True

    def refresh(self) -> list[tuple[tuple[int, bytes], int]]:
        """List the log files again, counting those after ours that vanished unread since the last listing
        (the exporter lists them every second, also while it waits for a collector). Returns the list."""
        files = self._identify()
        known = self._known
        ours = next((i for i, (ident, _) in enumerate(known) if ident[0] == self._inode), None)
        if ours is not None and self._fd is not None:
            still = {ident for ident, _ in files}
            still_inodes = {ident[0] for ident, _ in files}
            for ident, size in known[ours + 1 :]:
                if ident in still or (not ident[1] and ident[0] in still_inodes):
                    continue
                self.dropped_files += 1
                self.dropped_bytes += size
                log.warning("a log file was rotated away before the exporter read it (%d bytes)", size)
        inodes = [ident[0] for ident, _ in files]
        if self._fd is not None and self._inode not in inodes:
            # Ours is gone from the directory (we still read it): keep it first, everything left is newer.
            files = [((self._inode, b""), 0), *files]
        self._known = files
        return files

    def _next_file(self) -> bool:
        """At the end of the current file: move to the next one if the writer moved on. False if not."""
        files = self.refresh()
        if self._fd is None:
            return bool(files) and self._open(files[0][0][0], 0)
        inodes = [ident[0] for ident, _ in files]
        if inodes and inodes[-1] == self._inode:
            return False  # still the file being written
        if self._fill():  # written to just before the rotation
            return True
        if self._buffer:  # a torn last line (never written by JsonLog, which cuts them back)
            self.skipped_lines += 1
            self._buffer = b""
        following = files[inodes.index(self._inode) + 1 :] if self._inode in inodes else files
        return bool(following) and self._open(following[0][0][0], 0)
