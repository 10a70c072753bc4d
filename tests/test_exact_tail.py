"""`LongHeads(exact_tail=T)`: the query blocks holding the prompt's last T tokens select by the exact
best-key score of every chunk, the rest by the representation; decode selects exactly among the
representation's best and the previous token's picks (its memory). Against direct definitions."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jax.numpy as jnp

import lh_jax
from conftest import nothing_compiles
from lh_jax.longheads import LongHeads
from lh_jax.longheads.representations import MeanKeys
from lh_jax.longheads.selection import best_key_scores, select_with_memory
from lh_jax.methods import MethodSpec
from test_longheads import (IDS, T_LONG, TOL, assert_batch_equals_rows_alone, forced_decode, gqa, lh,  # noqa: F401
                            max_err, models, run_forward)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
L, N0 = 32, 4  # the test_longheads workhorse: 32-token chunks, 4 attended, dense up to 64 tokens
FIRST = 64


def test_best_key_scores_is_the_best_key_of_every_chunk():
    rng = np.random.default_rng(0)
    B, K, G, t, C, l, D = 2, 2, 3, 5, 11, 4, 8
    q = rng.standard_normal((B, K * G, t, D)).astype(np.float32)
    keys = rng.standard_normal((B, K, C, l, D)).astype(np.float32)
    got = np.asarray(best_key_scores(jnp.asarray(q), jnp.asarray(keys), chunks_per_step=3))  # 3 does not divide 11
    for b in range(B):
        for h in range(K * G):
            want = np.einsum("tD,ClD->tCl", q[b, h], keys[b, h // G]).max(-1)
            np.testing.assert_allclose(got[b, h], want, rtol=1e-5, atol=1e-5)


def direct_memory_picks(q, keys, mean_keys, memory, cur, N, R=1):
    """Decode's selection by definition for one query of one head: candidates are the N best free
    chunks (1..cur-2) by the mean key and the free chunks of `memory`; candidates ranked by their best
    key, then every other chunk by the mean key; chunk 0, the own chunk and the R before it
    (`local_chunks`; R=1: the previous one) forced, the ranking filling the other slots."""
    coarse = mean_keys @ q
    fine = (keys @ q).max(-1)
    free = list(range(1, cur - 1))
    by_coarse = sorted(free, key=lambda c: (-coarse[c], c))
    cand = set(by_coarse[:N]) | {c for c in memory if c in free}
    order = sorted(cand, key=lambda c: (-fine[c], c)) + [c for c in by_coarse if c not in cand]
    forced = {0, cur} | set(range(max(1, cur - R), cur))
    return sorted(forced | set([c for c in order if c not in forced][:max(0, N - 2 - R)]))


@st.composite
def memory_cases(draw):
    C = draw(st.integers(3, 14))
    N = draw(st.integers(3, 7))
    R = draw(st.integers(1, N - 2))  # local_chunks (1: the paper's previous chunk only)
    seed = draw(st.integers(0, 2 ** 16))
    return C, N, R, seed


@SETTINGS
@given(memory_cases())
def test_decode_selection_equals_the_direct_definition(case):
    """Also with local chunks forced (`local_chunks=R`)."""
    C, N, R, seed = case
    rng = np.random.default_rng(seed)
    B, K, G, l, D = 1, 2, 2, 4, 8
    H = K * G
    q = rng.standard_normal((B, H, 1, D)).astype(np.float32)
    keys = rng.standard_normal((B, K, C, l, D)).astype(np.float32)
    cur = rng.integers(0, C, size=(B, H, 1)).astype(np.int32)
    memory = rng.integers(0, C + 1, size=(B, H, 1, N)).astype(np.int32)  # C: an empty slot
    settings_ = LongHeads(l, N, chunk_repr="mean", exact_tail=1, local_chunks=R)
    mean_keys = keys.mean(3)  # B K C D
    sel = select_with_memory(settings_, jnp.asarray(q), jnp.asarray(mean_keys), jnp.asarray(cur), K, True,
                             jnp.asarray(keys), jnp.asarray(memory))
    idx, ok = np.asarray(sel.chunks), np.asarray(sel.valid)
    for h in range(H):
        want = direct_memory_picks(q[0, h, 0], keys[0, h // G], mean_keys[0, h // G], memory[0, h, 0],
                                   int(cur[0, h, 0]), N, R)
        assert idx[0, h, 0][ok[0, h, 0]].tolist() == want, (h, int(cur[0, h, 0]))


TAIL = lh(exact_tail=40)  # the last 40 tokens: blocks 7, 8 and 9 of the 300-token prompt


@pytest.mark.parametrize("base", ["attn", "mean"])
def test_prefill_tail_blocks_select_by_best_key_the_rest_by_the_representation(gqa, base):
    _, tail = run_forward(gqa, lh(exact_tail=40, chunk_repr=base))
    _, rep = run_forward(gqa, lh(chunk_repr=base))
    _, best = run_forward(gqa, lh(chunk_repr="best-key"))
    last_block = (T_LONG - 1) // L
    tail_from = (last_block - 2) * L - FIRST  # ceil(40/32) + 1 = 3 blocks, as query indices from FIRST
    # the layer's inputs differ once an earlier layer saw a different selection: compare layer 0
    np.testing.assert_array_equal(tail[0, :, :, :tail_from], rep[0, :, :, :tail_from])
    np.testing.assert_array_equal(tail[0, :, :, tail_from:], best[0, :, :, tail_from:])
    assert not np.array_equal(rep[0, :, :, tail_from:], best[0, :, :, tail_from:])  # the cases differ


def test_a_tail_over_the_whole_prompt_is_best_key(gqa):
    a, _ = run_forward(gqa, lh(exact_tail=T_LONG))
    b, _ = run_forward(gqa, lh(chunk_repr="best-key"))
    assert max_err(a, b) <= TOL


def test_the_tail_is_each_rows_own_in_a_left_padded_batch(gqa):
    assert_batch_equals_rows_alone(gqa, lh(exact_tail=40))


def test_decode_with_candidates_covering_every_chunk_is_best_key(gqa):
    """9 of 10 chunks attended: the representation's 9 best already hold every free chunk, so decode's
    exact choice among candidates is the best-key selection, step after step (150 decode steps
    across chunk boundaries, equal to forward() with best-key)."""
    attention = lh(num_chunks=9, exact_tail=40, record_selection=False)
    full, _ = run_forward(gqa, lh(num_chunks=9, chunk_repr="best-key", record_selection=False))
    rows = forced_decode(gqa, IDS, 150, attention)
    errs = np.abs(rows[0] - full[0, 149:]).max(-1)
    assert errs.max() <= TOL, f"max error {errs.max():.3g} at position {149 + errs.argmax()}"
    other, _ = run_forward(gqa, lh(num_chunks=9, record_selection=False))
    assert max_err(other[0, 149:], full[0, 149:]) > 1e-3  # the paper's summary would choose otherwise


def test_decode_memory_starts_from_the_prompts_last_token(gqa):
    """The cache's memory after prefill holds the last prompt token's picks (its exact selection)."""
    attention = lh(exact_tail=40)
    _, sel = run_forward(gqa, lh(chunk_repr="best-key"))  # [L, 1, H, T', N], queries from FIRST
    cache = lh_jax.init_cache(gqa.config, 1, 320, attention, jnp.float32)
    _, cache = lh_jax.prefill(gqa.params, gqa.config, IDS, cache, attention)
    memory = np.asarray(cache.layers["memory"])  # [L, B, H, N]
    np.testing.assert_array_equal(memory[0, 0], sel[0, 0, :, T_LONG - 1 - FIRST])


@pytest.mark.parametrize("kwargs,match", [
    (dict(exact_tail=-1), "exact_tail must be a non-negative integer"),
    (dict(exact_tail=2.5), "exact_tail must be a non-negative integer"),
    (dict(exact_tail=True), "exact_tail must be a non-negative integer"),
    (dict(exact_tail=64, reference=True, dense_length=64), "reproduces the released code"),
])
def test_bad_exact_tail_fails_at_construction(kwargs, match):
    with nothing_compiles(), pytest.raises(ValueError, match=match):
        LongHeads(16, 4, **kwargs)


def test_tail_option_in_the_method_grammar():
    spec = MethodSpec("longheads:128x32/tail=256")
    assert spec.longheads.exact_tail == 256 and spec.name == "longheads:128x32/tail=256"
    for bad in ("longheads:128x32/tail=x", "longheads:128x32/tail=-3", "sliding:128x32/tail=4"):
        with nothing_compiles(), pytest.raises(ValueError, match="tail="):
            MethodSpec(bad)


def test_a_sliding_window_with_an_exact_tail_retrieves_in_the_tail(gqa):
    """selector="recent" keeps the recent chunks for the bulk; the tail's picks are top-k by best key."""
    _, tail = run_forward(gqa, lh(exact_tail=40, selector="recent"))
    _, recent = run_forward(gqa, lh(selector="recent"))
    _, best = run_forward(gqa, lh(chunk_repr="best-key"))
    tail_from = ((T_LONG - 1) // L - 2) * L - FIRST
    np.testing.assert_array_equal(tail[0, :, :, :tail_from], recent[0, :, :, :tail_from])
    np.testing.assert_array_equal(tail[0, :, :, tail_from:], best[0, :, :, tail_from:])


def test_bulk_chunks_narrow_the_prompt_outside_the_tail(gqa):
    """bulk_chunks=3 of 4: the bulk's selection is the 3-chunk selection (the 4th slot unused), the
    tail's the exact 4-chunk one; without a tail the whole prompt computes as num_chunks=3."""
    _, narrow_tail = run_forward(gqa, lh(exact_tail=40, bulk_chunks=3))
    _, three = run_forward(gqa, lh(num_chunks=3))
    _, tail = run_forward(gqa, lh(exact_tail=40))
    tail_from = ((T_LONG - 1) // L - 2) * L - FIRST
    C = (T_LONG + L - 1) // L
    bulk = narrow_tail[0, :, :, :tail_from]
    np.testing.assert_array_equal(bulk[..., :3], three[0, :, :, :tail_from])
    np.testing.assert_array_equal(bulk[..., 3], C)
    np.testing.assert_array_equal(narrow_tail[0, :, :, tail_from:], tail[0, :, :, tail_from:])
    a, _ = run_forward(gqa, lh(bulk_chunks=3, record_selection=False))
    b, _ = run_forward(gqa, lh(num_chunks=3, record_selection=False))
    c, _ = run_forward(gqa, lh(record_selection=False))
    assert max_err(a, b) <= TOL and max_err(a, c) > 1e-3


@pytest.mark.parametrize("bad", [2, 5, 2.5, True, "3"])
def test_bad_bulk_chunks_fail_at_construction(bad):
    with nothing_compiles(), pytest.raises(ValueError, match="bulk_chunks must be an integer in 3..num_chunks=4"):
        LongHeads(16, 4, bulk_chunks=bad)


def test_bulk_option_in_the_method_grammar():
    spec = MethodSpec("longheads:recommended/bulk=16")
    assert spec.longheads.bulk_chunks == 16 and spec.name == "longheads:recommended/bulk=16"
    assert MethodSpec("longheads:128x32/tail=256/bulk=16").name == "longheads:128x32/tail=256/bulk=16"
    assert MethodSpec("longheads:128x32/bulk=32").name == "longheads:128x32"
    for bad in ("longheads:128x32/bulk=x", "longheads:128x32/bulk=40", "sliding:128x32/bulk=4"):
        with nothing_compiles(), pytest.raises(ValueError, match="bulk"):
            MethodSpec(bad)
