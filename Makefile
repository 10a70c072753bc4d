.PHONY: setup test demo bench

setup:
	bash scripts/setup.sh

# The test suite (CPU).
test: setup
	.venv/bin/python -m pytest -q tests

# The main job: generation, then passkey retrieval with full attention vs LongHeads (4k window:
# 128-token chunks x 32, each chunk scored by its best single key; with the paper's one pooled
# summary per chunk this model misses most 16k keys, see README) at 4k and 16k tokens (the default
# model was trained on 8k), 2 depths x 1 trial. Prints the length x depth table and writes
# runs/demo/passkey.{json,csv,md,png}. Finished cells are kept in runs/demo/cells.jsonl: a rerun
# skips them (delete the folder or add --no-resume to start over). About 8.5 minutes on 2 CPU cores,
# most of it at 16k.
demo: setup
	.venv/bin/lh-jax generate --prompt "The capital of France is" --max-new-tokens 24
	.venv/bin/lh-jax passkey --lengths 4k,16k --depths 0.25,0.75 --trials 1 --methods full,longheads \
		--chunk-size 128 --num-chunks 32 --chunk-repr mean-parts:128 --out runs/demo

bench: setup
	.venv/bin/lh-jax bench
