"""The package's layers, read from its imports: every rule in the subpackages' docstrings, checked.

Imports are read with :mod:`ast` from the source, module-level and function-level alike (a lazy import is
still a dependency), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "service" / "otellama"
SERVICE = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    this = module_name(path)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = this.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:  # "from otellama.tools import report" imports otellama.tools.report
                yield node.lineno, f"{base}.{alias.name}"


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for name, path in modules().items():
        if not in_package(name, package):
            continue
        for line, imported in imports_of(path):
            if any(in_package(imported, bad) for bad in forbidden):
                found.append(f"{path.relative_to(SERVICE)}:{line} imports {imported}")
    return sorted(set(found))


RULES = [
    # The byte path: no OpenTelemetry, no sink, no tool; it hands exchanges over through exchange.Recorder.
    (
        "otellama.proxy",
        (
            "opentelemetry",
            "otellama.observe",
            "otellama.sinks",
            "otellama.tools",
            "otellama.emulator",
            "otellama.demo",
            "otellama.app",
            "otellama.cli",
        ),
    ),
    # Observation is pure: no I/O, no OpenTelemetry, nothing above it.
    (
        "otellama.observe",
        (
            "opentelemetry",
            "socket",
            "asyncio",
            "subprocess",
            "threading",
            "pathlib",
            "io",
            "otellama.proxy",
            "otellama.sinks",
            "otellama.tools",
            "otellama.emulator",
            "otellama.demo",
            "otellama.app",
            "otellama.cli",
        ),
    ),
    # Sinks render records; they never reach back into the byte path or up into the tools.
    (
        "otellama.sinks",
        (
            "otellama.proxy",
            "otellama.tools",
            "otellama.emulator",
            "otellama.demo",
            "otellama.app",
            "otellama.cli",
        ),
    ),
    # The exporter process renders records from the log with the sinks; never the byte path or the tools.
    (
        "otellama.exporter",
        (
            "otellama.proxy",
            "otellama.tools",
            "otellama.emulator",
            "otellama.demo",
            "otellama.app",
            "otellama.cli",
        ),
    ),
    # The shared vocabulary depends on nothing of ours.
    ("otellama.exchange", ("otellama.",)),
    ("otellama.settings", ("otellama.",)),
    # The emulator stands in for Ollama; it knows nothing of the proxy that measures it.
    (
        "otellama.emulator",
        (
            "otellama.proxy",
            "otellama.sinks",
            "otellama.tools",
            "otellama.demo",
            "otellama.app",
            "opentelemetry",
        ),
    ),
]


@pytest.mark.parametrize(("package", "forbidden"), RULES, ids=[rule[0] for rule in RULES])
def test_a_layer_imports_only_what_its_docstring_allows(package: str, forbidden: tuple[str, ...]) -> None:
    assert modules(), "no modules found: the test is looking in the wrong place"
    assert violations(package, forbidden) == []


def test_the_rules_catch_a_forbidden_import(tmp_path: Path) -> None:
    # The checker itself: a proxy module importing OpenTelemetry is reported with its line.
    source = "import os\n\n\ndef f():\n    from opentelemetry import trace\n"
    path = PACKAGE / "proxy" / "forward.py"
    found = [
        (line, name) for line, name in imports_of_text(source, path) if in_package(name, "opentelemetry")
    ]
    assert found == [(5, "opentelemetry"), (5, "opentelemetry.trace")]


def imports_of_text(source: str, path: Path) -> list[tuple[int, str]]:
    scratch = path.parent / "__layers_probe__.py"
    scratch.write_text(source, encoding="utf-8")
    try:
        return list(imports_of(scratch))
    finally:
        scratch.unlink()


def test_no_module_imports_itself_back_through_a_circle() -> None:
    graph: dict[str, set[str]] = {}
    names = set(modules())
    for name, path in modules().items():
        edges = set()
        for _, imported in imports_of(path):
            # The longest known module the import names (a symbol import names its module).
            while imported and imported not in names:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not in_package(name, imported):
                edges.add(imported)
        graph[name] = edges
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_serving_loads_no_tool_emulator_or_demo() -> None:
    # What `otellama serve` imports before it starts uvicorn, in a fresh interpreter.
    probe = (
        "import sys, otellama.cli, otellama.app, otellama.server, otellama.proxy.connection;"
        "otellama.app.create_app;"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('otellama'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(SERVICE)},
    ).stdout.split()
    assert (
        "otellama.app" in loaded and "otellama.proxy.forward" in loaded
    )  # the probe really loaded the server
    assert [m for m in loaded if m.split(".")[1:2] in (["tools"], ["emulator"], ["demo"])] == []
