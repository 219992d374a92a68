# Two commands on a fresh clone:  `make run` (server on CPU, 127.0.0.1:8000)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test lint bench bench-quick loadtest soak audit gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) numpy
	$(PY) -m pip install -q -e '.[test]' -e ./clients/python
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m service serve --host $(HOST) --port $(PORT) --device cpu

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

test: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest

gpu-check: install
	bash scripts/gpu_check.sh

# Benchmarks and load tests (docs/benchmarks.md). wrk: `apt-get install -y wrk`.
BENCH_ARGS ?=
LOADTEST_ARGS ?=
bench: install
	$(PY) -m loadtest.bench $(BENCH_ARGS)

bench-quick: install
	$(PY) -m loadtest.bench --quick $(BENCH_ARGS)

loadtest: install
	$(PY) -m loadtest.run_locust --run-time 30s $(LOADTEST_ARGS)

# Reliability (docs/reliability.md): a 10-minute soak (not in CI) and a dependency audit.
SOAK_ARGS ?=
soak: install
	$(PY) scripts/soak.py --duration 600 $(SOAK_ARGS)

audit: install
	$(PY) -m pip install -q pip-audit==2.10.1
	$(PY) -m pip freeze --exclude-editable > .audit-requirements.txt
	$(VENV)/bin/pip-audit -r .audit-requirements.txt --no-deps --disable-pip --progress-spinner off

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
