# Two commands do all the set-up on a fresh machine:
#   make demo   -- create .venv, install, train configs/mnist.py, print test bits/dim
#   make test   -- create .venv, install, run the test suite
PYTHON_BOOT := $(shell scripts/find_python.sh)
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/mnist

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m vdm.main --config configs/mnist.py --workdir $(WORKDIR)

clean:
	rm -rf $(VENV) workdirs
