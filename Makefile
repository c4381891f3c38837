# One task runner for the README and CI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Install, then start the service on ./usagemeter.db with demo data in it.
serve: $(STAMP)
	$(BIN)/usagemeter serve --demo

## Install, then lint, type-check and run the whole test suite.
test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

## Install the bench's own needs and run every benchmark (see bench/README.md);
## flags through ARGS, e.g. make bench ARGS="--events 20000" or ARGS=--full.
bench: $(STAMP)
	$(BIN)/pip install --quiet -r bench/requirements.txt
	$(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
