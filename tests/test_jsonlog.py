"""The JSONL log on real files: whole lines, rotation, concurrent writers, and logs that cannot be written."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otellama.sinks.complaints import EVERY as WARN_EVERY
from otellama.sinks.jsonlog import JsonLog, encode


class Clock:
    """A clock the test moves by hand, so back-off and warning intervals need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def lines_of(log: JsonLog) -> list[dict[str, object]]:
    """Every line in every file, in time order; fails on a torn or invalid line."""
    out: list[dict[str, object]] = []
    for path in log.files():
        data = path.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{path} ends with a torn line"
        out.extend(orjson.loads(line) for line in data.splitlines())
    return out


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "otellama.sinks.jsonlog" and r.levelno == logging.WARNING]


def line(n: int, width: int = 0) -> bytes:
    """A line of exactly ``width`` bytes with its newline (or the natural width if 0)."""
    head = encode({"n": n, "pad": ""})
    return encode({"n": n, "pad": "x" * max(0, width - len(head))})


def test_encode_makes_one_compact_line() -> None:
    assert encode({"model": "llama3", "eval_count": 3, "tokens_per_second": 41.5}) == (
        b'{"model":"llama3","eval_count":3,"tokens_per_second":41.5}\n'
    )


def test_each_write_is_one_valid_line_readable_at_once(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "otellama.jsonl")
    assert log.write(b'{"n":0}')  # without the newline: added
    assert (tmp_path / "otellama.jsonl").read_bytes() == b'{"n":0}\n'  # no buffer to flush
    assert log.write(encode({"n": 1}))  # with it: not doubled
    assert (tmp_path / "otellama.jsonl").read_bytes() == b'{"n":0}\n{"n":1}\n'
    assert (log.written, log.failures, log.dropped) == (2, 0, 0)
    log.close()


def test_missing_directories_are_created(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "a" / "b" / "otellama.jsonl")
    assert log.write(encode({"n": 0}))
    assert lines_of(log) == [{"n": 0}]
    log.close()


def test_appends_to_an_existing_log_and_counts_its_size(tmp_path: Path) -> None:
    path = tmp_path / "otellama.jsonl"
    path.write_bytes(line(0, 40) * 2)
    log = JsonLog(path, max_bytes=100, backups=1)
    assert log.write(line(2, 40))  # 120 > 100 with the existing 80 bytes: rotates first
    assert [p.name for p in log.files()] == ["otellama.jsonl.1", "otellama.jsonl"]
    assert [r["n"] for r in lines_of(log)] == [0, 0, 2]
    log.close()


def test_rotation_keeps_backups_in_order_and_loses_nothing(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "otellama.jsonl", max_bytes=100, backups=3)
    for n in range(20):  # 20-byte lines, 5 per file: exactly fills the file and its 3 backups
        assert log.write(line(n, 20))
    names = [p.name for p in log.files()]
    assert names == ["otellama.jsonl.3", "otellama.jsonl.2", "otellama.jsonl.1", "otellama.jsonl"]
    assert [r["n"] for r in lines_of(log)] == list(range(20))
    assert all(p.stat().st_size == 100 for p in log.files())

    for n in range(20, 40):
        assert log.write(line(n, 20))
    assert [p.name for p in log.files()] == names  # the oldest went; never a .4
    assert not (tmp_path / "otellama.jsonl.4").exists()
    assert [r["n"] for r in lines_of(log)] == list(range(20, 40))
    assert log.written == 40
    log.close()


def test_no_backups_starts_the_file_over(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "otellama.jsonl", max_bytes=100, backups=0)
    for n in range(12):
        assert log.write(line(n, 20))
    assert log.files() == [tmp_path / "otellama.jsonl"]
    assert [r["n"] for r in lines_of(log)] == [10, 11]
    log.close()


def test_a_line_larger_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "otellama.jsonl", max_bytes=100, backups=2)
    for n, width in enumerate([20, 300, 20]):
        assert log.write(line(n, width))
    assert [p.stat().st_size for p in log.files()] == [20, 300, 20]
    log.close()


def test_files_lists_only_what_exists_oldest_first(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "otellama.jsonl", max_bytes=100, backups=5)
    assert log.files() == []
    for n in range(11):
        log.write(line(n, 20))
    assert log.files() == [tmp_path / f"otellama.jsonl{s}" for s in (".2", ".1", "")]
    log.close()


def test_a_copytruncate_is_noticed_before_rotating(tmp_path: Path) -> None:
    path = tmp_path / "otellama.jsonl"
    log = JsonLog(path, max_bytes=100, backups=2)
    for n in range(4):
        log.write(line(n, 20))
    os.truncate(path, 0)  # what logrotate's copytruncate does behind our back
    for n in range(4, 9):
        log.write(line(n, 20))
    assert log.files() == [path]  # 5 lines fit the truncated file: no early rotation
    assert [r["n"] for r in lines_of(log)] == [4, 5, 6, 7, 8]
    log.close()


@settings(max_examples=60, deadline=None)
@given(
    widths=st.lists(st.integers(min_value=10, max_value=120), max_size=60),
    max_bytes=st.integers(min_value=1, max_value=400),
    backups=st.integers(min_value=0, max_value=4),
)
def test_rotation_invariants(widths: list[int], max_bytes: int, backups: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = JsonLog(Path(tmp) / "otellama.jsonl", max_bytes=max_bytes, backups=backups)
        written = [line(n, w) for n, w in enumerate(widths)]
        assert all(log.write(data) for data in written)
        log.close()
        files = log.files()
        assert len(files) <= backups + 1
        # What the files hold, in order, is exactly the most recent lines: nothing reordered or torn.
        kept = b"".join(p.read_bytes() for p in files)
        assert b"".join(written).endswith(kept)
        for path in files:
            data = path.read_bytes()
            assert len(data) <= max_bytes or data.count(b"\n") == 1


def test_threads_writing_through_rotation_lose_nothing(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "otellama.jsonl", max_bytes=4096, backups=1000)
    threads, per_thread = 16, 400

    def writer(t: int) -> None:
        for i in range(per_thread):
            assert log.write(encode({"t": t, "i": i, "pad": "x" * (i % 50)}))

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    log.close()

    records = lines_of(log)
    assert len(log.files()) > 50  # rotation happened many times while the threads wrote
    assert len(records) == log.written == threads * per_thread
    for t in range(threads):  # each writer's lines appear once each, in the order written
        assert [r["i"] for r in records if r["t"] == t] == list(range(per_thread))


async def test_asyncio_tasks_writing_through_rotation_lose_nothing(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "otellama.jsonl", max_bytes=2048, backups=1000)

    async def exchange(t: int) -> None:
        for i in range(50):
            await asyncio.sleep(0)  # interleave the tasks as concurrent requests would
            assert log.write(encode({"t": t, "i": i}))

    await asyncio.gather(*(exchange(t) for t in range(100)))
    log.close()
    records = lines_of(log)
    assert len(records) == 100 * 50
    assert len({(r["t"], r["i"]) for r in records}) == 100 * 50


def test_separate_writers_on_one_file_never_interleave(tmp_path: Path) -> None:
    # Two logs on one path stand for two processes: only O_APPEND keeps their lines apart and whole.
    path = tmp_path / "otellama.jsonl"
    logs = [JsonLog(path, max_bytes=0), JsonLog(path, max_bytes=0)]

    def writer(k: int) -> None:
        for i in range(200):
            assert logs[k % 2].write(encode({"k": k, "i": i, "pad": str(k) * 20_000}))

    workers = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    records = lines_of(logs[0])
    assert len(records) == 800
    assert all(r["pad"] == str(r["k"]) * 20_000 for r in records)
    for log in logs:
        log.close()


@pytest.fixture
def blocker(tmp_path: Path) -> Iterator[Path]:
    """A regular file where a directory should be: no one, root included, can create a log under it."""
    path = tmp_path / "logs"
    path.write_text("not a directory")
    yield path


def test_an_unwritable_log_drops_and_counts_without_raising(
    blocker: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    log = JsonLog(blocker / "otellama.jsonl", retry_after=5.0, clock=clock)
    for n in range(10):
        assert log.write(encode({"n": n})) is False
    # One attempt, then the back-off: the disk is not tried on every request.
    assert (log.failures, log.dropped, log.written) == (1, 10, 0)
    [warning] = warnings_of(caplog)
    assert str(blocker / "otellama.jsonl") in warning.getMessage()

    clock.now += 5.0
    assert log.write(encode({"n": 10})) is False
    assert (log.failures, log.dropped) == (2, 11)
    assert len(warnings_of(caplog)) == 1  # still failing: not repeated within the minute


def test_the_warning_repeats_at_most_once_a_minute(
    blocker: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    log = JsonLog(blocker / "otellama.jsonl", retry_after=1.0, clock=clock)
    for _ in range(150):  # a failed attempt every second for 150 s
        log.write(b"{}")
        clock.now += 1.0
    assert log.failures == 150
    assert len(warnings_of(caplog)) == 1 + int(149 // WARN_EVERY)


def test_logging_resumes_once_the_cause_is_fixed(
    blocker: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="otellama.sinks.jsonlog")
    log = JsonLog(blocker / "otellama.jsonl", retry_after=5.0, clock=clock)
    assert not log.write(encode({"n": 0}))
    blocker.unlink()
    assert not log.write(encode({"n": 1}))  # fixed, but still backing off
    clock.now += 5.0
    assert log.write(encode({"n": 2}))
    assert log.write(encode({"n": 3}))
    assert lines_of(log) == [{"n": 2}, {"n": 3}]
    assert (log.failures, log.dropped, log.written) == (1, 2, 2)
    infos = [r for r in caplog.records if r.name == "otellama.sinks.jsonlog" and r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "again" in infos[0].getMessage()
    log.close()


def test_a_directory_in_the_way_is_a_failure_too(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "otellama.jsonl"
    path.mkdir()
    log = JsonLog(path, clock=clock)
    assert not log.write(b"{}")
    assert log.failures == 1
    path.rmdir()
    clock.now += 5.0
    assert log.write(b"{}")
    log.close()


def test_a_full_disk_drops_and_counts(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    log = JsonLog(Path("/dev/full"), max_bytes=10, clock=clock)  # a device: never rotated
    assert not log.write(b"{}")
    clock.now += 5.0
    assert not log.write(b"{}")
    assert (log.failures, log.dropped, log.written) == (2, 2, 0)
    [warning] = warnings_of(caplog)
    assert "No space left" in warning.getMessage()
    assert os.path.exists("/dev/full")
    log.close()


def test_a_short_write_is_cut_back_so_no_torn_line_remains(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "otellama.jsonl"
    calls = 0

    def disk_full_once(fd: int, data: bytes) -> int:
        """os.write on a disk that fills up halfway through the second line, then gets room again."""
        nonlocal calls
        calls += 1
        return os.write(fd, data[: len(data) // 2] if calls == 2 else data)

    log = JsonLog(path, clock=clock, write_fd=disk_full_once)
    assert log.write(encode({"n": 0}))
    assert not log.write(encode({"n": 1, "pad": "x" * 100}))
    assert path.read_bytes() == encode({"n": 0})  # the half line is gone
    assert (log.failures, log.dropped, log.written) == (1, 1, 1)

    clock.now += 5.0
    assert log.write(encode({"n": 2}))  # right after the last whole line
    assert lines_of(log) == [{"n": 0}, {"n": 2}]
    log.close()


def test_writes_after_close_are_dropped_not_reopened(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "otellama.jsonl")
    assert log.write(b"{}")
    log.close()
    log.close()
    assert not log.write(b"{}")
    assert (log.written, log.dropped, log.failures) == (1, 1, 0)
    assert lines_of(log) == [{}]


def test_negative_backups_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backups"):
        JsonLog(tmp_path / "x.jsonl", backups=-1)
