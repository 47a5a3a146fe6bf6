# Two commands on a fresh machine:  make run  (creates .venv if needed, runs the default experiment)
#                                   make test (the test suite, as CI runs it)
# CI (.ci/run) runs `make lint` (ruff check + ruff format --check) and then `make test`.
# torch: `pip install torch==$(TORCH_VERSION)` takes the build pip finds first. On a CPU-only machine
# without a local wheel, avoid the multi-GB CUDA build:  make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
# On a GPU machine pick the CUDA build of your driver:   make run TORCH_INDEX=https://download.pytorch.org/whl/cu128

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
ARGS ?=
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.lshe-installed

.PHONY: run test lint format env clean-outputs

run: env
	$(PY) run.py $(ARGS)

test: env
	OMP_NUM_THREADS=1 WANDB_MODE=offline $(PY) -m pytest $(PYTEST_ARGS)

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: env
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

env: $(STAMP)

# Re-run when the dependencies change; `rm -r .venv` starts over.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

clean-outputs:
	rm -rf outputs/[0-9]* outputs/multirun
