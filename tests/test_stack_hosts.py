"""The overview dashboard's Hosts row with several Ollama hosts, through a real Prometheus.

tests/test_stack.py proves every panel query returns data in front of one Ollama. This runs the Hosts row's
queries against otellama routing over three hosts (two emulators and one that is down), scraped by a real
Prometheus (Debian's package), and checks each panel shows the hosts it should, by name.
"""

from __future__ import annotations

import math
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from otellama.app import create_app
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.server import BackgroundServer
from otellama.settings import Settings, Upstream
from tests.stack import grafana
from tests.stack.prometheus import MISSING, Prometheus, finite

JOB = "otellama-hosts"
OVERVIEW = grafana.GRAFANA / "dashboards" / "ollama-overview.json"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _hosts_row() -> list[dict[str, Any]]:
    """The panels under the Hosts row (an open row: the panels that follow it, up to the next row)."""
    panels = grafana.load(OVERVIEW)["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"].startswith("Hosts"))
    row: list[dict[str, Any]] = []
    for panel in panels[start + 1 :]:
        if panel["type"] == "row":
            break
        row.append(panel)
    return row


def _drive(url: str) -> None:
    """Two models on each host in turn (each a cold load), and one model no host has (an error)."""
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        for model in ("llama3.2:3b", "gemma3:1b"):
            for pinned in ("a", "b"):
                body = {"model": model, "prompt": "hi", "stream": False}
                answer = http.post("/api/generate", json=body, headers={"X-Otellama-Upstream": pinned})
                assert answer.status_code == 200
        body = {"model": "nobody-has-it", "prompt": "hi"}
        missing = http.post("/api/generate", json=body, headers={"X-Otellama-Upstream": "a"})
        assert missing.status_code == 404  # an error, on a


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, float]]:
    if shutil.which("prometheus") is None:
        pytest.fail(MISSING, pytrace=False)
    workdir = tmp_path_factory.mktemp("hosts")
    # Loads above the cold-start threshold; each keeps one model loaded, so switching models reloads.
    a = BackgroundServer(create_emulator(EmulatorSettings(load_seconds=0.3, token_rate=0, max_loaded=1)))
    b = BackgroundServer(create_emulator(EmulatorSettings(load_seconds=0.3, token_rate=0, max_loaded=1)))
    with a, b:
        upstreams = (
            Upstream.parse(f"a={a.url}"),
            Upstream.parse(f"b={b.url}"),
            Upstream.parse(f"c=http://127.0.0.1:{_closed_port()}"),
        )
        settings = Settings(
            upstreams=upstreams,
            log_file=workdir / "otellama.jsonl",
            cold_start_seconds=0.2,
            poll_interval=0.2,
        )
        with BackgroundServer(create_app(settings)) as proxy:
            started = time.time() - 1
            prometheus = Prometheus(workdir, f"127.0.0.1:{proxy.port}", JOB)
            try:
                prometheus.wait_ready()
                prometheus.wait_for_scrapes(since=started, count=1)
                # Two rounds: a series must exist before its counter moves for increase() to see it.
                for _ in range(2):
                    _drive(proxy.url)
                    prometheus.wait_for_scrapes(since=time.time(), count=2)
                prometheus.wait_for_scrapes(since=time.time(), count=3)
                yield prometheus, started
            finally:
                prometheus.stop()


EXPECTED_HOSTS = {
    "Host up": {"a": 1, "b": 1, "c": 0},
    "Requests in flight per host": {"a": 0, "b": 0, "c": 0},
    "Models loaded per host": {"a": 1, "b": 1},  # c never answered: nothing known, no series
    "Memory of loaded models per host": None,  # a and b, in bytes
    "Cold starts per host": None,  # a and b: every model loaded cold on each
    "Errors/s per host": None,  # a, which said "not found"
}


def test_the_hosts_row_shows_each_host_on_real_prometheus(fleet: tuple[Prometheus, float]) -> None:
    prometheus, started = fleet
    window = math.ceil(time.time() - started) + 5
    values = {**grafana.interval_values(window), "job": JOB, "model": ".*", "client": ".*"}
    row = _hosts_row()
    assert {str(panel["title"]) for panel in row} == set(EXPECTED_HOSTS)
    for panel in row:
        title = str(panel["title"])
        for target in panel["targets"]:
            promql = grafana.interpolate(target["expr"], values)
            result = prometheus.query(promql)
            assert finite(result), f"{title}: no data\n    {promql}"
            by_host = {
                series["metric"].get("otellama_upstream"): float(series["value"][1]) for series in result
            }
            expected = EXPECTED_HOSTS[title]
            if expected is not None:
                assert by_host == expected, (title, by_host)
            elif title == "Errors/s per host":
                assert by_host["a"] > 0 and set(by_host) <= {"a", "b"}, by_host
            else:
                assert set(by_host) == {"a", "b"} and all(v > 0 for v in by_host.values()), (title, by_host)
