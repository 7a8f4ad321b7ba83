# One-command workflows for a fresh machine with Python 3.11:
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run the whole test suite
#   make docs   set up .venv and build the documentation site into site/ (strict)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# info-nce-pytorch 0.1.4, the implementation we are a drop-in replacement for.
# Its import name is also `info_nce`, so the tests load it from its wheel
# instead of installing it. lightly 1.6.0's DCL loss is read from its wheel too
# (the package itself pulls torchvision, pytorch-lightning and hydra), and so is
# open_clip's ClipLoss (open_clip imports torchvision, which has no CPU build here).
REFERENCE_DIR := $(VENV)/reference
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint docs docs-check bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,docs]'
	$(BIN)/pip download --quiet --no-deps info-nce-pytorch==0.1.4 -d $(REFERENCE_DIR)
	$(BIN)/pip download --quiet --no-deps lightly==1.6.0 -d $(REFERENCE_DIR)
	$(BIN)/pip download --quiet --no-deps open_clip_torch==3.3.0 -d $(REFERENCE_DIR)
	touch $@

demo: $(STAMP)
	$(BIN)/info-nce demo --output-dir out/demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/ruff format --check src tests benchmarks examples tools
	$(BIN)/mypy --strict src

# The site, offline: the theme ships its assets and the pages load no web font.
# --strict: a broken link or anchor, a page missing from the nav or a docstring
# that does not parse fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
	@echo "The site is built: open $(CURDIR)/site/index.html"

# The built site in headless Chromium (Debian's `chromium` package). Not in CI:
# installing Chromium where it is absent is 115 packages and 113 MB to download;
# the first install here took about 70 s (17 s of it unpacking, by apt's history
# log), over the minute CI may spend on it. The check itself takes about 4 s.
docs-check: docs
	$(BIN)/python tools/check_site.py site

bench: $(STAMP)
	$(BIN)/info-nce bench

clean:
	rm -rf $(VENV) out site
