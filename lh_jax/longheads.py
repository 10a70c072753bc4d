"""LongHeads attention (Lu et al. 2024, arXiv 2402.10685) as a drop-in attention function.

Axis legend: B batch, T tokens, H query heads, K kv heads, G heads per kv head, C chunks,
l chunk_size, t queries of a block, U chunks in a block's union, N num_chunks, D head_dim.

Every head picks, for every query, `num_chunks` chunks of `chunk_size` tokens (chunk 0, the
previous and own chunk, plus the best-scoring ones) and attends to them at contiguous positions,
so no relative distance reaches the window `chunk_size * num_chunks`.

Implementation notes
- Keys are cached rotated by their in-chunk offset o ("k_loc"). A key in window slot s sits at
  position s·l + o, so rotating the *query* by (its position − s·l) once per slot gives exactly
  the remapped dot products without re-rotating any key.
- Prefill works on blocks of queries of one chunk. Per block and head, the chunks selected by
  any of its queries form a union; the block walks it a few chunks at a time (online softmax,
  per-query mask, per-(query, chunk) rotation), skipping tiles past the largest union, so the
  cost follows how coherent the selections are and never reaches a [T, T] array. Exact.
- The cache is indexed by token position (not slot), so left-padded rows keep chunk boundaries
  at their own positions.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lh_jax import _native
from lh_jax.chunks import POSITION_SCHEMES, SELECTORS, chunk_repr_from_name
from lh_jax.models.attention import (MASK_VALUE, AttentionContext, _group, _ungroup, attend_stats,
                                     merge_stats, self_attention_stats)
from lh_jax.models.config import ModelConfig


SELECT_QUERIES = 2 ** 17  # selection pass: (query x chunk) pairs scored per step, over a few blocks


def _rot_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _rotate_by(x, cos, sin):
    return x * cos + _rot_half(x) * sin


def _rotate_f32(x, cos, sin):
    """RoPE rotation computed in float32, returned in x's dtype."""
    return _rotate_by(x.astype(jnp.float32), cos, sin).astype(x.dtype)


def _take_rows(x, idx, axis):
    """x[b, ..., idx[b, j], ...] along `axis` (batched gather with a leading batch axis)."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - idx.ndim))
    return jnp.take_along_axis(x, idx, axis=axis)


def _in_chunk_cos_sin(rope, B: int, l: int, seq_len):
    """cos/sin [B, l, D] of the in-chunk offsets 0..l-1 (the same for every chunk)."""
    return rope.cos_sin(jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (B, l)), seq_len)


def _rotate_in_chunk(x_BHTD, cos_BlD, sin_BlD):
    """Rotate every token of head-major x by its offset within its chunk (T a multiple of l):
    x viewed as [B, H, T/l, l, D], so the cos/sin tables hold one chunk, not T rows."""
    B, H, T, D = x_BHTD.shape
    l = cos_BlD.shape[1]
    out = _rotate_f32(x_BHTD.reshape(B, H, T // l, l, D), cos_BlD[:, None, None], sin_BlD[:, None, None])
    return out.reshape(B, H, T, D)


def _pass2_kv_heads(num_kv_heads: int) -> int:
    """How many kv heads the dispatch kernel's tile loop handles per step: one on the CPU (its
    running state then stays in cache longer), all of them elsewhere (fewer, larger steps)."""
    return 1 if jax.default_backend() == "cpu" else num_kv_heads


@dataclasses.dataclass(frozen=True)
class LongHeads:
    """LongHeads attention settings; pass as `attention=` to `lh_jax.forward` / `generate`.

    chunk_size: tokens per chunk (l). num_chunks: chunks each head attends to per query, the
    forced ones included (window = chunk_size * num_chunks). dense_length: the first tokens use
    ordinary causal attention at true positions (default: the window). reference: reproduce the
    authors' released code, defects included (see README). chunk_repr: "attn" | "mean" |
    "bounds" | "attn-parts" | "mean-parts" | "bounds-parts" ("<name>:P" for P sub-chunks) |
    "best-key" (a chunk scores its best single key) or an object with build/score/width and an
    optional check(chunk_size) (see `chunks`).
    positions: "remap" | "original" or a function.
    selection: "head" (each query head selects) or "group" (one selection per kv head, scores
    summed over its query heads). selector: "topk" (the paper) | "recent" (chunk 0 + the most
    recent chunks: a sliding-window baseline) or a function like `chunks.select_chunks`.
    kernel: the selective-prefill kernel (speed knob; the same results up to float rounding —
    though in a deep model rounding can flip a near-tied chunk choice in a later layer: on the
    default model at 4k, tile_rows 1024 vs 2048 moved the logits by up to 1.4e-2): "dispatch"
    (chunk-major: each selected (query, chunk) pair computed once, in tiles of `tile_rows` queries
    sharing a chunk) or "union" (per block of `query_block` queries, walk the union of their
    chunks `tile_chunks` at a time); "auto" (default) is "dispatch" everywhere: it grows linearly
    with the prompt while "union" grows with how far apart a block's selections lie (H100, 64k
    tokens: 5.2 s against 14.9 s; "union" is ahead only on short prompts: 0.28 against 0.41 s at
    8k). selection_segments: the dispatch kernel's selection pass
    runs the query blocks in this many groups, each scoring only the chunks it can see (speed;
    default: 4 from 128 chunks on, else 1, since each group is compiled separately).
    record_selection: also return the selected chunks as aux output (diagnostics).
    """

    chunk_size: int = 256
    num_chunks: int = 16
    dense_length: int | None = None
    reference: bool = False
    chunk_repr: Any = "attn"
    positions: Any = "remap"
    selection: str = "head"
    selector: Any = "topk"
    kernel: str = "auto"
    tile_rows: int = 2048
    selection_segments: int | None = None
    tile_chunks: int = 8
    query_block: int | None = None
    record_selection: bool = False

    def __post_init__(self):
        for name in ("chunk_size", "num_chunks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"LongHeads: {name} must be a positive integer, got {v!r}")
        if self.num_chunks < 3:
            raise ValueError(f"LongHeads: num_chunks={self.num_chunks} is too small to hold the 3 forced "
                             "chunks (first, previous, current); use num_chunks >= 3")
        if self.dense_length is None:
            object.__setattr__(self, "dense_length", self.chunk_size * self.num_chunks)
        if not isinstance(self.dense_length, int) or self.dense_length < 0:
            raise ValueError(f"LongHeads: dense_length must be a non-negative integer, got {self.dense_length!r}")
        if isinstance(self.chunk_repr, str):
            try:
                chunk_repr_from_name(self.chunk_repr, self.chunk_size)
            except ValueError as e:
                raise ValueError(f"LongHeads: {e}") from None
        if hasattr(self.repr_fn, "check"):
            self.repr_fn.check(self.chunk_size)
        if isinstance(self.positions, str) and self.positions not in POSITION_SCHEMES:
            raise ValueError(f"LongHeads: unknown positions scheme {self.positions!r}; choose one of "
                             f"{sorted(POSITION_SCHEMES)} or pass a function")
        if isinstance(self.selector, str) and self.selector not in SELECTORS:
            raise ValueError(f"LongHeads: unknown selector {self.selector!r}; choose one of {sorted(SELECTORS)} "
                             "or pass a function")
        if self.selection not in ("head", "group"):
            raise ValueError(f"LongHeads: unknown selection {self.selection!r}; choose 'head' or 'group'")
        if self.reference:
            if self.dense_length % self.chunk_size:
                raise ValueError(f"LongHeads(reference=True): dense_length={self.dense_length} must be a multiple "
                                 f"of chunk_size={self.chunk_size} (the released code cannot run otherwise)")
            if self.dense_length < (self.num_chunks - 1) * self.chunk_size:
                raise ValueError(f"LongHeads(reference=True): dense_length={self.dense_length} must be at least "
                                 f"(num_chunks - 1) * chunk_size = {(self.num_chunks - 1) * self.chunk_size}; below "
                                 "that the released code selects masked future chunks")
            if (self.chunk_repr != "attn" or self.positions != "remap" or self.selection != "head"
                    or self.selector != "topk"):
                raise ValueError("LongHeads(reference=True) reproduces the released code: use the default "
                                 "chunk_repr='attn', positions='remap', selection='head'")
        if self.kernel not in ("auto", "dispatch", "union"):
            raise ValueError(f"LongHeads: unknown kernel {self.kernel!r}; choose 'auto', 'dispatch' or 'union'")
        for name in ("tile_rows", "tile_chunks", "query_block", "selection_segments"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"LongHeads: {name} must be a positive integer or None, got {v!r}")

    # --- settings ------------------------------------------------------------------------------

    @property
    def window(self) -> int:
        return self.chunk_size * self.num_chunks

    @property
    def kernel_name(self) -> str:
        """The selective-prefill kernel that runs: "auto" is "dispatch" on every platform (linear in
        the prompt; on an H100 1.45x faster than "union" at 32k and 2.9x at 64k)."""
        return "dispatch" if self.kernel == "auto" else self.kernel

    @property
    def repr_fn(self):
        return chunk_repr_from_name(self.chunk_repr, self.chunk_size) if isinstance(self.chunk_repr, str) else self.chunk_repr

    @property
    def selector_fn(self) -> Callable:
        return SELECTORS[self.selector] if isinstance(self.selector, str) else self.selector

    @property
    def position_fn(self) -> Callable:
        return POSITION_SCHEMES[self.positions] if isinstance(self.positions, str) else self.positions

    supports_continued_prefill = False

    def validate(self, config: ModelConfig) -> None:
        if self.window > config.trained_length:
            warnings.warn(f"LongHeads window chunk_size*num_chunks={self.window} exceeds the model's trained "
                          f"length {config.trained_length}: attended distances leave the trained range, "
                          "which defeats the purpose", stacklevel=3)

    def check_generation(self, prompt_length: int, max_new_tokens: int) -> None:
        """Reference mode raises where the released code raises (defect 2)."""
        if not self.reference:
            return
        l, B = self.chunk_size, self.dense_length
        S, end = prompt_length, prompt_length + max_new_tokens
        cached = max(0, -(-S // l) - 1)
        if S > 1 and S < B <= end and cached > 0 and B // l > cached + 1:
            raise ValueError(
                f"LongHeads(reference=True): a {S}-token prompt continued past dense_length={B} fails in the "
                f"released code (its chunk summaries are not kept up to date in the dense phase: it holds "
                f"{cached}, needs {B // l}); use reference=False, which keeps them up to date")

    # --- cache ---------------------------------------------------------------------------------

    def _capacity(self, capacity):
        return -(-capacity // self.chunk_size) * self.chunk_size

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype) -> dict:
        cap = self._capacity(capacity)
        R, X = self.repr_fn.width(config.num_heads, config.num_kv_heads, config.head_dim)
        K, D, H, l = config.num_kv_heads, config.head_dim, config.num_heads, self.chunk_size
        return {"k": jnp.zeros((batch, K, cap, D), dtype), "v": jnp.zeros((batch, K, cap, D), dtype),
                "reps": jnp.zeros((batch, R, cap // l, X), jnp.float32),
                "qbuf": jnp.zeros((batch, H, l if self.repr_fn.needs_queries else 0, D), dtype)}

    # --- the attention function ----------------------------------------------------------------

    def __call__(self, q, k, v, *, config: ModelConfig, rope, ctx: AttentionContext, cache):
        if q.shape[1] == 1 and cache is not None:
            return self._decode(q, k, v, rope, ctx, cache)
        return self._prefill(q, k, v, rope, ctx, cache is not None)

    def write_cache(self, cache, writes, ctx: AttentionContext):
        if "pos" not in writes:  # prefill: whole arrays from position 0
            out = dict(cache)
            for name in ("k", "v", "reps"):
                new = writes[name].astype(cache[name].dtype)
                out[name] = jax.lax.dynamic_update_slice_in_dim(cache[name], new, 0, axis=3)
            out["qbuf"] = writes["qbuf"].astype(cache["qbuf"].dtype)
            return out
        pos = writes["pos"][0]  # [B] (identical across layers)
        l = self.chunk_size

        def put(c_LBxSX, n_LBx1X, idx_B):
            f = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=1)
            return jax.vmap(jax.vmap(f, in_axes=(0, 0, 0)), in_axes=(0, 0, None))(c_LBxSX, n_LBx1X, idx_B)

        out = {"k": put(cache["k"], writes["k"].astype(cache["k"].dtype), pos),
               "v": put(cache["v"], writes["v"].astype(cache["v"].dtype), pos),
               "reps": put(cache["reps"], writes["reps"], pos // l)}
        if cache["qbuf"].shape[3]:
            out["qbuf"] = put(cache["qbuf"], writes["q"].astype(cache["qbuf"].dtype), pos % l)
        else:
            out["qbuf"] = cache["qbuf"]
        return out

    # --- prefill -------------------------------------------------------------------------------

    def _prefill(self, q, k, v, rope, ctx: AttentionContext, with_cache: bool):
        B, T, H, D = q.shape
        K = k.shape[2]
        l = self.chunk_size
        n_valid = jnp.sum(ctx.token_mask, axis=1).astype(jnp.int32)  # [B]
        # to position space: row b's position p sits at index p
        to_pos = (jnp.arange(T, dtype=jnp.int32)[None, :] + ctx.pad[:, None]) % T
        q, k, v = (_take_rows(x, to_pos, 1) for x in (q, k, v))
        C = -(-T // l)
        Tl = C * l
        padT = lambda x: jnp.pad(x, ((0, 0), (0, Tl - T)) + ((0, 0),) * (x.ndim - 2))
        q, k, v = padT(q), padT(k), padT(v)
        pos = jnp.arange(Tl, dtype=jnp.int32)
        valid = pos[None, :] < n_valid[:, None]  # [B, Tl]
        seq_len = n_valid if rope.rope.rope_type == "dynamic" else None

        # head-major [B, H|K, Tl, D] from here on: one transpose per tensor, and every consumer
        # below (chunk summaries, dense part, kernels, cache) reads whole chunks of one head
        qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        cs_loc = _in_chunk_cos_sin(rope, B, l, seq_len)
        qh_loc, kh_loc = _rotate_in_chunk(qh, *cs_loc), _rotate_in_chunk(kh, *cs_loc)
        chunked = lambda x: x.reshape(B, x.shape[1], C, l, D).transpose(0, 2, 3, 1, 4)  # BCtHD
        reps = self._build_reps(chunked(qh_loc), chunked(kh_loc), chunked(vh), valid.reshape(B, C, l))

        # dense part: ordinary causal attention at true positions
        Dn = min(self.dense_length, Tl)
        outs = []
        if Dn > 0:
            p_true = jnp.broadcast_to(pos[:Dn], (B, Dn))
            cos, sin = rope.cos_sin(p_true, seq_len)  # B Dn D
            rot = lambda x: _rotate_f32(x[:, :, :Dn], cos[:, None], sin[:, None])
            dense, _ = self_attention_stats(rot(qh).reshape(B, K, H // K, Dn, D), rot(kh), vh[:, :, :Dn],
                                            valid[:, :Dn])
            outs.append(_ungroup(dense).astype(q.dtype))

        aux = None
        if Dn < Tl:
            kernel = self._dispatch_prefill if self.kernel_name == "dispatch" else self._selective_prefill
            sel_out, sel_idx = kernel(qh, qh_loc, kh_loc, vh, reps, n_valid, seq_len, rope, Dn)
            if Dn > 0:
                first = (Dn // l) * l  # the selective blocks start at a chunk boundary
                sel_out = sel_out[:, Dn - first:]
            outs.append(sel_out.astype(q.dtype))
            if self.record_selection:
                aux = {"selected": sel_idx}  # [B, H, Tl - first, N] for positions first..Tl-1
        out = jnp.concatenate(outs, axis=1)[:, :T]
        # back to slot space
        to_slot = (jnp.arange(T, dtype=jnp.int32)[None, :] - ctx.pad[:, None]) % T
        out = _take_rows(out, to_slot, 1)
        if not with_cache:
            return out, None, aux
        last_chunk = jnp.minimum(n_valid // l, C - 1)  # the chunk the next token lands in
        q_chunks = qh_loc.reshape(B, H, C, l, D)
        qbuf = jnp.take_along_axis(q_chunks, last_chunk[:, None, None, None, None], axis=2)[:, :, 0]  # BHtD
        if not self.repr_fn.needs_queries:
            qbuf = qbuf[:, :, :0]
        writes = {"k": kh_loc, "v": vh, "reps": reps, "qbuf": qbuf}
        return out, writes, aux

    def _build_reps(self, q_BCtHD, k_BCtKD, v_BCtKD, valid_BCt, block_tokens: int = 4096):
        """The chunk representations, whole chunks of about `block_tokens` tokens at a time
        (lax.map), so that a representation with per-chunk intermediates (the paper's in-chunk
        [l x l] attention) never holds them for every chunk at once. Padding chunks are
        all-invalid and dropped."""
        B, C, l = q_BCtHD.shape[:3]
        cb = min(C, max(1, block_tokens // l))
        nb = -(-C // cb)
        if nb == 1:
            return self.repr_fn.build(q_BCtHD, k_BCtKD, v_BCtKD, valid_BCt)

        def blocks(x):
            x = jnp.pad(x, ((0, 0), (0, nb * cb - C)) + ((0, 0),) * (x.ndim - 2))
            return x.reshape((B, nb, cb) + x.shape[2:]).swapaxes(0, 1)

        out = jax.lax.map(lambda a: self.repr_fn.build(*a),
                          (blocks(q_BCtHD), blocks(k_BCtKD), blocks(v_BCtKD), blocks(valid_BCt)))  # nb B R cb X
        R, X = out.shape[2], out.shape[4]
        return out.transpose(1, 2, 0, 3, 4).reshape(B, R, nb * cb, X)[:, :, :C]

    def _scores(self, q_BHtD, reps, H, K):
        s = self.repr_fn.score(q_BHtD, reps)  # BHtC
        if self.selection == "group":
            B, _, t, C = s.shape
            s = jnp.broadcast_to(s.reshape(B, K, H // K, t, C).sum(2, keepdims=True), (B, K, H // K, t, C))
            s = s.reshape(B, H, t, C)
        return s

    def _rotation_tables(self, qh, qh_loc, rope, seq_len, Tl):
        """(base queries BHTD, cos/sin tables B R D, index fn): the query of (t, chunk) at distance
        `dist` from the chunk start is base[t] rotated by table[index(dist, o_t)]. qh, qh_loc: the
        head-major queries, raw and rotated by their in-chunk offsets."""
        B = qh.shape[0]
        l, N = self.chunk_size, self.num_chunks
        _, rope_scale = rope.static_inv_freq()
        if self.positions in ("remap", "original"):
            # distance = j·l + o_t: rotate the in-chunk-rotated query by j·l — a table of J rows
            J = N if self.positions == "remap" else Tl // l
            jl = jnp.broadcast_to(jnp.arange(J, dtype=jnp.int32) * l, (B, J))
            cos_j, sin_j = rope.cos_sin(jl, seq_len)  # B J D
            base = qh_loc  # BHTD, rotated by the in-chunk offsets
            # the scale is already in the in-chunk rotation
            return base, cos_j / rope_scale, sin_j / rope_scale, lambda dist, o: jnp.clip((dist - o) // l, 0, J - 1)
        max_dist = Tl + N * l
        dpos = jnp.broadcast_to(jnp.arange(max_dist, dtype=jnp.int32), (B, max_dist))
        cos_t, sin_t = rope.cos_sin(dpos, seq_len)
        return qh, cos_t, sin_t, lambda dist, o: jnp.clip(dist, 0, max_dist - 1)

    def _dispatch_prefill(self, qh, qh_loc, kh_loc, vh, reps, n_valid, seq_len, rope, Dn):
        """Selective attention, chunk-major: every selected (query, chunk) pair is computed once.

        Pass 1 selects chunks for every query (blocks of one chunk of queries). The (head, query)
        pairs of each kv head are then grouped by chunk with a counting sort (destinations from
        per-block counts; no global sort) into tiles of `tile_rows` rows that share one chunk —
        rows from all query heads of the kv group, so tiles are tall and the matmuls large.
        Pass 2 walks the tiles: one [rows x chunk_size] logit block per kv head and tile, merged
        into each (head, query)'s running softmax. Cost ~ T·num_chunks·chunk_size whatever the
        selections (plus at most one partial tile per chunk). Exact.
        """
        B, H, Tl, D = qh.shape
        K = kh_loc.shape[1]
        G = H // K
        l, N = self.chunk_size, self.num_chunks
        C = Tl // l
        c0 = Dn // l
        S0 = c0 * l
        nb = C - c0  # query blocks (one chunk each)
        Tq = nb * l  # selective queries, positions S0..Tl-1
        R = max(1, min(self.tile_rows, G * Tq))
        scale = D ** -0.5
        own_key = 0 if self.reference else 1
        base, cos_tab, sin_tab, table_index = self._rotation_tables(qh, qh_loc, rope, seq_len, Tl)

        # pass 1: selections, per-block chunk counts, rank of each query among its block's queries.
        # Query block i can only select chunks 0..i, so the blocks run in a few segments, each
        # scoring and ranking only the chunks its last block can see (top_k's cost grows
        # faster than linearly with the width).
        def select_block(i, width):
            qb = jax.lax.dynamic_slice_in_dim(qh, i * l, l, axis=2)  # BHtD
            scores = self._scores(qb, reps[:, :, :width], H, K)
            sel, ok = self.selector_fn(scores, jnp.full(scores.shape[:-1], i, jnp.int32), N, True)  # BHtN
            # per (batch, head): how many queries of the block picked each chunk, and for each pick
            # how many earlier queries of the block picked its chunk (native on the CPU: O(t·N + width)
            # instead of a [t, width] membership matrix per head)
            within, cnt = _native.chunk_counts(jnp.where(ok, sel, width), width)  # BHtN, BHW
            cnt = jnp.pad(cnt, ((0, 0), (0, 0), (0, C - width)))
            return jnp.where(ok, sel, C), ok, within, cnt

        n_seg = self.selection_segments or (4 if C >= 128 else 1)
        n_seg = min(n_seg, nb)
        bounds = [c0 + (nb * j) // n_seg for j in range(n_seg + 1)]

        def batch(n, width):  # blocks per step: a divisor of n (one compiled body), ~SELECT_QUERIES pairs
            cap = max(1, SELECT_QUERIES // (l * width))
            return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)

        outs = [jax.lax.map(functools.partial(select_block, width=b), jnp.arange(a, b, dtype=jnp.int32),
                            batch_size=batch(b - a, b))
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        sel, ok, within, cnt = (jnp.concatenate(x, axis=0) for x in zip(*outs))
        flat = lambda x: x.transpose(1, 2, 0, 3, 4).reshape(B, H, Tq, N)  # nb B H l N -> B H Tq N
        sel, ok, within = flat(sel), flat(ok), flat(within)
        # order of the pairs of (kv head, chunk): block, then query head, then query
        cnt = cnt.reshape(nb, B, K, G, C)
        g_off = jnp.cumsum(cnt, axis=3) - cnt  # pairs of earlier heads of the group, same block
        blk = jnp.sum(cnt, axis=3)  # nb B K C
        blk_off = jnp.cumsum(blk, axis=0) - blk  # pairs in earlier blocks
        off = (blk_off[:, :, :, None] + g_off).transpose(1, 2, 3, 0, 4).reshape(B, H, nb * C)
        total = jnp.sum(blk, axis=0)  # B K C
        tiles_c = (total + R - 1) // R
        tile_end = jnp.cumsum(tiles_c, axis=-1)  # B K C
        tile_off = jnp.repeat(tile_end - tiles_c, G, axis=1)  # B H C
        nT = -(-G * Tq * N // R) + C  # static bound on tiles per kv head

        t_idx = jnp.arange(Tq, dtype=jnp.int32)
        safe = jnp.minimum(sel, C - 1).reshape(B, H, Tq * N)
        flat_idx = (t_idx // l)[:, None] * C + jnp.minimum(sel, C - 1)  # B H Tq N
        rank = (jnp.take_along_axis(off, flat_idx.reshape(B, H, Tq * N), axis=-1).reshape(B, H, Tq, N)
                + within)
        dest = jnp.take_along_axis(tile_off, safe, axis=-1).reshape(B, H, Tq, N) * R + rank
        n_sel = jnp.sum(ok, axis=-1)  # B H Tq
        q_pos = S0 + t_idx
        o_q = q_pos % l
        slot = jnp.arange(N, dtype=jnp.int32)
        dist = self.position_fn(slot, sel, (q_pos // l)[:, None], n_sel[..., None], o_q[:, None], l)
        rot = table_index(dist, o_q[:, None])  # B H Tq N
        # scatter the rows: per kv head a list of nT·R (head-in-group, query) rows, chunk-major
        size = B * K * nT * R
        bk = (jnp.arange(B)[:, None] * K + jnp.arange(H)[None, :] // G) * (nT * R)  # B H
        dest_flat = jnp.where(ok, dest + bk[..., None, None], size).reshape(-1)  # invalid: dropped
        gq = (jnp.arange(H) % G)[:, None] * Tq + t_idx[None, :]  # H Tq: row id within the kv group
        row_q = jnp.full((size,), G * Tq, jnp.int32).at[dest_flat].set(
            jnp.broadcast_to(gq[None, :, :, None], (B, H, Tq, N)).reshape(-1), mode="drop").reshape(B, K, nT * R)
        row_rot = jnp.zeros((size,), jnp.int32).at[dest_flat].set(rot.reshape(-1), mode="drop").reshape(B, K, nT * R)
        # keys of its chunk each row may see (l but in its own chunk; 0 for padding rows), so the
        # tile's mask is one compare per logit
        lim = jnp.clip(q_pos[:, None] + own_key - sel * l, 0, l)  # B H Tq N
        row_lim = jnp.zeros((size,), jnp.int32).at[dest_flat].set(lim.reshape(-1), mode="drop").reshape(B, K, nT * R)
        tile_chunk = jnp.sum(jnp.arange(nT, dtype=jnp.int32)[None, None, :, None] >= tile_end[:, :, None, :],
                             axis=-1, dtype=jnp.int32)
        tile_chunk = jnp.minimum(tile_chunk, C - 1)  # B K nT

        # pass 2: walk the tiles with a running softmax per (head, query); row G·Tq is a sink. On the
        # CPU one kv head at a time (lax.map): the rows a tile gathers and updates are scattered over
        # the whole running state, and one head's state (a third of the bytes on the default model)
        # keeps those reads in cache longer as T grows. Elsewhere all kv heads share each tile step
        # (fewer, larger steps; the variant measured on GPUs).
        kg = _pass2_kv_heads(K)  # kv heads per step
        qsel = jnp.pad(base[:, :, S0:].reshape(B, K, G * Tq, D).astype(jnp.float32) * scale,
                       ((0, 0), (0, 0), (0, 1), (0, 0)))  # B K (G·Tq + 1) D, scaled by 1/sqrt(D)
        o_key = jnp.arange(l, dtype=jnp.int32)
        b_ix = jnp.arange(B)[:, None, None]
        k_ix = jnp.arange(kg)[None, :, None]
        Rows = G * Tq + 1
        pib = "promise_in_bounds"  # every index below is in range by construction

        def heads(xs):
            k_c, v_c, qs, row_q, row_rot, row_lim, tile_chunk, n_t = xs  # kg kv heads: B kg C l D, ...

            def tile(i, carry):
                mx, den, acc = carry  # B kg Rows, B kg Rows, B kg Rows D
                c = tile_chunk[:, :, i]  # B kg
                rows = jax.lax.dynamic_slice_in_dim(row_q, i * R, R, axis=2)  # B kg R
                rr = jax.lax.dynamic_slice_in_dim(row_rot, i * R, R, axis=2)
                qv = jnp.take_along_axis(qs, rows[..., None], axis=2, mode=pib)  # B kg R D
                cos_r = cos_tab.at[b_ix, rr].get(mode=pib)
                sin_r = sin_tab.at[b_ix, rr].get(mode=pib)
                qr = (qv * cos_r + _rot_half(qv) * sin_r).astype(qh.dtype)
                cidx = c[:, :, None, None, None]
                Kc = jnp.take_along_axis(k_c, cidx, axis=2, mode=pib)[:, :, 0]  # B kg l D
                Vc = jnp.take_along_axis(v_c, cidx, axis=2, mode=pib)[:, :, 0]
                s = jnp.einsum("BKRD,BKlD->BKRl", qr, Kc, preferred_element_type=jnp.float32)
                lim = jax.lax.dynamic_slice_in_dim(row_lim, i * R, R, axis=2)
                mask = o_key < lim[..., None]
                s = jnp.where(mask, s, MASK_VALUE)
                get = lambda x: x.at[b_ix, k_ix, rows].get(mode=pib)
                m_old, d_old, a_old = get(mx), get(den), get(acc)
                m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m_old - m_new)
                d_new = d_old * corr + jnp.sum(p, axis=-1)
                a_new = a_old * corr[..., None] + jnp.einsum("BKRl,BKlD->BKRD", p.astype(vh.dtype), Vc,
                                                             preferred_element_type=jnp.float32)
                # rows are distinct within a tile except the padding sink row (discarded)
                put = lambda x, y: x.at[b_ix, k_ix, rows].set(y, mode=pib, unique_indices=True)
                return put(mx, m_new), put(den, d_new), put(acc, a_new)

            def maybe_tile(i, carry):
                return jax.lax.cond(i < n_t, lambda c_: tile(i, c_), lambda c_: c_, carry)

            init = (jnp.full((B, kg, Rows), MASK_VALUE, jnp.float32), jnp.zeros((B, kg, Rows), jnp.float32),
                    jnp.zeros((B, kg, Rows, D), jnp.float32))
            _, den, acc = jax.lax.fori_loop(0, nT, maybe_tile, init)
            return acc[:, :, :G * Tq] / den[:, :, :G * Tq, None]  # B kg (G·Tq) D

        def steps(x):  # B K ... -> K/kg B kg ...
            return jnp.moveaxis(x.reshape(B, K // kg, kg, *x.shape[2:]), 1, 0)

        n_t = jnp.max(tile_end[..., -1].reshape(B, K // kg, kg), axis=(0, 2))  # tiles per step
        out = jax.lax.map(heads, (steps(kh_loc.reshape(B, K, C, l, D)), steps(vh.reshape(B, K, C, l, D)),
                                  steps(qsel), steps(row_q), steps(row_rot), steps(row_lim), steps(tile_chunk),
                                  n_t))  # K/kg B kg (G·Tq) D
        out = jnp.moveaxis(out, 0, 1).reshape(B, K, G * Tq, D)
        out = out.reshape(B, H, Tq, D).transpose(0, 2, 1, 3)  # B Tq H D
        return out, sel

    def _selective_prefill(self, qh, qh_loc, kh_loc, vh, reps, n_valid, seq_len, rope, Dn):
        """Selective attention for all query blocks from chunk Dn // l on; returns [B, T', H, D].

        Per block of queries and head, the chunks selected by any of its queries form a union
        (sorted ascending). The block walks that union `tile_chunks` chunks at a time with an online
        softmax; each (query, chunk) logit uses the query rotated for the chunk's slot and is masked
        unless the query selected the chunk. Tiles past the largest union of the block are skipped,
        so the cost follows the actual union (never the whole context) and the result is exact.
        """
        B, H, Tl, D = qh.shape
        K = kh_loc.shape[1]
        G = H // K
        l, N = self.chunk_size, self.num_chunks
        C = Tl // l
        qb_size = min(self.query_block or l, l)
        while l % qb_size:
            qb_size -= 1
        per_chunk = l // qb_size
        first_chunk = Dn // l
        position_fn = self.position_fn
        scale = D ** -0.5
        u = max(1, min(self.tile_chunks, C))
        n_tiles_max = -(-C // u)
        # keys / values by chunk, per kv head: BKClD
        k_c = kh_loc.reshape(B, K, C, l, D)
        v_c = vh.reshape(B, K, C, l, D)
        o_key = jnp.arange(l, dtype=jnp.int32)
        c_ids = jnp.arange(C, dtype=jnp.int32)
        base, cos_tab, sin_tab, table_index = self._rotation_tables(qh, qh_loc, rope, seq_len, Tl)
        b_ix = jnp.arange(B)[:, None, None, None]
        own_key = 0 if self.reference else 1  # the released code leaves out the query's own key

        def gather_chunks(x_BKClD, ids_BHu):
            """x[b, h // G, ids[b, h, i]] -> BHulD, read from the kv heads without repeating them."""
            idx = ids_BHu.reshape(B, K, G * u)[..., None, None]
            out = jnp.take_along_axis(x_BKClD, idx, axis=2)  # B K (G u) l D
            return out.reshape(B, H, u, l, D)

        def block(i):
            start = i * qb_size
            cur = start // l
            qb = jax.lax.dynamic_slice_in_dim(qh, start, qb_size, axis=2)  # BHtD
            q_pos = start + jnp.arange(qb_size, dtype=jnp.int32)
            o_q = q_pos % l
            scores = self._scores(qb, reps, H, K)
            cur_t = jnp.full(scores.shape[:-1], cur, jnp.int32)
            sel, ok = self.selector_fn(scores, cur_t, N, True)  # BHtN
            n_sel = jnp.sum(ok, axis=-1)  # BHt
            M = jnp.any((sel[..., :, None] == c_ids) & ok[..., None], axis=-2)  # BHtC: query t selected chunk c
            rank = jnp.cumsum(M, axis=-1, dtype=jnp.int32) - 1  # slot of chunk c among t's selection
            used = jnp.any(M, axis=2)  # BHC
            count = jnp.sum(used, axis=-1)  # BH
            # the union, ascending, padded to whole tiles (padding repeats chunk 0, masked out)
            order = jnp.argsort(jnp.where(used, c_ids, C + c_ids), axis=-1).astype(jnp.int32)
            order = jnp.pad(order, ((0, 0), (0, 0), (0, n_tiles_max * u - C)))
            n_tiles = (jnp.max(count) + u - 1) // u
            qv = jax.lax.dynamic_slice_in_dim(base, start, qb_size, axis=2).astype(jnp.float32)[:, :, None]

            def tile(j, carry):
                mx, den, acc = carry
                ids = jax.lax.dynamic_slice_in_dim(order, j * u, u, axis=2)  # BHu
                u_ok = (j * u + jnp.arange(u)) < count[..., None]  # BHu
                Ku, Vu = gather_chunks(k_c, ids), gather_chunks(v_c, ids)  # BHulD
                gi = jnp.broadcast_to(ids[:, :, None, :], (B, H, qb_size, u))
                m_tu = jnp.take_along_axis(M, gi, axis=-1) & u_ok[:, :, None, :]  # BHtu
                slot = jnp.take_along_axis(rank, gi, axis=-1)
                dist = position_fn(slot, ids[:, :, None, :], cur, n_sel[..., None], o_q[None, None, :, None], l)
                rr = table_index(dist, o_q[None, None, :, None]).transpose(0, 1, 3, 2)  # BHut
                qr = _rotate_by(qv, cos_tab[b_ix, rr], sin_tab[b_ix, rr]).astype(qh.dtype)  # BHutD
                s = jnp.einsum("BHutD,BHuoD->BHuto", qr, Ku, preferred_element_type=jnp.float32)
                key_pos = ids[..., None] * l + o_key  # BHuo
                mask = (m_tu.transpose(0, 1, 3, 2)[..., None]
                        & (key_pos[:, :, :, None, :] < (q_pos + own_key)[:, None]))  # BHuto
                s = jnp.where(mask, s * scale, MASK_VALUE)
                new_mx = jnp.maximum(mx, jnp.max(s, axis=(2, 4)))  # BHt
                p = jnp.where(mask, jnp.exp(s - new_mx[:, :, None, :, None]), 0.0)
                corr = jnp.exp(mx - new_mx)
                den = den * corr + jnp.sum(p, axis=(2, 4))
                pv = jnp.einsum("BHuto,BHuoD->BHtD", p.astype(vh.dtype), Vu, preferred_element_type=jnp.float32)
                return new_mx, den, acc * corr[..., None] + pv

            def maybe_tile(j, carry):
                return jax.lax.cond(j < n_tiles, lambda c: tile(j, c), lambda c: c, carry)

            init = (jnp.full((B, H, qb_size), MASK_VALUE, jnp.float32), jnp.zeros((B, H, qb_size), jnp.float32),
                    jnp.zeros((B, H, qb_size, D), jnp.float32))
            _, den, acc = jax.lax.fori_loop(0, n_tiles_max, maybe_tile, init)
            out = acc / den[..., None]
            return out.transpose(0, 2, 1, 3), sel  # BtHD, BHtN

        ids = jnp.arange(first_chunk * per_chunk, C * per_chunk, dtype=jnp.int32)
        out, sel = jax.lax.map(block, ids)
        n_blocks = out.shape[0]
        out = out.transpose(1, 0, 2, 3, 4).reshape(B, n_blocks * qb_size, H, D)
        sel = sel.transpose(1, 2, 0, 3, 4).reshape(B, H, n_blocks * qb_size, N)
        return out, sel

    # --- decode --------------------------------------------------------------------------------

    def _decode(self, q, k, v, rope, ctx: AttentionContext, cache):
        B, _, H, D = q.shape
        K = k.shape[2]
        G = H // K
        l, N = self.chunk_size, self.num_chunks
        cap = cache["k"].shape[2]
        C = cap // l
        p = ctx.positions[:, 0]  # [B]
        n = p + 1
        cur = p // l
        o = p % l
        seq_len = n if rope.rope.rope_type == "dynamic" else None
        o_b = o[:, None]
        q_loc = rope.apply(q, o_b, seq_len)
        k_loc = rope.apply(k, o_b, seq_len)  # BTKD with T=1
        q_raw = q[:, 0].astype(jnp.float32)  # BHD
        scale = D ** -0.5

        # the own chunk, patched with the new token: keys/values/queries
        bidx = jnp.arange(B)
        chunk_keys = cache["k"].reshape(B, K, C, l, D)
        chunk_vals = cache["v"].reshape(B, K, C, l, D)
        own_k = chunk_keys[bidx, :, cur]  # B K l D
        own_v = chunk_vals[bidx, :, cur]
        at_o = (jnp.arange(l)[None, :] == o_b)[:, None, :, None]  # B 1 l 1
        own_k = jnp.where(at_o, k_loc[:, 0][:, :, None, :].astype(own_k.dtype), own_k)
        own_v = jnp.where(at_o, v[:, 0][:, :, None, :].astype(own_v.dtype), own_v)

        # the own chunk's representation (final once the chunk is complete)
        reps = cache["reps"]
        # (built on the step that completes the chunk; an unfinished chunk is never scored)
        if self.repr_fn.needs_queries:
            qbuf = jnp.where(at_o, q_loc[:, 0][:, :, None, :].astype(cache["qbuf"].dtype), cache["qbuf"])  # BHlD
            q_chunk = qbuf.transpose(0, 2, 1, 3)[:, None]  # B 1 l H D
        else:
            q_chunk = jnp.zeros((B, 1, l, H, D), q.dtype)
        valid_own = jnp.arange(l)[None, None, :] <= o_b[:, :, None]
        complete = o == l - 1

        def build_rep():
            new = self.repr_fn.build(q_chunk, own_k.transpose(0, 2, 1, 3)[:, None],
                                     own_v.transpose(0, 2, 1, 3)[:, None], valid_own)  # B R 1 X
            old = reps[bidx, :, cur][:, :, None]
            return jnp.where(complete[:, None, None, None], new, old)

        own_rep = jax.lax.cond(jnp.any(complete), build_rep, lambda: reps[bidx, :, cur][:, :, None])
        reps = jax.vmap(lambda r, n_, i: jax.lax.dynamic_update_slice_in_dim(r, n_, i, axis=1))(
            reps, own_rep, cur)

        if self.reference:
            dense_row = n < self.dense_length
            force_prev = (n % l) != 0
        else:
            dense_row = p < self.dense_length
            force_prev = jnp.ones_like(dense_row)

        # dense: all cached positions < p at true distances, plus the own key. Dense rows have
        # p < dense_length, so only the first Cd chunks can hold their keys: a fixed-size read.
        Cd = max(1, min(C, -(-self.dense_length // l)))

        def dense_branch():
            dist = p[:, None] - jnp.arange(Cd)[None, :] * l  # B Cd (query minus chunk start)
            cos, sin = rope.cos_sin(jnp.clip(dist, 0, None), seq_len)  # B Cd D
            qr = _rotate_by(q_raw[:, :, None, :], cos[:, None], sin[:, None])  # B H Cd D
            qr = qr.reshape(B, K, G, Cd, D).astype(cache["k"].dtype)
            s = jnp.einsum("BKGCD,BKClD->BKGCl", qr, chunk_keys[:, :, :Cd], preferred_element_type=jnp.float32)
            s = s * scale
            key_pos = jnp.arange(Cd * l).reshape(Cd, l)
            mask = (key_pos[None] < p[:, None, None])[:, None, None]
            s = jnp.where(mask, s, MASK_VALUE).reshape(B, K, G, 1, Cd * l)
            m = jnp.max(s, -1)
            e = jnp.exp(s - m[..., None])
            lsum = jnp.sum(e, -1)
            ov = jnp.einsum("BKGtS,BKSD->BKGtD", e.astype(cache["v"].dtype), cache["v"][:, :, :Cd * l],
                            preferred_element_type=jnp.float32) / lsum[..., None]
            past = (ov, m + jnp.log(lsum))
            # own key at distance 0
            q_self = rope.apply(q, p[:, None], seq_len)
            k_self = rope.apply(k, p[:, None], seq_len)
            selfp = attend_stats(_group(q_self, K), k_self.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                 jnp.ones((B, 1, 1), bool), scale)
            out, _ = merge_stats([past, selfp])
            return _ungroup(out)

        # A dense row (p < dense_length <= window) has at most num_chunks chunks behind it, so it
        # is a selective row whose selection is all of them at their true distances: one code
        # path (and one set of kernels to compile) serves both. A dense prefix longer than the
        # window keeps its own branch.
        dense_in_selective = 0 < self.dense_length <= self.window

        def selective_branch():
            scores = self._scores(q_raw[:, :, None, :], reps, H, K)[:, :, 0]  # B H C
            sel, ok = self.selector_fn(scores, jnp.broadcast_to(cur[:, None], (B, H)), N,
                                    jnp.broadcast_to(force_prev[:, None], (B, H)))  # B H N
            slot = jnp.arange(N)
            if dense_in_selective:
                all_ok = slot[None, None, :] <= cur[:, None, None]  # B 1 N: chunks 0..cur
                d_row = dense_row[:, None, None]
                ok = jnp.where(d_row, all_ok, ok)
                sel = jnp.where(d_row, jnp.where(all_ok, slot, C), sel)
            n_sel = jnp.sum(ok, -1)
            dist = self.position_fn(slot[None, None], sel, cur[:, None, None], n_sel[..., None], o[:, None, None], l)
            if dense_in_selective:
                dist = jnp.where(d_row, o[:, None, None] + (cur[:, None, None] - sel) * l, dist)
            cos, sin = rope.cos_sin(jnp.clip(dist, 0, None).reshape(B, H * N), seq_len)
            qr = _rotate_by(q_raw[:, :, None, :], cos.reshape(B, H, N, D), sin.reshape(B, H, N, D))
            kv_head = jnp.arange(H) // G
            safe = jnp.minimum(sel, C - 1)
            Ks = chunk_keys[bidx[:, None, None], kv_head[None, :, None], safe]  # B H N l D
            Vs = chunk_vals[bidx[:, None, None], kv_head[None, :, None], safe]
            is_own = (sel == cur[:, None, None])[..., None, None]
            Ks = jnp.where(is_own, own_k[:, kv_head][:, :, None], Ks)
            Vs = jnp.where(is_own, own_v[:, kv_head][:, :, None], Vs)
            s = jnp.einsum("BHND,BHNlD->BHNl", qr.astype(Ks.dtype), Ks, preferred_element_type=jnp.float32) * scale
            key_ok = ok[..., None] & (~is_own[..., 0] | (jnp.arange(l)[None, None, None, :] <= o[:, None, None, None]))
            s = jnp.where(key_ok, s, MASK_VALUE).reshape(B, H, N * l)
            pr = jax.nn.softmax(s, axis=-1).reshape(B, H, N, l)
            out = jnp.einsum("BHNl,BHNlD->BHD", pr.astype(Vs.dtype), Vs, preferred_element_type=jnp.float32)
            return out[:, None], sel

        # A separate dense branch (dense_length > window) runs unconditionally beside the selective
        # one: each reads a fixed amount of the cache (Cd chunks; N chunks per head). Under lax.cond
        # the whole per-layer cache slice became a materialised operand, i.e. a copy of the cache
        # per layer and step (decode time grew with the context).
        sel_out, sel = selective_branch()
        if self.dense_length > 0 and not dense_in_selective:
            sel_out = jnp.where(dense_row[:, None, None, None], dense_branch(), sel_out)
        out = sel_out.astype(q.dtype)
        writes = {"pos": p, "k": k_loc.transpose(0, 2, 1, 3), "v": v.transpose(0, 2, 1, 3),
                  "reps": own_rep, "q": q_loc.transpose(0, 2, 1, 3)}
        aux = {"selected": jnp.where(dense_row[:, None, None], -1, sel)} if self.record_selection else None
        return out, writes, aux


def sliding_window(chunk_size: int = 256, num_chunks: int = 16, dense_length: int | None = None) -> LongHeads:
    """Baseline with the same window: chunk 0 as a sink plus the most recent chunks (no retrieval)."""
    return LongHeads(chunk_size=chunk_size, num_chunks=num_chunks, dense_length=dense_length, selector="recent")
