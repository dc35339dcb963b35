"""API keys: who gets in, whose request it is, and what never leaks (``OTELLAMA_API_KEYS_FILE``)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otellama.app import create_app
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.proxy.auth import Keys
from otellama.settings import Settings, SettingsError, Upstream
from tests.conftest import ScriptedUpstream

SEARCH_KEY = "sk-search-0123456789abcdef"
NOTEBOOK_KEY = "sk-notebook-fedcba9876543210"
OLD_NOTEBOOK_KEY = "sk-notebook-old-00000000000"
KEYS_FILE = f"""\
# team        key
search-bot:   {SEARCH_KEY}
notebooks     {NOTEBOOK_KEY}

notebooks:{OLD_NOTEBOOK_KEY}
"""
ALL_KEYS = (SEARCH_KEY, NOTEBOOK_KEY, OLD_NOTEBOOK_KEY)


class Guarded:
    """otellama with keys in front of an upstream, with its JSONL log and an in-memory span exporter."""

    def __init__(self, serve: Callable[..., str], tmp_path: Path, upstream: Any, **settings: Any) -> None:
        keys = tmp_path / "keys"
        keys.write_text(KEYS_FILE)
        keys.chmod(0o600)
        self.upstream = upstream
        self.log_file = tmp_path / "otellama.jsonl"
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.app = create_app(
            Settings(
                upstream=Upstream.parse(serve(upstream)),
                log_file=self.log_file,
                api_keys_file=keys,
                **settings,
            ),
            tracer_provider=provider,
        )
        self.url = serve(self.app)

    def lines(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 5  # recorded just after the client's last byte
        while time.monotonic() < deadline:
            if self.log_file.exists() and len(self.log_file.read_bytes().splitlines()) >= count:
                break
            time.sleep(0.005)
        return [orjson.loads(line) for line in self.log_file.read_bytes().splitlines()]


@pytest.fixture
def guarded(serve: Callable[..., str], tmp_path: Path) -> Callable[..., Guarded]:
    def start(upstream: Any = None, **settings: Any) -> Guarded:
        return Guarded(serve, tmp_path, upstream or ScriptedUpstream(), **settings)

    return start


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the file ---------------------------------------------------------------------------------------------
def test_keys_file_forms_and_comments() -> None:
    keys = Keys.parse(KEYS_FILE)
    assert len(keys) == 3 and keys.names == ["notebooks", "search-bot"]
    assert keys.match(SEARCH_KEY.encode()) == "search-bot"
    assert keys.match(NOTEBOOK_KEY.encode()) == keys.match(OLD_NOTEBOOK_KEY.encode()) == "notebooks"
    assert keys.match(b"sk-search-0123456789abcdeF") is None
    assert keys.match(SEARCH_KEY.encode() + b"x") is None
    assert keys.match(b"") is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "lists no keys"),
        ("# only a comment\n\n", "lists no keys"),
        ("team:short-secret\n", "line 1: the key is shorter than 16"),
        ("ok:0123456789abcdefXX\nnokeyhere\n", "line 2: expected 'name:key'"),
        ("bad!name:0123456789abcdefXX\n", "line 1: a name is"),
        ("team:0123456789abcdef has spaces\n", "line 1: a key is printable ASCII"),
        ("a:0123456789abcdefXX\nb:0123456789abcdefXX\n", "listed twice"),
    ],
)
def test_a_bad_keys_file_names_the_line_never_the_key(text: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=complaint) as caught:
        Keys.parse(text)
    for secret in ("short-secret", "0123456789abcdef"):
        assert secret not in str(caught.value)


def test_a_missing_keys_file_stops_otellama_from_starting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="OTELLAMA_API_KEYS_FILE"):
        create_app(Settings(api_keys_file=tmp_path / "nope", log_file=None))


def test_every_key_is_compared_whichever_matches() -> None:
    calls: list[tuple[bytes, bytes]] = []

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return a == b

    entries = [(f"team{i}", f"key-{i:04d}-0123456789abcdef") for i in range(50)]
    keys = Keys(entries, compare=counting)
    for presented in (entries[0][1], entries[-1][1], "not-a-key-at-all-xxxxxxxx"):
        calls.clear()
        keys.match(presented.encode())
        assert len(calls) == 50  # no early exit on a match
        # Fixed-length digests are compared, never the keys themselves: their length cannot show either.
        assert {len(a) for a, _ in calls} == {len(b) for _, b in calls} == {32}


def test_settings_from_the_environment(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "OTELLAMA_API_KEYS_FILE": str(tmp_path / "keys"),
            "OTELLAMA_FORWARD_AUTHORIZATION": "yes",
            "OTELLAMA_PROTECT_ADMIN": "false",
        }
    )
    assert settings.api_keys_file == tmp_path / "keys"
    assert (settings.forward_authorization, settings.protect_admin) == (True, False)
    defaults = Settings.from_env({})
    assert (defaults.api_keys_file, defaults.forward_authorization, defaults.protect_admin) == (
        None,
        False,
        True,
    )
    with pytest.raises(SettingsError, match="OTELLAMA_PROTECT_ADMIN"):
        Settings.from_env({"OTELLAMA_PROTECT_ADMIN": "maybe"})


# --- on the wire ----------------------------------------------------------------------------------------
REFUSALS = [
    ({}, "needs an API key"),
    (bearer("sk-wrong-0123456789abcdef"), "invalid API key"),
    ({"Authorization": f"Basic {SEARCH_KEY}"}, "needs an API key"),  # only Bearer carries a key
    ({"Authorization": SEARCH_KEY}, "needs an API key"),
    ({"X-Api-Key": SEARCH_KEY}, "needs an API key"),
]


def test_no_valid_key_is_401_in_ollama_shape_and_reaches_nothing(guarded: Callable[..., Guarded]) -> None:
    g = guarded()
    for headers, says in REFUSALS:
        response = httpx.post(f"{g.url}/api/chat", content=b'{"model":"m"}', headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["content-type"] == "application/json; charset=utf-8"
        assert response.headers["www-authenticate"] == "Bearer"
        assert says in response.json()["error"], headers
        assert SEARCH_KEY not in response.text
    assert g.upstream.forwarded == []
    # Nothing reached the proxy, so there is no exchange to record (the exporter creates the log empty).
    assert not g.log_file.exists() or g.log_file.read_bytes() == b""
    assert g.app.gate is not None and g.app.gate.refused == len(REFUSALS)


def test_two_authorization_headers_are_refused(guarded: Callable[..., Guarded]) -> None:
    g = guarded()
    host, port = g.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SEARCH_KEY}\r\n"
            f"Authorization: Bearer sk-wrong-0123456789abcdef\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert g.upstream.forwarded == []


def test_head_gets_a_bodyless_401(guarded: Callable[..., Guarded]) -> None:
    g = guarded()
    response = httpx.head(f"{g.url}/")  # the ollama CLI's heartbeat
    assert (response.status_code, response.content) == (401, b"")


def test_openai_clients_get_openai_shaped_401(guarded: Callable[..., Guarded]) -> None:
    g = guarded()
    client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="ollama", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.body == {
        "message": "otellama: invalid API key",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }


def test_official_clients_work_with_a_key(guarded: Callable[..., Guarded]) -> None:
    g = guarded(create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01)))
    hello = [{"role": "user", "content": "hi"}]
    with ollama.Client(host=g.url, headers=bearer(SEARCH_KEY)) as native:
        chunks = list(native.chat("llama3.2:3b", hello, stream=True))
        assert chunks[-1].done
    with ollama.Client(host=g.url) as anonymous, pytest.raises(ollama.ResponseError) as caught:
        anonymous.chat("llama3.2:3b", hello)
    assert caught.value.status_code == 401 and "API key" in caught.value.error
    compatible = openai.OpenAI(base_url=f"{g.url}/v1", api_key=NOTEBOOK_KEY, max_retries=0)
    answer = compatible.chat.completions.create(model="llama3.2:3b", messages=hello)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    lines = g.lines(2)
    assert [line["client"] for line in lines] == ["search-bot", "notebooks"]
    assert all(line["outcome"] == "ok" for line in lines)


def test_the_key_name_is_the_client_and_cannot_be_spoofed(guarded: Callable[..., Guarded]) -> None:
    g = guarded()
    response = httpx.post(
        f"{g.url}/api/generate",
        content=b'{"model":"m","prompt":"hi"}',
        headers={**bearer(NOTEBOOK_KEY), "X-Client-Name": "search-bot"},
    )
    assert response.status_code == 200
    [seen] = g.upstream.forwarded
    assert seen.header(b"authorization") is None  # the key stops at otellama
    assert [v for k, v in seen.headers if k == b"x-client-name"] == [b"notebooks"]
    [line] = g.lines(1)
    assert line["client"] == "notebooks"
    metrics = httpx.get(f"{g.url}/otellama/metrics", headers=bearer(SEARCH_KEY)).text
    assert 'otellama_client="notebooks"' in metrics
    assert 'otellama_client="search-bot"' not in metrics


def test_a_configured_client_header_carries_the_name(guarded: Callable[..., Guarded]) -> None:
    g = guarded(client_header="x-team")
    httpx.get(f"{g.url}/api/tags", headers={**bearer(SEARCH_KEY), "X-Team": "someone-else"})
    [seen] = g.upstream.forwarded
    assert [v for k, v in seen.headers if k == b"x-team"] == [b"search-bot"]
    assert g.lines(1)[0]["client"] == "search-bot"


def test_forwarding_authorization_is_opt_in(guarded: Callable[..., Guarded]) -> None:
    g = guarded(forward_authorization=True)
    httpx.get(f"{g.url}/api/tags", headers=bearer(SEARCH_KEY))
    [seen] = g.upstream.forwarded
    assert seen.header(b"authorization") == f"Bearer {SEARCH_KEY}".encode()


def test_admin_routes_need_a_key_but_health_does_not(guarded: Callable[..., Guarded]) -> None:
    g = guarded()
    assert httpx.get(f"{g.url}/otellama/health").status_code == 200
    for path in ("/otellama/metrics", "/otellama/stats", "/otellama/anything"):
        refused = httpx.get(f"{g.url}{path}")
        assert refused.status_code == 401, path
        assert "API key" in refused.json()["error"]
    assert httpx.get(f"{g.url}/otellama/metrics", headers=bearer(SEARCH_KEY)).status_code == 200
    assert g.upstream.forwarded == []


PATH_TRICKS = [
    b"/%6Ftellama/metrics",  # decodes to /otellama/metrics: the gate sees what the router sees
    b"/otellama/health/../metrics",
    b"/otellama/health%2F..%2Fmetrics",
    b"/otellama/health/",
    b"/otellama/health?/../metrics",
    b"/api/blobs/..%2F..%2Fotellama%2Fmetrics",
    b"/api/blobs/../../otellama/metrics",
]


def test_no_path_trick_gets_past_the_gate(guarded: Callable[..., Guarded]) -> None:
    g = guarded()
    host, port = g.url.removeprefix("http://").split(":")
    for target in PATH_TRICKS:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        if target.startswith(b"/otellama/health?"):
            assert answer.startswith(b"HTTP/1.1 200 "), target  # the query is no path: this is health
            assert b'"status":"ok"' in answer
            continue
        assert answer.startswith(b"HTTP/1.1 401 "), (target, answer[:100])
        assert b"gen_ai" not in answer
    assert g.upstream.forwarded == []


def test_admin_can_be_left_open(guarded: Callable[..., Guarded]) -> None:
    g = guarded(protect_admin=False)
    assert httpx.get(f"{g.url}/otellama/metrics").status_code == 200
    assert httpx.get(f"{g.url}/api/tags").status_code == 401  # Ollama's API stays guarded


def test_keys_reach_no_log_record_span_or_error(
    guarded: Callable[..., Guarded], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    g = guarded()
    wrong = "sk-attacker-guess-0123456789"
    refused = httpx.post(f"{g.url}/api/chat", content=b"{}", headers=bearer(wrong))
    admitted = httpx.post(f"{g.url}/api/chat", content=b'{"model":"m"}', headers=bearer(SEARCH_KEY))
    assert (refused.status_code, admitted.status_code) == (401, 200)
    g.lines(1)
    sinks = {
        "own logs": caplog.text,
        "jsonl": g.log_file.read_text(),
        "spans": repr([(s.name, dict(s.attributes or {})) for s in g.spans.get_finished_spans()]),
        "metrics": httpx.get(f"{g.url}/otellama/metrics", headers=bearer(SEARCH_KEY)).text,
        "responses": refused.text + admitted.text,
    }
    assert len(g.spans.get_finished_spans()) >= 1  # the sinks did receive the exchange
    for sink, text in sinks.items():
        for secret in (*ALL_KEYS, wrong):
            assert secret not in text, f"a key leaked into {sink}"


def test_without_a_keys_file_nothing_changes(proxy_to: Callable[..., str], serve: Callable[..., str]) -> None:
    upstream = ScriptedUpstream()
    url = proxy_to(serve(upstream))
    response = httpx.get(f"{url}/api/tags", headers={**bearer("anything"), "X-Client-Name": "me"})
    assert response.status_code == 200
    [seen] = upstream.forwarded
    assert (seen.header(b"authorization"), seen.header(b"x-client-name")) == (b"Bearer anything", b"me")


def test_cors_preflights_pass_without_a_key(guarded: Callable[..., Guarded]) -> None:
    g = guarded()
    headers = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    assert httpx.options(f"{g.url}/api/chat", headers=headers).status_code == 200  # Ollama answers it
    assert [seen.method for seen in g.upstream.forwarded] == ["OPTIONS"]
    assert (
        httpx.post(f"{g.url}/api/chat", content=b"{}", headers={"Origin": "http://app.example"}).status_code
        == 401
    )
