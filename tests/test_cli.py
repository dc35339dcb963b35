"""The ``otellama`` command: help, version, settings errors, and ``serve`` as a real process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import psutil
import pytest
from starlette.types import Receive, Scope, Send

from otellama import __version__
from otellama.cli import main

OTELLAMA = [sys.executable, "-m", "otellama"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"otellama {__version__}"


@pytest.mark.parametrize("command", ["serve", "emulate", "demo"])
def test_every_command_has_help_with_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_unusable_setting_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--upstream", "ftp://nowhere"]) == 2
    assert "ftp://nowhere" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def otellama_process() -> Iterator[Callable[..., tuple[subprocess.Popen[str], str]]]:
    """Start ``python -m otellama serve`` as a real process; wait until it answers its health check."""
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
        port = _free_port()
        process = subprocess.Popen(
            [*OTELLAMA, "serve", "--port", str(port), *args],
            env={**os.environ, "OTELLAMA_LOG_FILE": "off", **(env or {})},
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/otellama/health", timeout=1)
                return process, url
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("otellama serve did not come up")

    yield start
    for process in processes:
        process.terminate()
        process.communicate(timeout=10)  # also closes the stderr pipe


def test_serve_logs_one_start_line_with_both_addresses(
    otellama_process: Callable[..., tuple[subprocess.Popen[str], str]],
) -> None:
    process, url = otellama_process(env={"OTELLAMA_UPSTREAM": "127.0.0.1:1"})
    process.terminate()
    _, err = process.communicate(timeout=10)
    [line] = [line for line in err.splitlines() if "listening on" in line]
    assert url in line and "http://127.0.0.1:1" in line


class _HashingSink:
    """An upstream that hashes a blob upload as it streams in, holding none of it."""

    def __init__(self) -> None:
        self.received = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        digest = hashlib.sha256()
        more = True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            self.received += len(chunk)
            more = message.get("more_body", False)
        ok = scope["path"].endswith(digest.hexdigest())
        await send({"type": "http.response.start", "status": 201 if ok else 400, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_one_gib_upload_streams_through_with_bounded_memory(
    serve: Callable[..., str], otellama_process: Callable[..., tuple[subprocess.Popen[str], str]]
) -> None:
    sink = _HashingSink()
    process, url = otellama_process("--upstream", serve(sink, lifespan="off"))
    proxy = psutil.Process(process.pid)
    baseline = proxy.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, proxy.memory_info().rss)

    block = os.urandom(1 << 20)
    blocks = 1024  # 1 GiB, generated on the fly
    expected = hashlib.sha256()
    for _ in range(blocks):
        expected.update(block)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = httpx.post(
            f"{url}/api/blobs/sha256:{expected.hexdigest()}",
            content=(block for _ in range(blocks)),
            timeout=120,
        )
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 201
    assert sink.received == blocks << 20
    grew_mib = (peak - baseline) / (1 << 20)
    print(f"\n1 GiB upload through otellama: proxy RSS {baseline >> 20} MiB -> peak {peak >> 20} MiB")
    assert grew_mib < 64, f"proxy memory grew by {grew_mib:.0f} MiB during a 1 GiB upload"
