# The one entry point. `make help` lists the targets; CI runs `make test` (see .ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Compiled bytecode for the installed package, as the stdlib has: the benchmark compares
# start-up costs, and this environment may set PYTHONDONTWRITEBYTECODE.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: help venv install dev test test-rust test-py test-compat bench lint fmt all clean

help:
	@echo "make install     build the release wheel and install it into $(VENV)"
	@echo "make dev         editable build (maturin develop -r) into $(VENV)"
	@echo "make test        install, then cargo test + pytest + the CPython-suite harness (CI)"
	@echo "make bench       install, then python -m ferroproc.bench (stdlib vs ferroproc)"
	@echo "make lint        cargo fmt --check, cargo clippy -D warnings, ruff"
	@echo "make fmt         cargo fmt, ruff format"

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.9.4,<2" "pytest>=8" "pytest-timeout>=2.3" "ruff>=0.6"
	# Optional for users; here it runs the numpy tests and benchmark cases (zero-copy arrays).
	$(PY) -m pip install -q numpy
	# Optional for users; tests the tqdm progress bar, and the benchmark's peer rows (mpire, loky).
	$(PY) -m pip install -q tqdm mpire loky
	touch $@

venv: $(VENV)/.deps

install: venv
	$(PY) -m pip install -q --force-reinstall --no-deps .

dev: venv
	$(VENV)/bin/maturin develop -r

test-rust:
	cargo test --quiet

test-py:
	$(PY) -m pytest -q tests

test-compat:
	$(PY) tests/compat/run_suite.py --ci

test: install test-rust test-py test-compat

bench: install
	$(PY) -m ferroproc.bench $(BENCH_ARGS)

lint: venv
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests

fmt: venv
	cargo fmt
	$(VENV)/bin/ruff format python tests

all: fmt lint test

clean:
	rm -rf $(VENV) target dist
