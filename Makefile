# Lockgate's tasks. `make run` and `make test` are the two commands a new
# user needs; both install what they need into .venv first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
REPO   ?= models/repository
HOST   ?= 127.0.0.1
ARGS   ?=
STAMP  := $(VENV)/.installed
LOCKGATE_FUZZ_EXAMPLES ?= 5000
FUZZ_SECONDS ?= 300
FUZZ_CORPUS  ?= bench/results/fuzz-corpus
PROTOS := $(wildcard protos/lockgate_client/_proto/*.proto)

.PHONY: help install models run test lint typecheck check-protos protos prometheus bench gpu-check fuzz soak clean

help:  ## list the tasks
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the server, the client and the dev tools

$(STAMP): pyproject.toml client/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Lockgate needs Python 3.11 or newer")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./client -e '.[dev]'
	@# The `lockgate` script moved from the server distribution to the client's:
	@# a venv made before that lost it when pip replaced the old server install.
	test -x $(VENV)/bin/lockgate || $(PY) -m pip install --quiet --no-deps --force-reinstall -e ./client
	touch $(STAMP)

models: $(STAMP)  ## build the example ONNX models into models/repository
	$(PY) models/build.py --out $(REPO)

run: models  ## install, build the models, and serve them on 127.0.0.1:8001
	$(VENV)/bin/lockgate serve --model-repository $(REPO) --host $(HOST) $(ARGS)

lint: $(STAMP)  ## ruff: lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)  ## mypy --strict over the server, the client, models and tests
	$(VENV)/bin/mypy server/lockgate client/lockgate_client models tests

check-protos: $(STAMP)  ## prove the generated code matches protos/
	$(PY) tools/gen_protos.py --check

protos: $(STAMP)  ## regenerate client/lockgate_client/_proto from protos/
	$(PY) tools/gen_protos.py

test: $(STAMP)  ## install, lint, type-check and run the test suite
	$(MAKE) --no-print-directory lint typecheck check-protos
	@$(MAKE) --no-print-directory prometheus
	$(PY) -m pytest $(PYTEST_ARGS)

# tests/test_monitoring.py and the promtool rule tests need Prometheus from the
# Debian package. Installed here only where it is missing, apt-get exists and
# we are root (CI); anywhere else those tests skip. Never fails the build.
# INSTALL_PROMETHEUS=no turns the attempt off.
INSTALL_PROMETHEUS ?= auto
prometheus:  ## install Prometheus (Debian package) for the monitoring tests, if possible
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then exit 0; fi; \
	if [ "$(INSTALL_PROMETHEUS)" = no ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "prometheus is not installed: the monitoring tests will be skipped"; exit 0; fi; \
	echo "installing prometheus (Debian package) for the monitoring tests"; \
	export DEBIAN_FRONTEND=noninteractive; \
	quiet_apt() { timeout 300 apt-get "$$@" >/dev/null 2>&1; }; \
	quiet_apt install -y --no-install-recommends prometheus || \
		{ quiet_apt update && quiet_apt install -y --no-install-recommends prometheus; } || \
		echo "prometheus did not install: the monitoring tests will be skipped"

bench: models  ## benchmark: in-process ORT vs echo ceiling vs Lockgate, batched vs not; shared memory vs bytes; ensemble and cache; --frontends 2 vs 1
	$(PY) bench/run.py --repository $(REPO) $(ARGS)
	$(PY) bench/shared_memory.py $(SHM_ARGS)
	$(PY) bench/repository_features.py
	$(PY) bench/frontends.py $(FRONTENDS_ARGS)

# No $(STAMP) prerequisite: a GPU host has no network for `make install`;
# the script installs what it needs from ARGS="--wheels DIR" into its own venv.
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:  ## prove the CUDA path on a GPU host: ARGS="--wheels DIR" (ARGS="--device cpu": dry run)
	$(GPU_PY) bench/gpu_check.py $(ARGS)

# atheris is installed on demand, never by `make install`: it has no wheel for
# some platforms and Pythons, and `make test` must not depend on it.
fuzz: $(STAMP)  ## long fuzzing passes against a live server: hypothesis, then atheris for FUZZ_SECONDS (default 300)
	LOCKGATE_FUZZ_EXAMPLES=$(LOCKGATE_FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q \
		--deselect tests/test_fuzz.py::test_atheris_harness_smoke
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet 'atheris>=2.3' || true
	@if $(PY) -c 'import atheris' 2>/dev/null; then \
		echo "$(PY) bench/fuzz_atheris.py --repository $(REPO) --corpus $(FUZZ_CORPUS) -max_total_time=$(FUZZ_SECONDS)"; \
		$(PY) bench/fuzz_atheris.py --repository $(REPO) --corpus $(FUZZ_CORPUS) -max_total_time=$(FUZZ_SECONDS); \
	else \
		echo "atheris is unavailable (it did not install for this Python and platform): skipping the coverage-guided pass"; \
	fi

soak: models  ## mixed traffic for SOAK_SECONDS (default 600); reports RSS growth
	$(PY) bench/soak.py --repository $(REPO) $(ARGS)

clean:  ## remove .venv, the built models and the caches
	rm -rf $(VENV) $(REPO) build dist .mypy_cache .ruff_cache .pytest_cache
