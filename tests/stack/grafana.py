"""The provisioned Grafana dashboards, read the way Grafana reads them.

Grafana cannot run here, so this module does the part of its work that decides what reaches Prometheus:
it walks every panel (rows and collapsed rows included), and expands template variables and the built-in
interval variables into a query exactly as Grafana's Prometheus datasource does (multi-value and "All"
selections become escaped regex alternations, or the variable's ``allValue``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_FILES = sorted((GRAFANA / "provisioning" / "datasources").glob("*.yaml"))
#: Grafana's own annotation datasource, present in every dashboard.
BUILTIN_UIDS = frozenset({"-- Grafana --", "grafana"})
ALL = "$__all"

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<match>.*\S)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.S)


def load(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, including the panels folded inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


@dataclasses.dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str
    datasource: str | None

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


def queries(dashboard: Mapping[str, Any]) -> list[Query]:
    """Every query Grafana would run for the dashboard's panels (hidden targets excluded)."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("hide"):
                continue
            source = target.get("datasource") or panel.get("datasource") or {}
            found.append(
                Query(
                    dashboard["title"],
                    panel.get("title", "?"),
                    target.get("refId", "?"),
                    target.get("expr", ""),
                    source.get("uid") if isinstance(source, dict) else source,
                )
            )
    return found


def datasource_uids(node: Any) -> set[str]:
    """Every datasource uid a dashboard refers to, wherever it appears (panels, targets, variables...)."""
    uids: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict) and "uid" in value:
                uids.add(value["uid"])
            elif key in ("datasource", "datasourceUid") and isinstance(value, str):
                uids.add(value)
            else:
                uids |= datasource_uids(value)
    elif isinstance(node, list):
        for item in node:
            uids |= datasource_uids(item)
    return uids


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    text = query or variable.get("definition")
    assert isinstance(text, str) and text, f"variable {variable['name']} has no query"
    return text


def parse_label_values(text: str) -> tuple[str | None, str]:
    """``label_values(match, label)`` -> (match, label); the only variable query these dashboards use."""
    found = _LABEL_VALUES.match(text)
    assert found, f"not a label_values() query: {text}"
    return found["match"], found["label"]


def regular_escape(value: str) -> str:
    """Grafana's ``prometheusRegularEscape``: a single value of a single-value variable."""
    return value.replace("\\", "\\\\").replace("'", "\\\\'")


def regex_escape(value: str) -> str:
    """Grafana's ``prometheusSpecialRegexEscape``: values of multi-value and "All"-able variables."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]+?.()|]", lambda m: "\\\\" + m[0], value)


def format_value(variable: Mapping[str, Any], selected: Sequence[str], options: Sequence[str]) -> str:
    """What Grafana puts in the query for ``selected`` (``[ALL]`` for All) out of ``options``."""
    if list(selected) == [ALL]:
        if variable.get("allValue"):
            return str(variable["allValue"])
        selected = options
    if not variable.get("multi") and not variable.get("includeAll"):
        (value,) = selected
        return regular_escape(value)
    escaped = [regex_escape(value) for value in selected]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def interval_values(window_s: int) -> dict[str, str]:
    """Grafana's built-in interval variables for a dashboard whose time range is the last ``window_s``.

    The test's time range is its own run: every interval is that whole window, so a ``rate()`` always has
    every sample the test produced.
    """
    return {
        "__rate_interval": f"{window_s}s",
        "__interval": f"{window_s}s",
        "__interval_ms": str(window_s * 1000),
        "__range": f"{window_s}s",
        "__range_s": str(window_s),
        "__range_ms": str(window_s * 1000),
    }


def interpolate(expr: str, values: Mapping[str, str]) -> str:
    """Replace ``$name``, ``${name}`` and ``[[name]]``; an unknown variable fails the test."""

    def replace(found: re.Match[str]) -> str:
        name = found[1] or found[2] or found[3]
        assert name in values, f"unknown variable ${name} in {expr!r}"
        return values[name]

    return _VARIABLE.sub(replace, expr)
