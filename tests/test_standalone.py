"""The repository stands on its own, and installs the versions it was tested with.

A clone is the tracked files and nothing else: no folder beside it, no file elsewhere on the machine. The
capture-based tests run in such a copy, with an audit hook that lists every file or directory opened outside
it (the Python installation, the temporary directory and the system's own files aside), so a test that reads
anything else fails here even where that thing happens to exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Enough of the suite to read every kind of file in tests/data, quickly: the recordings and their
# provenance (test_captures, test_ollama) and the API fixtures (test_ollama, test_emulator).
CAPTURE_TESTS = ("tests/test_captures.py", "tests/test_ollama.py", "tests/test_emulator.py")

# Runs inside the copy's interpreter before pytest: every open/listdir/scandir outside the allowed places is
# written down. Nothing is refused, so one run lists every stray read, not just the first.
AUDIT = """
import os, sys
copy, beside, report = sys.argv[1], os.path.dirname(sys.argv[1]), sys.argv[2]
allowed = tuple(os.path.realpath(p) for p in sys.argv[3].split(os.pathsep) if p)
seen = open(report, "a", encoding="utf-8")

def inside(path, top):
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)

def audit(event, args):
    if event not in ("open", "os.listdir", "os.scandir") or not args or isinstance(args[0], int):
        return
    path = os.path.abspath(os.fsdecode(args[0]) if args[0] is not None else ".")
    if ours(path):
        return
    seen.write(path + "\\n")
    seen.flush()

def ours(entry):
    path = os.path.abspath(entry or ".")
    return inside(path, copy) or (not inside(path, beside) and any(inside(path, top) for top in allowed))

# An editable install puts the original checkout on sys.path: a clone's environment would not have it.
sys.path[:] = [entry for entry in sys.path if ours(entry)]
sys.addaudithook(audit)
import pytest
sys.exit(pytest.main(sys.argv[4:]))
"""


def tracked_files() -> list[str]:
    """What a clone holds: ``git ls-files`` of this checkout."""
    git = shutil.which("git")
    if git is None:
        pytest.fail("git is not installed: it lists the files a clone of the repository holds")
    listing = subprocess.run(
        [git, "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=False, timeout=30
    )
    if listing.returncode != 0:
        pytest.fail(f"`git ls-files` failed in {ROOT} (not a git checkout?): {listing.stderr.decode()}")
    return [name for name in listing.stdout.decode().split("\0") if name]


def test_a_clone_runs_the_capture_tests_with_nothing_beside_it(tmp_path: Path) -> None:
    files = tracked_files()
    for required in (
        *CAPTURE_TESTS,
        "tests/data/ollama-captures/SOURCES.tsv",
        "tests/data/ollama-api/INDEX.md",
    ):
        assert required in files, f"{required} is not tracked by git: a clone would not have it"
    copy = (
        tmp_path / "alone" / "otellama"
    )  # "alone" holds the copy and nothing else, as a fresh clone's parent
    for name in files:
        source = ROOT / name
        if (
            source.is_file()
        ):  # tracked but deleted in this checkout: a clone made after committing lacks it too
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)

    # The interpreter and its packages are the environment's, not the repository's: otellama itself must come
    # from the copy, and the directories its installation lives in are allowed unless they are the checkout.
    paths = sysconfig.get_paths()
    allowed = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, tempfile.gettempdir()}
    allowed |= {paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]}
    allowed |= {"/dev", "/proc", "/sys", "/etc", "/usr", "/lib", "/lib64", os.devnull}
    report = tmp_path / "outside.txt"
    report.touch()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTEST", "PYTHON", "HYPOTHESIS", "COV_", "OTEL", "OTELLAMA", "OLLAMA"))
    }
    env["PYTHONPATH"] = str(copy / "service")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    command = [
        sys.executable,
        "-c",
        AUDIT,
        str(copy),
        str(report),
        os.pathsep.join(sorted(allowed)),
        "-q",
        "-p",
        "no:cacheprovider",
        f"--basetemp={tmp_path / 'pytest'}",
        *CAPTURE_TESTS,
    ]
    run = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=180, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"the capture tests failed in a copy of the tracked files:\n{output[-6000:]}"

    summary = output.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 100, f"too few tests ran in the copy: {summary}"
    assert not re.search(r"skipped|deselected|xfail|xpass|error|warning", summary), summary

    outside = sorted(set(report.read_text().splitlines()))
    assert not outside, "tests in a clone read outside it:\n" + "\n".join(outside[:40])

    imported = subprocess.run(
        [sys.executable, "-c", "import otellama; print(otellama.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert Path(imported.stdout.strip()).is_relative_to(copy / "service"), (
        "the copy imported another otellama"
    )


# --- reproducible installs ---------------------------------------------------------------------------------
def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, separator, pin = line.partition("==")
            assert separator, f"constraints.txt: {line!r} is not an exact pin"
            found[canonicalize_name(name)] = pin.strip()
    return found


def test_every_requirement_is_pinned_inside_its_declared_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    requirements += [
        Requirement(text) for extra in project["optional-dependencies"].values() for text in extra
    ]
    pinned = pins()
    assert "otellama" not in pinned, "constraints.txt pins otellama itself"
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pinned[name]}, outside pyproject.toml's {requirement}"
        )


def test_make_install_and_the_docker_image_install_the_pinned_versions() -> None:
    makefile = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.M)
    assert stamp and "constraints.txt" in stamp.group(1).split(), "a new constraints.txt must reinstall .venv"
    installs = re.findall(r"pip install\b.*$", makefile, re.M)
    project_installs = [line for line in installs if "-e " in line]
    assert project_installs and all("-c constraints.txt" in line for line in project_installs), installs
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M), (
        "the image build lacks constraints.txt"
    )
    assert re.search(r"^RUN pip install .*-c constraints\.txt", dockerfile, re.M), (
        "the image installs unpinned"
    )
    assert "make test" in (ROOT / ".ci" / "run").read_text(), "CI no longer installs through make"
