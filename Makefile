# Set-up is part of both targets: a fresh clone needs only `make demo` or `make test`.
# torch is pinned before anything pulls it in: a plain `torch` requirement would fetch a
# multi-GB CUDA build, while 2.13.0 is the CPU build (on this project's machines, already on disk).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# The main job: index the demo intents (written for this project), query them, evaluate.
DEMO := retrieval_imprint/data
demo: $(STAMP)
	rm -rf .demo-collection
	$(BIN)/imprint index .demo-collection $(DEMO)/demo_train.csv --quiet
	$(BIN)/imprint query .demo-collection "my card never showed up" "put on some Queen" --top 2
	$(BIN)/imprint eval .demo-collection $(DEMO)/demo_test.csv

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"
