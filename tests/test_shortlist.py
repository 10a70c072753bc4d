"""The Shortlist representation (coarse summary -> each query's shortlist -> best single key) and
its chunk-major fine pass, against direct definitions."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jax
import jax.numpy as jnp

import lh_jax
from conftest import nothing_compiles
from lh_jax import runtime
from lh_jax.longheads import Dispatch, LongHeads, select_chunks
from lh_jax.longheads import dispatch as kernel
from lh_jax.longheads import prefill as pf
from lh_jax.longheads.representations import (KeyBounds, MeanKeys, Shortlist, SubChunks, build_in_blocks,
                                             representation_from_name)
from lh_jax.models.rope import Rope
from test_longheads import models_config_for_layer

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def direct_picks(q, keys, cur, parts, size, num_chunks, coarse_kind="mean"):
    """The selection by definition, for one query of one head: candidates 1..cur-2; the `size` best by
    the best of `parts` sub-chunk summaries (mean key, or Quest's bound max over the part of q·k);
    those ranked by their best single key, then the rest by the coarse score; chunk 0, cur - 1, cur
    forced. q [D], keys [C, l, D]."""
    C, l, D = keys.shape
    sub = keys.reshape(C, parts, l // parts, D)
    if coarse_kind == "mean":
        coarse = (sub.mean(2) @ q).max(-1)
    else:
        coarse = np.maximum(q * sub.min(2), q * sub.max(2)).sum(-1).max(-1)
    fine = (keys @ q).max(-1)
    cand = [c for c in range(1, cur - 1)]
    short = sorted(cand, key=lambda c: (-coarse[c], c))[:size]
    rest = [c for c in sorted(cand, key=lambda c: (-coarse[c], c)) if c not in short]
    order = sorted(short, key=lambda c: (-fine[c], c)) + rest
    free = order[:max(0, num_chunks - 3)]
    return sorted(set(free) | {0} | ({cur - 1, cur} if cur >= 2 else {cur}))


@st.composite
def cases(draw):
    C = draw(st.integers(3, 12))
    l = draw(st.sampled_from([4, 8]))
    size = draw(st.integers(1, C + 2))
    N = draw(st.integers(3, C + 2))
    t = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 16))
    coarse = draw(st.sampled_from(["mean", "bounds"]))
    return C, l, size, N, t, seed, coarse


@SETTINGS
@given(cases())
def test_selection_equals_the_direct_definition(case):
    C, l, size, N, t, seed, coarse = case
    rng = np.random.default_rng(seed)
    B, K, G, D = 1, 2, 2, 8
    H = K * G
    q = rng.standard_normal((B, H, t, D)).astype(np.float32)
    keys = rng.standard_normal((B, K, C, l, D)).astype(np.float32)
    cur = rng.integers(0, C, size=(B, H, t)).astype(np.int32)
    rep = Shortlist(SubChunks(2, MeanKeys() if coarse == "mean" else KeyBounds()), size)
    k_BCtKD = jnp.asarray(keys.transpose(0, 2, 3, 1, 4))
    reps = rep.build(jnp.zeros((B, C, l, H, D)), k_BCtKD, jnp.zeros_like(k_BCtKD), jnp.ones((B, C, l), bool))
    scores = rep.score(jnp.asarray(q), reps, jnp.asarray(cur), jnp.asarray(keys))
    idx, ok = select_chunks(scores, jnp.asarray(cur), N)
    idx, ok = np.asarray(idx), np.asarray(ok)
    for h in range(H):
        for i in range(t):
            want = direct_picks(q[0, h, i], keys[0, h // G], int(cur[0, h, i]), 2, size, N, coarse)
            assert idx[0, h, i][ok[0, h, i]].tolist() == want, (h, i, int(cur[0, h, i]))


@pytest.mark.parametrize("tile_rows,segments", [(2048, None), (7, None), (1, None), (64, 3)])
def test_chunk_major_fine_scores_equal_the_direct_gather(tile_rows, segments):
    """The prefill kernel's fine pass (entries scheduled by chunk, one product per tile) gives
    exactly the best key of every shortlisted chunk that `Shortlist.fine_scores` gathers."""
    config = models_config_for_layer()
    # 3 selection segments: the first sees 2 + 3 chunks, fewer than the shortlist of 6
    lh = LongHeads(16, 4, dense_length=32, chunk_repr=Shortlist(SubChunks(2, MeanKeys()), 3 if segments is None else 6),
                   kernel=Dispatch(tile_rows=tile_rows, selection_segments=segments))
    T, H, K, D = 200, 4, 2, 16
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, n, D)).astype(np.float32)) for n in (H, K, K))
    ctx = runtime.context(jnp.ones((1, T), bool), 0)
    rope = Rope.from_config(config)

    def both(q, k, v):
        seq = pf.to_chunked(16, q, k, v, rope, ctx)
        S = seq.q.shape[2]
        reps = build_in_blocks(lh.representation, pf.chunk_major(seq.q_loc, 16), pf.chunk_major(seq.k_loc, 16),
                               pf.chunk_major(seq.v, 16), seq.valid.reshape(1, S // 16, 16))
        fine = kernel.shortlist_scores(lh, seq.q, reps, seq.k_loc, 2, K)
        queries = seq.q[:, :, 32:]
        cur = jnp.broadcast_to((32 + jnp.arange(queries.shape[2])) // 16, queries.shape[:3])
        ids, ok, _ = lh.representation.shortlist(queries, reps, cur)
        direct = lh.representation.fine_scores(queries, ids, seq.k_loc.reshape(1, K, S // 16, 16, D))
        return fine, direct, ok

    fine, direct, ok = (np.asarray(x) for x in jax.jit(both)(q, k, v))
    assert ok.any() and not ok.all()  # early queries have fewer candidates than the shortlist
    np.testing.assert_allclose(np.where(ok, fine, 0), np.where(ok, direct, 0), rtol=1e-6, atol=1e-5)


def test_a_shortlist_of_every_chunk_is_best_key(tmp_path):
    from test_longheads import IDS, Tiny, build_llama
    m = Tiny(build_llama(tmp_path / "m", 4, 2, seed=1))
    a = lh_jax.forward(m.params, m.config, IDS, attention=LongHeads(32, 4, dense_length=64, chunk_repr="shortlist:10"))
    b = lh_jax.forward(m.params, m.config, IDS, attention=LongHeads(32, 4, dense_length=64, chunk_repr="best-key"))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shortlist_names():
    assert representation_from_name("shortlist") == Shortlist(SubChunks(4, MeanKeys()), 32)
    assert representation_from_name("shortlist:8") == Shortlist(SubChunks(4, MeanKeys()), 8)
    assert representation_from_name("shortlist:8:bounds-parts:2") == Shortlist(SubChunks(2, KeyBounds()), 8)
    assert representation_from_name("shortlist:8:mean") == Shortlist(MeanKeys(), 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_repr="shortlist:8:best-key"), "coarse score must be a summary"),
    (dict(chunk_repr="shortlist:8:shortlist:4"), "coarse score must be a summary"),
    (dict(chunk_repr="shortlist:8:median"), "unknown chunk_repr 'median'"),
    (dict(chunk_repr="shortlist:8:bounds-parts:3"), "parts must be a positive integer dividing"),
    (dict(chunk_repr="shortlist:0"), "shortlist size"), (dict(chunk_repr="shortlist:x"), "shortlist size"),
    (dict(chunk_repr="shortlists"), "unknown chunk_repr"),
    (dict(chunk_repr=Shortlist(size=0)), "size must be a positive integer"),
    (dict(chunk_repr=Shortlist(SubChunks(3, MeanKeys()), 8)), "parts must be a positive integer dividing"),
])
def test_bad_shortlists_fail_at_construction(kwargs, match):
    with nothing_compiles(), pytest.raises(ValueError, match=match):
        LongHeads(16, 4, **kwargs)
