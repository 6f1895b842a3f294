# The two commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test

.PHONY: demo test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The demo needs only the runtime dependencies; tests add the oracles.
$(RUNTIME): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $@

$(TESTING): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(RUNTIME) $@

demo: $(RUNTIME)
	$(PY) -m examples.demo

# pytest exits 5 when it collected no tests: make fails then too, as it should.
test: $(TESTING)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(TESTING)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info
