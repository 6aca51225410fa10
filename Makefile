# The two commands: `make demo` and `make test`. Both build .venv from constraints.txt.
# `make docs` builds the documentation site (mkdocs-material) into site/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint docs test test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages on CPU machines.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,denoise]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medvae demo --out demo_out

# The strict docs build is part of lint, so a broken link, anchor or nav entry fails `make test`.
lint: $(STAMP)
	$(BIN)/ruff check medvae tests benchmarks
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -d site

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site
	@echo "documentation: site/index.html (or: .venv/bin/mkdocs serve)"

test: lint
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-all: lint
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo_out bench_out site .pytest_cache
