"""Chunk representations against numpy definitions written from the method's description
(shared/longheads.md): attention-pooled keys, and the sub-chunk variants built on the
attention-pooled, mean and min/max (Quest) summaries."""
from __future__ import annotations

import numpy as np
import pytest

import lh_jax
from lh_jax.longheads.representations import (CHUNK_REPRESENTATIONS, AttnPooled, DistinctKeys, KeyBounds,
                                              MeanKeys, SubChunkPooled, SubChunks, representation_from_name)


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


def _best_part_np(queries, k, parts, summary):
    """max over parts of the score of each part's summary; summary(k_part [m, D], q [t, D]) -> [t]."""
    B, C, l, K, D = k.shape
    H = queries.shape[1]
    G, m = H // K, l // parts
    want = np.empty((B, H, queries.shape[2], C), np.float32)
    for b in range(B):
        for h in range(H):
            for c in range(C):
                s = [summary(k[b, c, i * m:(i + 1) * m, h // G], queries[b, h]) for i in range(parts)]
                want[b, h, :, c] = np.max(np.stack(s), axis=0)
    return want


@pytest.mark.parametrize("parts", [1, 4, 16])
def test_subchunk_mean_and_bounds(chunk_data, parts):
    q, k, v, valid, queries = chunk_data
    mean = lambda kp, qs: qs @ kp.mean(0)
    bounds = lambda kp, qs: np.maximum(qs * kp.min(0), qs * kp.max(0)).sum(-1)
    for base, summary in ((MeanKeys(), mean), (KeyBounds(), bounds)):
        rep_fn = SubChunks(parts, base)
        got = np.asarray(rep_fn.score(queries, rep_fn.build(q, k, v, valid)))
        np.testing.assert_allclose(got, _best_part_np(queries, k, parts, summary), rtol=1e-4, atol=1e-4)
    if parts == k.shape[2]:  # one key per part: a chunk scores its best key
        G = queries.shape[1] // k.shape[3]
        best = np.einsum("bhtd,bcshd->bhtcs", queries, np.repeat(k, G, axis=3)).max(-1)
        got = np.asarray(SubChunks(parts, MeanKeys()).score(queries, SubChunks(parts, MeanKeys()).build(q, k, v, valid)))
        np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-4)


def test_chunk_repr_names():
    assert representation_from_name("bounds-parts:16") == SubChunks(16, KeyBounds())
    assert representation_from_name("attn-parts") == SubChunkPooled(8)
    assert representation_from_name("mean") == MeanKeys()
    for bad in ("attn:4", "attn-parts:0", "attn-parts:x", "median-parts:4", "bounds-parts:"):
        with pytest.raises(ValueError, match="unknown chunk_repr"):
            representation_from_name(bad)
    lh_jax.LongHeads(chunk_size=64, num_chunks=4, chunk_repr="mean-parts:64")
    # "best-key" is one key per part, whatever the chunk size (the test above checks that this
    # scores max_j q·k_j)
    for l in (16, 64, 128):
        assert representation_from_name("best-key", l) == SubChunks(l, MeanKeys())
        assert lh_jax.LongHeads(chunk_size=l, num_chunks=4, chunk_repr="best-key").representation == SubChunks(l, MeanKeys())
    with pytest.raises(ValueError, match="'best-key' needs the chunk size"):
        representation_from_name("best-key")
    with pytest.raises(ValueError, match="dividing chunk_size=64"):
        lh_jax.LongHeads(chunk_size=64, num_chunks=4, chunk_repr="bounds-parts:128")
    with pytest.raises(ValueError, match="unknown chunk_repr 'attn-parts:-2'"):
        lh_jax.LongHeads(chunk_size=64, num_chunks=4, chunk_repr="attn-parts:-2")


def test_attn_parts_is_registered_and_checked():
    assert CHUNK_REPRESENTATIONS["attn-parts"] == SubChunkPooled()
    lh_jax.LongHeads(chunk_size=64, num_chunks=4, chunk_repr="attn-parts")
    with pytest.raises(ValueError, match="parts must be a positive integer dividing chunk_size=36"):
        lh_jax.LongHeads(chunk_size=36, num_chunks=4, chunk_repr="attn-parts")
    with pytest.raises(ValueError, match="parts"):
        lh_jax.LongHeads(chunk_size=64, num_chunks=4, chunk_repr=SubChunkPooled(0))


@pytest.mark.parametrize("r,valid_len", [(1, 16), (4, 16), (16, 16), (4, 10), (8, 3)])
def test_distinct_keys_score_the_best_of_the_farthest_keys(chunk_data, r, valid_len):
    """Direct definition: per chunk and kv head, the r valid keys farthest from the mean of the
    chunk's valid keys; a query scores the chunk by its best product with them."""
    _, k, _, _, queries = chunk_data
    valid = np.zeros(k.shape[:3], bool)
    valid[:, :, :valid_len] = True
    rep = DistinctKeys(r)
    got = np.asarray(rep.score(queries, rep.build(None, k, None, valid)))
    B, C, l, K, D = k.shape
    H = queries.shape[1]
    for b in range(B):
        for c in range(C):
            for h in range(H):
                kv = k[b, c, :valid_len, h // (H // K)]
                far = ((kv - kv.mean(0)) ** 2).sum(-1)
                chosen = kv[np.argsort(-far, kind="stable")[:r]]
                want = (queries[b, h] @ chosen.T).max(-1)
                np.testing.assert_allclose(got[b, h, :, c], want, rtol=1e-5, atol=1e-5)


def test_distinct_keys_names_and_checks():
    assert representation_from_name("distinct-keys") == DistinctKeys(8)
    assert representation_from_name("distinct-keys:3") == DistinctKeys(3)
    for bad in ("distinct-keys:0", "distinct-keys:x"):
        with pytest.raises(ValueError, match="number of keys"):
            representation_from_name(bad)
    with pytest.raises(ValueError, match="keys must be an integer from 1 to chunk_size=16"):
        lh_jax.LongHeads(chunk_size=16, num_chunks=4, chunk_repr="distinct-keys:17")
