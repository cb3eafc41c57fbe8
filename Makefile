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
$(HOROVOD_STAMP): $(STAMP) third_party/horovod/build.sh third_party/horovod/*.patch
	third_party/horovod/build.sh $(BIN)/python
	touch $(HOROVOD_STAMP)

horovod: $(HOROVOD_STAMP)

# make dryrun BACKEND=tensorflow runs the same dry run with the TensorFlow backend.
BACKEND ?= torch
DRYRUN_CONFIG := $(if $(filter tensorflow,$(BACKEND)),configs/dryrun-tf.yaml,configs/dryrun.yaml)

dryrun: $(STAMP)
	$(BIN)/dcgan train --config $(DRYRUN_CONFIG) --dry-run

# Two lanes at once, three pytest processes (torch and TensorFlow never share one:
# docs/ARCHITECTURE.md, traps). The second lane starts as soon as the venv is ready: TensorFlow's
# tests, then BESIDE_TF, torch modules that need no Horovod. The first builds Horovod (once: its
# wheel is cached), then runs every other torch test. Either alone left a core idle much of the
# time. They share one node-local cache (the digits classifier is trained once, under a lock)
# and print in turn: the first lane as it runs, the second when both are done.
BESIDE_TF := tests/test_ray_runner.py tests/test_cli.py tests/test_cluster.py tests/quality
test: $(STAMP)
	@# pytest ARGS, where "no test selected" (exit 5: a -m filter that leaves a lane empty) passes.
	@run() { $(BIN)/python -m pytest --durations=25 "$$@" $(PYTEST_ARGS) || [ $$? -eq 5 ]; }; \
	cache=$$(mktemp -d -t dcgan-test-cache-XXXXXX) && export DCGAN_CACHE_DIR=$$cache; \
	( run tests/tf; tensorflow=$$?; run $(BESIDE_TF) && exit $$tensorflow ) \
		> $$cache/second-lane.log 2>&1 & second=$$!; \
	trap 'kill $$second 2>/dev/null; rm -rf $$cache' INT TERM; \
	$(MAKE) --no-print-directory horovod && run $(addprefix --ignore=,$(BESIDE_TF)); first=$$?; \
	wait $$second; second=$$?; \
	echo "=== the second lane (ran alongside): tests/tf, then $(BESIDE_TF) ==="; cat $$cache/second-lane.log; \
	rm -rf $$cache; echo "make test: first lane exited $$first, second lane $$second"; \
	[ $$first -eq 0 ] && [ $$second -eq 0 ]

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
