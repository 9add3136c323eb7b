# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean migrate bench soak soak-backup

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Bastion needs Python 3.11+"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: migrate and serve the reference service on http://127.0.0.1:8000 (SQLite by default)
demo: $(STAMP)
	$(BIN)/conversations demo

## test: run the whole test suite (PostgreSQL tests skip when no server answers, unless CI=true)
test: $(STAMP)
	$(BIN)/python -m pytest

## lint: ruff and mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

## bench: the reference service beside raw-driver, naive and sync baselines (wrk, ~9 min;
##        BENCH_QUICK=1 for a smoke run under 2 minutes). Writes bench/results/latest.{json,md}.
bench: $(STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python -m bench.run

## soak: 10 minutes of mixed load on PostgreSQL; fails if memory grows or connections drift
soak: $(STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python -m bench.soak

## soak-backup: S24, 5 minutes of writes with a backup + verify + integrity check every 30 s
##              (SOAK_BACKUP_BACKEND=postgresql for PostgreSQL; SOAK_BACKUP_SECONDS shortens it)
soak-backup: $(STAMP)
	$(BIN)/python -m bench.soak_backup

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

migrate: $(STAMP)
	$(BIN)/bastion db upgrade --migrations conversations:migrations

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
