# The README's two commands: `make serve` and `make test`. Both install first (.ci/setup
# skips what is already there).
PYTHON ?= python3
PORT ?= 8000

.PHONY: setup serve test bench

setup:
	bash .ci/setup

# The whole loop on embedded defaults (home ./.vivace): version the bundled churn data,
# train, register, promote, then serve churn@production and the benchmark reference model
# `mlp` on 127.0.0.1:$(PORT).
serve: setup
	$(PYTHON) -m vivace.cli demo --host 127.0.0.1 --port $(PORT)

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) -m vivace.cli bench http
