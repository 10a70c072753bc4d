"""The online softmax: attention over keys that arrive in blocks, and the merge of partial results.

Axis legend: S keys of one block, D head_dim; `...` is any leading shape (batch, heads, queries).

Every attention kernel of the package is written with these four functions: full attention's
tiled prefill and its one-shot dense path (models/attention.py), the LongHeads dispatch kernel
(which keeps one state row per (head, query) and updates the rows a tile touches) and LongHeads
decode. A state is (running max, running denominator, running numerator), all float32:

    state = init((B, H, T), D)
    for each block:  state = update(state, logits_..S, lambda p: p @ values_SD)
    out, lse = finalize(state)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

# Finite, so that a fully masked row gives a finite (not NaN) softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class SoftmaxState(NamedTuple):
    """Running softmax of the logits seen so far (float32).

    Attributes:
      max: [...] largest logit seen (MASK_VALUE before any).
      denom: [...] sum of exp(logit - max).
      acc: [..., D] sum of exp(logit - max) * value.
    """

    max: jax.Array
    denom: jax.Array
    acc: jax.Array


def init(shape: tuple, dim: int) -> SoftmaxState:
    """The empty state for rows of `shape` and values of width `dim`."""
    return SoftmaxState(jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
                        jnp.zeros(shape + (dim,), jnp.float32))


def update(state: SoftmaxState, logits, pv: Callable[[jax.Array], jax.Array], mask=None) -> SoftmaxState:
    """Fold one block of logits [..., S] (already scaled and masked) into `state`.

    pv(p) must return p @ V of the block, [..., D] float32, for the unnormalised probabilities p
    [..., S]. With `mask` [..., S], masked entries add nothing even to a row that has seen no
    unmasked logit yet (without it such a row averages its masked values, as a one-shot softmax
    with a finite mask value does).
    """
    m_new = jnp.maximum(state.max, jnp.max(logits, axis=-1))
    p = jnp.exp(logits - m_new[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    corr = jnp.exp(state.max - m_new)
    return SoftmaxState(m_new, state.denom * corr + jnp.sum(p, axis=-1), state.acc * corr[..., None] + pv(p))


def finalize(state: SoftmaxState):
    """(out [..., D], lse [...]): the normalised attention output and the log-sum-exp of the logits."""
    return state.acc / state.denom[..., None], state.max + jnp.log(state.denom)


def merge(parts):
    """Combine [(out, lse), ...] of attention over disjoint key sets (log-sum-exp merge)."""
    lse = parts[0][1]
    for _, part_lse in parts[1:]:
        lse = jnp.logaddexp(lse, part_lse)
    out = sum(o * jnp.exp(part_lse - lse)[..., None] for o, part_lse in parts)
    return out, lse
