# The two commands of the README, on a fresh clone with nothing installed but Python 3.11+ and make:
#
#   make demo    set up .venv if needed, then run the offline demo (tiny model, bundled data, a selection report)
#   make test    set up .venv if needed, then run the test suite (offline, CPU only)
#
# Before anything else, make checks the interpreter (tools/check_python.py: the venv's python if $(VENV) exists,
# else $(PYTHON)) and stops with one line if it is older than pyproject.toml's requires-python (3.11: TRL 1.16 and
# transformers 5.23 need it) or cannot create a venv (Debian without python3.11-venv).
#
# Setting up = create the virtual environment $(VENV) if it is missing; install torch==2.13.0 only if no torch is
# importable there (a GPU user who put their own CUDA torch in $(VENV) keeps it); install the package in editable
# mode with the extras $(EXTRAS), at the versions of .ci/constraints.txt for this Python (its lines carry
# environment markers where a version needs a newer Python; torch excepted, for the same reason as above). It is
# redone when pyproject.toml or the constraints change. Which torch build pip picks depends on its index: from PyPI
# on Linux the CUDA build (about 2.6 GB to download); TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# gets the CPU build (about 0.2 GB). Options: `make demo ARGS="--max_steps 120"`, `make test PYTEST_ARGS="-x
# tests/test_cli.py"`, `make test VENV=/path/to/env PYTHON=python3.13`, `make install`.

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev,qlora,bench,dist
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.trl-sstoken-installed

.PHONY: demo test install docs clean-venv lint test-fast

# The interpreter check, at parse time so that its one line comes before anything else (and nothing is created).
# `make clean-venv` alone needs no Python.
ifneq ($(filter-out clean-venv,$(or $(MAKECMDGOALS),demo)),)
SETUP_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
PYTHON_PROBLEM := $(shell if command -v $(SETUP_PYTHON) >/dev/null 2>&1; \
    then $(SETUP_PYTHON) tools/check_python.py $(SETUP_PYTHON) $(if $(wildcard $(BIN)/python),,--new-venv) 2>&1; \
    else echo "no Python '$(SETUP_PYTHON)' found: run make with PYTHON=python3.11 (or a newer python3.X)"; fi)
ifneq ($(PYTHON_PROBLEM),)
$(error $(PYTHON_PROBLEM))
endif
endif

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/trl-sstoken demo $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

install: $(STAMP)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

$(STAMP): pyproject.toml .ci/constraints.txt
	@test -x $(BIN)/python || { echo "creating the virtual environment $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	    echo "keeping the torch already in $(VENV): $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
	    echo "installing $(TORCH) into $(VENV)$(if $(TORCH_PIP_ARGS), ($(TORCH_PIP_ARGS)))"; $(BIN)/python -m pip install -q $(TORCH) $(TORCH_PIP_ARGS) \
	    && echo "installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)' 2>/dev/null)"; \
	fi
	@grep -v '^torch==' .ci/constraints.txt > $(VENV)/constraints-without-torch.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints-without-torch.txt -e ".[$(EXTRAS)]"
	@touch $@

clean-venv:
	rm -rf $(VENV)

# For contributors: `make test-fast` runs the fast unit tier (tests/conftest.py, TIERS; about 2 minutes on 2 cores),
# `make test` stays the full suite; `make lint` is what CI and the pre-commit hook check (ruff, .ci/constraints.txt).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TRL_SSTOKEN_SKIP_REAL_MODELS=1 $(BIN)/python -m pytest -q -m unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
