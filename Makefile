# One venv for everything; creating it is idempotent (a stamp file records the installed state).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH_VERSION ?= 2.13.0

.PHONY: install browser demo test test-fast lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build on CPU machines.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/caslie demo --workdir $(or $(WORKDIR),demo-out)

# The browser test opens report.html in the system's Chromium; installed here where apt can (Debian/Ubuntu, root).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
	    || echo "make browser: no Chromium and no way to install it here; the browser test will skip"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check caslie_core ray_jobs tests benchmarks
	$(BIN)/ruff format --check caslie_core ray_jobs tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format caslie_core ray_jobs tests benchmarks
	$(BIN)/ruff check --fix caslie_core ray_jobs tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/enrich.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
