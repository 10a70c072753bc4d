"""Chunk representations against numpy definitions written from the method's description
(shared/longheads.md): attention-pooled keys, and the sub-chunk variant built on it."""
from __future__ import annotations

import numpy as np
import pytest

import lh_jax
from lh_jax.chunks import CHUNK_REPRESENTATIONS, AttnPooled, SubChunkPooled


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def pooled_np(q, k, v):
    """One head, one (sub-)chunk: q [t, D], k/v [t, D] -> attention-pooled key [D]."""
    D = q.shape[-1]
    o = _softmax(q @ k.T / np.sqrt(D)) @ v
    q_bar = o.mean(0)
    return _softmax(q_bar @ k.T / np.sqrt(D)) @ k


@pytest.fixture(scope="module")
def chunk_data():
    rng = np.random.default_rng(0)
    B, C, l, H, K, D = 2, 3, 16, 4, 2, 8
    q = rng.standard_normal((B, C, l, H, D)).astype(np.float32)
    k = rng.standard_normal((B, C, l, K, D)).astype(np.float32)
    v = rng.standard_normal((B, C, l, K, D)).astype(np.float32)
    valid = np.ones((B, C, l), bool)
    queries = rng.standard_normal((B, H, 5, D)).astype(np.float32)
    return q, k, v, valid, queries


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_subchunk_scores_are_the_best_part(chunk_data, parts):
    q, k, v, valid, queries = chunk_data
    B, C, l, H, D = q.shape
    G = H // k.shape[3]
    rep = SubChunkPooled(parts).build(q, k, v, valid)
    scores = np.asarray(SubChunkPooled(parts).score(queries, rep))  # B H t C
    m = l // parts
    want = np.empty_like(scores)
    for b in range(B):
        for h in range(H):
            for c in range(C):
                reps = [pooled_np(q[b, c, i * m:(i + 1) * m, h], k[b, c, i * m:(i + 1) * m, h // G],
                                  v[b, c, i * m:(i + 1) * m, h // G]) for i in range(parts)]
                want[b, h, :, c] = np.max(queries[b, h] @ np.stack(reps).T, axis=-1)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
    if parts == 1:  # one part is the paper's representation
        attn = np.asarray(AttnPooled().score(queries, AttnPooled().build(q, k, v, valid)))
        np.testing.assert_allclose(scores, attn, rtol=1e-5, atol=1e-5)


def test_attn_parts_is_registered_and_checked():
    assert isinstance(CHUNK_REPRESENTATIONS["attn-parts"], SubChunkPooled)
    lh_jax.LongHeads(chunk_size=64, num_chunks=4, chunk_repr="attn-parts")
    with pytest.raises(ValueError, match="parts must be a positive integer dividing chunk_size=36"):
        lh_jax.LongHeads(chunk_size=36, num_chunks=4, chunk_repr="attn-parts")
    with pytest.raises(ValueError, match="parts"):
        lh_jax.LongHeads(chunk_size=64, num_chunks=4, chunk_repr=SubChunkPooled(0))
