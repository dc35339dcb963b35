"""Several Ollama hosts behind one otellama: warm-first routing, least-busy spread, failover, spill-over on
"server busy", the merged listings, management by header, and what each record says about its host.

Every host is a real emulator on a real socket; otellama polls them as it would poll Ollama. Which host
served a request is read from the hosts themselves (what each has loaded, which has a copied model), and
from otellama's JSONL log.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.types import Send

from otellama.app import create_app
from otellama.cli import main
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.server import BackgroundServer
from otellama.settings import Settings, SettingsError, Upstream
from tests.conftest import ScriptedUpstream, Seen

MODEL = "llama3.2:3b"
FAST = {"token_rate": 0.0, "load_seconds": 0.05}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Fleet:
    """Named emulators and one otellama in front of them all, with in-memory spans and metrics."""

    def __init__(
        self,
        serve: Callable[..., str],
        log_file: Path,
        hosts: dict[str, EmulatorSettings | str],
        **settings: Any,
    ) -> None:
        self.urls: dict[str, str] = {}
        for name, host in hosts.items():
            self.urls[name] = host if isinstance(host, str) else serve(create_emulator(host))
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        self.log_file = log_file
        settings.setdefault("poll_interval", 0.1)
        upstreams = tuple(Upstream.parse(f"{name}={url}") for name, url in self.urls.items())
        app = create_app(
            Settings(upstreams=upstreams, log_file=log_file, **settings),
            tracer_provider=provider,
            metric_readers=[self.metrics],
        )
        self.url = serve(app)

    def lines(self) -> list[dict[str, Any]]:
        if not self.log_file.exists():
            return []
        return [orjson.loads(line) for line in self.log_file.read_bytes().splitlines()]

    def settled(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 10
        while len(lines := self.lines()) < count:
            assert time.monotonic() < deadline, f"only {len(lines)} of {count} exchanges were recorded"
            time.sleep(0.005)
        return lines

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/otellama/health").json())

    def until(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> None:
        """Wait for otellama's own view of the hosts (its health answer) to show ``what``."""
        deadline = time.monotonic() + 10
        while not predicate({u["name"]: u for u in self.health()["upstreams"]}):
            assert time.monotonic() < deadline, f"otellama never saw {what}: {self.health()['upstreams']}"
            time.sleep(0.02)

    def loaded_on(self, name: str) -> set[str]:
        """What the host itself says it has loaded, asked directly."""
        return {m["name"] for m in httpx.get(f"{self.urls[name]}/api/ps").json()["models"]}

    def generate(self, model: str = MODEL, **extra: Any) -> httpx.Response:
        body = {"model": model, "prompt": "hi", "stream": False, **extra}
        return httpx.post(f"{self.url}/api/generate", json=body, timeout=30)


@pytest.fixture
def fleet(serve: Callable[..., str], tmp_path: Path) -> Callable[..., Fleet]:
    return lambda hosts, **settings: Fleet(serve, tmp_path / "otellama.jsonl", hosts, **settings)


def _load(url: str, model: str = MODEL) -> None:
    """Load ``model`` on one host directly (an empty prompt loads it, as in Ollama)."""
    assert httpx.post(f"{url}/api/generate", json={"model": model}, timeout=10).status_code == 200


# -- configuration -----------------------------------------------------------------------------------------


def test_upstreams_are_named_repeatable_and_comma_separated() -> None:
    env = {"OTELLAMA_UPSTREAM": "gpu1=http://10.0.0.1:11434, 10.0.0.2"}
    settings = Settings.from_env(env)
    assert [(u.name, u.url) for u in settings.hosts] == [
        ("gpu1", "http://10.0.0.1:11434"),
        ("10.0.0.2:11434", "http://10.0.0.2:11434"),
    ]
    assert settings.upstream.url == "http://10.0.0.1:11434"  # the first, for whatever reads only one
    flagged = Settings.from_env(env, upstream=["a=h1:1", "b=https://h2"])
    assert [(u.name, u.url) for u in flagged.hosts] == [("a", "http://h1:1"), ("b", "https://h2:443")]
    one = Settings.from_env({"OTELLAMA_UPSTREAM": "ollama:11500"})
    assert one.upstreams == () and one.hosts == (one.upstream,)
    with pytest.raises(SettingsError, match="must differ"):
        Settings.from_env({"OTELLAMA_UPSTREAM": "a=h1,a=h2"})
    with pytest.raises(SettingsError, match="a name is"):
        Upstream.parse("bad name=h1")


def test_the_upstream_flag_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    # Two hosts with one name: the command reads both flags (else there would be nothing to refuse).
    assert main(["serve", "--upstream", "gpu=h1:1", "--upstream", "gpu=h2:2"]) == 2
    assert "must differ" in capsys.readouterr().err


# -- routing -------------------------------------------------------------------------------------------------


def test_a_model_goes_to_the_host_where_it_is_loaded(fleet: Callable[..., Fleet]) -> None:
    settings = EmulatorSettings(token_rate=0, load_seconds=0.5)
    f = fleet({"a": settings, "b": settings, "c": settings})
    _load(f.urls["b"])
    f.until(lambda hosts: MODEL in hosts["b"]["loaded"], "the model loaded on b")
    for _ in range(6):
        answer = f.generate()
        assert answer.status_code == 200
        assert answer.json()["load_duration"] < 0.1e9  # no request waited for a load
    assert f.loaded_on("a") == f.loaded_on("c") == set()  # no host loaded it a second time
    lines = f.settled(6)
    assert {(line["upstream"], line["route"], line["cold_start"]) for line in lines} == {("b", "warm", False)}


def test_requests_spread_over_the_hosts_with_the_model_loaded_by_fewest_in_flight(
    fleet: Callable[..., Fleet],
) -> None:
    slow = EmulatorSettings(token_rate=40, load_seconds=0.05, response_tokens=(20, 20))
    f = fleet({"a": slow, "b": slow})
    for url in f.urls.values():
        _load(url)
    f.until(lambda hosts: all(MODEL in h["loaded"] for h in hosts.values()), "the model loaded on both")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: f.generate(), range(6)))
    assert [a.status_code for a in answers] == [200] * 6
    served = [line["upstream"] for line in f.settled(6)]
    assert sorted(served) == ["a"] * 3 + ["b"] * 3  # each new request went where fewer were in flight
    assert {line["route"] for line in f.lines()} == {"warm"}


def test_a_model_only_one_host_has_goes_there(fleet: Callable[..., Fleet]) -> None:
    f = fleet(
        {
            "a": EmulatorSettings(**FAST, models=("llama3.2:3b",)),
            "b": EmulatorSettings(**FAST, models=("llama3.2:3b", "gemma3:1b")),
        }
    )
    f.until(lambda hosts: all(h["up"] for h in hosts.values()), "both hosts up")
    for _ in range(3):
        assert f.generate("gemma3:1b").status_code == 200
    assert f.loaded_on("a") == set() and f.loaded_on("b") == {"gemma3:1b"}
    assert {(line["upstream"], line["route"]) for line in f.settled(3)} == {("b", "only")}


def test_a_host_killed_mid_run_fails_no_request_that_had_not_started(
    fleet: Callable[..., Fleet],
) -> None:
    doomed = BackgroundServer(create_emulator(EmulatorSettings(**FAST))).start()
    try:
        f = fleet({"a": EmulatorSettings(**FAST), "b": doomed.url}, poll_interval=60)
        f.until(lambda hosts: all(h["up"] for h in hosts.values()), "both hosts up")
        for name in f.urls:  # a request pinned to each host by the header: now warm on both
            pinned = httpx.post(
                f"{f.url}/api/generate", json={"model": MODEL}, headers={"X-Otellama-Upstream": name}
            )
            assert pinned.status_code == 200
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = [pool.submit(lambda: f.generate().status_code) for _ in range(40)]
            deadline = time.monotonic() + 10
            while sum(r.done() for r in running) < 10:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            # Mid-run: requests running on b finish (a server stopping lets them); new ones find it gone.
            doomed.stop()
            killed_at = time.time_ns()
            statuses = [r.result() for r in running]
    finally:
        doomed.stop()
    lines = f.settled(42)[2:]
    assert {line["upstream"] for line in lines[:8]} == {"a", "b"}  # both served before the kill
    after = [line for line in lines if line["trace"]["start_ns"] > killed_at]
    assert after and {(line["upstream"], line["status"]) for line in after} == {("a", 200)}
    # Only a request already sent to b as it went down may fail (b's server closing a kept-alive connection
    # the request was on): nothing is sent twice. Every other request succeeded.
    failed = [line for line in lines if line["status"] != 200]
    assert all(line["upstream"] == "b" and line["trace"]["start_ns"] < killed_at for line in failed), failed
    assert statuses.count(200) == 40 - len(failed) and len(failed) <= 4
    failed_over = [line for line in lines if line["route"] == "failover"]
    # The poll is a minute away: otellama learned b was down from a refused connection, and moved on.
    assert failed_over and [r["upstream"] for r in failed_over[0]["retries"]] == ["b"]
    assert failed_over[0]["retries"][0]["reason"] == "connect_error"
    assert len(failed_over) <= 4  # at most the 4 running at once tried b; then it was skipped
    health = {u["name"]: u for u in f.health()["upstreams"]}
    assert health["b"]["up"] is False and health["a"]["up"] is True


def test_server_busy_moves_the_request_to_another_host_with_the_model(fleet: Callable[..., Fleet]) -> None:
    tight = EmulatorSettings(
        token_rate=20, load_seconds=0.05, parallel=1, max_queue=0, response_tokens=(30, 30)
    )
    f = fleet({"a": tight, "b": EmulatorSettings(**FAST)})
    _load(f.urls["a"])  # warm on a only: a is everyone's first choice
    f.until(lambda hosts: MODEL in hosts["a"]["loaded"] and not hosts["b"]["loaded"], "the model warm on a")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(f.generate)  # takes a's only slot for 1.5 s
        deadline = time.monotonic() + 5
        while not f.health()["upstreams"][0]["in_flight"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        spilled = f.generate()
        assert spilled.status_code == 200 and spilled.json()["done"] is True
        assert long.result().status_code == 200
    by_route = {line["route"]: line for line in f.settled(2)}
    assert by_route["warm"]["upstream"] == "a"
    assert by_route["spill"]["upstream"] == "b"
    assert [(r["upstream"], r["reason"]) for r in by_route["spill"]["retries"]] == [("a", "busy")]


def test_all_hosts_down_is_a_502_naming_every_host_in_the_api_shape(fleet: Callable[..., Fleet]) -> None:
    a, b = (f"http://127.0.0.1:{_closed_port()}" for _ in range(2))
    f = fleet({"a": a, "b": b})
    native = f.generate()
    assert native.status_code == 502
    message = native.json()["error"]
    assert "a (" in message and "b (" in message, message
    openai = httpx.post(f"{f.url}/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10)
    assert openai.status_code == 502
    assert "a (" in openai.json()["error"]["message"] and "b (" in openai.json()["error"]["message"]
    tags = httpx.get(f"{f.url}/api/tags", timeout=10)
    assert tags.status_code == 502 and "a (" in tags.json()["error"]
    assert {line["error_type"] for line in f.settled(3)} == {"upstreams_down"}


# -- answers from every host ---------------------------------------------------------------------------------


def test_tags_models_and_ps_are_merged_across_hosts(fleet: Callable[..., Fleet]) -> None:
    f = fleet(
        {
            "a": EmulatorSettings(**FAST, models=("llama3.2:3b", "gemma3:1b")),
            "b": EmulatorSettings(**FAST, models=("gemma3:1b", "qwen3:14b")),
        }
    )
    _load(f.urls["a"], "gemma3:1b")
    _load(f.urls["b"], "gemma3:1b")
    _load(f.urls["b"], "qwen3:14b")
    tags = httpx.get(f"{f.url}/api/tags").json()["models"]
    assert sorted(m["name"] for m in tags) == ["gemma3:1b", "llama3.2:3b", "qwen3:14b"]  # each once
    direct = httpx.get(f"{f.urls['a']}/api/tags").json()["models"]
    assert next(m for m in tags if m["name"] == "llama3.2:3b") == direct[0]  # Ollama's own entry, unchanged
    openai = httpx.get(f"{f.url}/v1/models").json()
    assert openai["object"] == "list"
    assert sorted(m["id"] for m in openai["data"]) == ["gemma3:1b", "llama3.2:3b", "qwen3:14b"]
    ps = httpx.get(f"{f.url}/api/ps").json()["models"]
    assert sorted((m["name"], m["otellama_upstream"]) for m in ps) == [
        ("gemma3:1b", "a"),
        ("gemma3:1b", "b"),
        ("qwen3:14b", "b"),
    ]
    assert {line["route"] for line in f.settled(3)} == {"all"}


def test_management_goes_to_the_host_the_header_names_else_the_first(fleet: Callable[..., Fleet]) -> None:
    f = fleet({"a": EmulatorSettings(**FAST), "b": EmulatorSettings(**FAST)})

    def copy(destination: str, **headers: str) -> httpx.Response:
        body = {"source": MODEL, "destination": destination}
        return httpx.post(f"{f.url}/api/copy", json=body, headers=headers, timeout=10)

    assert copy("on-b", **{"X-Otellama-Upstream": "b"}).status_code == 200
    assert copy("on-a").status_code == 200
    names = {
        host: {m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"]}
        for host, url in f.urls.items()
    }
    assert "on-b:latest" in names["b"] and "on-b:latest" not in names["a"]
    assert "on-a:latest" in names["a"] and "on-a:latest" not in names["b"]
    unknown = copy("x", **{"X-Otellama-Upstream": "nowhere"})
    assert unknown.status_code == 400 and "nowhere" in unknown.json()["error"]
    assert [(line["upstream"], line["route"]) for line in f.settled(3)][:2] == [("b", "only"), ("a", "only")]


# -- telemetry -----------------------------------------------------------------------------------------------


def test_spans_and_metrics_name_the_host_and_the_retries(fleet: Callable[..., Fleet]) -> None:
    doomed = BackgroundServer(create_emulator(EmulatorSettings(**FAST))).start()
    try:
        f = fleet({"down": doomed.url, "a": EmulatorSettings(**FAST)}, poll_interval=60)
        f.until(lambda hosts: all(h["up"] for h in hosts.values()), "both hosts up")
    finally:
        doomed.stop()
    # No model: the two hosts take turns, so one of these goes to "down" first and fails over.
    for _ in range(2):
        assert httpx.get(f"{f.url}/api/version").status_code == 200
    assert f.generate().status_code == 200
    f.settled(3)
    spans = f.spans.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert all(s.attributes and s.attributes["otellama.upstream"] == "a" for s in servers)
    [failover] = [s for s in servers if s.attributes and s.attributes["otellama.route"] == "failover"]
    assert [(e.name, dict(e.attributes or {})) for e in failover.events] == [
        ("otellama.retry", {"otellama.upstream": "down", "otellama.retry.reason": "connect_error"})
    ]
    [genai] = [s for s in spans if s.attributes and "gen_ai.operation.name" in s.attributes]
    assert genai.attributes is not None
    port = int(f.urls["a"].rsplit(":", 1)[1])
    assert (genai.attributes["server.address"], genai.attributes["server.port"]) == ("127.0.0.1", port)
    assert genai.attributes["otellama.upstream"] == "a"
    data = f.metrics.get_metrics_data()
    assert data is not None
    points = {
        metric.name: [
            dict(p.attributes or {}) | {"value": getattr(p, "value", None)} for p in metric.data.data_points
        ]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert {p["otellama.upstream"] for p in points["ollama.requests"]} == {"a"}
    up = {p["otellama.upstream"]: p["value"] for p in points["otellama.upstream.up"]}
    assert up == {"down": 0, "a": 1}
    loaded = {
        (p["otellama.upstream"], p["gen_ai.request.model"]): p["value"] for p in points["ollama.model.loaded"]
    }
    # The poll is a minute away: what a has loaded is as the start-up poll saw it (nothing, all listed)
    assert loaded[("a", MODEL)] == 0 and loaded[("a", "gemma3:1b")] == 0
    in_flight = {p["otellama.upstream"]: p["value"] for p in points["otellama.upstream.requests.in_flight"]}
    assert in_flight == {"down": 0, "a": 0}


def test_one_upstream_gets_the_host_gauges_without_being_polled_on_a_timer(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    emulator = create_emulator(EmulatorSettings(**FAST))
    url = serve(emulator)
    reader = InMemoryMetricReader()
    app = create_app(
        Settings(upstream=Upstream.parse(url), log_file=tmp_path / "log.jsonl", poll_interval=0.05),
        metric_readers=[reader],
    )
    proxy = serve(app)
    assert httpx.post(f"{proxy}/api/generate", json={"model": MODEL}, timeout=10).status_code == 200
    time.sleep(0.3)  # several poll intervals: a timer would have polled by now
    assert app.hosts.hosts[0].polled_at is None
    deadline = time.monotonic() + 5
    while True:
        data = reader.get_metrics_data()  # the read asks /api/ps; the answer shows at the next read
        assert data is not None
        names = {
            metric.name: metric
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        }
        if "ollama.model.vram" in names:
            break
        assert time.monotonic() < deadline, "the single upstream's gauges never appeared"
        time.sleep(0.05)
    [vram] = names["ollama.model.vram"].data.data_points
    assert vram.attributes is not None and vram.value > 0
    assert dict(vram.attributes) == {"gen_ai.request.model": MODEL}  # no host attribute: there is one host
    lines = [orjson.loads(line) for line in (tmp_path / "log.jsonl").read_bytes().splitlines()]
    assert (lines[0]["upstream"], lines[0]["route"]) == (None, None)  # one upstream: nothing was routed


def test_a_model_no_host_has_goes_to_a_host_that_is_up_not_to_one_never_reached(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet({"down": f"http://127.0.0.1:{_closed_port()}", "a": EmulatorSettings(**FAST)})
    f.until(lambda hosts: hosts["down"]["up"] is False and hosts["a"]["up"] is True, "down down, a up")
    missing = f.generate("nobody-has-it")
    assert missing.status_code == 404 and "not found" in missing.json()["error"]  # Ollama's own answer
    [line] = f.settled(1)
    assert (line["upstream"], line["route"]) == ("a", "least_busy")


def test_busy_spills_only_a_body_still_in_memory(serve: Callable[..., str], tmp_path: Path) -> None:
    async def busy(seen: Seen, send: Send) -> None:
        listing = seen.path in ("/api/ps", "/api/tags")  # otellama's polls: up, with no models
        body = b'{"models":[]}' if listing else b'{"error":"server busy, please try again.  maximum pending"}'
        await send({"type": "http.response.start", "status": 200 if listing else 503, "headers": []})
        await send({"type": "http.response.body", "body": body})

    hosts = {name: ScriptedUpstream(busy) for name in ("a", "b")}
    upstreams = tuple(Upstream.parse(f"{name}={serve(host)}") for name, host in hosts.items())
    url = serve(create_app(Settings(upstreams=upstreams, log_file=tmp_path / "log.jsonl", poll_interval=0.1)))

    def generations() -> list[int]:
        return [sum(seen.path == "/api/generate" for seen in host.forwarded) for host in hosts.values()]

    small = httpx.post(f"{url}/api/generate", json={"model": MODEL, "prompt": "hi"}, timeout=10)
    assert small.status_code == 503  # the last host's own answer, relayed
    assert generations() == [1, 1]  # in memory: it went to the other host too
    # Over the 1 MiB kept in memory, the body streams to the first host and can go nowhere else.
    big = b'{"model": "llama3.2:3b", "prompt": "' + b"x" * (2 << 20) + b'"}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    streamed = httpx.post(f"{url}/api/generate", content=chunks(), timeout=10)
    assert streamed.status_code == 503
    assert sum(generations()) == 3  # one more: sent once, not spilled
