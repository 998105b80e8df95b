# The two commands of the README, on a fresh clone with nothing installed but Python 3.10+ and make:
#
#   make demo    set up .venv if needed, then run the offline demo (tiny model, bundled data, a selection report)
#   make test    set up .venv if needed, then run the test suite (offline, CPU only)
#
# Setting up = create the virtual environment $(VENV) if it is missing; install torch==2.13.0 (the CPU build) only if
# no torch is importable there (a GPU user who put their own CUDA torch in $(VENV) keeps it); install the package
# in editable mode with the extras $(EXTRAS), at the versions of .ci/constraints.txt (torch excepted, for the same
# reason). It is redone when pyproject.toml or the constraints change. Options: `make demo ARGS="--max_steps 120"`,
# `make test PYTEST_ARGS="-x tests/test_cli.py"`, `make test VENV=/path/to/env`, `make install`.

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev,qlora,bench,dist
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.trl-sstoken-installed

.PHONY: demo test install docs clean-venv lint test-fast

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
	    echo "installing $(TORCH) (CPU build) into $(VENV)"; $(BIN)/python -m pip install -q $(TORCH); \
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
