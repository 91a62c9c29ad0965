# `make test` does all set-up on a fresh machine: .venv, pinned dependencies, the package, pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test bench gpu-check clean

$(VENV)/.installed: requirements.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/step_time.py --reuse-cpu-memory

# On a machine with a CUDA GPU (needs no network): build, GPU tests, kernel benchmark, table last.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
