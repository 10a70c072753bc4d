"""The dispatch kernel: LongHeads' selective prefill, chunk-major, as a plan and a run.

Axis legend: B batch, H query heads, K kv heads, G query heads per kv head (H = K·G), C chunks,
l tokens per chunk, Q selective queries (positions first_chunk·l .. S-1), N num_chunks,
M entries per tile (Dispatch.tile_rows), S positions, W tiles per kv head (a static bound), D head_dim.

`plan` decides everything: it selects the chunks of every (query head, query) and lays the
selected (head, query, chunk) triples out chunk by chunk, per kv head, in tiles of M rows that
read the same chunk (a counting sort: destinations from per-block counts, no global sort). `run`
walks the tiles: one [M x l] logit block per tile, folded into each row's running softmax.
Every selected pair is computed once, so the cost is Q·N·l per head whatever the selections,
plus at most one partial tile per chunk; memory is linear in the prompt.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lh_jax import _native
from lh_jax.longheads.selection import Selection, distances, select
from lh_jax.models import softmax
from lh_jax.models.rope import rotate
from lh_jax.models.softmax import MASK_VALUE

#: (query, chunk) pairs the selection pass scores per step, over a few query blocks.
SELECT_PAIRS = 2 ** 17


class QueryRotation(NamedTuple):
    """How to rotate a query for a chunk at a given distance, without re-rotating any key.

    Keys are cached rotated by their offset o inside their chunk. For the built-in schemes the
    distance from a query at offset o_t to a chunk start is j·l + o_t, so the query already rotated
    by o_t ("base") is rotated once more by j·l: a table of J rows. A custom scheme gets a table of
    every distance and the un-rotated query as base.

    Attributes:
      base: [B, H, T, D] the queries the table rotates.
      cos, sin: [B, J, D] float32 rows of the table.
      step: tokens per table row (chunk_size, or 1 for a table of every distance).
    """

    base: jax.Array
    cos: jax.Array
    sin: jax.Array
    step: int

    def row(self, dist, offset):
        """Table row [...] for distances [...] of queries at in-chunk offsets [...]."""
        J = self.cos.shape[1]
        if self.step == 1:
            return jnp.clip(dist, 0, J - 1)
        return jnp.clip((dist - offset) // self.step, 0, J - 1)

    def apply(self, q, rows, batch_index, mode=None):
        """q rotated by the table rows `rows` (q and the gathered rows broadcast; batch_index picks
        each row's batch entry of the table; mode: the gather's index mode)."""
        cos = self.cos.at[batch_index, rows].get(mode=mode)
        sin = self.sin.at[batch_index, rows].get(mode=mode)
        return rotate(q, cos, sin)


def query_rotation(settings, rope, q_raw_BHTD, q_loc_BHTD, seq_len, num_chunks_total: int) -> QueryRotation:
    """The rotation table for queries of one sequence of `num_chunks_total` chunks."""
    B = q_raw_BHTD.shape[0]
    l, N = settings.chunk_size, settings.num_chunks
    if settings.positions in ("remap", "original"):
        J = N if settings.positions == "remap" else num_chunks_total
        jl = jnp.broadcast_to(jnp.arange(J, dtype=jnp.int32) * l, (B, J))
        cos, sin = rope.cos_sin(jl, seq_len)
        _, scale = rope.static_inv_freq()  # already applied by the in-chunk rotation of the base
        return QueryRotation(q_loc_BHTD, cos / scale, sin / scale, l)
    max_dist = num_chunks_total * l + N * l
    cos, sin = rope.cos_sin(jnp.broadcast_to(jnp.arange(max_dist, dtype=jnp.int32), (B, max_dist)), seq_len)
    return QueryRotation(q_raw_BHTD, cos, sin, 1)


class DispatchPlan(NamedTuple):
    """What the kernel computes: which row reads which chunk, at which position, seeing how much.

    A row is a (query head, selective query) pair of one kv head, numbered g·Q + t; row G·Q is a
    sink that padding entries point at. Entries of a kv head's row list are grouped by chunk,
    each chunk's entries padded to whole tiles.

    Attributes:
      selection: the chunks of every (head, query), [B, H, Q, N].
      first_chunk: the chunk of the first selective query (static).
      rotation: the queries and the table that rotates them to each entry's position.
      row: [B, K, W·M] int32, the row each entry updates.
      rotation_row: [B, K, W·M] int32, the row of the rotation table that places the entry's query
        at its chunk's slot.
      visible: [B, K, W·M] int32, how many leading keys of the chunk the entry sees (l, fewer in the
        query's own chunk, 0 for padding).
      tile_chunk: [B, K, W] int32, the chunk each tile reads.
      num_tiles: [K] int32, tiles in use per kv head (the largest over the batch).
    """

    selection: Selection
    first_chunk: int
    rotation: QueryRotation
    row: jax.Array
    rotation_row: jax.Array
    visible: jax.Array
    tile_chunk: jax.Array
    num_tiles: jax.Array


def _over_blocks(settings, S: int, first_chunk: int, block_fn):
    """`block_fn(i, width)` for every query block i (one chunk of queries) from `first_chunk` on,
    its outputs stacked on a leading block axis. Block i sees chunks 0..i only, so the blocks run in
    a few segments, each given the width (chunks) its last block can see: scoring and top-k then
    cover the visible chunks, not all of them (top-k costs more than linearly in width)."""
    l = settings.chunk_size
    C = S // l
    n_blocks = C - first_chunk
    n_seg = min(settings.kernel.selection_segments or (4 if C >= 128 else 1), n_blocks)
    bounds = [first_chunk + (n_blocks * j) // n_seg for j in range(n_seg + 1)]

    def per_step(n, width):  # blocks per lax.map step: a divisor of n, about SELECT_PAIRS pairs
        cap = max(1, SELECT_PAIRS // (l * width))
        return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)

    parts = [jax.lax.map(functools.partial(block_fn, width=hi), jnp.arange(lo, hi, dtype=jnp.int32),
                         batch_size=per_step(hi - lo, hi))
             for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    return tuple(jnp.concatenate(x, axis=0) for x in zip(*parts))


def _picks_and_counts(picks, valid, width: int, C: int):
    """A block's picks [B, H, t, P] with their per-block counts: (picks, C at invalid slots; valid;
    earlier [B, H, t, P]: queries of the block before this one that picked the same chunk; counts
    [B, H, C]: picks per chunk). Native on the CPU: O(t·P + width) per head instead of a [t, width]
    membership matrix."""
    earlier, counts = _native.chunk_counts(jnp.where(valid, picks, width), width)
    return jnp.where(valid, picks, C), valid, earlier, jnp.pad(counts, ((0, 0), (0, 0), (0, C - width)))


def _by_query(x, B: int, H: int):
    """[blocks, B, H, l, ...] -> [B, H, blocks·l, ...]."""
    return jnp.moveaxis(x, 0, 2).reshape((B, H, x.shape[0] * x.shape[3]) + x.shape[4:])


class Schedule(NamedTuple):
    """Where each entry (query head, query, pick) goes: per kv head, the entries of its G query heads
    grouped by the chunk they read, each chunk's entries padded to whole tiles of M.

    Attributes:
      dest: [B, H, Q, P] int32, the entry's index in the flat lists [B·K·W·M]; past the end (dropped)
        for invalid picks.
      tile_chunk: [B, K, W] int32, the chunk each tile reads.
      num_tiles: [K] int32, tiles in use per kv head (the largest over the batch).
      rows_per_tile: M (static).
    """

    dest: jax.Array
    tile_chunk: jax.Array
    num_tiles: jax.Array
    rows_per_tile: int

    def scatter(self, values_BHQP, fill, shape_BKx):
        """Per-entry values laid out in the tiles' order, [B, K, W·M] (`fill` in padding)."""
        size = int(np.prod(shape_BKx))
        out = jnp.full((size,), fill, jnp.int32).at[self.dest.reshape(-1)].set(values_BHQP.reshape(-1), mode="drop")
        return out.reshape(shape_BKx)


def schedule(picks, valid, earlier, counts, num_kv_heads: int, chunk_size: int, tile_rows: int) -> Schedule:
    """The counting sort: destinations of the entries from per-block counts, no global sort.
    picks/valid/earlier [B, H, Q, P] (queries in block order), counts [n_blocks, B, H, C]."""
    B, H, Q, P = picks.shape
    K, G = num_kv_heads, H // num_kv_heads
    n_blocks, C = counts.shape[0], counts.shape[-1]
    l = chunk_size
    M = max(1, min(tile_rows, G * Q))
    # within a kv head the entries of chunk c come in the order (block, query head, query)
    counts = counts.reshape(n_blocks, B, K, G, C)
    head_offset = jnp.cumsum(counts, axis=3) - counts
    per_block = jnp.sum(counts, axis=3)  # n_blocks B K C
    block_offset = jnp.cumsum(per_block, axis=0) - per_block
    offset = (block_offset[:, :, :, None] + head_offset).transpose(1, 2, 3, 0, 4).reshape(B, H, n_blocks * C)
    tiles_per_chunk = (jnp.sum(per_block, axis=0) + M - 1) // M  # B K C
    tile_end = jnp.cumsum(tiles_per_chunk, axis=-1)
    first_tile = jnp.repeat(tile_end - tiles_per_chunk, G, axis=1)  # B H C
    W = -(-G * Q * P // M) + C  # static bound on tiles per kv head

    query = jnp.arange(Q, dtype=jnp.int32)
    chunk = jnp.minimum(picks, C - 1)  # in range even at unused slots (dropped below)
    rank = jnp.take_along_axis(offset, ((query // l)[:, None] * C + chunk).reshape(B, H, Q * P), axis=-1)
    rank = rank.reshape(B, H, Q, P) + earlier
    dest = jnp.take_along_axis(first_tile, chunk.reshape(B, H, Q * P), axis=-1).reshape(B, H, Q, P) * M + rank
    list_start = (jnp.arange(B)[:, None] * K + jnp.arange(H)[None, :] // G) * (W * M)  # B H
    dest = jnp.where(valid, dest + list_start[..., None, None], B * K * W * M)
    tile_chunk = jnp.sum(jnp.arange(W, dtype=jnp.int32)[None, None, :, None] >= tile_end[:, :, None, :],
                         axis=-1, dtype=jnp.int32)
    return Schedule(dest, jnp.minimum(tile_chunk, C - 1), jnp.max(tile_end[..., -1], axis=0), M)


def _entry_rows(Q: int, P: int, B: int, H: int, G: int):
    """Each entry's row within its kv group, g·Q + t, [B, H, Q, P]."""
    rows = (jnp.arange(H) % G)[:, None] * Q + jnp.arange(Q, dtype=jnp.int32)[None, :]
    return jnp.broadcast_to(rows[None, :, :, None], (B, H, Q, P))


def shortlist_scores(settings, q_BHSD, reps, k_loc_BKSD, first_chunk: int, num_kv_heads: int):
    """For a `Shortlist` representation: every selective query's shortlist and the fine score of
    each shortlisted chunk (its best key), computed chunk-major: entries (query head, query,
    shortlisted chunk) scheduled like attention's, one [M x l] product per tile, each entry's
    maximum written to its (row, slot). Returns fine [B, H, Q, S]."""
    B, H, S_pos, D = q_BHSD.shape
    K, G = num_kv_heads, H // num_kv_heads
    l = settings.chunk_size
    C = S_pos // l
    Q = (C - first_chunk) * l
    representation = settings.representation

    def block(i, width):
        q = jax.lax.dynamic_slice_in_dim(q_BHSD, i * l, l, axis=2)
        ids, ok, _ = representation.shortlist(q, reps[:, :, :width], jnp.full(q.shape[:3], i, jnp.int32))
        return _picks_and_counts(ids, ok, width, C)

    picks, valid, earlier, counts = _over_blocks(settings, S_pos, first_chunk, block)
    picks, valid, earlier = (_by_query(x, B, H) for x in (picks, valid, earlier))
    n_short = picks.shape[-1]
    plan = schedule(picks, valid, earlier, counts, K, l, settings.kernel.tile_rows)
    M, W = plan.rows_per_tile, plan.tile_chunk.shape[-1]
    rows = G * Q * n_short + 1  # one output slot per (row, shortlist slot); the last is the padding sink
    slot = _entry_rows(Q, n_short, B, H, G) * n_short + jnp.arange(n_short, dtype=jnp.int32)
    entry_slot = plan.scatter(slot, rows - 1, (B, K, W * M))
    entry_row = plan.scatter(_entry_rows(Q, n_short, B, H, G), G * Q, (B, K, W * M))
    queries = q_BHSD[:, :, first_chunk * l:].reshape(B, K, G * Q, D).astype(jnp.float32)
    queries = jnp.pad(queries, ((0, 0), (0, 0), (0, 1), (0, 0)))
    keys = k_loc_BKSD.reshape(B, K, C, l, D)
    in_bounds = "promise_in_bounds"
    b_ix = jnp.arange(B)[:, None, None]
    k_ix = jnp.arange(K)[None, :, None]

    def tile(i, fine):
        entries = lambda x: jax.lax.dynamic_slice_in_dim(x, i * M, M, axis=2)  # B K M
        q = jnp.take_along_axis(queries, entries(entry_row)[..., None], axis=2, mode=in_bounds)
        chunk = plan.tile_chunk[:, :, i][:, :, None, None, None]
        k_c = jnp.take_along_axis(keys, chunk, axis=2, mode=in_bounds)[:, :, 0]  # B K l D
        best = jnp.einsum("BKMD,BKlD->BKMl", q.astype(keys.dtype), k_c, preferred_element_type=jnp.float32).max(-1)
        return fine.at[b_ix, k_ix, entries(entry_slot)].set(best, mode=in_bounds, unique_indices=True)

    def maybe_tile(i, fine):
        return jax.lax.cond(i < jnp.max(plan.num_tiles), lambda f: tile(i, f), lambda f: f, fine)

    fine = jax.lax.fori_loop(0, W, maybe_tile, jnp.zeros((B, K, rows), jnp.float32))
    fine = fine[:, :, :-1].reshape(B, K, G, Q, n_short).reshape(B, H, Q, n_short)
    return fine


def _exact_tail(settings, q_BHSD, k_loc_BKSD, length_B, first_chunk: int, num_kv_heads: int, blocks):
    """Re-select the query blocks that hold each row's last `settings.exact_tail` prompt tokens by
    the exact best-key score of every chunk (`best_key_scores`, all those blocks in one pass),
    replacing those blocks' entries in the per-block (picks, valid, earlier, counts)
    [n_blocks, B, ...] of `_over_blocks`."""
    B, H, S, D = q_BHSD.shape
    l = settings.chunk_size
    C = S // l
    n_blocks = C - first_chunk
    keys = k_loc_BKSD.reshape(B, num_kv_heads, C, l, D)
    last = (jnp.maximum(length_B, 1) - 1) // l  # B: the block of each row's last token
    n = min(n_blocks, -(-settings.exact_tail // l) + 1)
    # the tail's blocks, last first (a clipped repeat rewrites the same block with the same picks)
    block = jnp.clip(last[:, None] - jnp.arange(n)[None, :], first_chunk, C - 1)  # B n
    q = q_BHSD.reshape(B, H, C, l, D)[jnp.arange(B)[:, None], :, block]  # B n H l D
    q = q.transpose(0, 2, 1, 3, 4).reshape(B, H, n * l, D)
    cur = jnp.repeat(block, l, axis=1)[:, None]  # B 1 n·l
    sel = select(settings, q, None, cur, num_kv_heads, keys=keys, exact=True)
    chunks, valid = (x.reshape(B, H, n, l, -1) for x in sel)
    batch = jnp.arange(B)
    out = list(blocks)
    for j in range(n):
        new = _picks_and_counts(chunks[:, :, j], valid[:, :, j], C, C)
        out = [x.at[block[:, j] - first_chunk, batch].set(y) for x, y in zip(out, new)]
    return tuple(out)


def plan(settings, q_BHSD, q_loc_BHSD, reps, rope, seq_len, first_chunk: int, num_kv_heads: int,
         k_loc_BKSD=None, length_B=None) -> DispatchPlan:
    """Select, then schedule the selected entries chunk-major in tiles (see DispatchPlan).
    q: the un-rotated queries of the whole (padded) prompt, q_loc: rotated by in-chunk offsets;
    k_loc: the keys rotated by in-chunk offsets (for representations that read keys)."""
    B, H, S, D = q_BHSD.shape
    rotation = query_rotation(settings, rope, q_BHSD, q_loc_BHSD, seq_len, S // settings.chunk_size)
    K, G = num_kv_heads, H // num_kv_heads
    l = settings.chunk_size
    C = S // l
    Q = (C - first_chunk) * l
    fine = None
    if getattr(settings.representation, "needs_keys", False):
        fine = shortlist_scores(settings, q_BHSD, reps, k_loc_BKSD, first_chunk, K)

    bulk = settings if settings.bulk_chunks in (None, settings.num_chunks) else \
        dataclasses.replace(settings, num_chunks=settings.bulk_chunks, bulk_chunks=None)

    def block(i, width):
        q = jax.lax.dynamic_slice_in_dim(q_BHSD, i * l, l, axis=2)
        f = None if fine is None else jax.lax.dynamic_slice_in_dim(fine, (i - first_chunk) * l, l, axis=2)
        chunks, ok = select(bulk, q, reps[:, :, :width], i, K, fine=f)
        pad = settings.num_chunks - chunks.shape[-1]  # bulk_chunks < num_chunks: unused slots (C, invalid)
        chunks = jnp.pad(chunks, ((0, 0),) * 3 + ((0, pad),), constant_values=C)
        return _picks_and_counts(chunks, jnp.pad(ok, ((0, 0),) * 3 + ((0, pad),)), width, C)

    blocks = _over_blocks(settings, S, first_chunk, block)
    if settings.exact_tail:
        length_B = jnp.full((B,), S, jnp.int32) if length_B is None else length_B
        blocks = _exact_tail(settings, q_BHSD, k_loc_BKSD, length_B, first_chunk, K, blocks)
    chunks, valid, earlier, counts = blocks
    chunks, valid, earlier = (_by_query(x, B, H) for x in (chunks, valid, earlier))
    N = chunks.shape[-1]
    sched = schedule(chunks, valid, earlier, counts, K, l, settings.kernel.tile_rows)
    M, W = sched.rows_per_tile, sched.tile_chunk.shape[-1]

    query = jnp.arange(Q, dtype=jnp.int32)
    position = first_chunk * l + query
    offset_in_chunk = position % l
    sel = Selection(chunks, valid)
    dist = distances(settings, sel, jnp.broadcast_to(position // l, (B, H, Q)),
                     jnp.broadcast_to(offset_in_chunk, (B, H, Q)))
    own_key = 0 if settings.reference else 1  # the released code leaves out the query's own key
    visible = jnp.clip(position[:, None] + own_key - chunks * l, 0, l)
    shape = (B, K, W * M)  # padding entries: row G·Q (a sink), nothing visible
    return DispatchPlan(selection=sel, first_chunk=first_chunk, rotation=rotation,
                        row=sched.scatter(_entry_rows(Q, N, B, H, G), G * Q, shape),
                        rotation_row=sched.scatter(rotation.row(dist, offset_in_chunk[:, None]), 0, shape),
                        visible=sched.scatter(visible, 0, shape), tile_chunk=sched.tile_chunk,
                        num_tiles=sched.num_tiles)


def kv_heads_per_step(num_kv_heads: int) -> int:
    """kv heads a tile step of `run` handles: one on the CPU (the running state it gathers from and
    scatters into is then one head's, which stays in cache longer as the prompt grows), all of
    them elsewhere (fewer, larger steps)."""
    return 1 if jax.default_backend() == "cpu" else num_kv_heads


def run(plan: DispatchPlan, k_loc_BKSD, v_BKSD, settings):
    """Pass 2: walk the tiles, updating each entry's row of the running softmax. Returns the
    selective queries' output [B, Q, H, D] float32."""
    B, K, S, D = k_loc_BKSD.shape
    rotation = plan.rotation
    H = rotation.base.shape[1]
    G = H // K
    l = settings.chunk_size
    C = S // l
    Q = (C - plan.first_chunk) * l
    M = max(1, min(settings.kernel.tile_rows, G * Q))
    W = plan.tile_chunk.shape[-1]
    Kstep = kv_heads_per_step(K)
    rows = G * Q + 1  # the last row is the padding sink
    queries = rotation.base[:, :, plan.first_chunk * l:].reshape(B, K, G * Q, D).astype(jnp.float32) * D ** -0.5
    queries = jnp.pad(queries, ((0, 0), (0, 0), (0, 1), (0, 0)))  # B K rows D, scaled by 1/sqrt(D)
    key_offset = jnp.arange(l, dtype=jnp.int32)
    b_ix = jnp.arange(B)[:, None, None]
    k_ix = jnp.arange(Kstep)[None, :, None]
    in_bounds = "promise_in_bounds"  # every index below is in range by construction

    def heads(xs):  # Kstep kv heads at once: B Kstep ...
        keys, values, q, row, rot, visible, tile_chunk, num_tiles = xs

        def tile(i, state):
            entries = lambda x: jax.lax.dynamic_slice_in_dim(x, i * M, M, axis=2)  # B Kstep M
            row_i = entries(row)
            q_i = rotation.apply(jnp.take_along_axis(q, row_i[..., None], axis=2, mode=in_bounds),
                                 entries(rot), b_ix, mode=in_bounds)
            chunk = tile_chunk[:, :, i][:, :, None, None, None]
            k_c = jnp.take_along_axis(keys, chunk, axis=2, mode=in_bounds)[:, :, 0]  # B Kstep l D
            v_c = jnp.take_along_axis(values, chunk, axis=2, mode=in_bounds)[:, :, 0]
            s = jnp.einsum("BKRD,BKlD->BKRl", q_i.astype(keys.dtype), k_c, preferred_element_type=jnp.float32)
            mask = key_offset < entries(visible)[..., None]
            pv = lambda p: jnp.einsum("BKRl,BKlD->BKRD", p.astype(values.dtype), v_c,
                                      preferred_element_type=jnp.float32)
            get = lambda x: x.at[b_ix, k_ix, row_i].get(mode=in_bounds)
            new = softmax.update(softmax.SoftmaxState(*map(get, state)), jnp.where(mask, s, MASK_VALUE), pv, mask)
            # rows are distinct within a tile except the padding sink (discarded)
            put = lambda x, y: x.at[b_ix, k_ix, row_i].set(y, mode=in_bounds, unique_indices=True)
            return softmax.SoftmaxState(*map(put, state, new))

        def maybe_tile(i, state):
            return jax.lax.cond(i < num_tiles, lambda s: tile(i, s), lambda s: s, state)

        state = jax.lax.fori_loop(0, W, maybe_tile, softmax.init((B, Kstep, rows), D))
        out, _ = softmax.finalize(softmax.SoftmaxState(*(x[:, :, :G * Q] for x in state)))
        return out

    def steps(x):  # B K ... -> K/Kstep B Kstep ...
        return jnp.moveaxis(x.reshape(B, K // Kstep, Kstep, *x.shape[2:]), 1, 0)

    out = jax.lax.map(heads, (steps(k_loc_BKSD.reshape(B, K, C, l, D)), steps(v_BKSD.reshape(B, K, C, l, D)),
                              steps(queries), steps(plan.row), steps(plan.rotation_row), steps(plan.visible),
                              steps(plan.tile_chunk), plan.num_tiles.reshape(K // Kstep, Kstep).max(-1)))
    out = jnp.moveaxis(out, 0, 1).reshape(B, H, Q, D)  # K/Kstep B Kstep (G·Q) D -> B H Q D
    return out.transpose(0, 2, 1, 3)
