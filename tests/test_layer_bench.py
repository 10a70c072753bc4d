"""`experiments.layer_bench` (one layer's attention prefill on random q/k/v)."""
from __future__ import annotations

import numpy as np
import pytest

import lh_jax
from lh_jax.experiments import layer_bench


def _pairs(attention, T):
    """(query, key) pairs a causal prefill computes, counted from the method's definition: every
    query below the dense prefix sees all earlier keys, later queries num_chunks whole chunks —
    all earlier chunks while they are fewer (the own chunk only up to the query)."""
    if not isinstance(attention, lh_jax.LongHeads):
        return int(np.tril(np.ones((T, T))).sum())
    l, N, Dn = attention.chunk_size, attention.num_chunks, attention.dense_length
    total = 0
    for t in range(T):
        if t < Dn:
            total += t + 1
            continue
        own = t % l + 1
        earlier = min(t // l, N - 1)  # whole chunks before the own one
        total += own + earlier * l
    return total


@pytest.mark.parametrize("attention, T", [
    (lh_jax.FullAttention(), 100),
    (lh_jax.LongHeads(16, 4), 64),  # all within the dense prefix
    (lh_jax.LongHeads(16, 4), 200),
    (lh_jax.LongHeads(16, 4, dense_length=32), 200),
])
def test_flop_count_matches_the_pairs_attended(attention, T):
    H, D = 3, 8
    assert layer_bench.attention_flops(attention, T, H, D) == pytest.approx(4 * H * D * _pairs(attention, T), rel=1e-9)


def test_table(capsys):
    layer_bench.main(["--lengths", "160", "--attentions", "full,16x4,16x4@union", "--repeats", "1",
                      "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--tile-rows", "32"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "tokens" not in ln]
    assert [ln.split("|")[1].strip() for ln in lines] == ["full", "16x4", "16x4@union"]
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[4]) > 0  # median ms, GFLOP


def test_bad_arguments():
    with pytest.raises(ValueError, match="neither"):
        layer_bench.main(["--attentions", "nope", "--lengths", "64"])
    with pytest.raises(SystemExit):
        layer_bench.main(["--heads", "5", "--kv-heads", "2", "--lengths", "64"])
