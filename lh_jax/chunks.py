"""The swappable pieces of LongHeads: chunk representations, chunk selection, position schemes.

Axis legend: B batch, H query heads, K kv heads, G heads per kv head, R representation heads
(H or K), C chunks, l tokens per chunk, t queries, N chunks attended per query, D head_dim,
X representation width.

Each piece is a pure function (or a frozen dataclass of pure functions), so an ablation is a
constructor argument: `LongHeads(..., chunk_repr="mean")`, `LongHeads(..., positions="original")`,
or your own object with the same methods.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lh_jax import _native

NEG_INF = -jnp.inf


# --- chunk representations ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttnPooled:
    """The paper's representation: in-chunk attention, mean output as a query, attention-pooled keys.

    For chunk i and query head h: o_j = softmax(q_j·Kᵀ/√d)·V over the whole chunk (bidirectional),
    q̄ = mean_j o_j, c = softmax(q̄·Kᵀ/√d)·K, with q, K rotated by their in-chunk offsets.
    Padded positions are zeros that still take part in both softmaxes, as in the authors' code.
    """

    needs_queries = True

    def build(self, q_loc_BCtHD, k_loc_BCtKD, v_BCtKD, valid_BCt):
        B, C, l, H, D = q_loc_BCtHD.shape
        K = k_loc_BCtKD.shape[3]
        z = valid_BCt[..., None, None]
        q = jnp.where(z, q_loc_BCtHD, 0).astype(jnp.float32).reshape(B, C, l, K, H // K, D)
        k = jnp.where(z, k_loc_BCtKD, 0).astype(jnp.float32)
        v = jnp.where(z, v_BCtKD, 0).astype(jnp.float32)
        scale = D ** -0.5
        s = jnp.einsum("BCtKGD,BCsKD->BCKGts", q, k) * scale
        o = jnp.einsum("BCKGts,BCsKD->BCKGtD", jax.nn.softmax(s, axis=-1), v)
        q_bar = jnp.mean(o, axis=4)  # BCKGD
        w = jax.nn.softmax(jnp.einsum("BCKGD,BCsKD->BCKGs", q_bar, k) * scale, axis=-1)
        rep = jnp.einsum("BCKGs,BCsKD->BCKGD", w, k)
        return rep.reshape(B, C, H, D).transpose(0, 2, 1, 3)  # BHCD

    def score(self, q_BHtD, reps_BRCX):
        return jnp.einsum("BHtD,BHCD->BHtC", q_BHtD.astype(jnp.float32), reps_BRCX)

    def width(self, num_heads, num_kv_heads, head_dim):
        return num_heads, head_dim


@dataclasses.dataclass(frozen=True)
class MeanKeys:
    """Mean of the chunk's in-chunk-rotated keys, shared by the query heads of a kv head."""

    needs_queries = False

    def build(self, q_loc_BCtHD, k_loc_BCtKD, v_BCtKD, valid_BCt):
        k = jnp.where(valid_BCt[..., None, None], k_loc_BCtKD, 0).astype(jnp.float32)
        n = jnp.maximum(jnp.sum(valid_BCt, axis=2), 1).astype(jnp.float32)  # BC
        return (jnp.sum(k, axis=2) / n[..., None, None]).transpose(0, 2, 1, 3)  # BKCD

    def score(self, q_BHtD, reps_BKCD):
        B, H, t, D = q_BHtD.shape
        K = reps_BKCD.shape[1]
        q = q_BHtD.astype(jnp.float32).reshape(B, K, H // K, t, D)
        return jnp.einsum("BKGtD,BKCD->BKGtC", q, reps_BKCD).reshape(B, H, t, -1)

    def width(self, num_heads, num_kv_heads, head_dim):
        return num_kv_heads, head_dim


@dataclasses.dataclass(frozen=True)
class KeyBounds:
    """Quest-style element-wise min/max of the chunk's keys; score = Σ_d max(q_d·min_d, q_d·max_d),
    an upper bound of q·k over the chunk."""

    needs_queries = False

    def build(self, q_loc_BCtHD, k_loc_BCtKD, v_BCtKD, valid_BCt):
        z = valid_BCt[..., None, None]
        k = k_loc_BCtKD.astype(jnp.float32)
        lo = jnp.min(jnp.where(z, k, jnp.inf), axis=2)
        hi = jnp.max(jnp.where(z, k, -jnp.inf), axis=2)
        empty = ~jnp.any(valid_BCt, axis=2)[..., None, None]
        lo, hi = jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)
        return jnp.concatenate([lo, hi], axis=-1).transpose(0, 2, 1, 3)  # BKC(2D)

    def score(self, q_BHtD, reps_BKCX):
        B, H, t, D = q_BHtD.shape
        K = reps_BKCX.shape[1]
        q = q_BHtD.astype(jnp.float32).reshape(B, K, H // K, t, 1, D)
        lo, hi = reps_BKCX[..., :D][:, :, None, None], reps_BKCX[..., D:][:, :, None, None]
        return jnp.sum(jnp.maximum(q * lo, q * hi), axis=-1).reshape(B, H, t, -1)

    def width(self, num_heads, num_kv_heads, head_dim):
        return num_kv_heads, 2 * head_dim


@dataclasses.dataclass(frozen=True)
class SubChunks:
    """Several summaries per chunk (InfLLM-style representatives): any base representation
    applied to each of `parts` sub-chunks of chunk_size / parts tokens; a chunk scores the best of
    its parts. A short needle dominates its sub-chunk's summary instead of being averaged away
    among a whole chunk of filler. Scoring costs `parts` base scores per chunk; with
    parts = chunk_size and base MeanKeys a chunk scores its best single key (max_j q·k_j).

    Names: "attn-parts", "mean-parts", "bounds-parts" (8 parts), "attn-parts:16" etc.
    A sub-chunk that holds only padding (the partial last chunk) gets the base's empty summary;
    such chunks are always forced in, so it does not affect selection.
    """

    parts: int = 8
    base: Any = AttnPooled()

    @property
    def needs_queries(self):
        return self.base.needs_queries

    def check(self, chunk_size: int) -> None:
        if not isinstance(self.parts, int) or isinstance(self.parts, bool) or self.parts < 1 or chunk_size % self.parts:
            raise ValueError(f"chunk_repr SubChunks(parts={self.parts!r}): parts must be a positive "
                             f"integer dividing chunk_size={chunk_size}")

    def build(self, q_loc_BCtHD, k_loc_BCtKD, v_BCtKD, valid_BCt):
        B, C, l = valid_BCt.shape
        P = self.parts
        sub = lambda x: x.reshape((B, C * P, l // P) + x.shape[3:])
        rep = self.base.build(sub(q_loc_BCtHD), sub(k_loc_BCtKD), sub(v_BCtKD), sub(valid_BCt))
        R, X = rep.shape[1], rep.shape[-1]
        return rep.reshape(B, R, C, P * X)  # B R (C·P) X -> B R C (P·X)

    def score(self, q_BHtD, reps_BRCX):
        B, R, C, X = reps_BRCX.shape
        P = self.parts
        s = self.base.score(q_BHtD, reps_BRCX.reshape(B, R, C * P, X // P))  # B H t (C·P)
        return jnp.max(s.reshape(s.shape[:-1] + (C, P)), axis=-1)

    def width(self, num_heads, num_kv_heads, head_dim):
        R, X = self.base.width(num_heads, num_kv_heads, head_dim)
        return R, self.parts * X


def SubChunkPooled(parts: int = 8) -> SubChunks:
    """The paper's attention pooling per sub-chunk ("attn-parts")."""
    return SubChunks(parts, AttnPooled())


CHUNK_REPRESENTATIONS = {"attn": AttnPooled(), "mean": MeanKeys(), "bounds": KeyBounds(),
                         "attn-parts": SubChunks(8, AttnPooled()), "mean-parts": SubChunks(8, MeanKeys()),
                         "bounds-parts": SubChunks(8, KeyBounds())}


BEST_KEY = "best-key"


def chunk_repr_from_name(name: str, chunk_size: int | None = None):
    """A registered name, "<base>-parts:P" (e.g. "bounds-parts:16") for P sub-chunks per chunk, or
    "best-key": a chunk scores its best single key, max_j q·k_j (one key per part, i.e.
    "mean-parts:<chunk_size>"; it keeps a copy of the keys and scores every cached key per query).
    "best-key" needs `chunk_size`. Raises ValueError naming the bad name."""
    if name in CHUNK_REPRESENTATIONS:
        return CHUNK_REPRESENTATIONS[name]
    if name == BEST_KEY:
        if chunk_size is None:
            raise ValueError("chunk_repr 'best-key' needs the chunk size (pass chunk_size)")
        return SubChunks(chunk_size, MeanKeys())
    base, sep, parts = name.partition(":")
    if sep and base.endswith("-parts") and base in CHUNK_REPRESENTATIONS and parts.isdigit() and int(parts) > 0:
        return dataclasses.replace(CHUNK_REPRESENTATIONS[base], parts=int(parts))
    raise ValueError(f"unknown chunk_repr {name!r}; choose one of {sorted(CHUNK_REPRESENTATIONS) + [BEST_KEY]}, "
                     "'<base>-parts:P' with P a positive integer (e.g. 'attn-parts:16'), "
                     "or pass an object with build/score/width")


# --- selection ---------------------------------------------------------------------------------

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
