"""Attention as a pure, swappable function: the context it receives and full causal attention.

Axis legend: B batch, T new tokens (queries), S key slots, K kv heads, G query heads per kv head,
H query heads (= K·G), D head_dim, C cache capacity.

An attention implementation is a hashable object (a frozen dataclass) with

    init_cache(config, batch, capacity, dtype) -> pytree      # one layer's cache
    __call__(q, k, v, *, config, rope, ctx, cache) -> (out, cache, aux)

`q` [B,T,H,D], `k`/`v` [B,T,K,D] arrive **un-rotated** so that an implementation can place keys at
positions of its own choosing (LongHeads does); `rope` rotates them. `cache` is None for a
cache-free forward pass. `aux` is any per-layer pytree (or None) the model stacks over layers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from .config import ModelConfig

# Finite, so that a fully masked row gives a uniform (not NaN) softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class AttentionContext:
    """Where the new tokens sit. Slots are cache indices; position = slot - pad."""

    positions: jax.Array  # [B, T] int32, true token positions (0 at left padding)
    token_mask: jax.Array  # [B, T] bool, False at left padding
    start: jax.Array  # [] int32, cache slot of the first new token (0 without a cache)
    pad: jax.Array  # [B] int32, number of left-padding slots of each row


def attend(q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale=None):
    """Softmax attention of q over k/v with a boolean mask; GQA by grouping heads, f32 softmax."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
    scale = D ** -0.5 if scale is None else scale
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", q_BTKGD, k_BSKD,
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKD.dtype)
    out = jnp.einsum("BKGTS,BSKD->BTKGD", probs, v_BSKD, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, D).astype(q_BTHD.dtype)


def causal_attend(q_BTHD, k_BSKD, v_BSKD, q_slot_T, k_valid_BS, window=None, block=512):
    """Causal attention of T queries at cache slots `q_slot_T` over S key slots 0..S-1.

    Queries are processed in blocks so no [T, S] array larger than [block, S] exists at once.
    `window` (sliding-window models) hides keys at distance >= window.
    """
    B, T, H, D = q_BTHD.shape
    S = k_BSKD.shape[1]
    k_slot_S = jnp.arange(S, dtype=jnp.int32)

    def one_block(q_blk_BtHD, q_slot_t):
        mask = (k_slot_S[None, :] <= q_slot_t[:, None])
        if window is not None:
            mask &= (q_slot_t[:, None] - k_slot_S[None, :]) < window
        mask = mask[None] & k_valid_BS[:, None, :]
        return attend(q_blk_BtHD, k_BSKD, v_BSKD, mask)

    if T <= block:
        return one_block(q_BTHD, q_slot_T)
    n = -(-T // block)
    padded = n * block
    q_pad = jnp.pad(q_BTHD, ((0, 0), (0, padded - T), (0, 0), (0, 0)))
    slot_pad = jnp.pad(q_slot_T, (0, padded - T), constant_values=-1)
    q_blocks = q_pad.reshape(B, n, block, H, D).swapaxes(0, 1)
    out = jax.lax.map(lambda xs: one_block(*xs), (q_blocks, slot_pad.reshape(n, block)))
    return out.swapaxes(0, 1).reshape(B, padded, H, D)[:, :T]


@dataclasses.dataclass(frozen=True)
class FullAttention:
    """Ordinary causal attention at true positions (the model's own behaviour); keys cached rotated."""

    block: int = 512

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype) -> dict[str, Any]:
        shape = (batch, capacity, config.num_kv_heads, config.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def validate(self, config: ModelConfig) -> None:
        pass

    def __call__(self, q, k, v, *, config: ModelConfig, rope, ctx: AttentionContext, cache):
        window = config.sliding_window
        cos_sin = rope.cos_sin(ctx.positions)
        q = rope.apply(q, ctx.positions, cos_sin=cos_sin)
        k = rope.apply(k, ctx.positions, cos_sin=cos_sin)
        T = q.shape[1]
        if cache is None:
            q_slot = jnp.arange(T, dtype=jnp.int32)
            out = causal_attend(q, k, v, q_slot, ctx.token_mask, window, self.block)
            return out, None, None
        k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), ctx.start, 1)
        v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), ctx.start, 1)
        S = k_all.shape[1]
        k_valid = jnp.arange(S, dtype=jnp.int32)[None, :] >= ctx.pad[:, None]
        q_slot = ctx.start + jnp.arange(T, dtype=jnp.int32)
        out = causal_attend(q, k_all, v_all, q_slot, k_valid, window, self.block)
        return out, {"k": k_all, "v": v_all}, None
