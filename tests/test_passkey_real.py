"""Real model: LongHeads retrieves a passkey from ~4k-token prompts with a 1k window (4x beyond it),
while a sliding window of the same size (chunk 0 kept as a sink) fails when the key lies outside;
beyond the trained length, LongHeads.recommended() answers where the paper's summary misses."""
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


BEYOND = 9216  # past the model's trained 8,192 tokens


def test_recommended_retrieves_beyond_the_trained_length_where_the_paper_misses(model):
    """A 9.2k-token prompt (1.1x the trained length, 4096-token windows): the paper's chunk summary
    at the same chunk size and count loses the key, LongHeads.recommended() answers it (case taken
    from a `lh-jax passkey --lengths 9k` run, docs/results.md)."""
    config, _, tok = model
    prompt = build_prompt(tok, BEYOND, 0.15, 56764)
    assert len(prompt.ids) > config.max_position_embeddings
    ours = lh_jax.LongHeads.recommended()
    paper = lh_jax.LongHeads(ours.chunk_size, ours.num_chunks)
    text = _answer(model, prompt, ours)
    assert answer_matches(text, "56764"), f"LongHeads.recommended() answered {text!r}"
    text = _answer(model, prompt, paper)
    assert not answer_matches(text, "56764"), f"the paper's summary answered {text!r} (the case no longer separates them)"
