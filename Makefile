# Two set-up commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# checkov's dependencies clash with the SageMaker SDK's: it gets a virtual environment of its own.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV := $(VENV)/tools-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

.PHONY: run test check synth golden clean

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py | $(VENV)/pyvenv.cfg
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The main job: synthesize the definition, then run it here on a generated sample (no AWS, no Docker).
run: $(STAMP)
	$(BIN)/dogbreed synth
	$(BIN)/dogbreed local-run

# Installed beside the main environment (`make test` builds the two at once), inside it so `rm -rf .venv` removes both.
$(CHECKOV_STAMP): | $(VENV)/pyvenv.cfg
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install --quiet 'checkov==$(CHECKOV_VERSION)'
	touch $@

# Two pytest workers (pytest-xdist), each taking whole test files, so a file's module fixtures are built once;
# most tests wait on processes, servers or sockets, so two workers keep both cores busy.
WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile

test:
	@$(MAKE) --no-print-directory -j2 $(STAMP) $(CHECKOV_STAMP)
	$(BIN)/ruff check .
	$(PYTEST)

# The fast tier while developing: every test not marked slow (under two minutes here). `make test` runs them all.
check: $(STAMP)
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow" -q

synth: $(STAMP)
	$(BIN)/dogbreed synth

# Rewrite tests/golden/ (the definitions under review) from the current tree; the tests only compare with it.
golden: $(STAMP)
	DOGBREED_GOLDEN=update $(BIN)/python -m pytest tests/synth/test_golden_definition.py -q

clean:
	rm -rf build .pytest_cache
