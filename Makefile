# The two commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run dev test lint typecheck unit deps bench bench-full clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# Start the daemon in the foreground on 8 mock cards; no root, no broker.
run: $(STAMP)
	@mkdir -p .run
	@echo "xpu-agent on mock cards; try:  $(VENV)/bin/xpuctl --socket .run/agent.sock status"
	$(VENV)/bin/xpu-agent --dev --config config/dev.toml

# Debian packages the tests use (mosquitto, systemd tools, openssl); apt-get only as root.
deps:
	@scripts/install-test-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check agent tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict agent

unit: $(STAMP)
	$(VENV)/bin/pytest -q

test: deps $(STAMP) lint typecheck unit

bench: $(STAMP)
	$(PY) -m benchmarks.run --quick

bench-full: $(STAMP)
	$(PY) -m benchmarks.run --full

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache *.egg-info
