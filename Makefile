# Two commands do all the set-up on a fresh machine:
#   make demo   -- create .venv, install, train configs/mnist.py, print test bits/dim and the sample grid
#   make test   -- create .venv, install (with test extras), run the test suite
PYTHON_BOOT := $(shell scripts/find_python.sh)
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/mnist

.PHONY: demo test install clean

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# --no-compile: pip would byte-compile every file of every dependency (jax, scipy, tensorflow-datasets, ...);
# Python compiles the modules a run imports on first use instead. Install from a fresh clone: 57 s -> 21 s.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile -e .
	touch $@

# One install of the package with its test extras (a superset of the plain install, which it marks done too).
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m vdm.main --config configs/mnist.py --workdir $(WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup --durations=15 tests

clean:
	rm -rf $(VENV) workdirs
