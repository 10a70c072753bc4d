"""Chunk representations: how a chunk is summarised, and how a query scores the summaries.

Axis legend: B batch, H query heads, K kv heads, G query heads per kv head, R representation
heads (H or K), C chunks, P parts of a chunk, l tokens per chunk, t queries, D head_dim,
X representation width.

A representation is a frozen dataclass (hashable, so it can sit in a jitted function's static
arguments) with

    needs_queries: bool                                   # does build() read the chunk's queries?
    build(q_BCtHD, k_BCtKD, v_BCtKD, valid_BCt) -> reps [B, R, C, X] float32
    score(q_BHtD, reps_BRCX) -> scores [B, H, t, C] float32
    width(num_heads, num_kv_heads, head_dim) -> (R, X)
    check(chunk_size) -> None                             # optional: raise on a bad parameter

`build` sees a chunk's queries and keys rotated by their offsets inside the chunk (0..l-1) and
its values; `score` sees un-rotated queries (the paper's convention). Pass your own object as
`LongHeads(chunk_repr=...)` to try another summary.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lh_jax.models.attention import take_chunks


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
        q = q_BHtD.astype(jnp.float32).reshape(B, K, H // K, t, D)
        # max(q_d·lo_d, q_d·hi_d) is q_d·hi_d where q_d > 0 and q_d·lo_d otherwise: two matmuls
        # instead of a [.., C, D] product tensor.
        lo, hi = reps_BKCX[..., :D], reps_BKCX[..., D:]
        s = (jnp.einsum("BKGtD,BKCD->BKGtC", jnp.maximum(q, 0.0), hi)
             + jnp.einsum("BKGtD,BKCD->BKGtC", jnp.minimum(q, 0.0), lo))
        return s.reshape(B, H, t, -1)

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


@dataclasses.dataclass(frozen=True)
class DistinctKeys:
    """A chunk's `keys` most distinctive keys: those farthest (Euclidean) from the chunk's mean key,
    per kv head; a chunk scores the best of them, max_j q·k_j over that subset. The idea: a short
    needle among filler is where a chunk's keys depart from their average, while a mean over the
    chunk averages it away. Scoring costs `keys` products per chunk.

    Names: "distinct-keys" (8 keys), "distinct-keys:R".
    """

    keys: int = 8
    needs_queries = False

    def check(self, chunk_size: int) -> None:
        if not isinstance(self.keys, int) or isinstance(self.keys, bool) or not 1 <= self.keys <= chunk_size:
            raise ValueError(f"chunk_repr DistinctKeys(keys={self.keys!r}): keys must be an integer from 1 "
                             f"to chunk_size={chunk_size}")

    def build(self, q_loc_BCtHD, k_loc_BCtKD, v_BCtKD, valid_BCt):
        B, C, l, K, D = k_loc_BCtKD.shape
        z = valid_BCt[..., None, None]
        k = jnp.where(z, k_loc_BCtKD, 0).astype(jnp.float32)
        n = jnp.maximum(jnp.sum(valid_BCt, axis=2), 1).astype(jnp.float32)[:, :, None, None]  # BC11
        mean = jnp.sum(k, axis=2, keepdims=True) / n[:, :, None]  # BC1KD
        far = jnp.sum((k - mean) ** 2, axis=-1)  # BCtK
        far = jnp.where(valid_BCt[..., None], far, -jnp.inf).transpose(0, 1, 3, 2)  # BCKt
        r = min(self.keys, l)
        vals, idx = jax.lax.top_k(far, r)  # BCKr
        picked = jnp.take_along_axis(k.transpose(0, 1, 3, 2, 4), idx[..., None], axis=3)  # BCKrD
        # fewer valid keys than r (the partial last chunk): repeat the most distant one instead of a pad
        picked = jnp.where((vals > -jnp.inf)[..., None], picked, picked[:, :, :, :1])
        if r < self.keys:
            picked = jnp.concatenate([picked, jnp.repeat(picked[:, :, :, :1], self.keys - r, axis=3)], axis=3)
        return picked.transpose(0, 2, 1, 3, 4).reshape(B, K, C, self.keys * D)  # BKC(rD)

    def score(self, q_BHtD, reps_BKCX):
        B, K, C, X = reps_BKCX.shape
        s = MeanKeys().score(q_BHtD, reps_BKCX.reshape(B, K, C * self.keys, X // self.keys))  # B H t (C·r)
        return jnp.max(s.reshape(s.shape[:-1] + (C, self.keys)), axis=-1)

    def width(self, num_heads, num_kv_heads, head_dim):
        return num_kv_heads, self.keys * head_dim


@dataclasses.dataclass(frozen=True)
class Shortlist:
    """Coarse to fine, at a cost linear in the context. `coarse` scores every chunk; each query's
    `size` best candidate chunks by it (its shortlist) are re-scored by their best single key,
    max_j q·k_j, read from the keys themselves. Shortlisted chunks rank above all others, in that
    order; the rest keep their coarse order. Per query: C coarse scores + size·chunk_size key
    products (in prefill computed chunk-major by the dispatch kernel, like attention).

    Names: "shortlist" (coarse "mean-parts:4", 32 chunks), "shortlist:S" (S chunks),
    "shortlist:S:COARSE" (any representation name as the coarse score, e.g. "bounds-parts:4").
    """

    coarse: Any = SubChunks(4, MeanKeys())
    size: int = 32
    needs_keys = True

    @property
    def needs_queries(self):
        return self.coarse.needs_queries

    def check(self, chunk_size: int) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"chunk_repr Shortlist(size={self.size!r}): size must be a positive integer")
        if hasattr(self.coarse, "check"):
            self.coarse.check(chunk_size)

    def build(self, q_loc_BCtHD, k_loc_BCtKD, v_BCtKD, valid_BCt):
        return self.coarse.build(q_loc_BCtHD, k_loc_BCtKD, v_BCtKD, valid_BCt)

    def width(self, num_heads, num_kv_heads, head_dim):
        return self.coarse.width(num_heads, num_kv_heads, head_dim)

    def shortlist(self, q_BHtD, reps_BRCX, cur_BHt):
        """(ids [B, H, t, S], ok [B, H, t, S], coarse [B, H, t, C]): each query's best candidates
        (chunks 1..cur-2, the free picks of `select_chunks`) by the coarse score."""
        coarse = self.coarse.score(q_BHtD, reps_BRCX)
        C = coarse.shape[-1]
        c = jnp.arange(C, dtype=jnp.int32)
        candidate = (c >= 1) & (c <= cur_BHt[..., None] - 2)
        vals, ids = jax.lax.top_k(jnp.where(candidate, coarse, -jnp.inf), min(self.size, C))
        if C < self.size:  # fewer chunks than slots: the same static shape whatever C is
            pad = ((0, 0),) * 3 + ((0, self.size - C),)
            vals, ids = jnp.pad(vals, pad, constant_values=-jnp.inf), jnp.pad(ids, pad)
        return ids.astype(jnp.int32), vals > -jnp.inf, coarse

    @staticmethod
    def fine_scores(q_BHtD, ids_BHtS, keys_BKClD):
        """max_j q·k_j over each shortlisted chunk's keys, [B, H, t, S] (a gather per query: the
        direct definition, used in decode; prefill computes it chunk-major)."""
        B, H, t, D = q_BHtD.shape
        K = keys_BKClD.shape[1]
        S, l = ids_BHtS.shape[-1], keys_BKClD.shape[3]
        keys = take_chunks(keys_BKClD, jnp.arange(H) // (H // K), ids_BHtS)  # B H t S l D
        # one matrix-vector product per query over all S·l keys (a dot batched over S ran ~9x slower on CPU)
        s = jnp.einsum("BHtD,BHtXD->BHtX", q_BHtD.astype(jnp.float32),
                       keys.astype(jnp.float32).reshape(B, H, t, S * l, D))
        return s.reshape(B, H, t, S, l).max(-1)

    @staticmethod
    def combine(coarse_BHtC, ids_BHtS, ok_BHtS, fine_BHtS):
        """Scores [B, H, t, C]: shortlisted chunks above every coarse score of their row, by fine."""
        ceiling = jnp.max(coarse_BHtC, axis=-1, keepdims=True)
        floor = jnp.min(jnp.where(ok_BHtS, fine_BHtS, jnp.inf), axis=-1, keepdims=True)
        floor = jnp.where(jnp.isfinite(floor), floor, 0.0)
        lifted = jnp.where(ok_BHtS, fine_BHtS - floor + ceiling + 1.0, -jnp.inf)
        B, H, t, C = coarse_BHtC.shape
        flat = coarse_BHtC.reshape(B * H * t, C)
        rows = jnp.arange(B * H * t)[:, None]
        out = flat.at[rows, ids_BHtS.reshape(B * H * t, -1)].max(lifted.reshape(B * H * t, -1))
        return out.reshape(B, H, t, C)

    def score(self, q_BHtD, reps_BRCX, cur_BHt, keys_BKClD):
        ids, ok, coarse = self.shortlist(q_BHtD, reps_BRCX, cur_BHt)
        return self.combine(coarse, ids, ok, self.fine_scores(q_BHtD, ids, keys_BKClD))


def SubChunkPooled(parts: int = 8) -> SubChunks:
    """The paper's attention pooling per sub-chunk ("attn-parts")."""
    return SubChunks(parts, AttnPooled())


CHUNK_REPRESENTATIONS = {"attn": AttnPooled(), "mean": MeanKeys(), "bounds": KeyBounds(),
                         "attn-parts": SubChunks(8, AttnPooled()), "mean-parts": SubChunks(8, MeanKeys()),
                         "bounds-parts": SubChunks(8, KeyBounds())}


BEST_KEY = "best-key"


def representation_from_name(name: str, chunk_size: int | None = None):
    """A registered name, "<base>-parts:P" (e.g. "bounds-parts:16") for P sub-chunks per chunk, or
    "best-key": a chunk scores its best single key, max_j q·k_j (one key per part, i.e.
    "mean-parts:<chunk_size>"; it keeps a copy of the keys and scores every cached key per query).
    "best-key" needs `chunk_size`. Raises ValueError naming the bad name."""
    if name in CHUNK_REPRESENTATIONS:
        return CHUNK_REPRESENTATIONS[name]
    if name == "shortlist" or name.startswith("shortlist:"):
        size, _, coarse = name.partition(":")[2].partition(":")
        if size and not (size.isdigit() and int(size) > 0):
            raise ValueError(f"chunk_repr {name!r}: the shortlist size must be a positive integer")
        if coarse.startswith("shortlist") or coarse == BEST_KEY:
            raise ValueError(f"chunk_repr {name!r}: the coarse score must be a summary ('mean-parts:4', "
                             f"'bounds-parts:4', ...), not {coarse!r}")
        kwargs = {"size": int(size)} if size else {}
        if coarse:
            kwargs["coarse"] = representation_from_name(coarse, chunk_size)
        return Shortlist(**kwargs)
    if name == "distinct-keys" or name.startswith("distinct-keys:"):
        keys = name.partition(":")[2]
        if keys and not (keys.isdigit() and int(keys) > 0):
            raise ValueError(f"chunk_repr {name!r}: the number of keys must be a positive integer")
        return DistinctKeys(int(keys)) if keys else DistinctKeys()
    if name == BEST_KEY:
        if chunk_size is None:
            raise ValueError("chunk_repr 'best-key' needs the chunk size (pass chunk_size)")
        return SubChunks(chunk_size, MeanKeys())
    base, sep, parts = name.partition(":")
    if sep and base.endswith("-parts") and base in CHUNK_REPRESENTATIONS and parts.isdigit() and int(parts) > 0:
        return dataclasses.replace(CHUNK_REPRESENTATIONS[base], parts=int(parts))
    raise ValueError(f"unknown chunk_repr {name!r}; choose one of {sorted(CHUNK_REPRESENTATIONS) + [BEST_KEY]}, "
                     "'shortlist[:S[:COARSE]]', 'distinct-keys[:R]', '<base>-parts:P' with P a positive integer (e.g. 'attn-parts:16'), "
                     "or pass an object with build/score/width")




def build_in_blocks(representation, q_BCtHD, k_BCtKD, v_BCtKD, valid_BCt, block_tokens: int = 4096):
    """`representation.build` over whole chunks of about `block_tokens` tokens at a time (lax.map),
    so that a representation with per-chunk intermediates (the paper's in-chunk [l x l] attention)
    never holds them for every chunk at once. Returns [B, R, C, X]."""
    B, C, l = q_BCtHD.shape[:3]
    per_block = min(C, max(1, block_tokens // l))
    n_blocks = -(-C // per_block)
    if n_blocks == 1:
        return representation.build(q_BCtHD, k_BCtKD, v_BCtKD, valid_BCt)

    def blocks(x):  # padding chunks are all-invalid and dropped at the end
        x = jnp.pad(x, ((0, 0), (0, n_blocks * per_block - C)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape((B, n_blocks, per_block) + x.shape[2:]).swapaxes(0, 1)

    out = jax.lax.map(lambda a: representation.build(*a),
                      (blocks(q_BCtHD), blocks(k_BCtKD), blocks(v_BCtKD), blocks(valid_BCt)))  # n B R c X
    R, X = out.shape[2], out.shape[4]
    return out.transpose(1, 2, 0, 3, 4).reshape(B, R, n_blocks * per_block, X)[:, :, :C]
