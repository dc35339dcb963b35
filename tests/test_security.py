"""The byte path under attack: what a request line or a header can make otellama do, on raw sockets.

Every rig has the configured upstream (which records what reaches it) and a second listener, the victim,
that nobody configured: whatever a client writes, nothing may ever reach the victim, nor otellama's own
listener through otellama. Requests are written byte for byte, as an attacker would, not through a client
library that would tidy them up first.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.types import Send

from otellama.app import create_app
from otellama.proxy import auth, connection
from otellama.settings import Settings, Upstream
from tests.conftest import ScriptedUpstream, Seen
from tests.test_abuse import exchange

KEY = "sk-search-0123456789abcdef"
TIMEOUT = 0.5


class Rig:
    """otellama (on the production protocol) before a recording upstream, beside an unconfigured victim."""

    def __init__(
        self,
        serve: Callable[..., str],
        tmp_path: Path,
        upstream: ScriptedUpstream | None = None,
        client_timeout: float | None = 60.0,
        **settings: Any,
    ) -> None:
        self.upstream = upstream or ScriptedUpstream()
        self.victim = ScriptedUpstream()
        self.victim_port = port_of(serve(self.victim))
        self.log_file = tmp_path / "otellama.jsonl"
        app = create_app(
            Settings(upstream=Upstream.parse(serve(self.upstream)), log_file=self.log_file, **settings)
        )
        self.url = serve(app, http=connection.protocol(client_timeout))
        self.port = port_of(self.url)

    def send(self, data: bytes, wait: float = 5.0) -> bytes:
        """Write raw bytes, read until otellama closes (or ``wait`` passes)."""
        return exchange(self.url, data, wait)

    def lines(self, count: int, settle: float = 0.0) -> list[dict[str, Any]]:
        """The log once it has ``count`` lines (recorded just after the last byte), ``settle`` s later."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.log_file.exists() and len(self.log_file.read_bytes().splitlines()) >= count:
                break
            time.sleep(0.005)
        time.sleep(settle)
        if not self.log_file.exists():
            return []
        return [orjson.loads(line) for line in self.log_file.read_bytes().splitlines()]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def parse(answer: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers with lowercased names, body) of the first raw HTTP/1.1 response in ``answer``."""
    head, _, rest = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = [(name.strip().lower(), value.strip()) for name, _, value in (h.partition(b":") for h in lines)]
    if (b"transfer-encoding", b"chunked") in headers:
        body = b""
        while True:
            size, _, rest = rest.partition(b"\r\n")
            if int(size, 16) == 0:
                break
            body, rest = body + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
        return int(status_line.split(b" ")[1]), headers, body
    length = next((int(v) for k, v in headers if k == b"content-length"), len(rest))
    return int(status_line.split(b" ")[1]), headers, rest[:length]


def names(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {k for k, _ in headers}


@pytest.fixture
def rig(serve: Callable[..., str], tmp_path: Path) -> Callable[..., Rig]:
    def start(**options: Any) -> Rig:
        return Rig(serve, tmp_path, **options)

    return start


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(f"search-bot: {KEY}\n")
    path.chmod(0o600)
    return path


# --- the request target picks the path, never the host (items 1 and 2) -------------------------------------
def test_no_request_target_reaches_a_host_nobody_configured(rig: Callable[..., Rig]) -> None:
    r = rig()
    victim = b"127.0.0.1:%d" % r.victim_port
    targets = [
        b"*@" + victim + b"/x",  # the URL join read "http://upstream:port*@victim/x" as user info
        b"*@" + victim + b"/v1/models",
        b"*",
        b"*x",
        b"*.example/",
    ]
    for method in (b"GET", b"POST", b"OPTIONS"):
        for target in targets:
            if method == b"OPTIONS" and target == b"*":
                continue  # the one asterisk-form request HTTP defines: see the next test
            request = method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
            status, headers, body = parse(r.send(request))
            assert status == 400, (method, target, status, body)
            assert orjson.loads(body)["error"].startswith("otellama: "), (method, target)
            assert (b"connection", b"close") in headers, (method, target)  # the body was never read
    # Absolute form names a host too: only its path and query are used, against the configured upstream.
    # A path that starts with "//" is origin form all the same, and goes verbatim.
    for target in (b"http://" + victim + b"/api/tags?x=1", b"//" + victim + b"/api/tags"):
        answer = r.send(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert parse(answer)[0] == 200, (target, answer[:80])
    assert r.victim.forwarded == []
    assert [(s.raw_path, s.query) for s in r.upstream.forwarded] == [
        (b"/api/tags", b"x=1"),
        (b"//" + victim + b"/api/tags", b""),
    ]
    # Each refusal is an exchange like any other: recorded with the status the client got.
    lines = r.lines(3 * len(targets) - 1 + 2)
    assert sorted(line["status"] for line in lines) == [200] * 2 + [400] * (3 * len(targets) - 1)


def test_with_keys_neither_a_key_holder_nor_a_preflight_reaches_another_host(
    rig: Callable[..., Rig], keys_file: Path
) -> None:
    r = rig(api_keys_file=keys_file)
    victim = b"127.0.0.1:%d" % r.victim_port
    requests = [
        b"GET *@" + victim + b"/api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode(),
        b"OPTIONS *@" + victim + b"/api/tags HTTP/1.1\r\nHost: x\r\nOrigin: http://a.example\r\n"
        b"Access-Control-Request-Method: POST",
    ]
    for request in requests:
        answer = r.send(request + b"\r\nConnection: close\r\n\r\n")
        assert parse(answer)[0] == 400, answer[:80]
    assert r.victim.forwarded == [] and r.upstream.forwarded == []


def test_no_request_reaches_otellama_itself_through_otellama(rig: Callable[..., Rig]) -> None:
    r = rig()
    own = b"127.0.0.1:%d" % r.port
    # Once, "*@own/api/tags" made otellama call itself: each call another, 19,158 descriptors in 4 s.
    for target in (b"*@" + own + b"/api/tags", b"http://" + own + b"/api/tags", b"//" + own + b"/api/tags"):
        answer = r.send(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", wait=3)
        assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 200 ")), (target, answer[:80])
    # Three requests arrived, so otellama recorded three exchanges: none of them came back to it.
    lines = r.lines(3, settle=0.3)
    assert len(lines) == 3, len(lines)
    assert [s.raw_path for s in r.upstream.forwarded] == [b"/api/tags", b"//" + own + b"/api/tags"]
    assert r.victim.forwarded == []


def test_options_asterisk_is_answered_by_otellama_as_ollama_would(rig: Callable[..., Rig]) -> None:
    r = rig()
    # Go's net/http (Ollama's server) answers "OPTIONS *" itself: 200 and an empty body, on a live connection.
    with socket.create_connection(("127.0.0.1", r.port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        second = b""
        while chunk := sock.recv(65536):
            second += chunk
    status, headers, body = parse(first)
    assert (status, body) == (200, b"") and (b"content-length", b"0") in headers
    assert parse(second)[0] == 200  # the connection stayed usable
    assert [s.raw_path for s in r.upstream.forwarded] == [b"/api/tags"]
    assert [line["status"] for line in r.lines(2)] == [200, 200]


# --- OPTIONS and the key check (item 4) --------------------------------------------------------------------
def test_only_a_bodiless_cors_preflight_passes_without_a_key(
    rig: Callable[..., Rig], keys_file: Path
) -> None:
    r = rig(api_keys_file=keys_file)
    refused = [
        # Not a preflight (no Access-Control-Request-Method), with a body for Ollama.
        b"OPTIONS /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"OPTIONS /api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        # A preflight never has a body.
        b"OPTIONS /api/chat HTTP/1.1\r\nHost: x\r\nAccess-Control-Request-Method: POST\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        b"OPTIONS /api/chat HTTP/1.1\r\nHost: x\r\nAccess-Control-Request-Method: POST\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ]
    for request in refused:
        answer = r.send(request)
        assert parse(answer)[0] == 401, (request, answer[:80])
    assert r.upstream.forwarded == []

    # A real preflight passes, and gets the same header treatment as any other request: it can claim no
    # client name (so it can fill no label slots) and no credential of any kind goes on to Ollama.
    for claimed in (b"alice", b"bob", b"search-bot"):
        answer = r.send(
            b"OPTIONS /api/chat HTTP/1.1\r\nHost: x\r\nOrigin: http://a.example\r\n"
            b"Access-Control-Request-Method: POST\r\nX-Client-Name: " + claimed + b"\r\n"
            b"Authorization: Basic dXNlcjpwYXNz\r\nConnection: close\r\n\r\n"
        )
        assert parse(answer)[0] == 200, answer[:80]
    seen = r.upstream.forwarded
    assert [s.header(b"x-client-name") for s in seen] == [auth.ANONYMOUS.encode()] * 3
    assert [s.header(b"authorization") for s in seen] == [None] * 3
    assert [line["client"] for line in r.lines(3)] == [auth.ANONYMOUS] * 3

    # An OPTIONS with a key is that key's request: named by it, its Authorization kept from Ollama.
    answer = r.send(
        b"OPTIONS /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        b"X-Client-Name: alice\r\nConnection: close\r\n\r\n"
    )
    assert parse(answer)[0] == 200, answer[:80]
    last = r.upstream.forwarded[-1]
    assert (last.header(b"x-client-name"), last.header(b"authorization")) == (b"search-bot", None)


def test_the_anonymous_client_name_cannot_be_given_to_a_key() -> None:
    with pytest.raises(auth.SettingsError, match="line 1: the name 'anonymous' is reserved"):
        auth.Keys.parse(f"{auth.ANONYMOUS}: {KEY}\n")


# --- headers the Connection header names (item 5) ----------------------------------------------------------
def test_headers_named_in_connection_stop_at_otellama_both_ways(rig: Callable[..., Rig]) -> None:
    async def internal(seen: Seen, send: Send) -> None:
        headers = [(b"connection", b"X-Internal"), (b"x-internal", b"secret"), (b"x-public", b"p")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    r = rig(upstream=ScriptedUpstream(internal))
    answer = r.send(
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: close, X-Secret\r\nConnection: AUTHORIZATION\r\n"
        b"X-Secret: s\r\nAuthorization: Bearer t\r\nX-Kept: k\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\nForwarded: for=203.0.113.7\r\n\r\n"
    )
    status, headers, body = parse(answer)
    assert (status, body) == (200, b"ok")
    assert b"x-internal" not in names(headers) and (b"x-public", b"p") in headers
    [seen] = r.upstream.forwarded
    assert not {b"x-secret", b"authorization", b"connection"} & names(seen.headers)
    assert seen.header(b"x-kept") == b"k"
    # Forwarding headers pass as the client wrote them: otellama adds none and trusts none (README).
    forwarding = [(k, v) for k, v in seen.headers if k in (b"x-forwarded-for", b"forwarded")]
    assert forwarding == [(b"x-forwarded-for", b"203.0.113.7"), (b"forwarded", b"for=203.0.113.7")]


# --- smaller points ----------------------------------------------------------------------------------------
def test_transfer_codings_other_than_chunked_get_501(rig: Callable[..., Rig]) -> None:
    r = rig()
    chunked_hello = b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    for path, codings in [
        (b"/api/chat", b"Transfer-Encoding: gzip, chunked"),
        (b"/v1/chat/completions", b"Transfer-Encoding: identity,chunked"),
        (b"/api/chat", b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked"),
    ]:
        answer = r.send(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + codings + chunked_hello)
        status, headers, body = parse(answer)
        assert status == 501, (codings, answer[:80])
        assert (b"connection", b"close") in headers
        error = orjson.loads(body)["error"]
        message = error["message"] if path.startswith(b"/v1/") else error  # each API's own error shape
        assert "Transfer-Encoding" in message
    # Plain chunked is what every client sends for a streamed body: it passes.
    answer = r.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n"
                    b"Connection: close" + chunked_hello)  # fmt: skip
    assert parse(answer)[:3:2] == (200, b"hello")
    assert [s.body for s in r.upstream.forwarded] == [b"hello"]
    assert [line["status"] for line in r.lines(4)] == [501, 501, 501, 200]


def test_a_stalled_body_is_logged_with_the_408_the_client_got(rig: Callable[..., Rig]) -> None:
    r = rig(client_timeout=TIMEOUT)
    with socket.create_connection(("127.0.0.1", r.port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ")
    [line] = r.lines(1)
    assert (line["status"], line["outcome"]) == (408, "cancelled")
    assert "OTELLAMA_CLIENT_TIMEOUT" in line["error"]
