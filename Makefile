# Two commands do all the set-up: `make dryrun` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install only when the project's dependencies change; the stamp records that.
STAMP := $(VENV)/.installed

.PHONY: dryrun test test-fast bench gpu-wheels install horovod clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[torch,eval,export,tf,ray,dev]'
	touch $(STAMP)

install: $(STAMP)

# Horovod (distributed.strategy: horovod), built for this .venv's PyTorch from the patched
# 0.28.1 sdist; the wheel is cached in ~/.cache/dcgan/horovod (third_party/horovod/build.sh says how).
HOROVOD_STAMP := $(VENV)/.horovod
$(HOROVOD_STAMP): $(STAMP) third_party/horovod/build.sh third_party/horovod/cxx20.patch third_party/horovod/partial-cuda-toolkit.patch
	third_party/horovod/build.sh $(BIN)/python
	touch $(HOROVOD_STAMP)

horovod: $(HOROVOD_STAMP)

# make dryrun BACKEND=tensorflow runs the same dry run with the TensorFlow backend.
BACKEND ?= torch
DRYRUN_CONFIG := $(if $(filter tensorflow,$(BACKEND)),configs/dryrun-tf.yaml,configs/dryrun.yaml)

dryrun: $(STAMP)
	$(BIN)/dcgan train --config $(DRYRUN_CONFIG) --dry-run

# Two pytest processes at once (torch and TensorFlow never share one: docs/ARCHITECTURE.md,
# traps). TensorFlow's starts as soon as the venv is ready, Horovod builds beside it (once: its
# wheel is cached), then torch's runs; each alone leaves a core idle much of the time. They
# share one node-local cache (the digits classifier is trained once, under a lock) and print in
# turn: torch's as it runs, TensorFlow's when both are done. The cache is removed afterwards.
test: $(STAMP)
	@cache=$$(mktemp -d -t dcgan-test-cache-XXXXXX) && export DCGAN_CACHE_DIR=$$cache; \
	$(BIN)/python -m pytest tests/tf --durations=25 $(PYTEST_ARGS) > $$cache/tensorflow.log 2>&1 & tf=$$!; \
	trap 'kill $$tf 2>/dev/null; rm -rf $$cache' INT TERM; \
	$(MAKE) --no-print-directory horovod && $(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS); torch=$$?; \
	wait $$tf; tensorflow=$$?; \
	echo "=== tests/tf, TensorFlow's pytest process (ran alongside) ==="; cat $$cache/tensorflow.log; \
	rm -rf $$cache; echo "make test: torch's process exited $$torch, TensorFlow's $$tensorflow"; \
	[ $$torch -eq 0 ] && [ $$tensorflow -eq 0 ]

# The inner loop: the unit tests of both processes (no Ray, Horovod, subprocess or slow test), < 3 min.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m unit -q $(PYTEST_ARGS)
	$(BIN)/python -m pytest tests/tf -m unit -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: $(STAMP)
	$(BIN)/python bench/feed.py
	$(BIN)/python bench/ray_scaling.py
	$(BIN)/python bench/throughput.py

# The wheels bench/gpu_check.sh installs on a GPU machine without network: the versions of this
# .venv, pydantic-core (compiled) for every CPython the machine might have.
WHEELS := bench/wheels
version = $(shell $(BIN)/python -c "import importlib.metadata as m; print(m.version('$(1)'))")
gpu-wheels: $(STAMP)
	rm -rf $(WHEELS)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d $(WHEELS) \
		pydantic==$(call version,pydantic) annotated-types==$(call version,annotated-types) \
		typing-inspection==$(call version,typing-inspection) typing-extensions==$(call version,typing-extensions) \
		tensorboardX==$(call version,tensorboardX)
	for py in 3.10 3.11 3.12 3.13; do \
		$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d $(WHEELS) \
			--platform manylinux2014_x86_64 --implementation cp --python-version $$py \
			pydantic-core==$(call version,pydantic-core) || exit 1; \
	done

clean:
	rm -rf runs data/prepared .pytest_cache
