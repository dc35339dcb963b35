"""``GET /otellama/stats``: the rolling window agrees with ``otellama report --json`` and stays bounded."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from otellama.app import create_app
from otellama.emulator import FAULT_HEADER, FAULT_MIDSTREAM_ERROR, EmulatorSettings, create_emulator
from otellama.observe import summary, times
from otellama.settings import Settings, Upstream
from otellama.sinks import capper, stats
from otellama.tools import logscan
from tests import synthetic


def wait_for_lines(path: Path, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or len(path.read_bytes().splitlines()) < count:
        assert time.monotonic() < deadline, f"fewer than {count} lines in {path}"
        time.sleep(0.01)


def test_stats_has_the_numbers_of_report_json(serve: Callable[..., str], tmp_path: Path) -> None:
    log = tmp_path / "otellama.jsonl"
    upstream = serve(create_emulator(EmulatorSettings(token_rate=500, load_seconds=0.05)))
    url = serve(create_app(Settings(upstream=Upstream.parse(upstream), log_file=log)))
    sent = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(6):
            for model in ("llama3.2:3b", "gemma3:1b"):
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": "x" * i}],
                    "stream": i % 2 == 0,
                }
                client.post("/api/chat", json=body, headers={"X-Client-Name": f"c{i % 2}"})
                sent += 1
        client.post("/api/embed", json={"model": "nomic-embed-text", "input": "a"})
        client.post("/api/generate", json={"model": "missing", "prompt": "x"})
        client.post("/api/chat", json={"model": "llama3.2:3b", "messages": []}, headers={FAULT_HEADER: "x"})
        failing = {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "y"}]}
        client.post("/api/chat", json=failing, headers={FAULT_HEADER: FAULT_MIDSTREAM_ERROR})
        client.get("/api/tags")
        sent += 5
        wait_for_lines(log, sent)
        live = client.get("/otellama/stats").json()
        hour = client.get("/otellama/stats", params={"window": "1h"}).json()
        bad = client.get("/otellama/stats", params={"window": "soon"})
    offline = logscan.scan([log], "model").to_json()
    assert live["exchanges"] == offline["exchanges"] == sent
    assert live["groups"] == offline["groups"] and live["total"] == offline["total"]
    assert live["by"] == "model" and live["window_seconds"] == 900 and live["complete"] is True
    assert hour["window_seconds"] == 3600 and hour["groups"] == live["groups"]
    assert {g["group"] for g in live["groups"]} == {
        "llama3.2:3b",
        "gemma3:1b",
        "nomic-embed-text",
        "missing",
        None,
    }
    assert bad.status_code == 400 and "15m" in bad.json()["error"]


def values_of_line(line: dict[str, Any]) -> list[float | None]:
    return [line[name] for name in summary.SAMPLED]


def test_samples_are_the_numbers_of_the_jsonl_line() -> None:
    for item in synthetic.records(400, seed=13):
        samples = [None if math.isnan(v) else v for v in stats.samples_of(item)]
        assert samples == values_of_line(item.to_json())


def test_window_counts_exchanges_that_ended_in_it() -> None:
    now = 1_800_000_000.0
    rolling = stats.RollingStats(clock=lambda: now)
    items = synthetic.records(
        60, seed=3, start_ns=int((now - 3600) * 1e9), step_ns=60 * 10**9
    )  # one a minute for the last hour
    for item in items:
        rolling.write(item)
    recent = [item for item in items if item.end_ns / 1e9 >= now - 900]
    result = rolling.summary(900)
    assert result["exchanges"] == len(recent) and 10 <= len(recent) <= 16
    assert result["complete"] is True and result["since"] == times.iso(now - 900)
    expected = summary.Summary("model")
    for item in recent:
        expected.group(item.model).add_line(item.to_json())
    assert result["groups"] == expected.to_json()["groups"]


def test_memory_is_bounded_by_capacity() -> None:
    now = 1_800_000_000.0
    rolling = stats.RollingStats(capacity=500, clock=lambda: now)
    arrays = [rolling._ends, *rolling._columns, *rolling._tokens, rolling._flags]
    # Allocated whole at start: memory does not creep up with traffic (a soak would read that as a leak).
    assert all(len(a) == 500 for a in arrays) and len(rolling._models) == 500
    assert len(rolling) == 0 and rolling.summary(3600)["exchanges"] == 0
    items = synthetic.records(1600, seed=4, start_ns=int((now - 1600) * 1e9), step_ns=10**9)
    for item in items:
        rolling.write(item)
    assert len(rolling) == 500
    now_arrays = [rolling._ends, *rolling._columns, *rolling._tokens, rolling._flags]
    assert all(a is b for a, b in zip(now_arrays, arrays, strict=True))  # filled in place, never regrown
    assert all(len(a) == 500 for a in arrays) and len(rolling._models) == 500
    per_exchange = sum(a.itemsize for a in arrays) + 8  # + one reference to an interned model name
    assert per_exchange <= 120
    result = rolling.summary(3600)  # asks for an hour, holds only the last 500 exchanges
    assert result["exchanges"] == 500 and result["complete"] is False
    assert result["since"] == times.iso(items[-500].end_ns / 1e9)
    expected = summary.Summary("model")
    for item in items[-500:]:
        expected.group(item.model).add_line(item.to_json())
    assert result["groups"] == expected.to_json()["groups"]


def test_invented_model_names_are_capped() -> None:
    rolling = stats.RollingStats(capacity=1000)
    base = synthetic.records(1, seed=1)[0]
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    for i in range(capper.LIMIT + 40):
        rolling.write(type(base)(**{**fields, "model": f"invented-{i}", "end_ns": time.time_ns()}))
    groups = {g["group"]: g["requests"] for g in rolling.summary()["groups"]}
    assert len(groups) == capper.LIMIT + 1 and groups[capper.OVERFLOW] == 40


@pytest.mark.parametrize(
    ("text", "seconds"), [(None, 900), ("", 900), ("90s", 90), ("1h", 3600), ("24h", 86400)]
)
def test_window_parameter(text: str | None, seconds: float) -> None:
    assert stats.parse_window(text) == seconds


@pytest.mark.parametrize("text", ["soon", "2d", "0s", "2026-01-01", "-5m"])
def test_window_parameter_refused(text: str) -> None:
    with pytest.raises(ValueError, match="15m"):
        stats.parse_window(text)


def test_summary_is_valid_json_when_empty() -> None:
    result = stats.RollingStats().summary()
    assert orjson.loads(orjson.dumps(result))["groups"] == [] and result["exchanges"] == 0
