"""The CLI's persistent compilation cache: on by default (off for `bench`), a second process
reuses the first one's compiled programs and gives the same output."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

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
           "--max-new-tokens", "4", "--attention", "longheads:16x4"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(os.listdir(cache))
    assert entries, "nothing was written to the compilation cache"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout == first.stdout
    assert sorted(os.listdir(cache)) == entries  # nothing new compiled


def test_cpu_opt_level_default_and_overrides(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_accelerator_possible", lambda env: False)
    from jax._src import xla_bridge
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert cli.set_cpu_opt_level(env) == "1"
    assert env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_backend_optimization_level=1"
    env = {cli.CPU_OPT_LEVEL_ENV: "3"}
    assert cli.set_cpu_opt_level(env) == "3" and env["XLA_FLAGS"] == "--xla_backend_optimization_level=3"
    # the user's own XLA_FLAGS level wins; "default" leaves XLA alone
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=2"}
    assert cli.set_cpu_opt_level(env) is None and env["XLA_FLAGS"] == "--xla_backend_optimization_level=2"
    env = {cli.CPU_OPT_LEVEL_ENV: "default"}
    assert cli.set_cpu_opt_level(env) is None and "XLA_FLAGS" not in env
    with pytest.raises(SystemExit) as e:
        cli.set_cpu_opt_level({cli.CPU_OPT_LEVEL_ENV: "fast"})
    assert e.value.code == 2 and cli.CPU_OPT_LEVEL_ENV + "='fast'" in capsys.readouterr().err
    # a backend that exists already has read its flags: nothing is set
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    env = {}
    assert cli.set_cpu_opt_level(env) is None and env == {}


def test_cpu_opt_level_not_for_accelerators(monkeypatch):
    from jax._src import xla_bridge
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    for platforms, expect in (("cuda", None), ("tpu,cpu", None), ("cpu", "1")):
        env = {"JAX_PLATFORMS": platforms}
        assert cli.set_cpu_opt_level(env) == expect, platforms
        assert ("XLA_FLAGS" in env) == (expect is not None)


def test_cli_sets_level_before_any_backend(tmp_path):
    """Through the real entry point: the flag is in XLA_FLAGS before JAX creates its backend (the
    flag is only read then), and the command still runs."""
    model = save_tiny_with_tokenizer(tmp_path / "m", seed=5)
    code = ("import os, sys\n"
            "from jax._src import xla_bridge\n"
            "from lh_jax import cli\n"
            "orig = cli.set_cpu_opt_level\n"
            "def spy(*a):\n"
            "    assert not xla_bridge.backends_are_initialized()\n"
            "    r = orig(*a); print('LEVEL', r, os.environ.get('XLA_FLAGS'), file=sys.stderr); return r\n"
            "cli.set_cpu_opt_level = spy\n"
            "cli.main(sys.argv[1:])\n"
            "assert xla_bridge.backends_are_initialized()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cli.CPU_OPT_LEVEL_ENV)}
    env.update({"JAX_PLATFORMS": "cpu", cli.COMPILE_CACHE_ENV: "off"})
    cmd = [sys.executable, "-c", code, "generate", "--model", model, "--prompt", "Hello", "--max-new-tokens", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LEVEL 1 --xla_backend_optimization_level=1" in r.stderr
