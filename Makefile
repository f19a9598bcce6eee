# Two entry points for a new machine: `make demo` (set up, then train + evaluate on the bundled sample)
# and `make test` (set up, then run the test suite). Both create ./.venv on first use.

PYTHON ?= python3
VENV ?= .venv
# The torch build this project is tested with; override for other platforms, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean FORCE

# Rewritten only when TORCH changes, so that a new TORCH=... is installed into an existing .venv.
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH)' | cmp -s - $@ || echo '$(TORCH)' > $@

$(BIN)/.installed: pyproject.toml $(VENV)/.torch-spec
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/cxr demo --output runs/demo

test: setup
	bash scripts/test-deps.sh
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf runs/demo .pytest_cache
