"""Which chunks a query attends to, and where they sit: the one selection step that LongHeads'
prefill and decode share.

Axis legend: B batch, H query heads, K kv heads, G query heads per kv head, C chunks,
l tokens per chunk, t queries, N chunks attended per query (num_chunks), J rows of a rotation
table, D head_dim.

    scores = chunk_scores(settings, q_BHtD, reps)            # the chunk representation
    sel = select(settings, q_BHtD, reps, cur, force_prev)     # + the selector
    dist = distances(settings, sel, cur, offset)              # + the position scheme

Selectors and position schemes are plain functions, swappable by name or by passing your own
(`LongHeads(selector=fn, positions=fn)`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lh_jax import _native
from lh_jax.models.attention import from_storage

NEG_INF = -jnp.inf



def select_chunks(scores, cur, num_chunks: int, force_prev=True):
    """Pick the chunks one query attends to.

    scores [..., C] (any float), cur [...] int (the query's own chunk), force_prev [...] bool.
    Forced: chunk 0, the own chunk `cur`, and `cur - 1` when `force_prev`. Free picks: the top
    `num_chunks - 3` scores among chunks 1..cur-2 (1..cur-1 when the previous chunk is not
    forced), via `lax.top_k` (on the CPU the same picks from `lh_jax._native.top_k_picks`, a
    threaded kernel that also returns them in index order: XLA:CPU's top_k runs on one thread).
    Returns (idx [..., num_chunks] int32 ascending, valid [..., num_chunks] bool); unused slots
    hold C (they sort last) and are not valid.
    """
    C = scores.shape[-1]
    cur = jnp.asarray(cur, jnp.int32)
    force_prev = jnp.broadcast_to(jnp.asarray(force_prev, bool), cur.shape)
    n_free = num_chunks - 3
    c = jnp.arange(C, dtype=jnp.int32)
    cur_b, fp_b = cur[..., None], force_prev[..., None]
    hi = jnp.where(fp_b, cur_b - 2, cur_b - 1)
    candidate = (c >= 1) & (c <= hi)
    k = max(0, min(n_free, C))
    if k:  # free picks: ascending, C after the valid ones (all lie in 1..hi)
        free = _native.top_k_picks(jnp.where(candidate, scores.astype(jnp.float32), NEG_INF), k)
    else:
        free = jnp.zeros(cur.shape + (0,), jnp.int32)
    # The forced chunks bracket the free picks: 0 below them, cur - 1 (when forced) and cur above,
    # so the sorted selection is [0, free picks..., cur - 1, cur, C...] with no sort.
    fp_ok = force_prev & (cur >= 2)
    cur_v = jnp.where(cur >= 1, cur, C)
    e1 = jnp.where(fp_ok, cur - 1, cur_v)[..., None]
    e2 = jnp.where(fp_ok, cur_v, C)[..., None]
    n_valid = jnp.sum(free < C, axis=-1, dtype=jnp.int32)[..., None]
    lead = free.shape[:-1]
    base = jnp.concatenate([jnp.zeros(lead + (1,), jnp.int32), free, jnp.full(lead + (2,), C, jnp.int32)], axis=-1)
    s = jnp.arange(k + 3, dtype=jnp.int32)
    idx = jnp.where(s == n_valid + 1, e1, jnp.where(s == n_valid + 2, e2, base))
    if idx.shape[-1] < num_chunks:  # fewer chunks exist than slots
        fill = jnp.full(idx.shape[:-1] + (num_chunks - idx.shape[-1],), C, jnp.int32)
        idx = jnp.concatenate([idx, fill], axis=-1)
    return idx, idx < C


def select_recent(scores, cur, num_chunks: int, force_prev=True):
    """Baseline selector (a chunk-level sliding window, StreamingLLM-style): chunk 0 as the
    attention sink plus the most recent chunks up to the own one, ignoring the scores.
    Same signature and output convention as `select_chunks`."""
    C = scores.shape[-1]
    cur = jnp.asarray(cur, jnp.int32)[..., None]
    slots = jnp.arange(num_chunks, dtype=jnp.int32)
    recent = cur - (num_chunks - 2) + slots[:-1]  # num_chunks - 1 most recent chunks
    ok = recent >= 1
    idx = jnp.concatenate([jnp.zeros_like(cur), jnp.where(ok, recent, C)], axis=-1)
    idx = jnp.sort(idx, axis=-1)
    return idx, idx < C


SELECTORS = {"topk": select_chunks, "recent": select_recent}


# --- position schemes -------------------------------------------------------------------------

def remap_positions(slot, chunk, cur, num_selected, offset, chunk_size):
    """Contiguous remapping (the paper): the selected chunks, in order, sit at positions
    0..P; returns the query-to-chunk-start distance for a chunk in slot `slot`."""
    return (num_selected - 1 - slot) * chunk_size + offset


def original_positions(slot, chunk, cur, num_selected, offset, chunk_size):
    """Ablation: every key keeps its true position (distances can exceed the trained length)."""
    return (cur - chunk) * chunk_size + offset


POSITION_SCHEMES = {"remap": remap_positions, "original": original_positions}


# --- the shared step -----------------------------------------------------------------------------

class Selection(NamedTuple):
    """The chunks of one or more queries, as a selector returns them.

    Attributes:
      chunks: [..., N] int32, ascending; unused slots hold the number of chunks C.
      valid: [..., N] bool, False at unused slots.
    """

    chunks: jax.Array
    valid: jax.Array


def best_key_scores(q_BHtD, keys_BKClD, chunks_per_step: int | None = None):
    """max_j q·k_j over every chunk's keys, [B, H, t, C] float32: the exact best-key score of every
    chunk (the keys rotated by their in-chunk offsets, the queries un-rotated). Computed
    `chunks_per_step` chunks at a time (default: about 2^23 products per batch row and step), so
    the [t, l] products of all chunks never coexist."""
    keys_BKClD = from_storage(keys_BKClD)
    B, H, t, D = q_BHtD.shape
    _, K, C, l, _ = keys_BKClD.shape
    q = q_BHtD.reshape(B, K, H // K, t, D)
    if chunks_per_step is None:
        chunks_per_step = 2 ** 23 // (H * t * l)
    step = max(1, min(C, chunks_per_step))
    n = -(-C // step)
    keys = jnp.pad(keys_BKClD, ((0, 0), (0, 0), (0, n * step - C), (0, 0), (0, 0)))
    keys = jnp.moveaxis(keys.reshape(B, K, n, step, l, D), 2, 0)  # n B K step l D

    def part(k):
        s = jnp.einsum("BKGtD,BKClD->BKGtCl", q.astype(k.dtype), k, preferred_element_type=jnp.float32)
        return s.max(-1)  # B K G t step

    s = jax.lax.map(part, keys)  # n B K G t step
    s = jnp.moveaxis(s, 0, 4).reshape(B, K, H // K, t, n * step)[..., :C]
    return s.reshape(B, H, t, C)


def chunk_scores(settings, q_BHtD, reps, num_kv_heads: int, cur=None, keys=None, fine=None, exact=False):
    """Scores [B, H, t, C] of every chunk for each (un-rotated) query; with selection="group" the
    query heads of a kv head share the sum of their scores. A representation with `needs_keys`
    (a `Shortlist`) also gets the queries' own chunks `cur` [B, H, t] and the chunks' keys
    [B, K, C, l, D], or instead `fine` [B, H, t, S]: its shortlist's fine scores, computed already
    (the prefill kernel computes them chunk-major). exact: score every chunk by its best key
    instead (`best_key_scores`, reading `keys`), whatever the representation."""
    representation = settings.representation
    if exact:
        s = best_key_scores(q_BHtD, keys)
    elif fine is not None:
        ids, ok, coarse = representation.shortlist(q_BHtD, reps, cur)
        s = representation.combine(coarse, ids, ok, fine)
    elif getattr(representation, "needs_keys", False):
        s = representation.score(q_BHtD, reps, cur, keys)
    else:
        s = representation.score(q_BHtD, reps)
    return _shared_by_group(settings, s, num_kv_heads)


def _shared_by_group(settings, s, num_kv_heads: int):
    """With selection="group", every query head of a kv head gets the sum of their scores."""
    if settings.selection != "group":
        return s
    B, H, t, C = s.shape
    K = num_kv_heads
    s = s.reshape(B, K, H // K, t, C).sum(2, keepdims=True)
    return jnp.broadcast_to(s, (B, K, H // K, t, C)).reshape(B, H, t, C)


def pick(settings, scores, cur, force_prev=True, exact: bool = False) -> Selection:
    """The selector over `scores`; exact scores rank by top-k even when the bulk's selector is
    "recent" (a sliding window with an exact tail)."""
    force_prev = jnp.broadcast_to(jnp.asarray(force_prev, bool), cur.shape)
    fn = select_chunks if (exact and settings.selector == "recent") else settings.selector_fn
    if settings.local_chunks > 1:
        scores = force_local(scores, cur, settings.local_chunks)
    return Selection(*fn(scores, cur, settings.num_chunks, force_prev))


#: The score `force_local` gives a forced chunk: above any score, finite (ties break by index).
FORCED_SCORE = 0.25 * float(jnp.finfo(jnp.float32).max)


def force_local(scores, cur, local_chunks: int):
    """Scores [..., C] with the chunks cur-local_chunks .. cur-2 ([...] cur: the query's own chunk;
    cur-1 is forced by the selector itself) raised above every other score, so that a top-k
    selector picks them whatever the representation says (`LongHeads(local_chunks=...)`)."""
    c = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    cur = jnp.asarray(cur, jnp.int32)[..., None]
    local = (c >= cur - local_chunks) & (c <= cur - 2) & (c >= 1)
    return jnp.where(local, FORCED_SCORE, scores.astype(jnp.float32))


def select(settings, q_BHtD, reps, cur, num_kv_heads: int, force_prev=True, keys=None, fine=None,
           exact=False) -> Selection:
    """The chunks each (head, query) attends to: representation scores, then the selector.
    cur [B, H, t] (or broadcastable): the query's own chunk; keys [B, K, C, l, D]: the chunks' keys
    (rotated by their in-chunk offsets), for representations that read them."""
    B, H, t, _ = q_BHtD.shape
    cur = jnp.broadcast_to(jnp.asarray(cur, jnp.int32), (B, H, t))
    return pick(settings, chunk_scores(settings, q_BHtD, reps, num_kv_heads, cur, keys, fine, exact), cur,
                 force_prev, exact)


def select_with_memory(settings, q_BHtD, reps, cur, num_kv_heads: int, force_prev, keys, memory) -> Selection:
    """The decode selection of an `exact_tail` setting, at a cost that does not grow with the
    context beyond one representation score per chunk: the candidates are the `num_chunks` best by
    the representation plus `memory` [B, H, t, N] (the chunks this head picked at the previous
    token: the prompt's last token, picked by `best_key_scores` over every chunk, seeds it); each
    candidate is re-scored by its best key, and the candidates rank above all other chunks by that
    score (`Shortlist.combine`). keys [B, K, C, l, D]."""
    from lh_jax.longheads.representations import Shortlist
    B, H, t, _ = q_BHtD.shape
    cur = jnp.broadcast_to(jnp.asarray(cur, jnp.int32), (B, H, t))
    representation = settings.representation
    coarse = getattr(representation, "coarse", representation).score(q_BHtD, reps)  # a Shortlist's coarse
    C = coarse.shape[-1]
    c = jnp.arange(C, dtype=jnp.int32)
    free = (c >= 1) & (c <= cur[..., None] - 2)
    vals, best = jax.lax.top_k(jnp.where(free, coarse, NEG_INF), min(settings.num_chunks, C))
    ids = jnp.concatenate([best.astype(jnp.int32), memory.astype(jnp.int32)], axis=-1)
    ok = jnp.concatenate([vals > NEG_INF, (memory >= 1) & (memory <= cur[..., None] - 2)], axis=-1)
    ids = jnp.where(ok, ids, 0)
    scores = Shortlist.combine(coarse, ids, ok, Shortlist.fine_scores(q_BHtD, ids, keys))
    return pick(settings, _shared_by_group(settings, scores, num_kv_heads), cur, force_prev, exact=True)


def distances(settings, sel: Selection, cur, offset):
    """[..., N] distance from the query to the start of the chunk in each slot, by the position
    scheme; cur and offset ([...]) are the query's chunk and its offset inside it."""
    slot = jnp.arange(sel.chunks.shape[-1], dtype=jnp.int32)
    n_sel = jnp.sum(sel.valid, axis=-1)[..., None]
    return settings.position_fn(slot, sel.chunks, cur[..., None], n_sel, offset[..., None], settings.chunk_size)
