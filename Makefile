# One venv for everything; creating it is idempotent (a stamp file records the installed state).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH_VERSION ?= 2.13.0

.PHONY: install browser prometheus demo test test-fast lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned. PyPI's torch wheel for Linux is the CUDA build (multi-GB, with nvidia-* packages): on a
# machine without an NVIDIA driver, torch comes from the PyTorch CPU index when it can be reached, else as the
# `+cpu` build from the indexes pip is configured with (a mirror or wheel folder), and only then from PyPI.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
$(STAMP): pyproject.toml | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	elif curl -fsS -m 5 -o /dev/null "$(TORCH_CPU_INDEX)/torch/" 2>/dev/null; then \
	  $(BIN)/pip install -q --index-url "$(TORCH_CPU_INDEX)" "torch==$(TORCH_VERSION)"; \
	else \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" || $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	fi
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

# The dashboard tests scrape the suite's Ray node with a real Prometheus: Debian's package, where apt can (root).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
	    || echo "make prometheus: no prometheus and no way to install it here; the dashboard tests will skip"; }

test: $(STAMP) browser prometheus
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
