.PHONY: setup test demo bench

setup:
	bash scripts/setup.sh

# The test suite (CPU, minutes).
test: setup
	.venv/bin/python -m pytest -q tests

# The main job: a short demo on the embedded default model.
demo: setup
	.venv/bin/lh-jax generate --prompt "The capital of France is" --max-new-tokens 24

bench: setup
	.venv/bin/lh-jax bench
