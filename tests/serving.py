"""``otellama serve`` as a real process for tests (the command itself, with its exporter process), and the
traffic and waits that go with it. The fixtures that start them are in conftest.py."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.test_telemetry_wire import eventually as wait_for

MODEL = "llama3.2:3b"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], stop: Callable[[], str]) -> None:
    """Until otellama at ``url`` answers ``/otellama/health`` (20 s at most); fails with its stderr
    (``stop()``) if ``process`` exits first."""
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/otellama/health", timeout=1).status_code == 200:
                return
        assert process.poll() is None, stop()
        assert time.monotonic() < deadline, "otellama did not start"
        time.sleep(0.02)


def eventually(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """test_telemetry_wire's wait, with room for a process that starts a second process."""
    return wait_for(check, what, timeout)


class Serve:
    """``python -m otellama serve`` with a clean ``OTEL_*``/``OTELLAMA_*`` environment plus ``env``."""

    def __init__(self, upstream: str, log_file: Path, **env: str) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTELLAMA_"))}
        self.port = free_port()
        environ.update(
            OTELLAMA_UPSTREAM=upstream,
            OTELLAMA_LOG_FILE=str(log_file),
            OTELLAMA_PORT=str(self.port),
            OTEL_EXPORTER_OTLP_TIMEOUT="1",
            OTEL_METRIC_EXPORT_INTERVAL="200",
        )
        environ.update(env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "otellama", "serve"], env=environ, stderr=subprocess.PIPE
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until_healthy(self.url, self.process, self.stop)

    def exporter_pid(self) -> int:
        """The exporter process (the proxy's only child)."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        children = eventually(lambda: path.read_text().split(), "the exporter process")
        return int(children[0])

    def metric(self, name: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/otellama/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        _, err = self.process.communicate(timeout=30)
        return err.decode(errors="replace")


def traffic(url: str, count: int, *, stream: bool = False) -> None:
    with httpx.Client(timeout=30) as client:
        for i in range(count):
            body = {"model": MODEL, "prompt": f"p{i}", "stream": stream, "options": {"num_predict": 4}}
            response = client.post(f"{url}/api/generate", json=body)
            assert response.status_code == 200


def logged(log_file: Path) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in log_file.read_bytes().splitlines() if line.strip()[:1] == b"{"]
    return [line for line in lines if "trace" in line]
