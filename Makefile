# Two entry points for a fresh machine: `make study` and `make test`.
# Both create .venv and install sar3d into it first (once).

PYTHON ?= python3
VENV ?= .venv
# One job per core (training jobs use one thread each); `make study CORES=4` to limit.
CORES ?= $(shell nproc 2>/dev/null || echo 2)
# The CPU wheel here; on a CUDA box use e.g. TORCH_SPEC="torch==2.13.0" with the PyPI CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.sar3d-installed

.PHONY: study evidence test lint install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,slurm]"
	touch $@

install: $(STAMP)

study: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

# The evidence study (config/evidence.yaml over config.yaml; docs/evidence.md). `make evidence -n` is
# Snakemake's dry run of it: the `+` runs the line under make's -n, which then adds --dry-run.
evidence: $(STAMP)
	+PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile config.yaml config/evidence.yaml \
		$(if $(findstring n,$(firstword -$(MAKEFLAGS))),--dry-run) $(SNAKEMAKE_ARGS)

# --dist loadfile: each test file runs on one worker, so a module's expensive fixture (the
# tiny end-to-end study) is built once. (xdist's loadgroup marks are ignored under pytest 9.2.)
test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n $(CORES) --dist loadfile $(PYTEST_ARGS)

# ruff over the code, Snakemake's own linter over the workflow (non-zero on any lint).
lint: $(STAMP)
	$(BIN)/ruff check .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --lint
