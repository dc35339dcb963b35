"""The full stack (docker-compose.yml, otel-collector.yaml, grafana/): its files, and every chart has data.

Docker and Grafana cannot run here, so the proof is in two parts:

- static checks: the compose file against the Compose Specification's own JSON schema (as vendored by
  check-jsonschema) plus what the schema cannot know (mounted files exist, images pinned, one `ollama` per
  profile, references resolve); the collector's pipelines; the Dockerfile's build context; the dashboards'
  datasources, units and legends;
- a real Prometheus (Debian's package) scraping a real otellama in front of the emulator, fed two rounds of
  traffic that cover every outcome, then **every panel query of every dashboard**, with its variables
  expanded as Grafana expands them, run through Prometheus' HTTP API: a query that returns nothing fails.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from otellama.app import create_app
from otellama.demo import traffic
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.server import BackgroundServer
from otellama.settings import Settings, Upstream
from tests.stack import grafana
from tests.stack.prometheus import MISSING, Prometheus, finite

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COLLECTOR = ROOT / "otel-collector.yaml"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"
PROMETHEUS_UID = "otellama-prometheus"
TEMPO_UID = "otellama-tempo"
#: The stack's scrape job (docker-compose.yml), which the test's own Prometheus mimics.
SCRAPE_JOB = "otellama-scrape"
#: What each profile is for. `ollama` is the default (.env); exactly one service answers to `ollama` in each.
PROFILES = ("ollama", "gpu", "demo")
#: Services without a healthcheck, and why (anything else must have one).
NO_HEALTHCHECK = {
    "otel-collector": "the image holds the collector binary only: no shell, no HTTP client",
    "traffic": "a client: it serves nothing",
}
#: Exporter names that current collector releases have renamed (the old ones are deprecated aliases).
DEPRECATED_COMPONENTS = {"otlp": "otlp_grpc", "otlphttp": "otlp_http", "logging": "debug"}


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return compose


def _services(profile: str) -> dict[str, dict[str, Any]]:
    """The services `docker compose --profile PROFILE up` starts."""
    return {
        name: service
        for name, service in _compose()["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


def _hostnames(name: str, service: dict[str, Any]) -> set[str]:
    names = {name}
    for network in (service.get("networks") or {}).values():
        names |= set((network or {}).get("aliases", []))
    return names


def _config(name: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(_compose()["configs"][name]["content"])
    return config


# --- docker-compose.yml ------------------------------------------------------------------------------------
def test_compose_file_is_valid_against_the_compose_specification() -> None:
    # The schema docker compose itself validates against, as vendored by check-jsonschema.
    assert importlib.util.find_spec("check_jsonschema"), "install the test extra: pip install -e '.[test]'"
    checked = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_default_profile_is_ollama_and_each_profile_has_exactly_one_ollama() -> None:
    dotenv = dict(
        line.split("=", 1)
        for line in (ROOT / ".env").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    assert dotenv.get("COMPOSE_PROFILES") == "ollama", "`docker compose up` must start the real Ollama"
    for profile in PROFILES:
        services = _services(profile)
        upstreams = [name for name, service in services.items() if "ollama" in _hostnames(name, service)]
        assert len(upstreams) == 1, f"profile {profile}: {upstreams} all answer to the host name ollama"
        assert "ports" not in services[upstreams[0]], "Ollama itself must not be published"
        assert {"otellama", "otel-collector", "prometheus", "tempo", "grafana"} <= services.keys()
    demo = _services("demo")
    assert demo["emulator"]["command"][0] == "emulate", "the demo swaps Ollama for `otellama emulate`"
    assert "traffic" in demo
    gpu = _services("gpu")["ollama-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_otellama_stands_where_ollama_was() -> None:
    otellama = _compose()["services"]["otellama"]
    assert otellama["build"] == "."
    command = otellama["command"]
    assert command[command.index("--upstream") + 1] == "ollama:11434"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert [p.rsplit(":", 2)[-2:] for p in otellama["ports"]] == [["11434", "11434"]]
    env = otellama["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert env["OTELLAMA_LOG_FILE"].startswith("/var/log/otellama/")
    assert "otellama-logs:/var/log/otellama" in otellama["volumes"]


def test_compose_images_are_pinned_and_services_are_looked_after() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        if "build" not in service:
            image = service["image"]
            repository, _, tag = image.partition("@")[0].rpartition(":")
            assert repository and "/" not in tag, f"{name}: {image} has no tag"
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned to a release"
        assert service.get("restart") == "unless-stopped", f"{name}: no restart policy"
        healthcheck = service.get("healthcheck")
        if name in NO_HEALTHCHECK:
            assert not healthcheck or healthcheck.get("disable"), name
        else:
            assert healthcheck and healthcheck["test"][0] == "CMD", f"{name}: no healthcheck"


def test_compose_references_resolve_and_mounted_files_exist() -> None:
    compose = _compose()
    declared_volumes = set(compose.get("volumes") or {})
    declared_configs = set(compose.get("configs") or {})
    used_volumes: set[str] = set()
    for name, service in compose["services"].items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in compose["services"], f"{name} depends on unknown {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
                used_volumes.add(source)
        for config in service.get("configs", []):
            assert config["source"] in declared_configs, f"{name}: config {config['source']} is not declared"
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file()
    assert used_volumes == declared_volumes, "declared but unused volumes"
    for name, config in compose["configs"].items():
        assert "file" in config or yaml.safe_load(config["content"]), name
        if "file" in config:
            assert (ROOT / config["file"]).is_file(), name
    # Services that depend on each other start together in every profile.
    for profile in PROFILES:
        services = _services(profile)
        for name, service in services.items():
            for dependency in service.get("depends_on") or {}:
                assert dependency in services, f"profile {profile}: {name} needs {dependency}, not started"


def test_compose_prometheus_takes_otlp_keeps_exemplars_and_scrapes_otellama() -> None:
    prometheus = _compose()["services"]["prometheus"]
    assert "--web.enable-otlp-receiver" in prometheus["command"]
    assert "--enable-feature=exemplar-storage" in prometheus["command"]
    (mounted,) = prometheus["configs"]
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert mounted["target"] == config_file
    config = _config(mounted["source"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    scrape = jobs[SCRAPE_JOB]
    assert scrape["metrics_path"] == "/otellama/metrics"
    assert scrape["static_configs"] == [{"targets": ["otellama:11434"]}]
    tempo = _compose()["services"]["tempo"]
    receivers = _config(tempo["configs"][0]["source"])["distributor"]["receivers"]["otlp"]["protocols"]
    assert receivers["grpc"]["endpoint"] == "0.0.0.0:4317"


# --- Dockerfile --------------------------------------------------------------------------------------------
def _dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last matching rule wins)."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if re.fullmatch(f"{regex}(/.*)?", path):
            ignored = not negate
    return ignored


def test_dockerfile_builds_from_files_in_the_context_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    sources = [
        source
        for line in text.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in shlex.split(line)[1:-1]
        if not source.startswith("--")
    ]
    assert sources, "nothing copied"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not _dockerignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
        if (ROOT / source).is_dir():
            for path in (ROOT / source).rglob("*.py"):
                relative = path.relative_to(ROOT).as_posix()
                assert not _dockerignored(relative), f"{relative} excluded by .dockerignore"
    for unwanted in (".git", ".venv", "tests", "logs", "service/otellama/__pycache__"):
        assert _dockerignored(unwanted), f"{unwanted} is sent to the docker build"
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "the image must not run as root"
    assert "/otellama/health" in text.split("HEALTHCHECK", 1)[1]
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)


# --- otel-collector.yaml -----------------------------------------------------------------------------------
def test_collector_pipelines_use_only_defined_components() -> None:
    config = yaml.safe_load(COLLECTOR.read_text())
    service = config["service"]
    for extension in service.get("extensions", []):
        assert extension in config["extensions"], f"extension {extension} is not defined"
    kinds = ("receivers", "processors", "exporters")
    used: dict[str, set[str]] = {kind: set() for kind in kinds}
    for name, pipeline in service["pipelines"].items():
        assert name.split("/")[0] in ("traces", "metrics", "logs"), name
        for kind in kinds:
            for component in pipeline.get(kind, []):
                assert component in (config.get(kind) or {}), (
                    f"pipeline {name}: {kind[:-1]} {component} undefined"
                )
                assert component.split("/")[0] not in DEPRECATED_COMPONENTS or kind == "receivers", (
                    f"{component}: use {DEPRECATED_COMPONENTS[component.split('/')[0]]}, the current name"
                )
                used[kind].add(component)
        assert pipeline["processors"][0] == "memory_limiter", (
            f"pipeline {name}: memory_limiter must come first"
        )
        assert "batch" in pipeline["processors"]
        assert "debug" in pipeline["exporters"]
    for kind in kinds:
        assert used[kind] == set(config[kind]), (
            f"{kind} defined but in no pipeline: {set(config[kind]) - used[kind]}"
        )
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    exporters = config["exporters"]
    assert exporters["otlp_grpc/tempo"]["endpoint"] == "tempo:4317"
    assert (
        exporters["otlp_http/prometheus"]["metrics_endpoint"]
        == "http://prometheus:9090/api/v1/otlp/v1/metrics"
    )
    assert service["pipelines"]["traces"]["exporters"][0] == "otlp_grpc/tempo"
    assert service["pipelines"]["metrics"]["exporters"][0] == "otlp_http/prometheus"
    mount = next(
        v for v in _compose()["services"]["otel-collector"]["volumes"] if v.startswith("./otel-collector")
    )
    assert mount.split(":")[1] in _compose()["services"]["otel-collector"]["command"][0]


# --- grafana/ -----------------------------------------------------------------------------------------------
def _datasources() -> dict[str, dict[str, Any]]:
    found = {}
    for path in grafana.DATASOURCE_FILES:
        for source in yaml.safe_load(path.read_text())["datasources"]:
            found[source["uid"]] = source
    return found


def test_grafana_datasources_have_fixed_uids_and_exemplars_link_to_traces() -> None:
    sources = _datasources()
    assert sources[PROMETHEUS_UID]["type"] == "prometheus"
    assert sources[PROMETHEUS_UID]["url"] == "http://prometheus:9090"
    assert sources[TEMPO_UID]["type"] == "tempo"
    assert sources[TEMPO_UID]["url"] == "http://tempo:3200"
    (destination,) = sources[PROMETHEUS_UID]["jsonData"]["exemplarTraceIdDestinations"]
    assert destination == {"name": "trace_id", "datasourceUid": TEMPO_UID}


def test_grafana_provisioning_is_mounted_where_it_says() -> None:
    grafana_service = _compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana_service["volumes"] if v.startswith("./"))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((grafana.GRAFANA / "provisioning/dashboards/otellama.yaml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == mounts["./grafana/dashboards"]
    home = grafana_service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (grafana.GRAFANA / "dashboards" / Path(home).name).is_file()
    assert home.startswith(mounts["./grafana/dashboards"] + "/")
    assert grafana_service["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana_service["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def _link_uids(dashboard: dict[str, Any]) -> set[str]:
    """Datasource uids inside Explore links (``/explore?panes=...``)."""
    uids: set[str] = set()
    for link in dashboard.get("links", []):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(link["url"]).query)
        for panes in query.get("panes", []):
            uids |= grafana.datasource_uids(yaml.safe_load(panes))
    return uids


@pytest.mark.parametrize("path", grafana.DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_binds_to_provisioned_datasources_and_reads_without_a_manual(path: Path) -> None:
    dashboard = grafana.load(path)
    provisioned = set(_datasources()) | grafana.BUILTIN_UIDS
    used = grafana.datasource_uids(dashboard) | _link_uids(dashboard)
    assert used - provisioned == set(), f"datasource uids that are not provisioned: {used - provisioned}"
    assert dashboard["uid"].startswith("otellama-")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"job", "model", "client"}
    assert grafana.parse_label_values(grafana.variable_query(variables["model"])) == (
        'ollama_requests_total{job="$job"}',
        "gen_ai_request_model",
    )
    assert grafana.parse_label_values(grafana.variable_query(variables["client"]))[1] == "otellama_client"
    for name in ("model", "client"):
        assert variables[name]["includeAll"] and variables[name]["multi"], name
    ids = [panel["id"] for panel in dashboard["panels"]] + [
        p["id"] for row in dashboard["panels"] for p in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    section = _readme_full_stack()
    titles = [panel["title"] for panel in grafana.panels(dashboard)]
    assert len(titles) == len(set(titles)), "two panels with one title: a reader cannot tell them apart"
    for panel in grafana.panels(dashboard):
        title = panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, title
        assert f"| {title} |" in section, f"README's Full stack section does not say what {title!r} answers"
        if panel["type"] == "text":
            continue
        assert panel.get("description"), f"{title}: no description (the (i) a reader hovers)"
        assert panel["datasource"]["uid"] == PROMETHEUS_UID, f"{title}: not checkable through Prometheus"
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"{title}: no unit"
        assert defaults.get("thresholds", {}).get("steps"), f"{title}: no thresholds"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == PROMETHEUS_UID, f"{title}: {target['refId']}"
            if panel["type"] == "timeseries":
                assert target.get("legendFormat") not in (None, "", "__auto"), f"{title}: no legend"
                assert panel["options"]["legend"]["showLegend"], title
    latency = [
        t
        for q in grafana.panels(dashboard)
        for t in q.get("targets", [])
        if "gen_ai_client_operation_duration_seconds_bucket" in t["expr"] and not t.get("instant")
    ]
    assert latency and any(t.get("exemplar") for t in latency), "latency charts must carry exemplars"


def _readme_full_stack() -> str:
    text = README.read_text()
    assert "## Full stack" in text, "README.md has no Full stack section"
    return text.split("## Full stack", 1)[1].split("\n## ", 1)[0]


def test_readme_says_how_to_start_the_stack_and_where_to_look() -> None:
    section = _readme_full_stack()
    for command in ("docker compose up", "--profile demo", "--profile gpu"):
        assert command in section, command
    for name in ("grafana", "prometheus"):
        (port,) = _compose()["services"][name]["ports"]
        host, published, _ = port.split(":")
        assert f"http://{host}:{published}" in section, f"README does not say where {name} is"
    assert "127.0.0.1:11434" in section


# --- every panel query, through a real Prometheus ------------------------------------------------------
CLIENT = "stack-test"
OTHER_CLIENT = "notebook"


@dataclasses.dataclass
class Stack:
    prometheus: Prometheus
    otellama: str
    started: float  # epoch seconds, before the first scrape

    def window(self) -> int:
        """The dashboards' time range in the test: from before Prometheus started until now."""
        return math.ceil(time.time() - self.started) + 5


def _otellama_totals(url: str) -> tuple[float, float]:
    """(requests counted, requests in flight) in otellama's own /otellama/metrics."""
    totals = {"ollama_requests": 0.0, "ollama_requests_in_flight": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/otellama/metrics", trust_env=False).text):
        if family.name in totals:
            totals[family.name] += sum(s.value for s in family.samples if not s.name.endswith("_created"))
    return totals["ollama_requests"], totals["ollama_requests_in_flight"]


def _drive(url: str) -> None:
    """One round: every scenario as CLIENT (every outcome), a little as another client and as nobody."""
    with httpx.Client(base_url=url, timeout=30.0, trust_env=False) as http:
        for scenario in traffic.SCENARIOS:
            scenario.run(traffic.Caller(http, CLIENT))
        traffic.chat_stream(traffic.Caller(http, OTHER_CLIENT, "gemma3:1b"))
        traffic.embed(traffic.Caller(http, OTHER_CLIENT))
        traffic.chat(traffic.Caller(http, None))
        traffic.list_models(traffic.Caller(http, None))


def _settle(stack: Stack) -> None:
    """Wait until every exchange is recorded by otellama, ingested by Prometheus, and scraped twice more."""
    deadline = time.monotonic() + 15
    while (totals := _otellama_totals(stack.otellama))[1] != 0:
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.02)
    recorded = totals[0]
    ingested = f'sum(ollama_requests_total{{job="{SCRAPE_JOB}"}})'
    while stack.prometheus.value(ingested) != recorded:
        assert time.monotonic() < deadline, f"Prometheus has {stack.prometheus.value(ingested)} of {recorded}"
        time.sleep(0.1)
    stack.prometheus.wait_for_scrapes(since=time.time(), count=2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("prometheus") is None:
        pytest.fail(MISSING, pytrace=False)
    workdir = tmp_path_factory.mktemp("stack")
    # A fast emulator that still loads models (a cold start above the threshold) and queues (one slot).
    emulator = create_emulator(EmulatorSettings(load_seconds=0.3, token_rate=200.0, parallel=1))
    with BackgroundServer(emulator) as upstream:
        settings = Settings(
            upstream=Upstream.parse(upstream.url), log_file=workdir / "otellama.jsonl", cold_start_seconds=0.2
        )
        with BackgroundServer(create_app(settings)) as proxy:
            started = time.time() - 1
            prometheus = Prometheus(workdir, f"127.0.0.1:{proxy.port}", SCRAPE_JOB)
            try:
                prometheus.wait_ready()
                stack = Stack(prometheus, proxy.url, started)
                prometheus.wait_for_scrapes(since=started, count=1)
                # Two rounds: a series must exist before its counter moves for rate() to see the increase.
                for _ in range(2):
                    _drive(proxy.url)
                    _settle(stack)
                yield stack
            finally:
                prometheus.stop()


def test_the_traffic_covered_every_outcome(stack: Stack) -> None:
    """The panels' data is only worth checking if the traffic produced every case they show."""
    window = f"{stack.window()}s"
    seen = {
        label: {
            r["metric"].get(label, "")
            for r in stack.prometheus.query(f"count by ({label}) (ollama_requests_total)")
        }
        for label in ("otellama_outcome", "error_type", "gen_ai_operation_name", "otellama_client")
    }
    assert seen["otellama_outcome"] == {"ok", "error", "cancelled"}
    assert {"404", "stream_error", "cancelled"} <= seen["error_type"]
    assert {"chat", "text_completion", "embeddings", ""} <= seen["gen_ai_operation_name"]
    assert {CLIENT, OTHER_CLIENT, ""} <= seen["otellama_client"]
    cold = stack.prometheus.value(
        f'sum(increase(ollama_cold_starts_total{{otellama_client="{CLIENT}"}}[{window}]))'
    )
    assert cold and cold >= 1, "no cold start in the second round"
    queued = stack.prometheus.value("max(ollama_queue_duration_seconds_sum)")
    assert queued and queued > 0, "no request waited for a slot"


EVERY = "every value listed"
VARIANTS = {
    # Grafana's defaults: All models, all clients (allValue ".*", so requests without the header count too).
    "all": {"model": [grafana.ALL], "client": [grafana.ALL]},
    # Every listed value ticked one by one: a regex alternation of escaped values, "(a|b\\.c)".
    "every-value": {"model": [EVERY], "client": [EVERY]},
    # A reader narrowing down to one model and one client.
    "one-model-one-client": {"model": [traffic.CHAT_MODEL], "client": [CLIENT]},
}


def _variable_values(
    stack: Stack, dashboard: dict[str, Any], selection: dict[str, list[str]]
) -> dict[str, str]:
    values = grafana.interval_values(stack.window())
    for variable in dashboard["templating"]["list"]:
        match, label = grafana.parse_label_values(grafana.variable_query(variable))
        match = grafana.interpolate(match, values) if match else None
        options = stack.prometheus.label_values(label, match, stack.started)
        assert options, f"variable {variable['name']}: label_values found nothing"
        selected = selection.get(variable["name"])
        if selected == [EVERY]:
            selected = options
        elif selected is None:
            # A single-value variable: its saved value if Prometheus has it, else the first (Grafana's rule).
            current = variable.get("current", {}).get("value")
            selected = [current if current in options else options[0]]
        assert selected == [grafana.ALL] or set(selected) <= set(options), (
            variable["name"],
            selected,
            options,
        )
        values[variable["name"]] = grafana.format_value(variable, selected, options)
    return values


@pytest.mark.parametrize(
    ("path", "variant"),
    list(itertools.product(grafana.DASHBOARD_FILES, VARIANTS)),
    ids=[f"{p.stem}-{v}" for p, v in itertools.product(grafana.DASHBOARD_FILES, VARIANTS)],
)
def test_every_panel_query_returns_data(stack: Stack, path: Path, variant: str) -> None:
    dashboard = grafana.load(path)
    values = _variable_values(stack, dashboard, VARIANTS[variant])
    queries = grafana.queries(dashboard)
    assert queries
    empty = []
    for query in queries:
        assert query.datasource == PROMETHEUS_UID, f"{query.name}: not a Prometheus query, cannot be checked"
        promql = grafana.interpolate(query.expr, values)
        if not finite(stack.prometheus.query(promql)):
            empty.append(f"{query.name}:\n    {promql}")
    assert not empty, f"{len(empty)} of {len(queries)} panel queries returned no data:\n" + "\n".join(empty)


def test_demo_traffic_generator_runs_until_told_to_stop(
    serve: Callable[..., str], proxy_to: Callable[..., str]
) -> None:
    """What the demo profile's `traffic` service runs (`python -m otellama.demo.traffic`), for one second."""
    proxy = proxy_to(serve(create_emulator(EmulatorSettings(load_seconds=0.05, token_rate=0))))
    started = time.monotonic()
    argv = ["--target", proxy, "--workers", "2", "--pause", "0.01", "--seconds", "1"]
    assert traffic.main(argv) == 0
    assert time.monotonic() - started < 10
    assert _otellama_totals(proxy)[0] >= 10


def test_trace_to_metrics_queries_return_data(stack: Stack) -> None:
    """The Tempo datasource's links from a span back to its model's metrics."""
    links = _datasources()[TEMPO_UID]["jsonData"]["tracesToMetrics"]
    assert links["datasourceUid"] == PROMETHEUS_UID
    tags = f'gen_ai_request_model="{traffic.CHAT_MODEL}"'
    for link in links["queries"]:
        # $$ is how a provisioning file writes a literal $.
        promql = link["query"].replace("$$", "$").replace("$__tags", tags)
        assert "$" not in promql, promql
        assert finite(stack.prometheus.query(promql)), f"{link['name']}: {promql}"
