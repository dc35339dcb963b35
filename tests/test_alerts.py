"""The Prometheus alert rules shipped in prometheus/alerts.yml: valid, unit-tested by promtool on series
that should and should not fire them, and loaded by the compose stack's Prometheus."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "prometheus" / "alerts.test.yml"
MISSING = (
    "the alert rule tests need promtool, which Debian's prometheus package ships. Run `make test` "
    "(it runs scripts/install-prometheus when it can) or `apt-get install prometheus`."
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(MISSING, pytrace=False)
    return subprocess.run([promtool, *args], capture_output=True, text=True, check=False, cwd=RULES.parent)


def test_alert_rules_are_valid() -> None:
    checked = _promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_each_alert_fires_when_it_should_and_not_before() -> None:
    tested = _promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert alerts == {
        "OllamaHostDown",
        "OllamaColdStartRateHigh",
        "OllamaErrorRateHigh",
        "OllamaTimeToFirstTokenSlow",
    }
    cases = [
        case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]
    ]
    covered = {case["alertname"] for case in cases if case.get("exp_alerts")}
    assert covered == alerts, f"alerts no test sees firing: {alerts - covered}"


def test_the_compose_stack_prometheus_loads_the_rules() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prometheus = compose["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prometheus["volumes"] if v.startswith("./"))
    target = mounts["./prometheus/alerts.yml"]
    config = yaml.safe_load(compose["configs"]["prometheus-config"]["content"])
    assert config["rule_files"] == [target]
