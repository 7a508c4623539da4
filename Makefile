# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lint format

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/misc/demo.py

test: setup
	$(PY) -m pytest tests

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
