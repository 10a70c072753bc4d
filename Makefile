.PHONY: setup test demo bench

setup:
	bash scripts/setup.sh

# The test suite (CPU).
test: setup
	.venv/bin/python -m pytest -q --durations=20 tests

# The main job: generation, then passkey retrieval beyond the trained length (8k) with full
# attention vs LongHeads.recommended() (a 4096-token window) at 4k and 16k tokens, 2 depths x 1
# trial. Prints the length x depth table and writes runs/demo/passkey.{json,csv,md,png}. Finished
# cells are kept in runs/demo/cells.jsonl: a rerun skips them (delete the folder or add --no-resume).
demo: setup
	.venv/bin/lh-jax generate --prompt "The capital of France is" --max-new-tokens 24
	.venv/bin/lh-jax passkey --lengths 4k,16k --depths 0.25,0.75 --trials 1 --methods full,longheads:recommended \
		--out runs/demo

bench: setup
	.venv/bin/lh-jax bench
