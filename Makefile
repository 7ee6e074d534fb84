# The two commands of the README:
#   make demo   — set up, generate the embedded demo data, pretrain, build indexes, serve the UI
#   make test   — set up, then ruff + mypy + pytest
# Everything installs into .venv (created on first use); a second run reuses it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 7860

.PHONY: demo test install lint typecheck browser clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/cdretrieval demo --host $(HOST) --port $(PORT)

# Debian's chromium is needed only by the real-browser test; it is installed when we are root and apt
# works, otherwise that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "note: chromium not installed; the browser test will be skipped"; }

lint: $(STAMP)
	$(BIN)/ruff check cdretrieval app benchmarks tests

typecheck: $(STAMP)
	$(BIN)/mypy cdretrieval app benchmarks

test: $(STAMP) browser lint typecheck
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
