# Oakling: `make up` runs a 1-DOC stack, `make test` runs the tests. Both set up what they need.
VENV   := .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed

.PHONY: up test deps system-deps lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

deps: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/oak up

system-deps:
	@bash .ci/system-deps.sh

test: $(STAMP) system-deps
	$(VENV)/bin/pytest -n 2 -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy broker services plugins tui bench

bench: $(STAMP) system-deps
	$(VENV)/bin/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache
