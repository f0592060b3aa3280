# The README's two commands: `make serve` and `make test`. Both install first (.ci/setup
# makes the project environment .venv and skips what is already there), then run from it.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
export VENV PYTHON
# The environment's console scripts (vivace, pytest) come first for the commands below.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))
PY := $(abspath $(VENV))/bin/python

.PHONY: setup serve test bench

setup:
	bash .ci/setup

# The whole loop on embedded defaults (home ./.vivace): version the bundled churn data,
# train, register, promote, then serve churn@production and the benchmark reference model
# `mlp` on 127.0.0.1:$(PORT).
serve: setup
	$(PY) -m vivace demo --host 127.0.0.1 --port $(PORT)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m vivace bench http
