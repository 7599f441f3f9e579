# Set-up is part of both targets: a fresh clone needs only `make demo` or `make test`.
# torch is pinned before anything pulls it in: a plain `torch` requirement would fetch a
# multi-GB CUDA build, while 2.13.0 is the CPU build (on this project's machines, already on disk).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install install-gpu

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# The GPU set-up (README, "On a GPU"): torch's CUDA 12.8 build and faiss-gpu (CUDA 12) share one
# CUDA runtime. faiss-cpu (a requirement) and faiss-gpu install the same `faiss` files, so
# faiss-cpu is removed and faiss-gpu's files are put back. CI runs it with GPU_TORCH=2.13.0 (the
# CPU build on disk): the same faiss-gpu install, without 3 GB of CUDA wheels for torch.
GPU_TORCH ?= 2.9.1
install-gpu:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==$(GPU_TORCH)
	$(BIN)/pip install -q -e '.[dev,gpu]'
	$(BIN)/pip uninstall -q -y faiss-cpu
	$(BIN)/pip install -q --force-reinstall --no-deps faiss-gpu==$$($(BIN)/python -c \
		'from importlib.metadata import version; print(version("faiss-gpu"))')
	$(BIN)/python -c 'import faiss, torch; print(f"faiss {faiss.__version__}: {faiss.get_num_gpus()} GPU(s); " \
		f"torch {torch.__version__}: CUDA {torch.version.cuda}, GPU {torch.cuda.is_available()}")'
	touch $(STAMP)

# The main job: index the demo intents (written for this project), query them, evaluate.
DEMO := retrieval_imprint/data
demo: $(STAMP)
	rm -rf .demo-collection
	$(BIN)/imprint index .demo-collection $(DEMO)/demo_train.csv --quiet
	$(BIN)/imprint query .demo-collection "my card never showed up" "put on some Queen" --top 2
	$(BIN)/imprint eval .demo-collection $(DEMO)/demo_test.csv

# The tests, after the static checks: ruff's lint and its format check, and mypy on the package and
# its CLI (all configured in pyproject.toml).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"
