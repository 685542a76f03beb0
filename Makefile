# The two commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run dev test lint typecheck unit deps bench bench-full clean deb

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# Start the daemon in the foreground on 8 mock cards; no root, no broker.
# The demo: 3 agents on mock cards pooling over a local broker (mosquitto, else amqtt),
# everything under .run/demo. Without any broker: one standalone agent. No root needed.
run: $(STAMP)
	@mkdir -p .run
	@if $(VENV)/bin/xpu-agent demo --check >/dev/null 2>&1; then \
		$(VENV)/bin/xpu-agent demo --nodes 3; \
	else \
		echo "no MQTT broker (install mosquitto, or pip install '.[demo]'): one standalone agent"; \
		echo "xpu-agent on mock cards; try:  $(VENV)/bin/xpuctl --socket .run/agent.sock status"; \
		$(VENV)/bin/xpu-agent --dev --config config/dev.toml; \
	fi

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

# The Debian package (Debian 12, dh-virtualenv; pip fetches the Python dependencies) into
# build/deb/, checked by lintian. tests/test_deb.py builds, installs and purges it as root;
# XPU_TEST_DEB=0 skips that test.
deb:
	packaging/build-deb.sh --lint build/deb

bench: $(STAMP)
	$(PY) -m benchmarks.run --quick

bench-full: $(STAMP)
	$(PY) -m benchmarks.run --full

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache *.egg-info
