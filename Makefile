# The two commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run dev test test-latest lock lint typecheck unit deps bench bench-full clean deb completions

# Exactly the versions in the lock (hashes checked, nothing resolved), then the project
# itself, built with the locked setuptools. `make lock` refreshes the lock.
LOCK         := requirements/all.lock
RUNTIME_LOCK := requirements/runtime.lock
UV_VERSION   := 0.13.9
TOOLS_VENV   := .venv-tools
UV           := $(TOOLS_VENV)/bin/uv
LATEST_VENV  := .venv-latest

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
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
	$(VENV)/bin/ruff check agent tests benchmarks scripts
	$(VENV)/bin/ruff format --check agent tests benchmarks scripts

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

# Refresh the lock: the newest versions pyproject.toml's ranges allow, for Python 3.11
# (Debian 12) and newer on every platform. requirements/runtime.lock is the runtime part of
# the same resolution (the .deb installs it); tests/test_lock.py checks they agree.
$(UV):
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q uv==$(UV_VERSION)

LOCK_FLAGS := --generate-hashes --universal --python-version 3.11 --custom-compile-command "make lock" -q

lock: $(UV)
	$(UV) pip compile pyproject.toml requirements/build.in --extra test --upgrade $(LOCK_FLAGS) -o $(LOCK)
	$(UV) pip compile pyproject.toml requirements/build.in -c $(LOCK) --no-emit-package pip $(LOCK_FLAGS) -o $(RUNTIME_LOCK)

# Drift met on purpose (not in CI): the newest releases the ranges allow, in their own
# virtual environment, then the whole suite. The lock check is the one test skipped.
test-latest: deps
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q --upgrade -e '.[test]'
	$(LATEST_VENV)/bin/ruff check agent tests benchmarks
	$(LATEST_VENV)/bin/mypy --strict agent
	XPU_TEST_LATEST=1 $(LATEST_VENV)/bin/pytest -q

# bash and zsh completion for xpuctl, generated from its argument parser with shtab (a test
# checks the committed files are current; the .deb installs them).
completions: $(STAMP)
	$(PY) scripts/gen-completions.py packaging/completions

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(LATEST_VENV) .run .mypy_cache .ruff_cache .pytest_cache *.egg-info
