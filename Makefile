# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint install bench clean browser-deps sandbox-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin torch first so pip takes the CPU wheel that is on this disk instead of a multi-GB CUDA build;
	# elsewhere the same line fetches torch 2.13.0 from PyPI.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.6,<2.15"
	# the client alone is `pip install modelpress`; running and testing the service needs every extra
	$(BIN)/pip install -q -e ".[server,worker,test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP) sandbox-deps
	$(BIN)/modelpress migrate
	$(BIN)/modelpress keys create --tenant default
	$(BIN)/modelpress serve --host 0.0.0.0 --port 8000 --embedded-worker

# lint first: a type error or a formatting drift fails the run before the slow tests start
test: $(STAMP) sandbox-deps browser-deps lint
	$(BIN)/python -m pytest -q -x --durations=15

# the inner loop: everything but the end-to-end tests with worker processes (CI runs all of them)
test-fast: $(STAMP) sandbox-deps
	$(BIN)/python -m pytest -q -x -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Workers run users' model files under bubblewrap (namespaces, no network); installed once when missing and we
# are root. Without it the worker refuses to start unless MODELPRESS_SANDBOX_ISOLATION=none is set.
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1; } || \
	  echo "note: bubblewrap missing: install it (apt-get install bubblewrap) or workers refuse to start"

# The dashboard test drives Debian's chromium + chromedriver: installed once when missing and we are root.
browser-deps:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "note: chromium/chromedriver missing; the dashboard test skips (and fails when CI=true)"

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) var
