# Everything bootstraps its own virtualenv, so a fresh clone needs only Python 3.11, pip and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINTED := $(wildcard service tests bench)

.PHONY: install test lint typecheck pytest prometheus demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: install
	$(BIN)/mypy

# The stack test (tests/test_stack.py) runs a real Prometheus: Debian's package, installed when missing and
# possible (root with apt-get, as on CI); otherwise this stops and says how to install it.
prometheus:
	bash scripts/install-prometheus

pytest: install prometheus
	$(BIN)/pytest

test: lint typecheck pytest

demo: install
	$(BIN)/otellama demo

bench: install
	$(BIN)/python bench/proxy_bench.py --write BENCHMARKS.md

clean:
	rm -rf $(VENV) build *.egg-info service/*.egg-info .mypy_cache .ruff_cache .pytest_cache
