# kvgrove: `make serve` and `make test` are the whole quick start.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?=
PROMPT ?= What is the capital of France?

.PHONY: setup serve run test lint bench clean

$(STAMP): pyproject.toml scripts/system-deps.sh
	sh scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/kvgrove pull $(MODEL)
	$(VENV)/bin/kvgrove serve $(if $(MODEL),--model $(MODEL))

run: $(STAMP)
	$(VENV)/bin/kvgrove run $(if $(MODEL),--model $(MODEL)) "$(PROMPT)"

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
