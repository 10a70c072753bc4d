"""The native CPU kernels (lh_jax._native): top-k against jax.lax.top_k (bit-identical values and
indices: ties, signed zeros, infinities, NaNs; under jit/vmap/grad, across the kernel's thread
blocks), the sorted top-k picks against lax.top_k, the chunk counts against a direct count; their
build, their switch and their fallback."""
from __future__ import annotations

import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lh_jax import _native
from lh_jax.longheads import select_chunks

from conftest import missing_asset

HAVE_CXX = _native._compiler() is not None


@pytest.fixture(scope="module")
def native():
    """The native kernels, built: without them `_native.top_k` *is* lax.top_k, and comparing the
    two would test nothing."""
    if not _native.available():
        missing_asset(f"the native CPU kernels are unavailable ({_native._state.get('why')})")

# values that stress the order: ties, +-0, +-inf, both NaN signs
SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 1e-38, -1e-38], np.float32)


def _same(a, b):
    (va, ia), (vb, ib) = a, b
    np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib))
    np.testing.assert_array_equal(np.asarray(va).view(np.int32), np.asarray(vb).view(np.int32))


def test_native_kernel_builds_where_a_compiler_exists():
    if not HAVE_CXX:
        missing_asset("no C++ compiler on this machine (install g++ or set CXX)")
    assert _native.available(), _native._state.get("why")


def _draw_rows(data, rows, n):
    """[rows, n] float32 scores: plain, rounded (ties), special values, or the LongHeads shape
    (candidates then a -inf tail per row)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal((rows, n)).astype(np.float32)
    mode = data.draw(st.sampled_from(["plain", "ties", "special", "masked"]))
    if mode == "ties":
        x = np.round(x).astype(np.float32)
    elif mode == "special":
        x = np.where(rng.random(x.shape) < 0.5, rng.choice(SPECIAL, x.shape), x).astype(np.float32)
    elif mode == "masked":
        hi = rng.integers(0, n + 1, size=(rows, 1))
        x = np.where(np.arange(n)[None] < hi, x, -np.inf).astype(np.float32)
    return x


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), n=st.integers(1, 300), data=st.data())
def test_top_k_equals_lax(native, rows, n, data):
    k = data.draw(st.integers(1, n))
    x = _draw_rows(data, rows, n)
    f = jax.jit(lambda x: _native.top_k(x, k))
    _same(f(x), jax.lax.top_k(x, k))


def test_many_rows_over_thread_blocks_and_large_k(native):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20000, 64)).astype(np.float32)
    x[:, ::5] = 0.5  # ties across the row
    for k in (1, 13, 64):
        _same(jax.jit(lambda x: _native.top_k(x, k))(x), jax.lax.top_k(x, k))
    y = rng.standard_normal((300, 400)).astype(np.float32)  # k > 64: the partial-sort path
    _same(jax.jit(lambda y: _native.top_k(y, 150))(y), jax.lax.top_k(y, 150))


def test_batched_shapes_vmap_and_grad(native):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 5, 7, 33)).astype(np.float32))
    _same(_native.top_k(x, 6), jax.lax.top_k(x, 6))
    _same(jax.vmap(lambda r: _native.top_k(r, 4))(x), jax.vmap(lambda r: jax.lax.top_k(r, 4))(x))

    def loss(fn):
        return lambda x: jnp.sum(fn(x, 5)[0] * jnp.arange(5.0))

    np.testing.assert_array_equal(np.asarray(jax.grad(loss(_native.top_k))(x)),
                                  np.asarray(jax.grad(loss(jax.lax.top_k))(x)))


def test_selection_lowers_to_the_native_kernel_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the native kernels are for the CPU backend")
    if not _native.available():
        missing_asset(f"the native CPU kernels are unavailable ({_native._state.get('why')})")
    scores = jnp.zeros((2, 9, 40), jnp.float32)
    cur = jnp.full((2, 9), 30, jnp.int32)
    hlo = jax.jit(lambda s, c: select_chunks(s, c, 16)).lower(scores, cur).as_text()
    assert _native._PICKS_TARGET in hlo
    sel = jnp.zeros((2, 9, 8, 16), jnp.int32)
    assert _native._COUNTS_TARGET in jax.jit(lambda s: _native.chunk_counts(s, 40)).lower(sel).as_text()


def _picks_direct(x, k):
    """The picks by definition: lax.top_k's indices whose value is > -inf, ascending, then n."""
    vals, idx = (np.asarray(a) for a in jax.lax.top_k(x, k))
    out = np.full(idx.shape, x.shape[-1], np.int32)
    for r in np.ndindex(idx.shape[:-1]):
        keep = np.sort(idx[r][vals[r] > -np.inf])
        out[r][:len(keep)] = keep
    return out


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), n=st.integers(1, 200), data=st.data())
def test_top_k_picks_are_lax_top_k_sorted(rows, n, data):
    k = data.draw(st.integers(1, min(n, 80)))
    x = _draw_rows(data, rows, n)
    got = np.asarray(jax.jit(lambda x: _native.top_k_picks(x, k))(x))
    np.testing.assert_array_equal(got, _picks_direct(x, k))
    np.testing.assert_array_equal(np.asarray(_native.top_k_picks_reference(x, k)), got)
    x3 = x.reshape(1, rows, n)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda r: _native.top_k_picks(r, k))(x3))[0], got)


def _counts_direct(sel, width):
    """within[g, t, j]: earlier queries t' < t of group g whose picks include sel[g, t, j];
    cnt[g, c]: queries of group g that picked c (picks outside [0, width) ignored)."""
    G, l, n = sel.shape
    within = np.zeros(sel.shape, np.int32)
    cnt = np.zeros((G, width), np.int32)
    for g in range(G):
        sets = [{int(c) for c in sel[g, t] if 0 <= c < width} for t in range(l)]
        for t in range(l):
            for j in range(n):
                c = int(sel[g, t, j])
                if 0 <= c < width:
                    within[g, t, j] = sum(c in sets[u] for u in range(t))
        for t in range(l):
            for c in sets[t]:
                cnt[g, c] += 1
    return within, cnt


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 6), l=st.integers(1, 20), n=st.integers(1, 10), width=st.integers(1, 30),
       seed=st.integers(0, 2**31 - 1))
def test_chunk_counts_equal_a_direct_count(groups, l, n, width, seed):
    rng = np.random.default_rng(seed)
    sel = rng.integers(-2, width + 3, size=(groups, l, n)).astype(np.int32)  # out of range, repeats
    want = _counts_direct(sel, width)
    got = jax.jit(lambda s: _native.chunk_counts(s, width))(sel)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(_native.chunk_counts_reference(sel, width), want):
        np.testing.assert_array_equal(np.asarray(a), b)
    s4 = sel.reshape(1, groups, l, n)  # batched: vmap and leading dims
    for a, b in zip(jax.vmap(lambda s: _native.chunk_counts(s, width))(s4), want):
        np.testing.assert_array_equal(np.asarray(a)[0], b)


def test_switch_off_and_build_failure_fall_back(monkeypatch, tmp_path):
    x = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32)
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("LH_JAX_NATIVE", "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _native.available()
    _same(_native.top_k(x, 7), jax.lax.top_k(x, 7))
    np.testing.assert_array_equal(np.asarray(_native.top_k_picks(x, 7)), _picks_direct(x, 7))
    sel = np.random.default_rng(4).integers(-1, 12, size=(3, 6, 4)).astype(np.int32)
    for a, b in zip(_native.chunk_counts(sel, 10), _counts_direct(sel, 10)):
        np.testing.assert_array_equal(np.asarray(a), b)

    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.delenv("LH_JAX_NATIVE")
    monkeypatch.setenv("LH_JAX_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        _native.build()
    with pytest.warns(RuntimeWarning, match="native CPU top-k is unavailable"):
        assert not _native.available()
    _same(_native.top_k(x, 7), jax.lax.top_k(x, 7))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_build_error_names_the_compiler_output(monkeypatch, tmp_path):
    bad = tmp_path / "topk.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(_native, "_SOURCE", bad)
    monkeypatch.setenv("LH_JAX_NATIVE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "g++")
    with pytest.raises(RuntimeError, match="failed to build topk.cc"):
        _native.build()
