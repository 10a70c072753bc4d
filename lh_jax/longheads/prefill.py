"""LongHeads prefill: the prompt's dense prefix at true positions, the rest by selection.

Axis legend: B batch, T tokens (in slot order), S positions (the cache's slots) padded to whole
chunks, H query heads, K kv heads, G query heads per kv head, C chunks, l tokens per chunk, D head_dim,
N num_chunks.

The prompt is moved to position space (row b's position p at index p, so left padding sits at
the end) and padded to whole chunks; queries and keys are rotated by their offsets inside their
chunk once, for the chunk representations, the cache and the dispatch kernel alike.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lh_jax.longheads import dispatch
from lh_jax.longheads.representations import build_in_blocks
from lh_jax.models.attention import AttentionContext, self_attention_stats, ungroup_heads
from lh_jax.models.rope import rotate


class Chunked(NamedTuple):
    """The prompt in position space, head-major ([B, H or K, S, D]), padded to whole chunks.

    Attributes:
      q, k, v: un-rotated queries, keys and values.
      q_loc, k_loc: queries and keys rotated by their offset inside their chunk.
      valid: [B, S] bool, False at padding.
      length: [B] int32, real tokens of each row.
      seq_len: [B] int32 for dynamic-NTK RoPE (which depends on the length), else None.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_loc: jax.Array
    k_loc: jax.Array
    valid: jax.Array
    length: jax.Array
    seq_len: jax.Array | None


def take_rows(x, index_BT, axis: int):
    """x[b, ..., index[b, t], ...] along `axis` (a gather with a leading batch axis)."""
    index = index_BT.reshape(index_BT.shape + (1,) * (x.ndim - index_BT.ndim))
    return jnp.take_along_axis(x, index, axis=axis)


def in_chunk_rotation(rope, batch: int, chunk_size: int, seq_len):
    """cos, sin [B, l, D] of the offsets 0..l-1 inside a chunk (the same for every chunk)."""
    offsets = jnp.broadcast_to(jnp.arange(chunk_size, dtype=jnp.int32), (batch, chunk_size))
    return rope.cos_sin(offsets, seq_len)


def rotate_in_chunks(x_BHSD, cos_BlD, sin_BlD):
    """Rotate every position of head-major x by its offset inside its chunk, viewing x as
    [B, H, S/l, l, D] so the cos/sin tables hold one chunk, not S rows."""
    B, H, S, D = x_BHSD.shape
    l = cos_BlD.shape[1]
    out = rotate(x_BHSD.reshape(B, H, S // l, l, D), cos_BlD[:, None, None], sin_BlD[:, None, None])
    return out.reshape(B, H, S, D)


def to_chunked(chunk_size: int, q, k, v, rope, ctx: AttentionContext) -> Chunked:
    B, T = q.shape[:2]
    length = jnp.sum(ctx.token_mask, axis=1).astype(jnp.int32)
    to_pos = (jnp.arange(T, dtype=jnp.int32)[None, :] + ctx.pad[:, None]) % T
    S = -(-T // chunk_size) * chunk_size
    pad = lambda x: jnp.pad(take_rows(x, to_pos, 1), ((0, 0), (0, S - T), (0, 0), (0, 0)))
    q, k, v = (pad(x).transpose(0, 2, 1, 3) for x in (q, k, v))  # head-major from here on
    seq_len = length if rope.rope.rope_type == "dynamic" else None
    cos, sin = in_chunk_rotation(rope, B, chunk_size, seq_len)
    valid = jnp.arange(S, dtype=jnp.int32)[None, :] < length[:, None]
    return Chunked(q, k, v, rotate_in_chunks(q, cos, sin), rotate_in_chunks(k, cos, sin), valid, length, seq_len)


def chunk_major(x_BHSD, chunk_size: int):
    """[B, H, S, D] -> [B, C, l, H, D], the layout chunk representations are built from."""
    B, H, S, D = x_BHSD.shape
    return x_BHSD.reshape(B, H, S // chunk_size, chunk_size, D).transpose(0, 2, 3, 1, 4)


def dense_prefix(seq: Chunked, rope, end: int):
    """Causal attention of positions < end at their true positions: [B, end, H, D] float32."""
    B, K, _, D = seq.k.shape
    H = seq.q.shape[1]
    cos, sin = rope.cos_sin(jnp.broadcast_to(jnp.arange(end, dtype=jnp.int32), (B, end)), seq.seq_len)
    rot = lambda x: rotate(x[:, :, :end], cos[:, None], sin[:, None])
    out, _ = self_attention_stats(rot(seq.q).reshape(B, K, H // K, end, D), rot(seq.k), seq.v[:, :, :end],
                                  seq.valid[:, :end])
    return ungroup_heads(out)


def prefill(settings, q, k, v, rope, ctx: AttentionContext, with_cache: bool):
    """LongHeads over a whole prompt: (out [B, T, H, D], cache writes or None, aux or None)."""
    B, T, H, D = q.shape
    l = settings.chunk_size
    seq = to_chunked(l, q, k, v, rope, ctx)
    S = seq.q.shape[2]
    reps = build_in_blocks(settings.representation, chunk_major(seq.q_loc, l), chunk_major(seq.k_loc, l),
                           chunk_major(seq.v, l), seq.valid.reshape(B, S // l, l))
    dense_end = min(settings.dense_length, S)
    outs, aux = [], None
    memory = jnp.zeros((B, H, settings.num_chunks), jnp.int32)  # no pick (a dense prompt)
    if dense_end > 0:
        outs.append(dense_prefix(seq, rope, dense_end).astype(q.dtype))
    if dense_end < S:
        first = (dense_end // l) * l  # selective queries start at a chunk boundary
        plan = dispatch.plan(settings, seq.q, seq.q_loc, reps, rope, seq.seq_len, first // l, seq.k.shape[1],
                             seq.k_loc, seq.length)
        selective = dispatch.run(plan, seq.k_loc, seq.v, settings)
        last = jnp.clip(seq.length - 1 - first, 0, None)  # the last token's picks seed decode's memory
        picked = jnp.take_along_axis(plan.selection.chunks, last[:, None, None, None], axis=2)[:, :, 0]
        memory = jnp.where((seq.length - 1 >= dense_end)[:, None, None], picked, memory)
        outs.append(selective[:, dense_end - first:].astype(q.dtype))
        if settings.record_selection:
            aux = {"selected": plan.selection.chunks}  # [B, H, S - first, N], positions first..S-1
    out = jnp.concatenate(outs, axis=1)[:, :T]
    to_slot = (jnp.arange(T, dtype=jnp.int32)[None, :] - ctx.pad[:, None]) % T
    out = take_rows(out, to_slot, 1)
    if not with_cache:
        return out, None, aux
    # the queries of the chunk the next token lands in (to build its representation in decode)
    last_chunk = jnp.minimum(seq.length // l, S // l - 1)
    q_chunks = seq.q_loc.reshape(B, H, S // l, l, D)
    qbuf = jnp.take_along_axis(q_chunks, last_chunk[:, None, None, None, None], axis=2)[:, :, 0]
    if not settings.representation.needs_queries:
        qbuf = qbuf[:, :, :0]
    writes = {"k": seq.k_loc, "v": seq.v, "reps": reps, "qbuf": qbuf}
    if settings.exact_tail:
        writes["memory"] = memory
    return out, writes, aux
