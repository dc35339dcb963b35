"""``otellama report``: numbers recomputed independently from real log files; filters, bad lines, polish."""

from __future__ import annotations

import datetime as dt
import io
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from otellama.cli import main
from otellama.observe import summary, times
from otellama.sinks.jsonlog import JsonLog, encode
from otellama.tools import logscan, report
from tests import synthetic

#: (JSON name, JSONL field, statistics), restated from the issue rather than imported.
EXPECTED = (
    ("ttft_ms", "ttft_ms", ("p50", "p95", "p99")),
    ("tokens_per_second", "tokens_per_second", ("p50", "p95")),
    ("prompt_tokens_per_second", "prompt_tokens_per_second", ("p50",)),
    ("load_time_ms", "load_time_ms", ("p50", "max")),
    ("queue_time_ms", "queue_time_ms", ("p95",)),
    ("duration_ms", "duration_ms", ("p50", "p95", "p99")),
)


def quantile(values: list[float], statistic: str) -> float | None:
    """The statistic the independent way: ``statistics.quantiles`` (inclusive = linear interpolation)."""
    if not values:
        return None
    if statistic == "max":
        return max(values)
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[int(statistic[1:]) - 1]


def expected_groups(lines: list[dict[str, Any]], by: str) -> dict[str | None, dict[str, Any]]:
    grouped: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        grouped[line[by]].append(line)
    result = {}
    for key, members in grouped.items():
        n = len(members)
        errors = sum(m["outcome"] == "error" for m in members)
        cancelled = sum(m["outcome"] == "cancelled" for m in members)
        group: dict[str, Any] = {
            "requests": n,
            "errors": errors,
            "error_pct": 100 * errors / n,
            "cancelled": cancelled,
            "cancelled_pct": 100 * cancelled / n,
            "cold_starts": sum(m["cold_start"] is True for m in members),
            "input_tokens": sum(m["input_tokens"] or 0 for m in members),
            "output_tokens": sum(m["output_tokens"] or 0 for m in members),
        }
        for name, field, wanted in EXPECTED:
            values = [m[field] for m in members if m[field] is not None]  # nulls are left out, never 0
            group[name] = {"count": len(values), **{s: quantile(values, s) for s in wanted}}
        result[key] = group
    return result


def same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if isinstance(value, dict):
            same(actual[key], value)
        elif isinstance(value, float):
            assert actual[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
        else:
            assert actual[key] == value, key


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return synthetic.write(tmp_path / "otellama.jsonl", synthetic.records(1500, seed=3))


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("by", ["model", "client", "operation", "endpoint"])
def test_json_numbers_match_an_independent_computation(
    log: Path, by: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--json", "--by", by, str(log))
    assert code == 0
    data = json.loads(out)
    lines = lines_of(log)
    expected = expected_groups(lines, by)
    assert data["by"] == by and data["exchanges"] == data["lines"] == len(lines) and data["corrupt"] == 0
    assert {g["group"] for g in data["groups"]} == set(expected)
    for group in data["groups"]:
        same(group, expected[group["group"]])
    [everything] = expected_groups([{**line, "all": None} for line in lines], "all").values()
    same(data["total"], everything)
    requests = [g["requests"] for g in data["groups"]]
    assert requests == sorted(requests, reverse=True)  # busiest first


def test_percentile_is_linear_interpolation_like_statistics_inclusive() -> None:
    import random

    rng = random.Random(5)
    for n in [1, 2, 3, 7, 50, 101]:
        values = sorted(rng.uniform(0, 1000) for _ in range(n))
        for p in (50, 95, 99):
            assert summary.percentile(values, p) == pytest.approx(quantile(values, f"p{p}"), rel=1e-12)
    assert summary.percentile([], 50) is None


def test_corrupt_and_truncated_lines_are_skipped_and_counted(
    log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = len(lines_of(log))
    with log.open("ab") as stream:
        stream.write(b"this line was edited by hand\n")
        stream.write(b"[1, 2, 3]\n")  # JSON, but not a record
        stream.write(b"\n")  # a blank line is not a line
        stream.write(b'{"hello": "world"}\n')
        stream.write(encode(synthetic.records(1, seed=9)[0].to_json())[:200])  # a crash mid-write
    code, out, err = run(capsys, "--json", str(log))
    assert code == 0
    data = json.loads(out)
    assert data["corrupt"] == 4 and data["exchanges"] == good and data["lines"] == good + 4
    assert "skipped 4 corrupt" in err


def test_default_files_are_the_configured_log_and_its_backups_in_time_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "logs" / "otellama.jsonl"
    items = synthetic.records(400, seed=4)
    writer = JsonLog(path, max_bytes=60_000, backups=20)
    for item in items:
        assert writer.write(encode(item.to_json()))
    writer.close()
    assert len(writer.files()) > 3  # it really rotated
    monkeypatch.setenv("OTELLAMA_LOG_FILE", str(path))
    monkeypatch.setenv("OTELLAMA_LOG_BACKUPS", "20")
    code, out, _ = run(capsys, "--json")
    data = json.loads(out)
    assert code == 0 and data["exchanges"] == 400
    assert data["files"] == [str(f) for f in writer.files()]
    assert data["files"][-1] == str(path) and data["files"][0].endswith(f".{len(writer.files()) - 1}")
    assert (
        data["first"] == items[0].to_json()["timestamp"] and data["last"] == items[-1].to_json()["timestamp"]
    )


def test_missing_log_says_which_setting_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTELLAMA_LOG_FILE", str(tmp_path / "nothing.jsonl"))
    code, _, err = run(capsys)
    assert code == 2 and "OTELLAMA_LOG_FILE" in err and "nothing.jsonl" in err
    code, _, err = run(capsys, str(tmp_path / "typo.jsonl"))
    assert code == 2 and "typo.jsonl" in err


def test_since_until_model_and_client_filters(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = lines_of(log)
    start = dt.datetime.fromisoformat(lines[100]["timestamp"])
    end = dt.datetime.fromisoformat(lines[700]["timestamp"])
    code, out, _ = run(
        capsys, "--json", "--since", start.isoformat(), "--until", end.isoformat(),
        "--model", "llama*", "--model", "gemma3:1b", "--client", "open-webui", str(log),
    )  # fmt: skip
    assert code == 0
    kept = [
        line for line in lines[100:700]
        if line["model"] in ("llama3.2:3b", "gemma3:1b") and line["client"] == "open-webui"
    ]  # fmt: skip
    data = json.loads(out)
    assert data["exchanges"] == len(kept) > 0
    assert {g["group"] for g in data["groups"]} == {"llama3.2:3b", "gemma3:1b"}
    for group in data["groups"]:
        same(group, expected_groups(kept, "model")[group["group"]])


def test_durations_count_back_from_now(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = dt.datetime.now(dt.UTC).timestamp()
    recent = synthetic.records(10, seed=6, start_ns=int((now - 600) * 1e9), step_ns=10**9)  # 10 min ago
    old = synthetic.records(7, seed=7, start_ns=int((now - 3 * 86400) * 1e9), step_ns=10**9)  # 3 days ago
    path = synthetic.write(tmp_path / "otellama.jsonl", [*old, *recent])
    for since, count in (("15m", 10), ("1h30m", 10), ("2d", 10), ("1w", 17), ("5m", 0)):
        code, out, _ = run(capsys, "--json", "--since", since, str(path))
        assert code == 0 and json.loads(out)["exchanges"] == count, since
    code, out, _ = run(capsys, "--json", "--until", "1d", str(path))
    assert json.loads(out)["exchanges"] == 7


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("2d", 172800),
        ("1w", 604800),
        ("1h30m", 5400),
        ("500ms", 0.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert times.parse_time(text, now=1e6) == pytest.approx(1e6 - seconds)


def test_parse_timestamps() -> None:
    assert times.parse_time("2026-08-01T14:00:00Z") == dt.datetime(2026, 8, 1, 14, tzinfo=dt.UTC).timestamp()
    assert (
        times.parse_time("2026-08-01 16:00+02:00") == dt.datetime(2026, 8, 1, 14, tzinfo=dt.UTC).timestamp()
    )
    assert times.parse_time("2026-08-01") == dt.datetime(2026, 8, 1).timestamp()  # local midnight
    with pytest.raises(times.TimeError, match="15m, 1h"):
        times.parse_time("yesterday")


def test_a_bad_time_exits_2_saying_what_to_write(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--since", "last tuesday", str(log))
    assert code == 2 and "15m, 1h" in err


def test_table_has_a_block_per_group_and_no_colour_off_a_terminal(
    log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, str(log))
    assert code == 0
    for model in ("llama3.2:3b", "qwen3:14b", "gemma3:1b", "nomic-embed-text", "(no model)", "all"):
        assert f"\n{model}\n" in out
    for row in ("time to first token", "generation tokens/s", "prompt tokens/s", "load time", "queue time",
                "end to end", "tokens", "cold starts", "errors", "cancelled"):  # fmt: skip
        assert row in out
    assert "p50" in out and "p95" in out and "p99" in out
    assert "\x1b[" not in out


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_on_a_terminal_unless_no_color(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    out = Terminal()
    assert report.run([str(log)], out=out, err=io.StringIO()) == 0
    assert "\x1b[1m" in out.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    out = Terminal()
    assert report.run([str(log)], out=out, err=io.StringIO()) == 0
    assert "\x1b[" not in out.getvalue()


def test_parts_read_in_parallel_give_the_same_report(log: Path, tmp_path: Path) -> None:
    second = synthetic.write(tmp_path / "otellama.jsonl.1", synthetic.records(700, seed=8))
    serial = logscan.scan([second, log], "client", workers=1, timeline=True)
    small_parts = logscan.scan([second, log], "client", workers=1, part_bytes=4093, timeline=True)
    assert small_parts.to_json() == serial.to_json()
    assert sorted(small_parts.times) == sorted(serial.times)
    # Several processes are only forked from a single-threaded caller: run one.
    script = (
        "import json, sys; from pathlib import Path; from otellama.tools import logscan;"
        "r = logscan.scan([Path(p) for p in sys.argv[1:]], 'client', workers=2, part_bytes=4093,"
        " parallel_bytes=0);"
        "print(json.dumps(r.to_json()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(second), str(log)], capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == json.loads(json.dumps(serial.to_json()))


@pytest.mark.parametrize("command", ["report", "replay"])
def test_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "examples:" in out and "exit status" in out


def test_html_is_written_with_the_table_still_printed(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "report.html"
    code, out, err = run(capsys, "--html", str(page), str(log))
    assert code == 0 and page.stat().st_size > 10_000 and str(page) in err and "time to first token" in out


def test_unwritable_html_exits_2(log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--html", str(tmp_path / "missing" / "report.html"), str(log))
    assert code == 2 and "cannot write" in err
