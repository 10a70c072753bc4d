"""LongHeads decode: one new token per row against the cache, with the selection step of prefill.

Axis legend: B batch, H query heads, K kv heads, G query heads per kv head, C chunks of the cache,
l tokens per chunk, N num_chunks, R representation heads, X representation width, D head_dim.

A step (1) puts the new key/value into its own chunk (read from the cache, patched), (2) builds
that chunk's representation when the token completes it, (3) selects chunks exactly as prefill
does and (4) attends to them at the positions of the position scheme. Every read of the cache
has a fixed size (N chunks per head), so a step costs the same at any context length apart from
scoring one representation per chunk.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lh_jax.longheads.selection import Selection, distances, select, select_with_memory
from lh_jax.models import softmax
from lh_jax.models.attention import (AttentionContext, attend_stats, from_storage, group_heads, take_chunks,
                                     ungroup_heads)
from lh_jax.models.rope import rotate
from lh_jax.models.softmax import MASK_VALUE


def _own_chunk(settings, cache, k_loc, v, q_loc, cur, offset):
    """The keys/values [B, K, l, D] of the row's current chunk with the new token written in, and
    the chunk representations [B, R, C, X] with the current chunk's rebuilt when the token
    completes it (an unfinished chunk is never scored). Also returns the new representation
    [B, R, 1, X] (the cache write)."""
    B, K, S, D = cache["k"].shape
    l = settings.chunk_size
    C = S // l
    batch = jnp.arange(B)
    at_offset = (jnp.arange(l)[None, :] == offset[:, None])[:, None, :, None]  # B 1 l 1
    own = jnp.broadcast_to(cur[:, None], (B, K))
    keys = take_chunks(cache["k"].reshape(B, K, C, l, D), jnp.arange(K), own)  # B K l D
    values = take_chunks(cache["v"].reshape(B, K, C, l, D), jnp.arange(K), own)
    keys = jnp.where(at_offset, k_loc[:, 0][:, :, None, :].astype(keys.dtype), keys)
    values = jnp.where(at_offset, v[:, 0][:, :, None, :].astype(values.dtype), values)
    reps = cache["reps"]
    old = reps[batch, :, cur][:, :, None]
    representation = settings.representation
    complete = offset == l - 1

    def build():
        H = q_loc.shape[2]
        if representation.needs_queries:
            qbuf = jnp.where(at_offset, q_loc[:, 0][:, :, None, :].astype(cache["qbuf"].dtype), cache["qbuf"])
            queries = qbuf.transpose(0, 2, 1, 3)[:, None]  # B 1 l H D
        else:
            queries = jnp.zeros((B, 1, l, H, D), q_loc.dtype)
        filled = jnp.arange(l)[None, None, :] <= offset[:, None, None]
        new = representation.build(queries, keys.transpose(0, 2, 1, 3)[:, None], values.transpose(0, 2, 1, 3)[:, None],
                                   filled)
        return jnp.where(complete[:, None, None, None], new, old)

    own_rep = jax.lax.cond(jnp.any(complete), build, lambda: old)
    reps = jax.vmap(lambda r, n, i: jax.lax.dynamic_update_slice_in_dim(r, n, i, axis=1))(reps, own_rep, cur)
    return keys, values, reps, own_rep


def _selected_attention(settings, q_raw, rope, seq_len, cache, own_keys, own_values, sel: Selection, dist, cur,
                        offset):
    """Attention [B, 1, H, D] float32 of the un-rotated query [B, H, D] over its selected chunks
    [B, H, N] at distances `dist` [B, H, N] (keys are cached rotated by their in-chunk offset)."""
    B, K, S, D = cache["k"].shape
    H, N = sel.chunks.shape[1:]
    l = settings.chunk_size
    C = S // l
    cos, sin = rope.cos_sin(jnp.clip(dist, 0, None).reshape(B, H * N), seq_len)
    q = rotate(q_raw.astype(jnp.float32)[:, :, None, :], cos.reshape(B, H, N, D), sin.reshape(B, H, N, D))
    kv_head = jnp.arange(H) // (H // K)
    chunk = jnp.minimum(sel.chunks, C - 1)
    keys = take_chunks(cache["k"].reshape(B, K, C, l, D), kv_head, chunk).astype(jnp.float32)  # B H N l D
    values = take_chunks(cache["v"].reshape(B, K, C, l, D), kv_head, chunk).astype(jnp.float32)
    is_own = (sel.chunks == cur[:, None, None])[..., None, None]
    keys = jnp.where(is_own, own_keys[:, kv_head][:, :, None], keys)
    values = jnp.where(is_own, own_values[:, kv_head][:, :, None], values)
    s = jnp.einsum("BHND,BHNlD->BHNl", q.astype(keys.dtype), keys, preferred_element_type=jnp.float32) * D ** -0.5
    seen = jnp.arange(l)[None, None, None, :] <= offset[:, None, None, None]  # own chunk: up to the token
    key_ok = sel.valid[..., None] & (~is_own[..., 0] | seen)
    s = jnp.where(key_ok, s, MASK_VALUE).reshape(B, H, -1)
    pv = lambda p: jnp.einsum("BHS,BHSD->BHD", p.astype(values.dtype), values.reshape(B, H, N * l, D),
                              preferred_element_type=jnp.float32)
    out, _ = softmax.finalize(softmax.update(softmax.init((B, H), D), s, pv))
    return out[:, None]


def _dense_attention(settings, q, k, v, rope, seq_len, cache, pos):
    """Ordinary causal attention of the query over every cached position before it plus its own
    key, at true distances: for dense rows when dense_length exceeds the window (then a dense row
    needs more chunks than a selection holds). Reads only the chunks a dense row can reach."""
    B, K, S, D = cache["k"].shape
    H = q.shape[2]
    l = settings.chunk_size
    reach = max(1, min(S // l, -(-settings.dense_length // l)))  # chunks a dense row can see
    chunk_start = pos[:, None] - jnp.arange(reach)[None, :] * l  # query minus chunk start
    cos, sin = rope.cos_sin(jnp.clip(chunk_start, 0, None), seq_len)  # B reach D
    q_rot = rotate(q[:, 0].astype(jnp.float32)[:, :, None, :], cos[:, None], sin[:, None])  # B H reach D
    keys = from_storage(cache["k"][:, :, :reach * l]).reshape(B, K, reach, l, D)
    near_values = from_storage(cache["v"][:, :, :reach * l])
    q_rot = q_rot.reshape(B, K, H // K, reach, D).astype(keys.dtype)
    s = jnp.einsum("BKGCD,BKClD->BKGCl", q_rot, keys, preferred_element_type=jnp.float32) * D ** -0.5
    before = (jnp.arange(reach * l).reshape(reach, l)[None] < pos[:, None, None])[:, None, None]
    s = jnp.where(before, s, MASK_VALUE).reshape(B, K, H // K, 1, reach * l)
    pv = lambda p: jnp.einsum("BKGtS,BKSD->BKGtD", p.astype(near_values.dtype), near_values,
                              preferred_element_type=jnp.float32)
    past = softmax.finalize(softmax.update(softmax.init(s.shape[:-1], D), s, pv))
    q_self, k_self = rope.apply(q, pos[:, None], seq_len), rope.apply(k, pos[:, None], seq_len)
    own = attend_stats(group_heads(q_self, K), k_self.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                       jnp.ones((B, 1, 1), bool), D ** -0.5)
    out, _ = softmax.merge([past, own])
    return ungroup_heads(out)


def decode_step(settings, q, k, v, rope, ctx: AttentionContext, cache):
    """One token per row: (out [B, 1, H, D], writes for `write_cache`, aux or None)."""
    B, _, H, D = q.shape
    K = k.shape[2]
    l, N = settings.chunk_size, settings.num_chunks
    C = cache["k"].shape[2] // l
    pos = ctx.positions[:, 0]
    cur, offset = pos // l, pos % l
    seq_len = pos + 1 if rope.rope.rope_type == "dynamic" else None
    q_loc = rope.apply(q, offset[:, None], seq_len)
    k_loc = rope.apply(k, offset[:, None], seq_len)
    own_keys, own_values, reps, own_rep = _own_chunk(settings, cache, k_loc, v, q_loc, cur, offset)

    if settings.reference:  # the released code's switch point and its unforced previous chunk
        dense_row, force_prev = pos + 1 < settings.dense_length, (pos + 1) % l != 0
    else:
        dense_row, force_prev = pos < settings.dense_length, jnp.ones_like(pos, bool)
    keys = None
    if settings.exact_tail or getattr(settings.representation, "needs_keys", False):
        keys = cache["k"].reshape(B, K, C, l, D)  # the own chunk is forced, never read here
    query = q[:, 0].astype(jnp.float32)[:, :, None, :]
    if settings.exact_tail:
        sel = select_with_memory(settings, query, reps, cur[:, None, None], K, force_prev[:, None, None], keys,
                                 cache["memory"][:, :, None])
    else:
        sel = select(settings, query, reps, cur[:, None, None], K, force_prev[:, None, None], keys=keys)
    sel = Selection(sel.chunks[:, :, 0], sel.valid[:, :, 0])  # B H N
    memory = sel.chunks  # the next step's candidates (exact_tail)
    dist = distances(settings, sel, jnp.broadcast_to(cur[:, None], (B, H)), jnp.broadcast_to(offset[:, None], (B, H)))
    # A dense row (pos < dense_length <= window) has at most N chunks behind it: it is a selective
    # row whose selection is all of them at their true distances, so one path serves both. A dense
    # prefix longer than the window keeps its own path (below).
    dense_in_selective = 0 < settings.dense_length <= settings.window
    if dense_in_selective:
        slot = jnp.arange(N, dtype=jnp.int32)
        everything = slot[None, None, :] <= cur[:, None, None]  # B 1 N: chunks 0..cur
        d_row = dense_row[:, None, None]
        sel = Selection(jnp.where(d_row, jnp.where(everything, slot, C), sel.chunks),
                        jnp.where(d_row, everything, sel.valid))
        dist = jnp.where(d_row, offset[:, None, None] + (cur[:, None, None] - sel.chunks) * l, dist)
    out = _selected_attention(settings, q[:, 0], rope, seq_len, cache, own_keys, own_values, sel, dist, cur, offset)
    if settings.dense_length > 0 and not dense_in_selective:
        # both paths read a fixed amount of the cache; under lax.cond the layer's whole cache slice
        # became an operand, i.e. a copy of the cache per layer and step
        out = jnp.where(dense_row[:, None, None, None], _dense_attention(settings, q, k, v, rope, seq_len, cache, pos),
                        out)
    writes = {"pos": pos, "k": k_loc.transpose(0, 2, 1, 3), "v": v.transpose(0, 2, 1, 3),
              "reps": own_rep, "q": q_loc.transpose(0, 2, 1, 3)}
    if settings.exact_tail:
        writes["memory"] = memory
    aux = {"selected": jnp.where(dense_row[:, None, None], -1, sel.chunks)} if settings.record_selection else None
    return out.astype(q.dtype), writes, aux
