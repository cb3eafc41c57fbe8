# Two commands do all the set-up: `make dryrun` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install only when the project's dependencies change; the stamp records that.
STAMP := $(VENV)/.installed

.PHONY: dryrun test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[torch,tf,ray,dev]'
	touch $(STAMP)

install: $(STAMP)

# make dryrun BACKEND=tensorflow runs the same dry run with the TensorFlow backend.
BACKEND ?= torch
DRYRUN_CONFIG := $(if $(filter tensorflow,$(BACKEND)),configs/dryrun-tf.yaml,configs/dryrun.yaml)

dryrun: $(STAMP)
	$(BIN)/dcgan train --config $(DRYRUN_CONFIG) --dry-run

# Two processes: torch and TensorFlow never share one (docs/ARCHITECTURE.md, traps).
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m pytest tests/tf $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/feed.py
	$(BIN)/python bench/ray_scaling.py

clean:
	rm -rf runs data/prepared .pytest_cache
