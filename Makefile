# Quick start: `make demo` trains the tiny model on CPU and samples from it; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo test lint install clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The demo trains on CPU: JAX_PLATFORMS=cpu also keeps libtpu (a dev extra) from probing for TPUs.
demo: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(PY) -m llada_jax.train --config=configs/tiny.py --workdir=$(WORKDIR)
	JAX_PLATFORMS=cpu $(PY) -m llada_jax.sample --workdir=$(WORKDIR) --prompt="ROMEO:" --prompt="First Citizen:" \
	    --prompt="KING HENRY:" --gen_length=112 --steps=112

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadscope tests

# Formatting (pyink, checked not applied: run `.venv/bin/python -m pyink llada_jax tests ...` to
# fix) and pylint, both configured in pyproject.toml.
lint: $(VENV)/.installed
	PY=$(PY) .ci/lint

clean:
	rm -rf $(VENV) runs *.egg-info
