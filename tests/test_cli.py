"""The `lh-jax` console script as a user meets it: one-line errors with exit code 2 (no traceback),
--version, and `generate` (prompt file / stdin, sampling, EOS, RoPE-scaling methods)."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

import lh_jax
import lh_jax.cli
from conftest import cli_error, save_tiny_with_tokenizer
from lh_jax import runtime


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("cli") / "m", seed=9)


@pytest.mark.parametrize("argv,match", [
    (["generate", "--attention", "longheads:12"], "window '12'"),
    (["generate", "--max-new-tokens", "x"], "--max-new-tokens"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["generate", "--temperature", "-1"], "--temperature"),
    (["generate", "--prompt-file", "/no/such/prompt.txt"], "/no/such/prompt.txt does not exist"),
    (["generate", "--prompt", "a", "--prompt-file", "-"], "not allowed with argument"),
    (["generate", "--model", "/no/such/model"], "/no/such/model"),
    (["passkey", "--depths", "2"], "--depths"),
    (["passkey", "--methods", "full,warp"], "unknown method 'warp'"),
    (["needle", "--tasks", "haystack"], "unknown"),
    (["compare", "--tasks", "summarize"], "summarize"),
    (["perplexity", "--bucket", "3q"], "--bucket"),
    (["bench", "--lengths", "4q"], "--lengths"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, match, capsys):
    assert match in cli_error(argv, capsys)


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lh_jax.cli", "passkey", "--depths", "1.5", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--depths" in proc.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        lh_jax.cli.main(["--version"])
    assert e.value.code == 0 and f"lh-jax {lh_jax.__version__}" in capsys.readouterr().out


class GenerateSpy:
    def __init__(self, monkeypatch):
        self.calls = []
        real = lh_jax.generate

        def spy(params, config, ids, *a, **kw):
            self.calls.append((config, np.asarray(ids), kw))
            return real(params, config, ids, *a, **kw)
        monkeypatch.setattr(lh_jax, "generate", spy)


def test_generate_reads_a_prompt_file_and_stdin(model, tmp_path, monkeypatch, capsys):
    spy = GenerateSpy(monkeypatch)
    prompt = "The mill by the river turned all night. " * 3
    path = tmp_path / "p.txt"
    path.write_text(prompt)
    lh_jax.cli.main(["generate", "--model", model, "--prompt-file", str(path), "--max-new-tokens", "3"])
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
    lh_jax.cli.main(["generate", "--model", model, "--prompt-file", "-", "--max-new-tokens", "3"])
    want = lh_jax.load_tokenizer(model)(prompt, add_special_tokens=False)["input_ids"]
    assert [c[1][0].tolist() for c in spy.calls] == [want, want]
    assert all(c[2]["stop_at_eos"] for c in spy.calls)


def test_generate_rope_scaling_methods_rescale_rope(model, monkeypatch):
    # `--attention ntk` used to be dropped (full attention at the trained RoPE): the config that
    # reaches generate must carry the scaling
    spy = GenerateSpy(monkeypatch)
    for method, rope_type, factor in (("ntk:4", "dynamic", 4.0), ("yarn:2", "yarn", 2.0), ("pi:3", "linear", 3.0),
                                      ("longheads:16x4+ntk:2", "dynamic", 2.0)):
        lh_jax.cli.main(["generate", "--model", model, "--attention", method, "--max-new-tokens", "2"])
        config = spy.calls[-1][0]
        assert (config.rope.rope_type, config.rope.factor) == (rope_type, factor), method


def test_sampling_is_seeded_and_greedy_is_the_argmax(model):
    config, params = lh_jax.load(model, progress=False)
    ids = np.arange(5, 45, dtype=np.int32)[None]
    greedy = np.asarray(lh_jax.generate(params, config, ids, 8))
    logits = np.asarray(lh_jax.forward(params, config, greedy[:, :-1]))[0, 39:]
    assert np.array_equal(logits.argmax(-1), greedy[0, 40:])
    a = np.asarray(lh_jax.generate(params, config, ids, 8, temperature=1.5, seed=1))
    b = np.asarray(lh_jax.generate(params, config, ids, 8, temperature=1.5, seed=1))
    c = np.asarray(lh_jax.generate(params, config, ids, 8, temperature=1.5, seed=2))
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, greedy)
    # top_p so small that only the most likely token survives: greedy again
    assert np.array_equal(np.asarray(lh_jax.generate(params, config, ids, 8, temperature=1.5, top_p=1e-6)), greedy)
    with pytest.raises(ValueError, match="top_p"):
        lh_jax.generate(params, config, ids, 8, top_p=0.0)


def test_stop_at_eos_fills_the_rest_with_eos(model):
    config, params = lh_jax.load(model, progress=False)
    ids = np.arange(5, 45, dtype=np.int32)[None]
    free = np.asarray(lh_jax.generate(params, config, ids, 12))[0, 40:]
    eos = int(free[2])  # pretend the third new token is the end of sequence
    import dataclasses
    stopped = np.asarray(lh_jax.generate(params, dataclasses.replace(config, eos_token_id=eos), ids, 12,
                                         stop_at_eos=True))[0, 40:]
    first = int(np.argmax(free == eos))
    assert np.array_equal(stopped[:first + 1], free[:first + 1]) and (stopped[first:] == eos).all()
    assert runtime.cut_at_eos(stopped, eos) == free[:first].tolist()
