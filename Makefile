# Two commands do all set-up on a fresh machine:
#   make demo   - train the debug model on the bundled corpus (embedded local Ray, CPU, MLflow)
#   make test   - run the test suite (GPU tests skip without CUDA)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-cpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: a bare torch requirement would pull a multi-GB CUDA build on CPU boxes
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/train.py

test: $(STAMP)
	$(VENV)/bin/ruff check elastic_moe actors kernels jobs tests benchmarks
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check elastic_moe actors kernels jobs tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) outputs mlruns mlflow.db
