"""LongHeads' settings, its kernel knobs and its cache layout: the object users pass as `attention=`.

Axis legend: B batch, H query heads, K kv heads, C chunks, l tokens per chunk (chunk_size),
S cache slots (positions), R representation heads, X representation width, D head_dim.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lh_jax.longheads.representations import representation_from_name
from lh_jax.longheads.reread import Reread
from lh_jax.longheads.selection import POSITION_SCHEMES, SELECTORS
from lh_jax.models.attention import AttentionContext, storage_dtype, to_storage
from lh_jax.models.config import ModelConfig


def _check_positive(owner: str, name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        kind = "a positive integer or None" if optional else "a positive integer"
        raise ValueError(f"{owner}: {name} must be {kind}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Tuning knobs of the dispatch prefill kernel (lh_jax/longheads/dispatch.py). They change the
    tiling, not the result (up to float rounding).

    tile_rows: (query head, query) rows per tile; a tile is one [tile_rows x chunk_size] matmul.
    selection_segments: the selection pass runs the query blocks in this many groups, each scoring
      only the chunks its last block can see (None: 4 from 128 chunks on, else 1; each group is
      compiled separately).
    """

    tile_rows: int = 2048
    selection_segments: int | None = None

    def __post_init__(self):
        _check_positive("Dispatch", "tile_rows", self.tile_rows)
        _check_positive("Dispatch", "selection_segments", self.selection_segments, optional=True)


@dataclasses.dataclass(frozen=True)
class LongHeads:
    """LongHeads attention; pass it as `attention=` to `lh_jax.forward`, `generate`, `prefill`,
    `decode_step`.

    The paper's method (Lu et al. 2024) is `LongHeads()`: every head picks, for every query,
    `num_chunks` chunks of `chunk_size` tokens (chunk 0, the previous and own chunk, plus the
    best-scoring ones) and attends to them at contiguous positions, so no distance reaches the
    window `chunk_size * num_chunks`. The first `dense_length` tokens (default: the window) use
    ordinary causal attention.

    chunk_repr: how a chunk is summarised and scored: "attn" (the paper), "mean", "bounds" (Quest),
      "<base>-parts[:P]", "best-key", or an object (see `representations`).
    selector: "topk" (the paper), "recent" (a sliding-window baseline) or a function like
      `selection.select_chunks`.
    positions: "remap" (the paper), "original" (ablation) or a function like
      `selection.remap_positions`.
    selection: "head" (each query head selects) or "group" (one selection per kv head).
    reference: reproduce the authors' released code, defects included (README, "reference mode").
    kernel: the prefill kernel's knobs (`Dispatch`); speed only.
    record_selection: also return the selected chunks as per-layer aux output (diagnostics).
    exact_tail: the query blocks holding the prompt's last `exact_tail` tokens score every chunk by
      its best key (max_j q·k_j, exact) instead of by the representation, and so does decode, among
      a bounded set of candidates (see `selection.select_with_memory`). 0: off (the paper). With
      selector="recent" (a sliding window for the rest) the exact picks use "topk".
    bulk_chunks: chunks a prompt query outside the exact tail selects (3..num_chunks; None: num_chunks).
      The exact tail and decode keep `num_chunks`: the wide window is spent where the answer is read,
      the rest of the prompt attends to fewer chunks (its attention costs bulk_chunks/num_chunks).
    local_chunks: the `local_chunks` chunks before a query's own are forced into its selection (a
      local window of whole chunks inside the num_chunks; 0 or 1: the paper's previous chunk only),
      in the prompt and in decode, by any selector that ranks scores.
    """

    chunk_size: int = 256
    num_chunks: int = 16
    dense_length: int | None = None
    chunk_repr: Any = "attn"
    selector: Any = "topk"
    positions: Any = "remap"
    selection: str = "head"
    reference: bool = False
    kernel: Dispatch = Dispatch()
    record_selection: bool = False
    exact_tail: int = 0
    bulk_chunks: int | None = None
    local_chunks: int = 0
    reread: Reread | None = None

    def __post_init__(self):
        _check_positive("LongHeads", "chunk_size", self.chunk_size)
        _check_positive("LongHeads", "num_chunks", self.num_chunks)
        if self.num_chunks < 3:
            raise ValueError(f"LongHeads: num_chunks={self.num_chunks} is too small to hold the 3 forced "
                             "chunks (first, previous, current); use num_chunks >= 3")
        if not isinstance(self.exact_tail, int) or isinstance(self.exact_tail, bool) or self.exact_tail < 0:
            raise ValueError(f"LongHeads: exact_tail must be a non-negative integer, got {self.exact_tail!r}")
        if self.bulk_chunks is not None:
            if (not isinstance(self.bulk_chunks, int) or isinstance(self.bulk_chunks, bool)
                    or not 3 <= self.bulk_chunks <= self.num_chunks):
                raise ValueError(f"LongHeads: bulk_chunks must be an integer in 3..num_chunks={self.num_chunks} "
                                 f"(or None), got {self.bulk_chunks!r}")
        smallest = min(self.num_chunks, self.bulk_chunks or self.num_chunks)
        if (not isinstance(self.local_chunks, int) or isinstance(self.local_chunks, bool)
                or not 0 <= self.local_chunks <= smallest - 2):
            raise ValueError(f"LongHeads: local_chunks must be an integer in 0..{smallest - 2} (chunk 0 and the "
                             f"query's own chunk are forced too, among {smallest}), got {self.local_chunks!r}")
        if self.dense_length is None:
            object.__setattr__(self, "dense_length", self.window)
        if not isinstance(self.dense_length, int) or isinstance(self.dense_length, bool) or self.dense_length < 0:
            raise ValueError(f"LongHeads: dense_length must be a non-negative integer, got {self.dense_length!r}")
        if isinstance(self.chunk_repr, str):
            try:
                representation_from_name(self.chunk_repr, self.chunk_size)
            except ValueError as e:
                raise ValueError(f"LongHeads: {e}") from None
        if hasattr(self.representation, "check"):
            self.representation.check(self.chunk_size)
        if isinstance(self.positions, str) and self.positions not in POSITION_SCHEMES:
            raise ValueError(f"LongHeads: unknown positions scheme {self.positions!r}; choose one of "
                             f"{sorted(POSITION_SCHEMES)} or pass a function")
        if isinstance(self.selector, str) and self.selector not in SELECTORS:
            raise ValueError(f"LongHeads: unknown selector {self.selector!r}; choose one of {sorted(SELECTORS)} "
                             "or pass a function")
        if self.selection not in ("head", "group"):
            raise ValueError(f"LongHeads: unknown selection {self.selection!r}; choose 'head' or 'group'")
        if not isinstance(self.kernel, Dispatch):
            raise ValueError(f"LongHeads: kernel must be a lh_jax.longheads.Dispatch(...) of kernel knobs, "
                             f"got {self.kernel!r}")
        if self.reread is not None and not isinstance(self.reread, Reread):
            raise ValueError(f"LongHeads: reread must be a lh_jax.longheads.Reread(...) or None, got {self.reread!r}")
        if self.reference:
            self._check_reference()

    def _check_reference(self) -> None:
        if self.dense_length % self.chunk_size:
            raise ValueError(f"LongHeads(reference=True): dense_length={self.dense_length} must be a multiple "
                             f"of chunk_size={self.chunk_size} (the released code cannot run otherwise)")
        if self.dense_length < (self.num_chunks - 1) * self.chunk_size:
            raise ValueError(f"LongHeads(reference=True): dense_length={self.dense_length} must be at least "
                             f"(num_chunks - 1) * chunk_size = {(self.num_chunks - 1) * self.chunk_size}; below "
                             "that the released code selects masked future chunks")
        if (self.chunk_repr != "attn" or self.positions != "remap" or self.selection != "head"
                or self.selector != "topk" or self.exact_tail or self.local_chunks > 1 or self.reread):
            raise ValueError("LongHeads(reference=True) reproduces the released code: use the default "
                             "chunk_repr='attn', positions='remap', selection='head', selector='topk', exact_tail=0, "
                             "local_chunks=0, reread=None")

    @classmethod
    def recommended(cls, **overrides) -> "LongHeads":
        """This project's setting for retrieval beyond the trained length (a 4096-token window), as
        opposed to `LongHeads()`, the paper's: 128-token chunks x 32, a cheap summary for most
        queries, exact best-key selection for the prompt's last 1,024 tokens and for decode, the
        8 chunks before each query always kept, and `generate` answering a prompt longer than the
        window from a re-read of it (`Reread()`: chunk 0, 8 chunks voted for by the first
        layers' heads with 64 tokens on each side, the last 1,024 tokens). Keyword arguments override any of these
        (`reread=None`: the setting before re-reading). See README, "Which setting"."""
        return cls(**{"chunk_size": 128, "num_chunks": 32, "chunk_repr": "mean-parts:4", "exact_tail": 1024,
                      "local_chunks": 8, "reread": Reread(), **overrides})

    # --- derived settings ------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """Tokens a head attends to per query at most (chunk_size * num_chunks)."""
        return self.chunk_size * self.num_chunks

    @property
    def representation(self):
        """The chunk representation object (build/score/width)."""
        if isinstance(self.chunk_repr, str):
            return representation_from_name(self.chunk_repr, self.chunk_size)
        return self.chunk_repr

    @property
    def selector_fn(self) -> Callable:
        return SELECTORS[self.selector] if isinstance(self.selector, str) else self.selector

    @property
    def position_fn(self) -> Callable:
        return POSITION_SCHEMES[self.positions] if isinstance(self.positions, str) else self.positions

    # --- checks before compiling -------------------------------------------------------------------

    supports_continued_prefill = False

    def validate(self, config: ModelConfig) -> None:
        if self.reread is not None:
            self.reread.voting_layers(config.num_layers)
        if self.window > config.trained_length:
            warnings.warn(f"LongHeads window chunk_size*num_chunks={self.window} exceeds the model's trained "
                          f"length {config.trained_length}: attended distances leave the trained range, "
                          "which defeats the purpose", stacklevel=3)

    def check_generation(self, prompt_length: int, max_new_tokens: int) -> None:
        """Reference mode raises where the released code raises (defect 2 in README)."""
        if not self.reference:
            return
        chunk, dense = self.chunk_size, self.dense_length
        end = prompt_length + max_new_tokens
        cached = max(0, -(-prompt_length // chunk) - 1)  # summaries the released code holds
        if prompt_length > 1 and prompt_length < dense <= end and cached > 0 and dense // chunk > cached + 1:
            raise ValueError(
                f"LongHeads(reference=True): a {prompt_length}-token prompt continued past dense_length={dense} "
                f"fails in the released code (its chunk summaries are not kept up to date in the dense phase: "
                f"it holds {cached}, needs {dense // chunk}); use reference=False, which keeps them up to date")

    # --- cache layout ------------------------------------------------------------------------------

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype) -> dict:
        """One layer's cache, indexed by token position (so left-padded rows keep their chunk
        boundaries): keys rotated by their in-chunk offset "k" [B, K, S, D], values "v"
        [B, K, S, D] (bfloat16 ones as uint16 bits: `models.attention.storage_dtype`), chunk
        representations "reps" [B, R, C, X] float32, and the queries of the chunk being filled
        "qbuf" [B, H, l, D] (empty when the representation needs none); with `exact_tail`, also
        "memory" [B, H, N] int32: the chunks each head picked at the last token (decode's
        candidates beside the representation's best)."""
        slots = -(-capacity // self.chunk_size) * self.chunk_size
        R, X = self.representation.width(config.num_heads, config.num_kv_heads, config.head_dim)
        K, D, H, l = config.num_kv_heads, config.head_dim, config.num_heads, self.chunk_size
        kv = storage_dtype(dtype)  # bfloat16 entries are stored as their bits (see `storage_dtype`)
        cache = {"k": jnp.zeros((batch, K, slots, D), kv), "v": jnp.zeros((batch, K, slots, D), kv),
                 "reps": jnp.zeros((batch, R, slots // l, X), jnp.float32),
                 "qbuf": jnp.zeros((batch, H, l if self.representation.needs_queries else 0, D), dtype)}
        if self.exact_tail:
            cache["memory"] = jnp.zeros((batch, H, self.num_chunks), jnp.int32)
        return cache

    def write_cache(self, cache, writes, ctx: AttentionContext):
        """Apply one call's writes to a stacked cache (leading layer axis): a prefill's whole arrays
        from position 0, or a decode step's one position per row."""
        if "pos" not in writes:
            out = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], to_storage(writes[name], cache[name]),
                                                              0, axis=3)
                   for name in ("k", "v", "reps")}
            out["qbuf"] = writes["qbuf"].astype(cache["qbuf"].dtype)
            if "memory" in cache:
                out["memory"] = writes["memory"]
            return out
        pos = writes["pos"][0]  # [B] (the same in every layer)

        def put(stacked, new, index_B):
            one = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=1)
            return jax.vmap(jax.vmap(one, in_axes=(0, 0, 0)), in_axes=(0, 0, None))(stacked, new, index_B)

        out = {"k": put(cache["k"], to_storage(writes["k"], cache["k"]), pos),
               "v": put(cache["v"], to_storage(writes["v"], cache["v"]), pos),
               "reps": put(cache["reps"], writes["reps"], pos // self.chunk_size),
               "qbuf": cache["qbuf"]}
        if "memory" in cache:
            out["memory"] = writes["memory"]
        if cache["qbuf"].shape[3]:
            out["qbuf"] = put(cache["qbuf"], writes["q"].astype(cache["qbuf"].dtype), pos % self.chunk_size)
        return out

    # --- the attention function --------------------------------------------------------------------

    def __call__(self, q, k, v, *, config: ModelConfig, rope, ctx: AttentionContext, cache):
        from lh_jax.longheads import decode, prefill
        if q.shape[1] == 1 and cache is not None:
            return decode.decode_step(self, q, k, v, rope, ctx, cache)
        return prefill.prefill(self, q, k, v, rope, ctx, with_cache=cache is not None)


def sliding_window(chunk_size: int = 256, num_chunks: int = 16, dense_length: int | None = None) -> LongHeads:
    """Baseline with the same window: chunk 0 as a sink plus the most recent chunks (no retrieval)."""
    return LongHeads(chunk_size=chunk_size, num_chunks=num_chunks, dense_length=dense_length, selector="recent")
