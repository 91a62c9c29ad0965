# `make test` does all set-up on a fresh machine: .venv, pinned dependencies, the package, pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test bench clean

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

bench: $(VENV)/.installed
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/step_time.py --reuse-cpu-memory

clean:
	rm -rf $(VENV) build *.egg-info egn_fast/_C*.so
