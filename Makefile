# The two commands:  `make demo` (the main job) and `make test` (the test suite).
# Both set up .venv on a fresh machine first: the CPU wheel of torch, then safemerge with its pins.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean torch-cpu

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory torch-cpu
	$(PIP) -e '.[dev]'
	touch $(STAMP)

# torch's CPU build: PyPI's Linux wheel of torch pulls the multi-GB CUDA libraries, so unless pip already finds a
# `+cpu` build (a local wheel folder, as on this project's machines) or the machine is a Mac (whose PyPI wheel has no
# CUDA), PyTorch's CPU index is added, whose `2.13.0+cpu` then wins over PyPI's `2.13.0` (configured mirrors stay).
# The check is a dry run that reads the wheel's metadata only on pip >= 23.2 (older pips would download the wheel to
# read it, so they go to the CPU index at once).
TORCH := 2.13.0
PIP := $(BIN)/pip install --disable-pip-version-check -q
torch-cpu:
	if [ "$$(uname -s)" = Darwin ] || { $(BIN)/python -c "import sys, pip; sys.exit(tuple(map(int, pip.__version__.split('.')[:2])) < (23, 2))" \
	    && $(PIP) --dry-run --no-deps --report - torch==$(TORCH) 2>/dev/null | grep -q '"version": "$(TORCH)+cpu"'; }; then \
	  $(PIP) torch==$(TORCH); \
	else \
	  $(PIP) torch==$(TORCH) --extra-index-url https://download.pytorch.org/whl/cpu; \
	fi

demo: $(STAMP)
	$(BIN)/safemerge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
