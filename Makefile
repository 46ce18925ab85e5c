# headlab: the README's two commands are `make book` and `make test`; both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned exactly: a bare range could pull a newer CUDA build of several GB.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup fetch chromium book test test-fast bench grid clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[book,test,grid]"
	touch $@

setup: $(VENV)/.installed fetch  ## venv + packages + data/model cache

fetch: $(VENV)/.installed
	$(BIN)/headlab fetch

# Debian's Chromium: the tests open a built book in it (tests/test_book_browser.py), so does
# `headlab book --browser-check`. Installed with apt-get when missing (as root, else through sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

book: setup  ## execute every chapter with papermill and render the offline HTML book
	$(BIN)/headlab book

test: setup chromium  ## the whole test suite (includes the `slow` tests on the real GGUF model)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# without the tiers that need `headlab fetch`: `slow` (the real model) and `data` (the data sets)
test-fast: $(VENV)/.installed chromium
	$(BIN)/python -m pytest -m "not slow and not data" $(PYTEST_ARGS)

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

SPEC ?= grids/induction_small.yaml
grid: setup  ## run a chapter over a parameter grid: make grid SPEC=grids/induction_small.yaml
	$(BIN)/headlab grid $(SPEC)

clean:
	rm -rf book/_build book/chapters book/_vendor book/headlines.md results
