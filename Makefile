# Two commands on a fresh machine: `make run` (the main job) and `make test` (lint, types, tests).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint typecheck unit bench

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh

run: $(VENV)/.installed
	$(PY) -m rlmesh.train recipe=grpo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest

unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit

bench: $(VENV)/.installed
	$(PY) scripts/bench_mesh.py
