# Battery-cell inspection: one entry point for people and CI.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup system-packages serve test test-unit lint format synth preview bench bench-synth train-quick train-standard review clean

# serve: ports and runs are configurable, e.g. make serve GRPC_PORT=9001 RUNS="runs/standard"
GRPC_PORT    ?= 8001
HTTP_PORT    ?= 8000
METRICS_PORT ?= 8002
RUNS         ?=
# any other option of `python -m export serve`, e.g. make serve SERVE_ARGS="--precision int8"
SERVE_ARGS   ?=
# gRPC over TLS: make serve TLS_CERT=server.pem TLS_KEY=server.key; the admin key comes from $TRITON_ADMIN_KEY
TLS_CERT     ?=
TLS_KEY      ?=

setup: system-packages $(STAMP)

# Debian packages beyond Python (libpython3.11 for Triton's Python backend; chromium, prometheus,
# libb64-0d, libjemalloc2, qemu-user for some tests): installed as root, else one line says which.
system-packages:
	@bash scripts/debian-packages.sh

# Re-install only when the dependency list changes; a no-op otherwise.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Train the quick models if no runs exist, build the repository if stale, run tritonserver
# in the foreground (Ctrl-C stops it).
serve: setup
	$(PY) -m export serve --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) $(if $(RUNS),--runs $(RUNS)) \
	  $(if $(TLS_CERT),--tls-cert $(TLS_CERT) --tls-key $(TLS_KEY)) $(SERVE_ARGS)

# Everything: tests/unit and tests/integration (tritonserver, Prometheus, browsers), about 21 min on 2 cores.
test: setup
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# No servers, no long trainings: contracts, data, models, export, the layers (about 1.5 min on 2 cores).
test-unit: setup
	$(PY) -m pytest -n 2 tests/unit $(PYTEST_ARGS)

# ruff (lint and format check, pyproject.toml) and the layer rules of docs/architecture.md;
# `make format` rewrites what ruff can fix.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -p no:xdist -p no:cacheprovider tests/unit/test_layers.py

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Demo data: a small synthetic AI Hub tree and its contact sheet.
synth: setup
	$(PY) -m training.synth --out data/synth --batteries 40 --seed 0

preview: synth
	$(PY) -m training.synth preview data/synth --out results/synth_preview.png

# Presets: generate data, train both models, evaluate on a fresh test set, print a table.
train-quick: setup
	$(PY) -m training.preset quick

train-standard: setup
	$(PY) -m training.preset standard

# Serving throughput: Triton (load generator + perf_analyzer) against in-process baselines;
# results in benchmarks/results/latest/. BENCH_ARGS passes options, e.g. BENCH_ARGS="--seconds 20".
bench: setup
	$(PY) -m benchmarks serving $(BENCH_ARGS)

# The review station (Streamlit) on http://localhost:8501, against the service `make serve` runs.
# REVIEW_ARGS passes options, e.g. REVIEW_ARGS="--run results --explain-options '--vlm gemini'".
review: setup
	$(PY) -m client review $(REVIEW_ARGS)

bench-synth: setup
	$(PY) -m benchmarks.synth_speed

clean:
	rm -rf $(VENV) build .pytest_cache
	find model_repository -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
