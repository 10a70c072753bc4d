"""Parity with transformers' PyTorch models built from small random configs.

For every variant (LLaMA MHA / GQA 2:1 and 4:1 / MQA, tied and untied embeddings, LLaMA biases,
every RoPE type, Mistral with and without a sliding window shorter than the sequence, Qwen2 with
q/k/v biases):
  - float32 logits over 600 tokens (past the 512-token dense/tiled switch) within 1e-4;
  - greedy 32-token continuations identical to `model.generate(do_sample=False)`;
  - prefill + teacher-forced decode steps give the logits of a full forward pass (and of
    transformers' own incremental decoding).
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import lh_jax
from lh_jax.models import RopeConfig

from conftest import ROPE_SCALED, VARIANTS, WINDOWED, random_ids, torch_greedy, torch_logits, torch_model

TOL = 1e-4
SEQ = 600  # > 512: the tiled causal kernel, several tiles, not a multiple of the tile
PROMPT = 96
NEW = 32

ALL = sorted(VARIANTS)


@pytest.fixture(scope="module")
def long_ids():
    return random_ids((1, SEQ), seed=1234)


_forward_cache: dict = {}


def our_logits(m, ids):
    key = (m.name, ids.tobytes())
    if key not in _forward_cache:
        _forward_cache[key] = np.asarray(lh_jax.forward(m.params, m.config, ids))
    return _forward_cache[key]


@pytest.mark.parametrize("name", ALL)
def test_logits_match_transformers(tiny, long_ids, name):
    m = tiny(name)
    ours = our_logits(m, long_ids)
    ref = torch_logits(m.path, long_ids)
    assert ours.shape == ref.shape == (1, SEQ, m.config.vocab_size)
    assert ours.dtype == np.float32
    assert ref.std() > 0.3, "reference logits are degenerate; the comparison would be vacuous"
    err = np.abs(ours - ref).max()
    assert err <= TOL, f"{name}: max |logits - transformers| = {err:.3g}"


@pytest.mark.parametrize("name", ROPE_SCALED)
def test_rope_scaling_matters(tiny, long_ids, name):
    """The RoPE variants are only tested if their scaling changes the logits at the test length."""
    m = tiny(name)
    plain = dataclasses.replace(m.config, rope=RopeConfig(theta=m.config.rope.theta))
    unscaled = np.asarray(lh_jax.forward(m.params, plain, long_ids))
    diff = np.abs(unscaled - our_logits(m, long_ids)).max()
    assert diff > 100 * TOL, f"{name}: RoPE scaling changes the logits by only {diff:.3g}"


@pytest.mark.parametrize("name", WINDOWED)
def test_sliding_window_matters(tiny, long_ids, name):
    m = tiny(name)
    assert m.config.sliding_window is not None and m.config.sliding_window < SEQ
    unwindowed = np.asarray(lh_jax.forward(m.params, dataclasses.replace(m.config, sliding_window=None), long_ids))
    ours = our_logits(m, long_ids)
    w = m.config.sliding_window
    # identical while the window covers the whole prefix, different after
    assert np.abs(unwindowed[:, :w] - ours[:, :w]).max() <= TOL
    assert np.abs(unwindowed[:, w:] - ours[:, w:]).max() > 100 * TOL


def test_model_types_and_biases_are_read(tiny):
    assert tiny("qwen2").config.model_type == "qwen2" and tiny("qwen2").config.attention_bias
    assert "bias" in tiny("qwen2").params["layers"]["q_proj"]
    assert "bias" not in tiny("qwen2").params["layers"]["o_proj"]
    assert tiny("mistral").config.model_type == "mistral" and tiny("mistral").config.sliding_window is None
    assert tiny("mistral_window64").config.sliding_window == 64
    b = tiny("llama_bias")
    assert b.config.attention_bias and b.config.attention_out_bias and b.config.mlp_bias
    assert "lm_head" not in tiny("llama_gqa2_tied").params and "lm_head" in tiny("llama_mha").params
    assert tiny("llama_mqa").config.num_kv_heads == 1
    assert tiny("llama_gqa4").config.group_size == 4


@pytest.mark.parametrize("name", ALL)
def test_greedy_matches_transformers(tiny, name):
    m = tiny(name)
    prompt = random_ids((1, PROMPT), seed=7)
    ours = np.asarray(lh_jax.generate(m.params, m.config, prompt, NEW))
    ref = torch_greedy(m.path, prompt, NEW)
    assert ours.shape == ref.shape == (1, PROMPT + NEW)
    np.testing.assert_array_equal(ours[:, :PROMPT], prompt)
    assert len(set(ref[0, PROMPT:].tolist())) > 3, "reference continuation is degenerate"
    np.testing.assert_array_equal(ours, ref, err_msg=f"{name}: greedy continuation differs from transformers")


def torch_incremental(path, ids, prefix):
    """transformers' logits for the prefix's last token and then one teacher-forced token at a time."""
    model = torch_model(path)
    t = torch.as_tensor(np.asarray(ids, np.int64))
    out = []
    with torch.no_grad(), warnings.catch_warnings():
        # transformers 5.2x renames `past_key_values` to `cache`; the old name works in 4.x and 5.x
        warnings.simplefilter("ignore", FutureWarning)
        res = model(t[:, :prefix], use_cache=True)
        out.append(res.logits[:, -1])
        past = res.past_key_values
        for i in range(prefix, t.shape[1]):
            res = model(t[:, i:i + 1], past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(res.logits[:, -1])
    return torch.stack(out, 1).numpy()  # [B, 1 + (T - prefix), V] for positions prefix-1 ...


@pytest.mark.parametrize("name", ALL)
def test_decode_steps_match_forward(tiny, long_ids, name):
    m = tiny(name)
    prefix = SEQ - NEW
    cache = lh_jax.init_cache(m.config, 1, SEQ)
    last, cache = lh_jax.prefill(m.params, m.config, long_ids[:, :prefix], cache)
    steps = [np.asarray(last)]
    for i in range(prefix, SEQ):
        logits, cache = lh_jax.decode_step(m.params, m.config, long_ids[:, i], cache)
        steps.append(np.asarray(logits))
    ours = np.stack(steps, 1)  # positions prefix-1 ... SEQ-1
    assert int(cache.index) == SEQ

    ref = torch_incremental(m.path, long_ids, prefix)
    err = np.abs(ours - ref).max()
    assert err <= TOL, f"{name}: prefill/decode vs transformers' incremental decoding: {err:.3g}"

    if m.config.rope.rope_type != "dynamic":
        # dynamic NTK rescales by the length of each call, so a one-shot forward differs by design
        full = our_logits(m, long_ids)[:, prefix - 1:]
        err = np.abs(ours - full).max()
        assert err <= TOL, f"{name}: prefill/decode vs forward on the whole sequence: {err:.3g}"
