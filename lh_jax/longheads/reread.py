"""Re-reading: answer a long prompt from a short window of it that the model's early heads choose.

Axis legend: B batch, T tokens, H query heads, K kv heads, G query heads per kv head, n voting
queries, C chunks, D head_dim.

A generation-time strategy of `LongHeads(reread=Reread(...))` (on in `LongHeads.recommended()`):

1. vote: the prompt runs through the model's first `layers` layers only (with the LongHeads
   attention, so the cost is linear), and every head of those layers scores each chunk by its best
   key (max_j q·k_j, keys rotated by their in-chunk offset) for the prompt's last `query_tokens`
   queries (the question) and for the `background_tokens` queries before them. A head's term for
   a chunk is p_q(c)·log(p_q(c) / p_bg(c)), p_q and p_bg the softmax over chunks averaged over the
   question's and the background's queries: chunks the question looks at more than the text
   before it does (a chunk every query attends to, such as a sink, gets nothing). A chunk's vote
   (`combine="layer-best"`, the default) is each voting layer's largest head term, summed over the
   layers: a chunk the best head of several layers singles out. `combine="sum"` sums every head's
   term (many heads' small terms can outvote the needle), `combine="max"` takes the largest one.
2. re-read: the model then reads a short prompt made of chunk 0 (the instruction), the `chunks`
   best-voted chunks, each widened by `margin` tokens on both sides (a sentence cut by a chunk
   boundary comes whole; overlapping spans merge), and the prompt's last `recent` tokens, in
   document order, with ordinary attention at in-distribution positions, and answers from it
   (the cache then holds only that).

Why (docs/results.md, 2026-12-07): on natural text beyond the trained length the deep heads that
answer do not find the needle among the chunks of a long prompt, and even when given it they read it
through a context the short prompts the model was trained on never had; an early head finds it,
and the model answers from a short prompt holding it. Logits for every prompt token (perplexity,
`forward`, `prefill`) do not use this: it changes only what `generate` answers with.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lh_jax.models.attention import AttentionContext


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"Reread: {name} must be a positive integer, got {value!r}")


#: Reread.combine -> (the reduction over one layer's heads, the reduction over the voting layers).
COMBINE = {"sum": (jnp.sum, jnp.sum), "max": (jnp.max, jnp.max), "layer-best": (jnp.max, jnp.sum)}

#: keys scored at a time by the vote (its scores are [VOTE_BLOCK, heads, query_tokens + background_tokens]).
VOTE_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class Reread:
    """What a long prompt is re-read as (see the module docstring).

    chunks: chunks picked by the vote (besides chunk 0).
    margin: tokens re-read before and after each picked chunk.
    recent: the prompt's last tokens kept (the question and the text just before it).
    layers: the first `layers` layers vote (None: the first quarter of the model, rounded up).
    query_tokens: the prompt's last tokens whose attention votes for chunks (the question).
    background_tokens: the tokens before those whose attention is the baseline a vote must beat.
    combine: how the voting heads' terms make a chunk's vote: "layer-best" (each voting layer's
      largest, summed over the layers; the default), "sum" (over every head of every voting layer)
      or "max" (the largest of them).
    """

    chunks: int = 8
    margin: int = 64
    recent: int = 1024
    layers: int | None = None
    query_tokens: int = 32
    background_tokens: int = 256
    combine: str = "layer-best"

    def __post_init__(self):
        for name in ("chunks", "recent", "query_tokens", "background_tokens"):
            _positive(name, getattr(self, name))
        if self.layers is not None:
            _positive("layers", self.layers)
        if not isinstance(self.margin, int) or isinstance(self.margin, bool) or self.margin < 0:
            raise ValueError(f"Reread: margin must be a non-negative integer, got {self.margin!r}")
        if not isinstance(self.combine, str) or self.combine not in COMBINE:
            raise ValueError(f"Reread: unknown combine {self.combine!r}; choose one of {sorted(COMBINE)}")
        if self.query_tokens + self.background_tokens > self.recent:
            raise ValueError(f"Reread: query_tokens + background_tokens = "
                             f"{self.query_tokens + self.background_tokens} must fit in recent={self.recent}")

    def over_layers(self, votes_LBC):
        """[B, C] votes from the per-layer votes [L, B, C] that `chunk_votes` returns."""
        return COMBINE[self.combine][1](votes_LBC, axis=0)

    def voting_layers(self, num_layers: int) -> int:
        n = math.ceil(num_layers / 4) if self.layers is None else self.layers
        if n > num_layers:
            raise ValueError(f"Reread: layers={n} but the model has {num_layers} layers")
        return n

    def short_length(self, chunk_size: int) -> int:
        """Tokens of the re-read prompt at most."""
        return chunk_size + self.chunks * (chunk_size + 2 * self.margin) + self.recent

    def applies(self, prompt_length: int, chunk_size: int, dense_length: int) -> bool:
        """A prompt is re-read when LongHeads would not read it whole with ordinary attention
        (longer than `dense_length`) and the re-read prompt is shorter than it."""
        return prompt_length > max(dense_length, self.short_length(chunk_size))


@dataclasses.dataclass(frozen=True)
class Voter:
    """An attention function for the voting pass: `inner`'s output, and each chunk's vote as aux."""

    inner: object
    reread: Reread
    chunk_size: int

    def validate(self, config) -> None:
        self.inner.validate(config)

    def __call__(self, q, k, v, *, config, rope, ctx: AttentionContext, cache):
        out, writes, _ = self.inner(q, k, v, config=config, rope=rope, ctx=ctx, cache=cache)
        return out, writes, chunk_votes(q, k, ctx, rope, self.reread, self.chunk_size)


def chunk_votes(q_BTHD, k_BTKD, ctx: AttentionContext, rope, reread: Reread, chunk_size: int,
                block: int = VOTE_BLOCK):
    """[B, C] votes of one layer's heads for each chunk of a left-padded prompt (C = T // chunk_size
    + 1); -inf where a chunk is not a candidate (chunk 0, chunks reaching into the last `recent`
    tokens, padding). Keys are scored `block` at a time (memory bounded at long lengths)."""
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    l = chunk_size
    C = T // l + 1
    n_q, n_bg = reread.query_tokens, reread.background_tokens
    n = n_q + n_bg
    pos = ctx.positions  # [B, T]
    real = ctx.token_mask
    length = jnp.sum(real, axis=1).astype(jnp.int32)  # [B]
    k = rope.apply(k_BTKD, pos % l).astype(jnp.float32)  # rotated by the in-chunk offset
    q = q_BTHD[:, T - n:].astype(jnp.float32).reshape(B, n, K, H // K, D)
    chunk_of = jnp.where(real, pos // l, C)  # padding to an extra segment, dropped below
    candidate = (jnp.arange(C)[None] >= 1) & ((jnp.arange(C)[None] + 1) * l <= (length - reread.recent)[:, None])

    block = min(T, block)
    pad = -T % block
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, -1, block, K, D)
    chunk_of = jnp.pad(chunk_of, ((0, 0), (0, pad)), constant_values=C).reshape(B, -1, block)

    def best_keys(q_nKGD, k_NbKD, seg_Nb):
        """[C, K, G, n] best key score per chunk, `block` keys at a time (bounded memory)."""
        def step(best, xs):
            k_bKD, seg_b = xs
            s = jnp.einsum("nKGD,bKD->bKGn", q_nKGD, k_bKD) * (D ** -0.5)
            return jnp.maximum(best, jax.ops.segment_max(s, seg_b, num_segments=C + 1)), None
        init = jnp.full((C + 1,) + q_nKGD.shape[1:3] + (q_nKGD.shape[0],), -jnp.inf, jnp.float32)
        return jax.lax.scan(step, init, (k_NbKD, seg_Nb))[0][:C]

    def one_row(q_nKGD, k_NbKD, seg_Nb, cand_C):
        best = jnp.where(cand_C[:, None, None, None], best_keys(q_nKGD, k_NbKD, seg_Nb), -jnp.inf)
        p = jax.nn.softmax(best, axis=0)
        p_q, p_bg = jnp.mean(p[..., n_bg:], axis=-1), jnp.mean(p[..., :n_bg], axis=-1)  # [C, K, G]
        w = p_q * (jnp.log(p_q + 1e-6) - jnp.log(p_bg + 1e-6))
        return jnp.where(cand_C, COMBINE[reread.combine][0](w, axis=(1, 2)), -jnp.inf)

    return jax.vmap(one_row)(q, k, chunk_of, candidate)


def pick_chunks(votes_BC, reread: Reread) -> np.ndarray:
    """[B, chunks] chunk indices, in document order, of the best votes (ties to the earlier chunk)."""
    votes = np.asarray(votes_BC, np.float64)
    out = np.empty((votes.shape[0], reread.chunks), np.int64)
    for b, row in enumerate(votes):
        if np.sum(np.isfinite(row)) < reread.chunks:
            raise AssertionError("fewer candidate chunks than Reread.chunks")  # excluded by `applies`
        order = np.argsort(-row, kind="stable")[:reread.chunks]
        out[b] = np.sort(order)
    return out


def short_prompt(ids_T: np.ndarray, chunks, chunk_size: int, recent: int, margin: int = 0) -> np.ndarray:
    """The re-read prompt of one (unpadded) prompt: chunk 0, the chosen chunks widened by `margin`
    tokens on each side, the last `recent` tokens; each token once, in document order."""
    ids_T = np.asarray(ids_T)
    T = len(ids_T)
    keep = np.zeros(T, bool)
    keep[:chunk_size] = True
    keep[T - recent:] = True
    for c in chunks:
        keep[max(0, c * chunk_size - margin):min(T, (c + 1) * chunk_size + margin)] = True
    return ids_T[keep]
