# Two commands do all set-up on a fresh machine:
#   make demo   - train the debug model on the bundled corpus (embedded local Ray, CPU, MLflow)
#   make test   - run the test suite (GPU tests skip without CUDA)
# Both install exactly the versions in requirements.lock; `make lock` refreshes that file.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# The lock pins this CPU build of torch (pyproject keeps torch>=2.11 for GPU images).
TORCH_CPU := 2.13.0
PIP_TOOLS := pip-tools==7.7.0
RUFF_PATHS := elastic_moe actors kernels jobs tests benchmarks

.PHONY: demo test soak lint lock bench-cpu clean

$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# --no-deps: the lock names every package, so nothing unpinned comes in (pip check below fails
	# on a lock that misses one), and torch is the lock's CPU build, never a multi-GB CUDA one.
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	# --no-build-isolation: build the project with the locked setuptools, not whatever is newest.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/train.py

# The suite runs in TEST_JOBS processes (pytest-xdist; a test module stays in one of them, with
# its shared Ray), then the `alone` tests, which assert on time measured on the box, run with
# the machine to themselves. On the 2-core CI box the tests wait on timeouts and restarts
# for about a quarter of their time, so two processes finish sooner than one.
TEST_JOBS ?= 2

test: $(STAMP)
	$(VENV)/bin/ruff check $(RUFF_PATHS)
	$(PY) -m pytest -q -m "not soak and not alone" -n $(TEST_JOBS) --dist loadfile --durations=15 tests
	$(PY) -m pytest -q -m "alone and not soak" --durations=5 tests

# Repetitions of the fault scenarios (each runs once in `make test`): minutes to an hour.
soak: $(STAMP)
	$(PY) -m pytest -q -m soak tests

lint: $(STAMP)
	$(VENV)/bin/ruff check $(RUFF_PATHS)
	$(VENV)/bin/mypy

# Re-resolve every dependency to its newest release allowed by pyproject.toml (torch stays at
# TORCH_CPU, the CPU build) and write the pins to requirements.lock. Run it after editing the
# dependencies in pyproject.toml or to take upgrades; then run `make test` and commit the lock.
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q '$(PIP_TOOLS)'
	CUSTOM_COMPILE_COMMAND='make lock' $(VENV)/bin/pip-compile -q --upgrade \
	    --upgrade-package 'torch==$(TORCH_CPU)' --extra dev --strip-extras --allow-unsafe \
	    --no-emit-index-url --no-emit-find-links -o $(LOCK) pyproject.toml
	# A CUDA torch (and its nvidia-* wheels) must not creep in: the CPU build is what pip has to find.
	grep -qx 'torch==$(TORCH_CPU)+cpu' $(LOCK)
	! grep -E '^nvidia-' $(LOCK)

clean:
	rm -rf $(VENV) outputs mlruns mlflow.db
