"""The CLI's persistent compilation cache: on by default (off for `bench`), a second process
reuses the first one's compiled programs and gives the same output."""
from __future__ import annotations

import os
import subprocess
import sys

import jax

from conftest import save_tiny_with_tokenizer
from lh_jax import cli


def test_cache_settings(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv(cli.COMPILE_CACHE_ENV, str(tmp_path / "xla"))
        assert cli.enable_compile_cache("bench") is None
        assert cli.enable_compile_cache("passkey") == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        monkeypatch.setenv(cli.COMPILE_CACHE_ENV, "off")
        assert cli.enable_compile_cache("passkey") is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_second_run_reuses_compiled_programs(tmp_path):
    model = save_tiny_with_tokenizer(tmp_path / "m", seed=5)
    cache = tmp_path / "xla"
    env = {**os.environ, cli.COMPILE_CACHE_ENV: str(cache), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "lh_jax.cli", "generate", "--model", model, "--prompt", "Hello there",
           "--max-new-tokens", "4", "--attention", "longheads", "--chunk-size", "16", "--num-chunks", "4"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(os.listdir(cache))
    assert entries, "nothing was written to the compilation cache"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout == first.stdout
    assert sorted(os.listdir(cache)) == entries  # nothing new compiled
