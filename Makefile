.PHONY: setup test demo bench

setup:
	bash scripts/setup.sh

# The test suite (CPU).
test: setup
	.venv/bin/python -m pytest -q tests

# The main job: generation, then LongHeads vs a sliding window of the same 1k window on
# ~4k-token passkey prompts (default model, a few minutes on 2 CPU cores).
demo: setup
	.venv/bin/lh-jax generate --prompt "The capital of France is" --max-new-tokens 24
	.venv/bin/lh-jax passkey --lengths 4k --depths 0.2,0.5,0.8 --methods longheads,sliding \
		--chunk-size 64 --num-chunks 16 --dense-length 1024 --out runs/demo_passkey.json

bench: setup
	.venv/bin/lh-jax bench
