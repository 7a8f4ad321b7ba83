# One-command workflows for a fresh machine with Python 3.11:
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# info-nce-pytorch 0.1.4, the implementation we are a drop-in replacement for.
# Its import name is also `info_nce`, so the tests load it from its wheel
# instead of installing it. lightly 1.6.0's DCL loss is read from its wheel too
# (the package itself pulls torchvision, pytorch-lightning and hydra).
REFERENCE_DIR := $(VENV)/reference
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip download --quiet --no-deps info-nce-pytorch==0.1.4 -d $(REFERENCE_DIR)
	$(BIN)/pip download --quiet --no-deps lightly==1.6.0 -d $(REFERENCE_DIR)
	touch $@

demo: $(STAMP)
	$(BIN)/info-nce demo --output-dir out/demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy --strict src

bench: $(STAMP)
	$(BIN)/info-nce bench

clean:
	rm -rf $(VENV) out
