"""Real model: LongHeads retrieves a passkey from ~4k-token prompts with a 1k window (4x beyond it),
while a sliding window of the same size (chunk 0 kept as a sink) fails when the key lies outside."""
import numpy as np
import pytest

import lh_jax
from conftest import default_tokenizer, load_default
from lh_jax.experiments.passkey import answer_matches, build_prompt

pytestmark = pytest.mark.slow

WINDOW = dict(chunk_size=64, num_chunks=16, dense_length=1024)  # a 1k window
LENGTH = 4096


@pytest.fixture(scope="module")
def model():
    config, params = load_default()
    return config, params, default_tokenizer()


def _answer(model, prompt, attention):
    config, params, tok = model
    out = np.asarray(lh_jax.generate(params, config, prompt.ids[None], 7, attention=attention))
    return tok.decode(out[0, len(prompt.ids):].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("depth,key", [(0.1, 31415), (0.45, 27182), (0.75, 86420)])
def test_longheads_retrieves_beyond_window(model, depth, key):
    prompt = build_prompt(model[2], LENGTH, depth, key)
    assert len(prompt.ids) >= 4 * 1024 - 64
    text = _answer(model, prompt, lh_jax.LongHeads(**WINDOW))
    assert answer_matches(text, str(key)), f"depth {depth}: expected {key}, got {text!r}"


@pytest.mark.parametrize("depth,key", [(0.1, 31415), (0.45, 27182)])
def test_sliding_window_fails_when_key_outside(model, depth, key):
    prompt = build_prompt(model[2], LENGTH, depth, key)
    window = WINDOW["chunk_size"] * WINDOW["num_chunks"]
    assert prompt.needle_end < len(prompt.ids) - window  # the needle is outside the recent window
    text = _answer(model, prompt, lh_jax.sliding_window(**WINDOW))
    assert not answer_matches(text, str(key)), f"sliding window answered {text!r}"


def test_heads_select_the_needle_chunk(model):
    """Selection is observable: at the answer position many heads pick the needle's chunk."""
    config, params, tok = model
    prompt = build_prompt(tok, LENGTH, 0.3, 55555)
    lh = lh_jax.LongHeads(**WINDOW, record_selection=True)
    _, aux = lh_jax.forward(params, config, prompt.ids[None], attention=lh, return_aux=True)
    l = WINDOW["chunk_size"]
    first = (WINDOW["dense_length"] // l) * l  # aux covers query positions from here on
    sel = np.asarray(aux["selected"])[:, 0, :, len(prompt.ids) - 1 - first]  # [L, H, N], last prompt token
    needle_chunks = set(range(prompt.needle_start // l, (prompt.needle_end - 1) // l + 1))
    hits = np.isin(sel, list(needle_chunks)).any(-1)  # [L, H]
    assert hits.mean() > 0.3, f"only {hits.sum()} of {hits.size} heads select the needle chunk"
