"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) through our GGUF path against
transformers' own GGUF loading (dequantised to float32)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import lh_jax

from conftest import hamlet_text, load_default

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hamlet_ids(real_model):
    ids = real_model.tokenizer(hamlet_text()[:20000], add_special_tokens=False)["input_ids"]
    assert len(ids) >= 256
    return np.asarray(ids[:256], np.int32)[None]


@pytest.fixture(scope="module")
def hamlet_logits(real_model, hamlet_ids):
    ours = np.asarray(lh_jax.forward(real_model.params, real_model.config, hamlet_ids))
    with torch.no_grad():
        ref = real_model.hf(torch.as_tensor(hamlet_ids.astype(np.int64))).logits.float().numpy()
    return ours, ref


def mean_nll(logits, ids):
    """Mean next-token negative log-likelihood of ids [1, T] under logits [1, T, V]."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return -np.take_along_axis(logp[0, :-1], ids[0, 1:, None].astype(np.int64), axis=-1).mean()


def test_default_config(real_model):
    c = real_model.config
    hf = real_model.hf.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size) == (
        hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.intermediate_size)
    assert c.vocab_size == hf.vocab_size
    assert c.tie_word_embeddings
    assert c.rope.theta == pytest.approx(hf.rope_parameters["rope_theta"])
    assert c.rms_norm_eps == pytest.approx(hf.rms_norm_eps)


def test_default_logits_match_transformers_gguf(hamlet_logits):
    ours, ref = hamlet_logits
    assert ours.shape == ref.shape and ours.shape[1] == 256
    err = np.abs(ours - ref).max()
    assert err <= 1e-3, f"max |logits - transformers GGUF| = {err:.3g}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_default_model_is_a_language_model(real_model, hamlet_ids, hamlet_logits):
    """Sanity: the model predicts Hamlet far better than chance (a scrambled load would not)."""
    ours, _ = hamlet_logits
    nll = mean_nll(ours, hamlet_ids)
    assert nll < 0.5 * np.log(real_model.config.vocab_size), nll


def test_default_greedy_matches_transformers(real_model):
    tok = real_model.tokenizer
    prompt = np.asarray(tok("The capital of France is", add_special_tokens=False)["input_ids"], np.int32)[None]
    ours = np.asarray(lh_jax.generate(real_model.params, real_model.config, prompt, 16))
    with torch.no_grad():
        t = torch.as_tensor(prompt.astype(np.int64))
        ref = real_model.hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=16, do_sample=False,
                                     eos_token_id=None, pad_token_id=0).numpy()
    assert ref.shape == ours.shape == (1, prompt.shape[1] + 16)
    np.testing.assert_array_equal(ours, ref)
    assert "Paris" in tok.decode(ours[0, prompt.shape[1]:])


def test_default_bfloat16(real_model, hamlet_ids, hamlet_logits):
    config16, params16 = load_default("bfloat16")
    assert config16 == real_model.config
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params16))
    out = np.asarray(lh_jax.forward(params16, config16, hamlet_ids))
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    ours32, _ = hamlet_logits
    agree = (out.argmax(-1) == ours32.argmax(-1)).mean()
    assert agree >= 0.9, f"bfloat16 and float32 argmax agree on only {agree:.0%} of positions"
    nll16, nll32 = mean_nll(out, hamlet_ids), mean_nll(ours32, hamlet_ids)
    assert abs(nll16 - nll32) < 0.03 * nll32, (nll16, nll32)
