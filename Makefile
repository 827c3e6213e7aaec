# Two commands do all the set-up on a fresh machine:
#   make demo   -- create .venv, install, train configs/mnist.py, print test bits/dim and the sample grid
#   make test   -- create .venv, install (with test extras), run the test suite
PYTHON_BOOT := $(shell scripts/find_python.sh)
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/mnist

.PHONY: demo test install oldest clean

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The demo's install leaves byte-compiling to Python, which compiles the modules one program imports as it imports
# them (fresh clone, 2 cores: compiling the whole of .venv/lib took 29 s of the demo's 49 s of set-up).
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile -e .
	touch $@

# One install of the package with its test extras (a superset of the plain install, which it marks done too).
# pip byte-compiles what it installs on one core; compileall -j 0 does it on all of them (fresh clone, 2 cores:
# 57 s -> 43 s). The tests need the .pyc files up front: they start many Python processes, and where
# PYTHONDONTWRITEBYTECODE is set, nothing writes them later and every process would compile jax, flax, ... again.
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile -e '.[test]'
	$(PY) -m compileall -q -j 0 $(VENV)/lib
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

# The test environment with the oldest jax, jaxlib and Flax that pyproject.toml admits (CI runs the suite on both
# ends of the range: .github/workflows/tests.yml); a later `make test` keeps them.
oldest: $(VENV)/.installed-test
	$(PY) scripts/install_oldest.py

demo: $(VENV)/.installed
	$(PY) -m vdm.main --config configs/mnist.py --workdir $(WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup --durations=15 tests

clean:
	rm -rf $(VENV) workdirs
