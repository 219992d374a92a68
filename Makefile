# Two commands on a fresh clone:  `make run` (server on CPU, 127.0.0.1:8000)  and  `make test`.
# `make run` installs only what the server needs; `make test` adds the test and load tools.
PYTHON ?= python3
# The virtual environment keeps the bytecode Python compiles on first import (pip installs
# with --no-compile, so nothing else writes it): where the environment sets
# PYTHONDONTWRITEBYTECODE, every process would compile torch's Python sources again, about
# 2 s of CPU on each server, worker or engine process start (docs/testing.md).
unexport PYTHONDONTWRITEBYTECODE
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
# make run listens on HOST:PORT for HTTP and HOST:GRPC_PORT for gRPC (0 turns gRPC off);
# e.g. `make run PORT=8080 GRPC_PORT=8081`
HOST ?= 127.0.0.1
PORT ?= 8000
GRPC_PORT ?= 8001

# The torch build (README "Which torch"): cpu (the default without an NVIDIA driver) takes
# the CPU-only wheel from the PyTorch CPU index, ~200 MB; cuda (the default where nvidia-smi
# exists) takes PyPI's wheel, which on Linux x86_64 bundles CUDA (several GB of nvidia-*
# wheels). TORCH_CPU_INDEX= (empty) makes cpu use PyPI too.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(TORCH),cpu)
# an extra index: torch's "+cpu" build ranks above PyPI's; everything else comes from PyPI
TORCH_INDEX_ARGS := $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX) --retries 2)
else ifeq ($(TORCH),cuda)
TORCH_INDEX_ARGS :=
else
$(error TORCH must be cpu or cuda, not "$(TORCH)")
endif

.PHONY: install install-server run test test-fast lint bench bench-quick loadtest soak audit gpu-check clean

# the server: torch from the chosen index and the runtime dependencies, in one pip run;
# --no-compile: Python compiles only the modules it imports, when it first imports them
$(VENV)/.server-$(TORCH): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ls $(VENV)/.server-* 2>/dev/null | grep -qv '/.server-$(TORCH)$$'; then \
	    $(PY) -m pip uninstall -y -q torch; fi  # switching builds
	@args="$(TORCH_INDEX_ARGS)"; \
	if [ -n "$$args" ] && ! $(PY) -c "import socket, urllib.parse as u; \
	        socket.getaddrinfo(u.urlsplit('$(TORCH_CPU_INDEX)').hostname, 443)" 2>/dev/null; then \
	    echo "note: $(TORCH_CPU_INDEX) is unreachable: torch comes from pip's configured index"; \
	    args=""; \
	fi; \
	echo "$(PY) -m pip install -q --no-compile $(TORCH_PIN) -e . $$args"; \
	$(PY) -m pip install -q --no-compile $(TORCH_PIN) -e . $$args
	rm -f $(VENV)/.server-* && touch $@

# the test and load tools, and the Python client, for `make test` and the tools below
$(VENV)/.installed: $(VENV)/.server-$(TORCH) pyproject.toml Makefile clients/python/pyproject.toml
	$(PY) -m pip install -q -e '.[test]' -e ./clients/python
	touch $@

install-server: $(VENV)/.server-$(TORCH)

install: $(VENV)/.installed

run: install-server
	$(PY) -m service serve --host $(HOST) --port $(PORT) --grpc-port $(GRPC_PORT) --device cpu

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

# the whole suite (what .ci/run calls); the tiers are in docs/testing.md. Two pytest worker
# processes, each test file on one of them (module-scoped servers start once), the files with
# slow tests handed out first (tests/conftest.py orders them; xdist keeps that order):
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

# the quick loop while working: unit and in-process tests, no server, process or socket
# (ACTSERVE_TEST_TIER=fast makes a test that starts a server without the socket mark fail)
test-fast: install
	$(PY) -m ruff check .
	ACTSERVE_TEST_TIER=fast $(PY) -m pytest -m "not slow and not socket" $(PYTEST_ARGS)

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
	$(PY) -m scripts.soak --duration 600 $(SOAK_ARGS)

audit: install
	$(PY) -m pip install -q pip-audit==2.10.1
	$(PY) -m pip freeze --exclude-editable > .audit-requirements.txt
	$(VENV)/bin/pip-audit -r .audit-requirements.txt --no-deps --disable-pip --progress-spinner off

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
