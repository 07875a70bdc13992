# Quick start: `make demo` trains the tiny model on CPU and samples from it; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo test lint install clean constraints

# Bytecode is cached on import under .venv/pycache (nothing is written in the source trees),
# whatever PYTHONDONTWRITEBYTECODE says (this CI host sets it): otherwise every trainer the tests
# start would compile TensorFlow's sources again (seqio imports in 15 s instead of 7). Only what is
# imported gets compiled: 7,200 modules, 18 s on one core, where compiling all of site-packages at
# install took 45 s on two (a fresh `make test`: 13 s slower than with a warm cache, 58 s less
# installing).
export PYTHONDONTWRITEBYTECODE :=
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache

# The dev install is pinned to the tested versions (constraints.txt); users keep setup.py's ranges.
$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The demo trains on CPU: JAX_PLATFORMS=cpu also keeps libtpu (a dev extra) from probing for TPUs.
demo: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(PY) -m llada_jax.train --config=configs/tiny.py --workdir=$(WORKDIR)
	JAX_PLATFORMS=cpu $(PY) -m llada_jax.sample --workdir=$(WORKDIR) --prompt="ROMEO:" --prompt="First Citizen:" \
	    --prompt="KING HENRY:" --gen_length=112 --steps=112

# Whole modules per worker, in tests/conftest.py's order (longest first), not xdist's (most tests).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder tests

# Formatting (pyink, checked not applied: run `.venv/bin/python -m pyink llada_jax tests ...` to
# fix) and pylint, both configured in pyproject.toml.
lint: $(VENV)/.installed
	PY=$(PY) .ci/lint

clean:
	rm -rf $(VENV) runs *.egg-info

# Re-pins constraints.txt (its comment lines kept) to the newest versions setup.py allows, from a
# fresh install beside .venv; then `make clean test`, and commit the file once green.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --quiet --upgrade pip
	.venv-constraints/bin/python -m pip install --quiet -e '.[dev]'
	{ grep '^#' constraints.txt; .venv-constraints/bin/python -m pip freeze --exclude-editable \
	    | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints
