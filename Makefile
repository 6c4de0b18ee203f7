# The two set-up commands of the README. Both bootstrap .venv (scripts/setup_env.sh) when missing.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env train test lint clean

env:
	@bash scripts/setup_env.sh

train: env
	$(PY) -m rl.train $(ARGS)

test: env lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: env
	$(PY) -m ruff check .

clean:
	rm -rf outputs .pytest_cache
