"""`LongHeads(local_chunks=R)`: the R chunks before a query's own are forced into its selection (a
local window of whole chunks inside the num_chunks), in the prompt's selection pass, its exact tail
and decode. Against a direct definition and the model's own forward pass (the decode's memory
selection with local chunks: tests/test_exact_tail.py)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jax.numpy as jnp

from conftest import nothing_compiles
from lh_jax.longheads import LongHeads
from lh_jax.longheads.selection import pick
from lh_jax.methods import MethodSpec
from test_longheads import IDS, T_LONG, TOL, forced_decode, gqa, lh, max_err, models, run_forward  # noqa: F401

L = 32  # the test_longheads workhorse: 32-token chunks, dense up to 64 tokens
FIRST = 64


def direct_local_picks(scores, cur: int, N: int, R: int) -> list[int]:
    """One query's chunks by definition: chunk 0, its own chunk, the max(R, 1) chunks before it,
    then the best-scoring of the older chunks 1..cur-R-1 up to N chunks in all."""
    forced = {0, cur} | set(range(max(1, cur - max(R, 1)), cur))
    older = sorted(range(1, cur - max(R, 1)), key=lambda c: (-scores[c], c))
    free = N - 3 - (max(R, 1) - 1)  # the selector's free slots less the forced local chunks
    return sorted(forced | set(older[:max(0, free)]))


@st.composite
def cases(draw):
    C = draw(st.integers(1, 24))
    N = draw(st.integers(3, 10))
    R = draw(st.integers(0, N - 2))
    return C, N, R, draw(st.integers(0, 2 ** 16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_selection_equals_the_direct_definition(case):
    C, N, R, seed = case
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((2, 3, C)).astype(np.float32)  # [B, t, C]; every query its own chunk
    cur = rng.integers(0, C, (2, 3)).astype(np.int32)
    sel = pick(LongHeads(8, N, local_chunks=R), jnp.asarray(scores), jnp.asarray(cur))
    chunks, valid = np.asarray(sel.chunks), np.asarray(sel.valid)
    for b in range(2):
        for t in range(3):
            got = sorted(chunks[b, t][valid[b, t]].tolist())
            assert got == direct_local_picks(scores[b, t], int(cur[b, t]), N, R), (b, t, cur[b, t])


def _holds_local_chunks(selected, R: int, first: int):
    """Every (layer, head, query) selection [L, 1, H, T', N] from query position `first` on holds
    the R chunks before the query's own."""
    T = selected.shape[3]
    cur = (first + np.arange(T)) // L
    for back in range(1, R + 1):
        want = cur - back
        ok = (want < 1) | (selected == want[None, None, None, :, None]).any(-1)
        assert ok.all(), f"chunk cur-{back} missing at {np.argwhere(~ok)[:3].tolist()}"


def test_prefill_and_decode_force_the_local_chunks_and_agree(gqa):
    """num_chunks=6, local_chunks=3 (chunks cur-3..cur-1 forced): every selective query's selection
    holds them, the selections differ from the setting without them, and teacher-forced decode
    reproduces the forward pass's logits."""
    attention = lh(num_chunks=6, local_chunks=3)
    logits, selected = run_forward(gqa, attention)
    _holds_local_chunks(selected[:, :, :, :T_LONG - FIRST], 3, FIRST)
    _, plain = run_forward(gqa, lh(num_chunks=6))
    assert (plain != selected).any()
    rows = forced_decode(gqa, IDS, 150, attention)
    errs = np.abs(rows[0] - logits[0, 149:]).max(-1)
    assert errs.max() <= TOL, f"max error {errs.max():.3g} at position {149 + errs.argmax()}"


def test_the_exact_tail_forces_the_local_chunks_too(gqa):
    """With an exact tail (the last 40 prompt tokens select by best key): the tail's selections
    hold the local chunks as well."""
    _, selected = run_forward(gqa, lh(num_chunks=6, local_chunks=3, exact_tail=40))
    _holds_local_chunks(selected[:, :, :, :T_LONG - FIRST], 3, FIRST)


def test_local_chunks_of_one_are_the_paper():
    """The previous chunk is always forced: local_chunks=1 computes what local_chunks=0 does."""
    scores = jnp.asarray(np.random.default_rng(0).standard_normal((4, 12)), jnp.float32)
    cur = jnp.asarray([11, 7, 3, 1], jnp.int32)
    a, b = pick(LongHeads(8, 5, local_chunks=1), scores, cur), pick(LongHeads(8, 5), scores, cur)
    np.testing.assert_array_equal(a.chunks, b.chunks)


@pytest.mark.parametrize("bad", [-1, 31, 2.5, True, "4"])
def test_bad_local_chunks_fail_at_construction(bad):
    with nothing_compiles(), pytest.raises(ValueError, match=r"local_chunks must be an integer in 0\.\.30"):
        LongHeads(128, 32, local_chunks=bad)
    with nothing_compiles(), pytest.raises(ValueError, match=r"local_chunks must be an integer in 0\.\.14"):
        LongHeads(128, 32, bulk_chunks=16, local_chunks=15)
    with nothing_compiles(), pytest.raises(ValueError, match="local_chunks=0"):
        LongHeads(64, 4, dense_length=256, reference=True, local_chunks=2)


def test_local_option_in_the_method_grammar():
    spec = MethodSpec("longheads:recommended/local=8")
    assert spec.longheads.local_chunks == 8 and spec.name == "longheads:recommended/local=8"
    assert spec.resolved_name == "longheads:128x32/mean-parts:4/tail=1024/local=8/reread=8"
    assert MethodSpec("longheads:128x32/local=1").name == "longheads:128x32"
    for bad in ("longheads:128x32/local=x", "longheads:128x32/local=31", "sliding:128x32/local=4"):
        with nothing_compiles(), pytest.raises(ValueError, match="local"):
            MethodSpec(bad)
