"""Attention as a pure, swappable function: the context it receives and full causal attention.

Axis legend: B batch, T new tokens (queries), S key slots (cache positions), K kv heads, G query heads per kv head,
H query heads (= K·G), D head_dim, L layers.

An attention implementation is a hashable object (a frozen dataclass) with

    init_cache(config, batch, capacity, dtype) -> pytree          # one layer's cache
    __call__(q, k, v, *, config, rope, ctx, cache) -> (out, writes, aux)
    write_cache(cache_L, writes_L, ctx) -> cache_L                 # leading layer axis L
    validate(config) -> None                                       # raise/warn before compiling

`q` [B,T,H,D], `k`/`v` [B,T,K,D] arrive **un-rotated** so that an implementation can place keys at
positions of its own choosing (LongHeads does); `rope` rotates them. `cache` is the layer's cache
as it was before this call (read-only; None for a cache-free forward pass). The layer returns
`writes` instead of a new cache; the model applies them with `write_cache` (see models/llama.py).
`aux` is any per-layer pytree (or None), stacked over layers for diagnostics.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from . import softmax
from .config import ModelConfig
from .softmax import MASK_VALUE


# --- bfloat16 caches stored as their bits ------------------------------------------------------------
# XLA:CPU runs a gather or dynamic-update-slice of a bfloat16 array by converting the whole operand to
# float32 and back: a decode step reading a few chunks of a bfloat16 cache converted all of it (every
# layer, every step). A cache that stores its bfloat16 entries as uint16 bits reads and writes them in
# place and converts only what it read.

def storage_dtype(dtype):
    """The dtype a cache stores entries of `dtype` in: uint16 bits for bfloat16, else `dtype`."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def from_storage(x):
    """Entries read from a cache (any slice of it) in their float dtype."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def to_storage(x, stored):
    """Entries `x` in the storage dtype of the cache array `stored`."""
    if stored.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(stored.dtype)


def take_chunks(x_BKClD, kv_head_H, ids_BH):
    """Whole chunks of a cache viewed as [B, K, C, l, D]: x[b, kv_head[h], ids[b, h, ...]] as
    [B, H, ..., l, D] in the entries' float dtype (`from_storage`); ids are clipped into [0, C).
    One take of contiguous rows, the gather form XLA:CPU runs fastest (~3x an indexed gather)."""
    B, K, C, l, D = x_BKClD.shape
    extra = ids_BH.ndim - 2
    b = jnp.arange(B).reshape((B, 1) + (1,) * extra)
    h = jnp.asarray(kv_head_H).reshape((1, -1) + (1,) * extra)
    rows = (b * K + h) * C + jnp.clip(ids_BH, 0, C - 1)
    out = jnp.take(x_BKClD.reshape(B * K * C, l * D), rows.reshape(-1), axis=0, mode="clip")
    return from_storage(out.reshape(rows.shape + (l, D)))


@struct.dataclass
class AttentionContext:
    """Where the new tokens sit. Slots are cache indices; position = slot - pad."""

    positions: jax.Array  # [B, T] int32, true token positions (0 at left padding)
    token_mask: jax.Array  # [B, T] bool, False at left padding
    start: jax.Array  # [] int32, cache slot of the first new token (0 without a cache)
    pad: jax.Array  # [B] int32, number of left-padding slots of each row


def group_heads(q_BTHD, num_kv):
    """[B, T, H, D] -> [B, K, G, T, D]: query heads grouped by their kv head."""
    B, T, H, D = q_BTHD.shape
    return q_BTHD.reshape(B, T, num_kv, H // num_kv, D).transpose(0, 2, 3, 1, 4)  # BKGTD


def ungroup_heads(o_BKGTD):
    """[B, K, G, T, D] -> [B, T, H, D], the inverse of `group_heads`."""
    B, K, G, T, D = o_BKGTD.shape
    return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)


def attend_stats(q_BKGTD, k_BKSD, v_BKSD, mask_BTS, scale, keys_transposed=False):
    """Masked softmax attention returning (out [B,K,G,T,D] f32 normalised, lse [B,K,G,T] f32).

    With `keys_transposed`, keys come as [B, K, D, S] (the decode cache layout)."""
    eq = "BKGTD,BKDS->BKGTS" if keys_transposed else "BKGTD,BKSD->BKGTS"
    s = jnp.einsum(eq, q_BKGTD, k_BKSD, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask_BTS[:, None, None], s, MASK_VALUE)
    pv = lambda p: jnp.einsum("BKGTS,BKSD->BKGTD", p.astype(v_BKSD.dtype), v_BKSD,
                              preferred_element_type=jnp.float32)
    return softmax.finalize(softmax.update(softmax.init(s.shape[:-1], v_BKSD.shape[-1]), s, pv))


def attend(q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale=None):
    """Softmax attention of q over k/v under a boolean mask [B, T, S]; GQA by grouping heads."""
    K, D = k_BSKD.shape[2], q_BTHD.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    out, _ = attend_stats(group_heads(q_BTHD, K), k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3),
                          mask_BTS, scale)
    return ungroup_heads(out).astype(q_BTHD.dtype)


def flash_causal(q_BKGTD, k_BKTD, v_BKTD, key_valid_BT, window=None, block=512):
    """Causal self-attention of T tokens, tiled with an online softmax; skips tiles above the diagonal.

    Never holds more than a [block, block] score tile per head. Returns (out f32, lse). Only the
    diagonal tile (and, with a sliding window, the oldest tile) pays for an element-wise mask;
    left padding enters as an additive key bias. The key loop has a data-dependent bound, so this
    kernel is forward-only; `self_attention_stats(..., differentiable=True)` takes the dense path.
    """
    B, K, G, T, D = q_BKGTD.shape
    n = -(-T // block)
    Tp = n * block
    padT = lambda x, ax: jnp.pad(x, [(0, Tp - T) if a == ax else (0, 0) for a in range(x.ndim)])
    q_scaled = (q_BKGTD.astype(jnp.float32) * D ** -0.5).astype(q_BKGTD.dtype)
    q_blocks = padT(q_scaled, 3).reshape(B, K, G, n, block, D).transpose(3, 0, 1, 2, 4, 5)
    k_blocks = padT(k_BKTD, 2).reshape(B, K, n, block, D)
    v_blocks = padT(v_BKTD, 2).reshape(B, K, n, block, D)
    bias = jnp.where(padT(key_valid_BT, 1), 0.0, MASK_VALUE).astype(jnp.float32).reshape(B, n, block)
    offs = jnp.arange(block, dtype=jnp.int32)
    diag_ok = offs[None, :] <= offs[:, None]

    def tile(q_b, j, state, mask=None):
        kb = jax.lax.dynamic_index_in_dim(k_blocks, j, 2, keepdims=False)
        vb = jax.lax.dynamic_index_in_dim(v_blocks, j, 2, keepdims=False)
        bj = jax.lax.dynamic_index_in_dim(bias, j, 1, keepdims=False)  # [B, block]
        s = jnp.einsum("BKGTD,BKSD->BKGTS", q_b, kb, preferred_element_type=jnp.float32)
        s = s + bj[:, None, None, None, :]
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        pv = lambda p: jnp.einsum("BKGTS,BKSD->BKGTD", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return softmax.update(state, s, pv)

    def q_block(i, q_b):
        init = softmax.init((B, K, G, block), D)
        if window is None:
            state = jax.lax.fori_loop(0, i, lambda j, st: tile(q_b, j, st), init)
        else:
            q_slot = i * block + offs
            lo = jnp.maximum(0, (i * block - window + 1) // block)

            def windowed(j, st):
                k_slot = j * block + offs
                return tile(q_b, j, st, (q_slot[:, None] - k_slot[None, :]) < window)
            state = jax.lax.fori_loop(lo, i, windowed, init)
            diag_ok_w = diag_ok & ((offs[:, None] - offs[None, :]) < window)
        return softmax.finalize(tile(q_b, i, state, diag_ok if window is None else diag_ok_w))

    out, lse = jax.lax.map(lambda xs: q_block(*xs), (jnp.arange(n, dtype=jnp.int32), q_blocks))
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, Tp, D)[:, :, :, :T]
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, K, G, Tp)[..., :T]
    return out, lse


def self_attention_stats(q_BKGTD, k_BKTD, v_BKTD, key_valid_BT, window=None, block=None,
                         dense_below=512, differentiable=False):
    """Causal attention among the new tokens: dense when short (or asked to be differentiable),
    tiled when long (tile 256 up to 2k tokens, else 512, unless `block` is given)."""
    T = q_BKGTD.shape[3]
    if block is None:
        block = 256 if T <= 2048 else 512
    if T <= dense_below or differentiable:
        slot = jnp.arange(T)
        mask = slot[None, :] <= slot[:, None]
        if window is not None:
            mask &= (slot[:, None] - slot[None, :]) < window
        mask = mask[None] & key_valid_BT[:, None, :]
        return attend_stats(q_BKGTD, k_BKTD, v_BKTD, mask, q_BKGTD.shape[-1] ** -0.5)
    return flash_causal(q_BKGTD, k_BKTD, v_BKTD, key_valid_BT, window, block)


def cached_attention_stats(q_BKGTD, k_BKDS, v_BKSD, ctx: AttentionContext, window=None, block=512):
    """Attention of the new tokens over the slots already in the cache (slots < ctx.start).

    Keys are cached transposed, [B, K, D, S], so a decode step's q·kᵀ reads them in place."""
    B, K, G, T, D = q_BKGTD.shape
    S = k_BKDS.shape[3]
    slot = jnp.arange(S, dtype=jnp.int32)
    key_ok = (slot[None, :] >= ctx.pad[:, None]) & (slot[None, :] < ctx.start)  # [B, S]

    def part(q_b, q_slot):
        mask = jnp.broadcast_to(key_ok[:, None, :], (B, q_slot.shape[0], S))
        if window is not None:
            mask &= (q_slot[None, :, None] - slot[None, None, :]) < window
        return attend_stats(q_b, k_BKDS, v_BKSD, mask, D ** -0.5, keys_transposed=True)

    q_slot = ctx.start + jnp.arange(T, dtype=jnp.int32)
    if T <= block:
        return part(q_BKGTD, q_slot)
    n = -(-T // block)
    qp = jnp.pad(q_BKGTD, ((0, 0),) * 3 + ((0, n * block - T), (0, 0)))
    sp = jnp.pad(q_slot, (0, n * block - T))
    qb = qp.reshape(B, K, G, n, block, D).transpose(3, 0, 1, 2, 4, 5)
    out, lse = jax.lax.map(lambda xs: part(*xs), (qb, sp.reshape(n, block)))
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, n * block, D)[:, :, :, :T]
    return out, lse.transpose(1, 2, 3, 0, 4).reshape(B, K, G, n * block)[..., :T]


def write_slots(cache_LBKSD, new_LBTKD, start, transposed=False):
    """Write new entries [L, B, T, K, D] into a stacked cache [L, B, K, S, D] (or, `transposed`,
    [L, B, K, D, S]) at slot `start`."""
    if transposed:
        new = new_LBTKD.transpose(0, 1, 3, 4, 2).astype(cache_LBKSD.dtype)
        return jax.lax.dynamic_update_slice_in_dim(cache_LBKSD, new, start, axis=4)
    new = new_LBTKD.transpose(0, 1, 3, 2, 4).astype(cache_LBKSD.dtype)
    return jax.lax.dynamic_update_slice_in_dim(cache_LBKSD, new, start, axis=3)


@dataclasses.dataclass(frozen=True)
class FullAttention:
    """Ordinary causal attention at true positions (the model's own behaviour); keys cached rotated,
    transposed ([B, K, D, S]) so that decode reads them without a copy.

    Long prompts use a tiled, diagonal-skipping kernel; prompts of at most `dense_below` tokens,
    or every prompt with `differentiable=True`, use one dense masked softmax (reverse-mode
    differentiable, memory quadratic in T).
    """

    block: int | None = None
    dense_below: int = 512
    differentiable: bool = False

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype) -> dict[str, Any]:
        K, D = config.num_kv_heads, config.head_dim
        capacity = -(-capacity // 128) * 128  # aligned rows: an odd capacity halves decode speed on CPU
        return {"k": jnp.zeros((batch, K, D, capacity), dtype), "v": jnp.zeros((batch, K, capacity, D), dtype)}

    def validate(self, config: ModelConfig) -> None:
        pass

    def __call__(self, q, k, v, *, config: ModelConfig, rope, ctx: AttentionContext, cache):
        window = config.sliding_window
        cos_sin = rope.cos_sin(ctx.positions)
        q = rope.apply(q, ctx.positions, cos_sin=cos_sin)
        k = rope.apply(k, ctx.positions, cos_sin=cos_sin)
        K = k.shape[2]
        q_g = group_heads(q, K)
        k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        parts = [self_attention_stats(q_g, k_t, v_t, ctx.token_mask, window, self.block, self.dense_below,
                                      self.differentiable)]
        writes = None
        if cache is not None:
            past = lambda: cached_attention_stats(q_g, cache["k"], cache["v"], ctx, window)
            if q.shape[1] == 1:
                parts.append(past())
            else:  # a prefill into an empty cache has no past to attend to
                nothing = lambda: (jnp.zeros_like(parts[0][0]), jnp.full_like(parts[0][1], MASK_VALUE))
                parts.append(jax.lax.cond(ctx.start > 0, past, nothing))
            writes = {"k": k, "v": v}
        out, _ = softmax.merge(parts)
        return ungroup_heads(out).astype(q.dtype), writes, None

    def write_cache(self, cache, writes, ctx: AttentionContext):
        return {"k": write_slots(cache["k"], writes["k"], ctx.start, transposed=True),
                "v": write_slots(cache["v"], writes["v"], ctx.start)}
