# Each target sets up what it needs: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Synthetic cells -> a CPU-sized U-Net trained for a few minutes -> prediction with an overlay
# PNG -> evaluation on held-out synthetic images. Everything lands under runs/demo.
demo: install
	bash experiments/demo.sh

test: install
	$(BIN)/pytest -q --durations=15

# The unit tests without the end-to-end runs marked slow.
test-fast: install
	$(BIN)/pytest -q -m "not slow"

bench: install
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

lint: install
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check unetcell tests benchmarks docs

clean:
	rm -rf runs .pytest_cache
