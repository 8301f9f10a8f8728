# Oakling: `make up` runs a 1-DOC stack, `make test` runs the tests. Both set up what they need.
VENV   := .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed

.PHONY: up test deps system-deps lint bench clean

$(STAMP): pyproject.toml
	@echo "oak: setting up $(VENV): Python packages, a minute or two the first time (each is listed as it comes)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	bash -c "$(VENV)/bin/pip install --progress-bar off -e '.[test]' | { grep --line-buffered -E '^(Collecting|Successfully installed)' || true; }; exit \$${PIPESTATUS[0]}"
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
