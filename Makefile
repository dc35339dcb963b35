# Everything bootstraps its own virtualenv, so a fresh clone needs only Python 3.11, pip and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINTED := $(wildcard service tests bench)

.PHONY: install constraints test lint typecheck pytest prometheus chromium demo bench bench-report soak clean

install: $(STAMP)

# constraints.txt pins every package to the versions the tests and benchmarks ran with (the Dockerfile and
# so CI install from it too); `make constraints` moves it to the newest releases pyproject.toml allows.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,demo]'
	touch $(STAMP)

constraints:
	PYTHON=$(PYTHON) bash scripts/update-constraints

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: install
	$(BIN)/mypy

# The stack test (tests/test_stack.py) runs a real Prometheus: Debian's package, installed when missing and
# possible (root with apt-get, as on CI); otherwise this stops and says how to install it.
prometheus:
	bash scripts/install-prometheus

# The HTML report test (tests/test_html.py) renders the page in headless Chromium: Debian's package,
# installed when missing and possible (root with apt-get, as on CI); otherwise this stops and says how.
chromium:
	bash scripts/install-chromium

pytest: install prometheus chromium
	$(BIN)/pytest

test: lint typecheck pytest

demo: install
	$(BIN)/otellama demo

bench: install
	$(BIN)/python bench/proxy_bench.py --telemetry off --write BENCHMARKS.md
	$(BIN)/python bench/proxy_bench.py --telemetry default --write BENCHMARKS.md
	$(BIN)/python bench/proxy_bench.py --telemetry on --write BENCHMARKS.md
	$(BIN)/python bench/proxy_bench.py --telemetry blackhole --write BENCHMARKS.md
	$(BIN)/python bench/proxy_bench.py --telemetry on --label "telemetry on, httpx instrumentation disabled" \
		--proxy-env OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=httpx --write BENCHMARKS.md
	$(BIN)/python bench/throughput_ab.py
	$(BIN)/python bench/telemetry_bench.py

soak: install
	$(BIN)/python bench/soak.py

bench-report: install
	$(BIN)/python bench/report_bench.py --write BENCHMARKS.md

clean:
	rm -rf $(VENV) build *.egg-info service/*.egg-info .mypy_cache .ruff_cache .pytest_cache
