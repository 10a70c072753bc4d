"""Runtime behaviour: left-padded batches, bfloat16 params, prefix invariance, jit vs eager,
and that repeated generation does not retrace."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lh_jax
from lh_jax import runtime

from conftest import random_ids, torch_logits, torch_model

TOL = 1e-4


def left_pad(prompts, pad_id=0):
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


def prompts_of(lengths, seed):
    return [random_ids((n,), seed=seed + i) for i, n in enumerate(lengths)]


# --- left-padded batches -----------------------------------------------------------------------

@pytest.mark.parametrize("name,lengths", [
    ("llama_gqa2_tied", (40, 100, 64)),
    ("mistral_window64", (100, 40, 77)),
    ("llama_dynamic", (40, 100, 64)),
    ("llama_mha", (530, 600)),  # the tiled kernel, with padding across a tile boundary
])
def test_left_padded_batch_logits(tiny, name, lengths):
    m = tiny(name)
    prompts = prompts_of(lengths, seed=100)
    ids, mask = left_pad(prompts, pad_id=5)
    batch = np.asarray(lh_jax.forward(m.params, m.config, ids, attention_mask=mask))
    assert np.isfinite(batch).all()
    T = ids.shape[1]
    for i, p in enumerate(prompts):
        alone = np.asarray(lh_jax.forward(m.params, m.config, p[None]))
        err = np.abs(batch[i, T - len(p):] - alone[0]).max()
        assert err <= TOL, f"row {i} (length {len(p)}): {err:.3g}"


@pytest.mark.parametrize("name", ["llama_gqa2_tied", "qwen2"])
def test_left_padded_batch_matches_transformers(tiny, name):
    m = tiny(name)
    prompts = prompts_of((40, 100, 64), seed=200)
    ids, mask = left_pad(prompts, pad_id=0)
    ours = np.asarray(lh_jax.forward(m.params, m.config, ids, attention_mask=mask))
    ref = torch_logits(m.path, ids, attention_mask=mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= TOL


@pytest.mark.parametrize("name,lengths", [
    ("llama_gqa2_tied", (40, 100, 64)),
    ("mistral_window64", (5, 100, 77)),
])
def test_left_padded_batch_greedy(tiny, name, lengths):
    m = tiny(name)
    prompts = prompts_of(lengths, seed=300)
    ids, mask = left_pad(prompts, pad_id=1)
    batch = np.asarray(lh_jax.generate(m.params, m.config, ids, 32, attention_mask=mask))
    assert batch.shape == (len(prompts), ids.shape[1] + 32)
    np.testing.assert_array_equal(batch[:, :ids.shape[1]], ids)
    for i, p in enumerate(prompts):
        alone = np.asarray(lh_jax.generate(m.params, m.config, p[None], 32))
        np.testing.assert_array_equal(batch[i, ids.shape[1]:], alone[0, len(p):], err_msg=f"row {i}")


def test_left_padded_batch_greedy_matches_transformers(tiny):
    import torch
    m = tiny("llama_mqa")
    prompts = prompts_of((30, 90, 64), seed=400)
    ids, mask = left_pad(prompts, pad_id=0)
    ours = np.asarray(lh_jax.generate(m.params, m.config, ids, 32, attention_mask=mask))
    model = torch_model(m.path)
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(ids.astype(np.int64)), attention_mask=torch.as_tensor(mask),
                             max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours, ref)


# --- bfloat16 ----------------------------------------------------------------------------------

def test_bfloat16_params(tiny):
    m = tiny("llama_gqa4")
    config16, params16 = lh_jax.load(m.path, dtype="bfloat16", progress=False)
    assert config16 == m.config
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    ids = random_ids((2, 256), seed=21)
    out16 = np.asarray(lh_jax.forward(params16, config16, ids))
    out32 = np.asarray(lh_jax.forward(m.params, m.config, ids))
    assert out16.dtype == np.float32 and np.isfinite(out16).all()
    agree = (out16.argmax(-1) == out32.argmax(-1)).mean()
    assert agree >= 0.8, f"argmax agreement {agree:.0%}"
    assert np.abs(out16 - out32).max() < 0.1 * np.abs(out32).max()
    # generation with a bfloat16 cache
    gen = np.asarray(lh_jax.generate(params16, config16, ids[:, :50], 16))
    assert gen.shape == (2, 66) and (gen >= 0).all() and (gen < config16.vocab_size).all()
    cache = lh_jax.init_cache(config16, 2, 64, dtype=jnp.bfloat16)
    last, cache = lh_jax.prefill(params16, config16, ids[:, :50], cache)
    assert np.isfinite(np.asarray(last)).all()
    np.testing.assert_array_equal(np.asarray(last).argmax(-1), gen[:, 50])


# --- consistency -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,lengths", [("llama_gqa2_tied", (1, 37, 513)), ("mistral_window300", (256, 513))])
def test_sequence_length_does_not_change_prefix(tiny, name, lengths):
    m = tiny(name)
    ids = random_ids((1, 700), seed=31)
    full = np.asarray(lh_jax.forward(m.params, m.config, ids))
    for n in lengths:
        part = np.asarray(lh_jax.forward(m.params, m.config, ids[:, :n]))
        err = np.abs(part[0] - full[0, :n]).max()
        assert err <= TOL, f"prefix of {n} tokens: {err:.3g}"


def test_jit_and_eager_agree(tiny):
    m = tiny("qwen2_tied_mqa")
    ids = random_ids((1, 10), seed=41)
    jitted = np.asarray(lh_jax.forward(m.params, m.config, ids))
    with jax.disable_jit():
        eager = np.asarray(lh_jax.forward(m.params, m.config, ids))
    assert np.abs(jitted - eager).max() <= 1e-5


def test_prefill_in_pieces(tiny):
    """Two prefills into one cache equal one prefill of the concatenation."""
    m = tiny("llama_gqa4")
    ids = random_ids((2, 90), seed=51)
    cache = lh_jax.init_cache(m.config, 2, 128)
    _, cache = lh_jax.prefill(m.params, m.config, ids[:, :50], cache)
    last2, cache = lh_jax.prefill(m.params, m.config, ids[:, 50:], cache)
    full = np.asarray(lh_jax.forward(m.params, m.config, ids))
    assert np.abs(np.asarray(last2) - full[:, -1]).max() <= TOL
    assert int(cache.index) == 90


# --- compilation -------------------------------------------------------------------------------

def test_generate_does_not_retrace(tiny):
    m = tiny("llama_mqa")
    counts = runtime.TRACE_COUNTS
    ids = random_ids((1, 150), seed=61)  # a prompt bucket (192) no other test uses
    g0, d0 = counts["generate"], counts["decode_step"]
    first = np.asarray(lh_jax.generate(m.params, m.config, ids, 20))
    assert counts["generate"] == g0 + 1, "the first call must trace (or the check below is vacuous)"
    g1, d1 = counts["generate"], counts["decode_step"]
    second = np.asarray(lh_jax.generate(m.params, m.config, ids, 24))  # also 32 steps
    third = np.asarray(lh_jax.generate(m.params, m.config, random_ids((1, 170), seed=62), 17))  # same buckets
    assert (counts["generate"], counts["decode_step"]) == (g1, d1), "generate was retraced"
    np.testing.assert_array_equal(second[:, :170], first)  # 24 tokens extend the 20 tokens
    assert third.shape == (1, 187)


def test_decode_step_traces_once(tiny):
    m = tiny("llama_gqa4")
    cache = lh_jax.init_cache(m.config, 3, 40)
    _, cache = lh_jax.prefill(m.params, m.config, random_ids((3, 7), seed=71), cache)
    before = runtime.TRACE_COUNTS["decode_step"]
    for t in range(5):
        _, cache = lh_jax.decode_step(m.params, m.config, np.array([t, t + 1, t + 2]), cache)
    assert runtime.TRACE_COUNTS["decode_step"] - before <= 1
    before = runtime.TRACE_COUNTS["decode_step"]
    for t in range(5):
        _, cache = lh_jax.decode_step(m.params, m.config, np.array([t, t, t]), cache)
    assert runtime.TRACE_COUNTS["decode_step"] == before


# --- logits_to_keep -------------------------------------------------------------------------------

def test_logits_to_keep_returns_the_last_positions_only(tiny):
    m = tiny("llama_gqa2_tied")
    ids = random_ids((2, 70), seed=31)
    full = np.asarray(lh_jax.forward(m.params, m.config, ids))
    kept = lh_jax.forward(m.params, m.config, ids, logits_to_keep=3)
    assert kept.shape == (2, 3, m.config.vocab_size)
    np.testing.assert_allclose(np.asarray(kept), full[:, -3:], atol=1e-6)
    lh = lh_jax.LongHeads(16, 4)
    kept, aux = lh_jax.forward(m.params, m.config, ids, attention=lh, logits_to_keep=1, return_aux=True)
    np.testing.assert_allclose(np.asarray(kept)[:, 0], np.asarray(lh_jax.forward(m.params, m.config, ids, lh))[:, -1],
                               atol=1e-6)
    for bad in (0, 71, 2.0):
        with pytest.raises(ValueError, match="logits_to_keep"):
            lh_jax.forward(m.params, m.config, ids, logits_to_keep=bad)


# --- long prompts: memory check, bfloat16 cache, progress ---------------------------------------

def test_a_request_that_cannot_fit_fails_before_any_work(tiny, monkeypatch):
    from conftest import nothing_compiles
    m = tiny("llama_gqa2_tied")
    ids = random_ids((1, 300), seed=5)
    need = runtime.memory_estimate(m.config, None, 1, 320, jnp.float32, 320 + 16)
    monkeypatch.setattr(runtime, "available_memory", lambda: sum(need.values()) // 4)
    with nothing_compiles(), pytest.raises(runtime.InsufficientMemoryError, match="1 x 320 tokens need about .* MiB"):
        lh_jax.generate(m.params, m.config, ids, 4)
    with nothing_compiles(), pytest.raises(runtime.InsufficientMemoryError, match="cache_dtype"):
        runtime.token_logprobs(m.params, m.config, ids)


def test_longheads_falls_back_to_a_bfloat16_cache_when_float32_does_not_fit(tiny, monkeypatch):
    m = tiny("llama_gqa2_tied")
    lh = lh_jax.LongHeads(16, 4)
    ids = random_ids((1, 300), seed=6)
    ref = np.asarray(lh_jax.generate(m.params, m.config, ids, 6, attention=lh))  # float32 cache
    f32 = runtime.memory_estimate(m.config, lh, 1, 320, jnp.float32, 336)
    bf16 = runtime.memory_estimate(m.config, lh, 1, 320, jnp.bfloat16, 336)
    assert bf16["cache"] < f32["cache"]
    monkeypatch.setattr(runtime, "available_memory", lambda: (sum(f32.values()) + sum(bf16.values())) // 2)
    with pytest.warns(RuntimeWarning, match="bfloat16 cache"):
        assert runtime.choose_cache_dtype(m.config, lh, m.params, 1, 320, 336) == jnp.bfloat16
    # plenty of memory: float32 below LONG_CACHE_BYTES, bfloat16 above it
    with monkeypatch.context() as mp:
        mp.setattr(runtime, "available_memory", lambda: 100 * sum(f32.values()))
        assert runtime.choose_cache_dtype(m.config, lh, m.params, 1, 320, 336) == jnp.float32
        mp.setattr(runtime, "LONG_CACHE_BYTES", f32["cache"] - 1)
        with pytest.warns(RuntimeWarning, match="bfloat16 cache"):
            assert runtime.choose_cache_dtype(m.config, lh, m.params, 1, 320, 336) == jnp.bfloat16
        assert runtime.choose_cache_dtype(m.config, None, m.params, 1, 320, 336) == jnp.float32
    # full attention keeps its cache dtype (a bfloat16 cache would be converted whole at every step)
    full = runtime.memory_estimate(m.config, None, 1, 320, jnp.float32, 336)
    with monkeypatch.context() as mp:
        mp.setattr(runtime, "available_memory", lambda: sum(full.values()) - 1)
        with pytest.raises(runtime.InsufficientMemoryError):
            runtime.choose_cache_dtype(m.config, None, m.params, 1, 320, 336)
    with pytest.warns(RuntimeWarning, match="bfloat16 cache"):
        out = np.asarray(lh_jax.generate(m.params, m.config, ids, 6, attention=lh))
    assert out.shape == ref.shape and (out[:, :301] == ref[:, :301]).all()  # the first token comes from prefill


def test_a_bfloat16_longheads_cache_holds_the_rounded_entries_and_is_never_converted_whole(tiny):
    """The bfloat16 cache stores its entries as uint16 bits: prefill and decode write exactly the
    float32 cache's entries rounded to bfloat16, decode logits stay close to the float32 cache's,
    and a decode step's compiled program converts no whole-cache array to float32 (XLA:CPU did so
    for a bfloat16 gather or update: a copy of the cache per layer and step)."""
    from lh_jax.models.attention import from_storage
    m = tiny("llama_gqa2_tied")
    lh = lh_jax.LongHeads(16, 4, exact_tail=32)
    ids = random_ids((2, 150), seed=9)
    nxt = random_ids((2,), seed=10)
    caches, logits = {}, {}
    for dt in (jnp.float32, jnp.bfloat16):
        cache = lh_jax.init_cache(m.config, 2, 160, lh, dt)
        _, cache = lh_jax.prefill(m.params, m.config, ids, cache, lh)
        logits[dt], cache = lh_jax.decode_step(m.params, m.config, nxt, cache, lh)
        caches[dt] = cache
    f32, b16 = caches[jnp.float32].layers, caches[jnp.bfloat16].layers
    for name in ("k", "v"):
        assert b16[name].dtype == jnp.uint16
        got, want = np.asarray(from_storage(b16[name])), np.asarray(f32[name].astype(jnp.bfloat16))
        assert (got[:, :, :, :150] == want[:, :, :, :150]).all(), name  # the prompt's slots, every layer
        assert (got[0, :, :, 150] == want[0, :, :, 150]).all(), name  # the decoded token's, first layer
    np.testing.assert_allclose(np.asarray(logits[jnp.bfloat16]), np.asarray(logits[jnp.float32]), atol=0.05)
    assert np.abs(np.asarray(logits[jnp.bfloat16]) - np.asarray(logits[jnp.float32])).max() > 0  # it is bfloat16

    big = lh_jax.init_cache(m.config, 1, 4096, lh, jnp.bfloat16).replace(index=jnp.asarray(4000, jnp.int32))
    hlo = runtime._decode_jit.lower(m.params, jnp.zeros((1,), jnp.int32), big, m.config, lh).compile().as_text()
    whole = "[" + ",".join(map(str, big.layers["k"].shape)) + "]"
    assert f"u16{whole}" in hlo
    assert f"f32{whole}" not in hlo and f"bf16{whole}" not in hlo


def test_long_prefills_report_each_layer(tiny, monkeypatch, capsys):
    m = tiny("llama_gqa2_tied")
    seen = []
    monkeypatch.setattr(runtime, "_show_layer", lambda i, n: seen.append((int(i), int(n))))
    ids = random_ids((1, 80), seed=7)
    lh_jax.generate(m.params, m.config, ids, 2, attention=lh_jax.LongHeads(16, 4, dense_length=32), progress=True)
    L = m.config.num_layers
    assert seen == [(i, L) for i in range(L)]
    seen.clear()
    runtime.token_logprobs(m.params, m.config, ids, progress=True)
    assert seen == [(i, L) for i in range(L)]
    seen.clear()
    lh_jax.generate(m.params, m.config, ids, 2, attention=lh_jax.LongHeads(16, 4, dense_length=48))  # short: off
    assert seen == []
