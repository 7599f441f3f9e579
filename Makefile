# Set-up is part of both targets: a fresh clone needs only `make demo` or `make test`.
# torch is pinned before anything pulls it in: a plain `torch` requirement would fetch a
# multi-GB CUDA build, while 2.13.0 is the CPU build (on this project's machines, already on disk).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/imprint demo

test: $(STAMP)
	$(BIN)/python -m pytest
