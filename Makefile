# The two quick-start commands: `make demo` and `make test`. Both install into .venv first
# (CPU torch; see scripts/install.sh and the README for the CUDA path).
VENV ?= .venv
FVLM = $(VENV)/bin/fvlm
PY = $(VENV)/bin/python
export HF_HUB_OFFLINE = 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-fast bench

$(VENV)/.fvlm-installed: pyproject.toml scripts/install.sh
	FVLM_VENV=$(VENV) bash scripts/install.sh cpu

install: $(VENV)/.fvlm-installed

demo: install
	$(FVLM) demo --out runs/demo

# two pytest workers (one torch thread each, tests/conftest.py); TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

bench: install
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done
