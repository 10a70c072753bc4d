"""Property tests of LongHeads' chunk selection (lh_jax.longheads.select_chunks) and of the position
schemes, against brute-force numpy definitions.

select_chunks(scores [..., C], cur [...], num_chunks, force_prev [...]) must return, per query,
`num_chunks` ascending indices (unused slots = C, marked invalid) holding
- the forced chunks: 0, the own chunk `cur`, and `cur - 1` when force_prev (and cur >= 2);
- the free picks: the best-scoring candidates, candidates being 1..cur-2 (1..cur-1 without
  force_prev), as many as fit: num_chunks - 3 of them.
Hence exactly min(num_chunks, cur + 1) distinct chunks with force_prev, and min(num_chunks - 1,
cur + 1) without (the slot of the unforced previous chunk stays free; it is a candidate only).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import jax.numpy as jnp

from lh_jax.longheads import POSITION_SCHEMES, select_chunks

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Q = 6  # queries per example (one batch of independent selections)


@st.composite
def selection_cases(draw):
    C = draw(st.integers(1, 20))
    N = draw(st.integers(3, C + 5))
    cur = draw(hnp.arrays(np.int32, (Q,), elements=st.integers(0, C - 1)))
    force_prev = draw(hnp.arrays(np.bool_, (Q,)))
    # few distinct values make ties likely; any finite float32 exercises extreme magnitudes
    elements = st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 2.0]),
                         st.floats(allow_nan=False, allow_infinity=False, width=32))
    scores = draw(hnp.arrays(np.float32, (Q, C), elements=elements))
    return scores, cur, N, force_prev


def expected_count(cur, N, force_prev):
    return min(N, cur + 1) if force_prev else min(N - 1, cur + 1)


def check_selection(scores, cur, N, force_prev, idx, ok):
    Q_, C = scores.shape
    assert idx.shape == (Q_, N) and ok.shape == (Q_, N)
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(ok, idx < C)
    for q in range(Q_):
        c, fp, row, valid = int(cur[q]), bool(force_prev[q]), idx[q], ok[q]
        chosen = row[valid]
        ctx = f"query {q}: cur={c} N={N} force_prev={fp} C={C} -> {row.tolist()}"
        assert np.all(np.diff(row) >= 0), "not sorted: " + ctx
        assert np.all(row[~valid] == C), "unused slots must hold C: " + ctx
        assert len(set(chosen.tolist())) == len(chosen), "repeated chunk: " + ctx
        assert np.all(chosen <= c), "a future chunk: " + ctx
        assert len(chosen) == expected_count(c, N, fp), "wrong count: " + ctx
        forced = {0, c} | ({c - 1} if fp and c >= 2 else set())
        assert forced <= set(chosen.tolist()), "a forced chunk is missing: " + ctx
        # free picks: the top scores among the candidates (compared as score multisets: ties)
        hi = c - 2 if fp else c - 1
        candidates = np.arange(1, hi + 1)
        free = sorted(set(chosen.tolist()) - forced)
        assert set(free) <= set(candidates.tolist()), "a pick outside the candidates: " + ctx
        k = min(N - 3, len(candidates))
        assert len(free) == k, "wrong number of free picks: " + ctx
        want = np.sort(scores[q, candidates])[::-1][:k]
        got = np.sort(scores[q, free])[::-1]
        np.testing.assert_array_equal(got, want, err_msg="free picks are not the top scores: " + ctx)


@SETTINGS
@given(selection_cases())
def test_select_chunks_properties(case):
    scores, cur, N, force_prev = case
    idx, ok = select_chunks(jnp.asarray(scores), jnp.asarray(cur), N, jnp.asarray(force_prev))
    check_selection(scores, cur, N, force_prev, np.asarray(idx), np.asarray(ok))


@SETTINGS
@given(selection_cases(), st.booleans())
def test_select_chunks_scalar_force_prev(case, force_prev):
    """force_prev given as one Python bool for every query (the default is True)."""
    scores, cur, N, _ = case
    if force_prev:
        idx, ok = select_chunks(jnp.asarray(scores), jnp.asarray(cur), N)
    else:
        idx, ok = select_chunks(jnp.asarray(scores), jnp.asarray(cur), N, False)
    check_selection(scores, cur, N, np.full(Q, force_prev), np.asarray(idx), np.asarray(ok))


@SETTINGS
@given(st.integers(1, 12), st.integers(0, 3), st.data())
def test_select_chunks_leading_axes(C, extra, data):
    """Arbitrary leading axes ([B, H, t] in the model) behave like independent queries."""
    N = 3 + extra
    shape = (2, 3, 2)
    scores = data.draw(hnp.arrays(np.float32, shape + (C,), elements=st.floats(-10, 10, width=32)))
    cur = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(0, C - 1)))
    fp = data.draw(hnp.arrays(np.bool_, shape))
    idx, ok = select_chunks(jnp.asarray(scores), jnp.asarray(cur), N, jnp.asarray(fp))
    idx, ok = np.asarray(idx), np.asarray(ok)
    assert idx.shape == shape + (N,)
    check_selection(scores.reshape(-1, C), cur.reshape(-1), N, fp.reshape(-1), idx.reshape(-1, N),
                    ok.reshape(-1, N))


def test_select_chunks_example():
    """One hand-checked case (documents the convention; the properties above are the real test)."""
    scores = jnp.asarray([[0.0, 5.0, 1.0, 4.0, 3.0, 9.0, 7.0]])
    idx, ok = select_chunks(scores, jnp.asarray([6]), 5, True)
    # forced 0, 5, 6; free picks among 1..4: the top two are chunk 1 (5.0) and chunk 3 (4.0)
    assert np.asarray(idx).tolist() == [[0, 1, 3, 5, 6]]
    idx, ok = select_chunks(scores, jnp.asarray([6]), 5, False)
    # forced 0, 6; candidates 1..5: chunk 5 (9.0) and chunk 1 (5.0); one slot stays free
    assert np.asarray(idx).tolist() == [[0, 1, 5, 6, 7]]
    assert np.asarray(ok).tolist() == [[True, True, True, True, False]]


# --- position schemes -----------------------------------------------------------------------------

@SETTINGS
@given(st.integers(1, 64), st.integers(3, 12), st.data())
def test_remap_positions_are_contiguous(l, N, data):
    """Brute force of the paper's remapping: concatenate the selected chunks in order and number
    their tokens 0, 1, ...; the query sits at its own token's number. The distance from the query
    to each slot's first token must be what `remap` returns, below the window N*l, and `original`
    must return the true distance."""
    C = data.draw(st.integers(1, 3 * N))
    cur = data.draw(st.integers(0, C - 1))
    o = data.draw(st.integers(0, l - 1))
    others = data.draw(st.sets(st.integers(0, max(cur - 1, 0)), max_size=N - 1)) - {cur}
    chunks = sorted(others | {cur})
    n = len(chunks)
    # brute force: token positions in the concatenated window
    starts, pos = [], 0
    for c in chunks:
        starts.append(pos)
        pos += l if c != cur else o + 1
    query_pos = pos - 1  # the own token, last in the window
    slot = np.arange(n)
    remap = np.asarray(POSITION_SCHEMES["remap"](jnp.asarray(slot), jnp.asarray(chunks), cur, n, o, l))
    np.testing.assert_array_equal(remap, query_pos - np.asarray(starts))
    assert remap.max() < N * l and remap.min() >= 0
    orig = np.asarray(POSITION_SCHEMES["original"](jnp.asarray(slot), jnp.asarray(chunks), cur, n, o, l))
    np.testing.assert_array_equal(orig, (cur * l + o) - np.asarray(chunks) * l)


@pytest.mark.parametrize("name", sorted(POSITION_SCHEMES))
def test_position_schemes_listed(name):
    assert callable(POSITION_SCHEMES[name])
