# The README's two commands: `make serve` and `make test`. Both install first (.ci/setup
# skips what is already there).
PYTHON ?= python3
PORT ?= 8000
MODELS ?= .vivace/packages

.PHONY: setup serve test bench

setup:
	bash .ci/setup

# Writes the benchmark reference model package and serves it on 127.0.0.1:$(PORT).
serve: setup
	$(PYTHON) -m vivace.engine.cli bench model --out $(MODELS)/mlp --force
	$(PYTHON) -m vivace.engine.cli serve $(MODELS)/mlp --host 127.0.0.1 --port $(PORT)

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) -m vivace.engine.cli bench http
