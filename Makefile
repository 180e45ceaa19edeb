# Two set-up commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: run test synth clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The main job: synthesize the definition, then run it here on a generated sample (no AWS, no Docker).
run: $(STAMP)
	$(BIN)/dogbreed synth
	$(BIN)/dogbreed local-run

test: $(STAMP)
	$(BIN)/python -m pytest

synth: $(STAMP)
	$(BIN)/dogbreed synth

clean:
	rm -rf build .pytest_cache
