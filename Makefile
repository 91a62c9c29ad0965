# `make demo` and `make test` do all set-up on a fresh machine: .venv, pinned dependencies, the
# package; then the demo (EGN vs Adam vs SGD on scikit-learn's bundled data) or pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench gpu-check clean

# csrc/ sources are dependencies: editing a kernel rebuilds the extension egn_fast._C.
$(VENV)/.installed: requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	@$(PY) -c "import importlib.util as u; print('egn_fast._C (CUDA extension):', 'built' if u.find_spec('egn_fast._C') else 'not built, pure Python')"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	$(VENV)/bin/egn-fast demo

bench: $(VENV)/.installed
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/step_time_sweep.py
	$(PY) benchmarks/step_time.py --reuse-cpu-memory

# On a machine with a CUDA GPU (needs no network): build, GPU tests, kernel benchmark, table last.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info egn_fast/_C*.so
