"""A real Prometheus for the stack test: Debian's ``prometheus`` binary, a generated config, a tmp TSDB."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

MISSING = (
    "the stack test needs a Prometheus server binary and there is no 'prometheus' on PATH. "
    "Run `make test` (it installs Debian's prometheus package when it can: scripts/install-prometheus) "
    "or install it yourself: `apt-get install prometheus`."
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Prometheus:
    """``prometheus`` scraping ``/otellama/metrics`` of one otellama every ``interval`` seconds.

    The caller checks :func:`shutil.which` first (see :data:`MISSING`); this class only runs the binary.
    """

    def __init__(self, workdir: Path, target: str, job: str, interval: float = 1.0) -> None:
        binary = shutil.which("prometheus")
        assert binary is not None, MISSING
        self.job = job
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": f"{round(interval * 1000)}ms",
                "scrape_timeout": f"{round(interval * 1000)}ms",
            },
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": "/otellama/metrics",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--enable-feature=exemplar-storage",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)

    def wait_ready(self, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"prometheus not ready within {limit} s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query, as Grafana's Prometheus datasource sends it; returns the result vector."""
        form = {"query": promql, "time": f"{at or time.time():.3f}"}
        body = self.http.post("/api/v1/query", data=form).json()
        assert body["status"] == "success", f"{promql}\n-> {body.get('errorType')}: {body.get('error')}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", f"{promql}\n-> {data['resultType']}, not an instant vector"
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of a query that aggregates to one series, or None when it has none yet."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def label_values(self, label: str, match: str | None, start: float) -> list[str]:
        """What Grafana's ``label_values(match, label)`` lists for a template variable."""
        params: dict[str, str] = {"start": f"{start:.3f}", "end": f"{time.time():.3f}"}
        if match:
            params["match[]"] = match
        body = self.http.get(f"/api/v1/label/{label}/values", params=params).json()
        assert body["status"] == "success", body
        return sorted(body["data"])

    def scrapes_since(self, since: float) -> int:
        """Scrapes of the target that started after ``since`` (epoch seconds)."""
        form = {"query": f'up{{job="{self.job}"}}[5m]', "time": f"{time.time():.3f}"}
        body = self.http.post("/api/v1/query", data=form).json()
        assert body["status"] == "success", body
        return sum(1 for series in body["data"]["result"] for at, _ in series["values"] if float(at) > since)

    def wait_for_scrapes(self, since: float, count: int = 2, limit: float = 20.0) -> None:
        deadline = time.monotonic() + limit
        while self.scrapes_since(since) < count:
            assert time.monotonic() < deadline, f"fewer than {count} scrapes in {limit} s:\n{self.logs()}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def finite(result: list[dict[str, Any]]) -> list[float]:
    """The values of an instant vector that a chart can draw (not NaN, not infinite)."""
    values = (float(sample["value"][1]) for sample in result)
    return [v for v in values if math.isfinite(v)]
