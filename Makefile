# Two commands do all the set-up: `make dryrun` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install only when the project's dependencies change; the stamps record that. PyTorch (and
# the tools Horovod builds with) first, so Horovod's wheel can build while the rest installs.
TORCH_STAMP := $(VENV)/.installed-torch
STAMP := $(VENV)/.installed
EXTRAS := .[torch,eval,fid,export,tf,ray,dev]

.PHONY: dryrun test test-fast bench gpu-wheels install horovod horovod-wheel clean

# PyTorch with pip, which is how its wheels (CUDA builds, gigabytes) reach a machine: its index,
# its caps, its cache.
$(TORCH_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[torch]' 'setuptools>=61' wheel
	$(BIN)/python -m pip install --quiet 'uv>=0.5' || echo "uv did not install: pip installs the rest (slower)"
	touch $(TORCH_STAMP)

# The rest with uv (parallel downloads and bytecode compiling: 30 s where pip takes 122 s for the
# same packages, measured on 2 cores), PyTorch held at what pip installed. With pip where uv
# fails, e.g. behind an index that only pip's own configuration names.
$(STAMP): $(TORCH_STAMP)
	$(BIN)/python -c 'import importlib.metadata as m; print(*(f"{p}=={m.version(p)}" for p in ("torch", "torchvision")), sep="\n")' \
		> $(VENV)/pytorch-pins.txt
	{ test -x $(BIN)/uv && $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode \
		--constraint $(VENV)/pytorch-pins.txt -e '$(EXTRAS)'; } || $(BIN)/python -m pip install --quiet -e '$(EXTRAS)'
	touch $(STAMP)

install: $(STAMP)

# Horovod (distributed.strategy: horovod), built for this .venv's PyTorch from the patched
# 0.28.1 sdist; the wheel is cached in ~/.cache/dcgan/horovod (third_party/horovod/build.sh says how).
HOROVOD_SOURCES := third_party/horovod/build.sh $(wildcard third_party/horovod/*.patch)
HOROVOD_WHEEL_STAMP := $(VENV)/.horovod-wheel
$(HOROVOD_WHEEL_STAMP): $(TORCH_STAMP) $(HOROVOD_SOURCES)
	third_party/horovod/build.sh --wheel-only $(BIN)/python
	touch $(HOROVOD_WHEEL_STAMP)

HOROVOD_STAMP := $(VENV)/.horovod
$(HOROVOD_STAMP): $(STAMP) $(HOROVOD_WHEEL_STAMP)
	third_party/horovod/build.sh $(BIN)/python
	touch $(HOROVOD_STAMP)

horovod-wheel: $(HOROVOD_WHEEL_STAMP)
horovod: $(HOROVOD_STAMP)

# make dryrun BACKEND=tensorflow runs the same dry run with the TensorFlow backend.
BACKEND ?= torch
DRYRUN_CONFIG := $(if $(filter tensorflow,$(BACKEND)),configs/dryrun-tf.yaml,configs/dryrun.yaml)

dryrun: $(STAMP)
	$(BIN)/dcgan train --config $(DRYRUN_CONFIG) --dry-run

# The set-up in two lanes too: Horovod's wheel (minutes of compiling, once: it is cached) builds
# as soon as PyTorch is in, while the rest installs. Then two lanes at once, four pytest
# processes (torch and TensorFlow never share one: docs/ARCHITECTURE.md, traps). The second lane:
# TensorFlow's tests, then BESIDE_TF. The first: every other torch module that needs no Horovod,
# then (the wheel installed by then) the NEEDS_HOROVOD modules. They share one node-local cache
# (the digits classifier is trained once, under a lock) and print in turn: the first lane as it
# runs, the second when both are done, then the failures of both (CI shows only the tail).
# tests/test_sweep.py leads BESIDE_TF: at its end, its PBT sweep ran beside the first lane's ASHA
# sweep, two Ray sweeps on two cores (326 and 350 s, against 190 and 196 s apart).
BESIDE_TF := tests/test_sweep.py tests/test_ray_runner.py tests/test_ray_devices.py tests/test_cli.py tests/test_resume.py tests/quality
NEEDS_HOROVOD := tests/test_horovod.py tests/backends/test_torch_horovod.py tests/test_combinations.py tests/test_launch.py
test: $(TORCH_STAMP)
	@# pytest ARGS, where "no test selected" (exit 5: a -m filter that leaves a lane empty) passes.
	@# Each run's output is also appended to $$log, whose FAILED/ERROR lines are printed last.
	@run() { rc=$$(mktemp); { $(BIN)/python -m pytest --durations=25 "$$@" $(PYTEST_ARGS); echo $$? > $$rc; } 2>&1 \
		| tee -a $$log; status=$$(cat $$rc); rm -f $$rc; [ "$$status" = 0 ] || [ "$$status" = 5 ]; }; \
	cache=$$(mktemp -d -t dcgan-test-cache-XXXXXX) && export DCGAN_CACHE_DIR=$$cache; log=$$cache/first-lane.log; \
	$(MAKE) --no-print-directory horovod-wheel > $$cache/horovod-wheel.log 2>&1 & wheel=$$!; \
	trap 'kill $$wheel $$second 2>/dev/null; rm -rf $$cache' INT TERM; \
	$(MAKE) --no-print-directory install || { wait $$wheel; exit 1; }; \
	( log=/dev/null; run tests/tf; tensorflow=$$?; run $(BESIDE_TF) && exit $$tensorflow ) \
		> $$cache/second-lane.log 2>&1 & second=$$!; \
	run $(addprefix --ignore=,$(BESIDE_TF) $(NEEDS_HOROVOD)); without=$$?; \
	wait $$wheel; built=$$?; cat $$cache/horovod-wheel.log; \
	[ $$built -eq 0 ] && $(MAKE) --no-print-directory horovod && run $(NEEDS_HOROVOD); first=$$?; \
	[ $$without -eq 0 ] || first=$$without; \
	wait $$second; second=$$?; \
	echo "=== the second lane (ran alongside): tests/tf, then $(BESIDE_TF) ==="; cat $$cache/second-lane.log; \
	echo "=== failures and errors of both lanes ==="; \
	grep -hE '^(FAILED|ERROR) ' $$log $$cache/second-lane.log || echo "none"; \
	rm -rf $$cache; echo "make test: first lane exited $$first, second lane $$second"; \
	[ $$first -eq 0 ] && [ $$second -eq 0 ]

# The inner loop: the unit tests (no Ray, Horovod, subprocess or slow test), < 3 min: the
# TensorFlow process beside the torch one (101 s; one after the other, 197 s: each is mostly
# one core's work), its output printed after.
test-fast: $(STAMP)
	@log=$$(mktemp -t dcgan-test-fast-XXXXXX); \
	{ $(BIN)/python -m pytest tests/tf -m unit -q $(PYTEST_ARGS) || [ $$? -eq 5 ]; } > $$log 2>&1 & tf=$$!; \
	{ $(BIN)/python -m pytest -m unit -q $(PYTEST_ARGS) || [ $$? -eq 5 ]; }; torch=$$?; \
	wait $$tf; tensorflow=$$?; echo "=== tests/tf (ran alongside) ==="; cat $$log; rm -f $$log; \
	[ $$torch -eq 0 ] && [ $$tensorflow -eq 0 ]

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
