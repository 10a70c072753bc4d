"""Forward pass, prefill, jitted decode step and greedy generation for any attention function.

Axis legend: B batch, T tokens, V vocabulary.

Every entry point checks its inputs in Python (shapes, vocabulary range, cache capacity, the
attention's own parameters) before anything is traced or compiled. Jitted functions are defined
once at module level with the config and attention as static arguments; generation buckets the
prompt length and the number of new tokens so one compilation serves many requests.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lh_jax.models.attention import AttentionContext, FullAttention
from lh_jax.models.config import ModelConfig
from lh_jax.models.llama import Transformer, lm_head_weight

#: How many times each jitted entry point was traced (a test checks decode compiles once).
TRACE_COUNTS: Counter = Counter()

PROMPT_BUCKET = 64


class CacheCapacityError(ValueError):
    """Generation would write past the end of the KV cache."""


class InsufficientMemoryError(ValueError):
    """A request that cannot fit in this machine's memory (raised before any work)."""


#: Prompts of at least this many tokens show per-layer progress on stderr ($LH_JAX_PROGRESS=off: never).
PROGRESS_FROM = 32768


class _LayerProgress:
    """Host-side progress of a long multi-token pass, one tick per layer (a jax.debug.callback)."""

    def __init__(self):
        self.bar = None

    def __call__(self, layer, layers):
        from tqdm.auto import tqdm
        layer, layers = int(layer), int(layers)
        if layer == 0 or self.bar is None:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=layers, desc="layers", leave=False, dynamic_ncols=True)
        self.bar.update(1)
        if layer == layers - 1:
            self.bar.close()
            self.bar = None


_show_layer = _LayerProgress()


def _progress_wanted(progress, tokens: int) -> bool:
    if progress is not None:
        return bool(progress)
    import os
    if os.environ.get("LH_JAX_PROGRESS", "").strip().lower() in ("off", "0", "false", "no"):
        return False
    return tokens >= PROGRESS_FROM


def _tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def memory_estimate(config: ModelConfig, attention, batch: int, tokens: int, kv_dtype=jnp.float32,
                    capacity: int | None = None) -> dict:
    """Bytes a prefill of [batch, tokens] needs beyond the params: the cache (`capacity` slots, None: no
    cache) and the largest layer's working set (activations, attention intermediates), estimated per
    token from the model's widths (see docs/results.md for the measurements it was checked against)."""
    attention = resolve_attention(attention)
    cache = 0
    if capacity is not None:
        one = jax.eval_shape(lambda: attention.init_cache(config, batch, capacity, kv_dtype))
        cache = _tree_bytes(one) * config.num_layers
    c = config
    per_token = 4 * (8 * c.hidden_size + 3 * c.intermediate_size + 6 * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
    if getattr(attention, "num_chunks", None):  # LongHeads: the dispatch plan, per (query head, slot)
        per_token += 4 * 8 * c.num_heads * attention.num_chunks
    return {"cache": cache, "activations": int(per_token) * batch * tokens}


def available_memory() -> int | None:
    """Bytes this process may still allocate on the CPU backend (None elsewhere: not checked)."""
    if jax.default_backend() != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_memory(config: ModelConfig, attention, batch: int, tokens: int, kv_dtype, capacity: int | None) -> None:
    """Raise InsufficientMemoryError, before any work, when the estimate exceeds the available memory."""
    avail = available_memory()
    if avail is None:
        return
    need = memory_estimate(config, attention, batch, tokens, kv_dtype, capacity)
    if sum(need.values()) > avail:
        gib = lambda b: f"{b / 2 ** 30:.1f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"
        raise InsufficientMemoryError(
            f"{batch} x {tokens} tokens need about {gib(sum(need.values()))} (cache {gib(need['cache'])} in "
            f"{jnp.dtype(kv_dtype).name}, working set {gib(need['activations'])}) but {gib(avail)} are available: "
            "use a shorter prompt or a smaller batch, a bfloat16 cache (cache_dtype=jnp.bfloat16), or more memory")


# A LongHeads float32 cache larger than this is kept in bfloat16 on the CPU (its decode reads only the
# selected chunks, so the narrower cache costs no whole-cache conversion per step): 128k tokens of the
# default model are a 5.6 GiB float32 cache.
LONG_CACHE_BYTES = 4 * 2 ** 30


def choose_cache_dtype(config: ModelConfig, attention, params, batch: int, tokens: int, capacity: int,
                       requested=None):
    """The cache dtype of a generation: `requested`, else `cache_dtype(params)`, except for LongHeads
    with a float32 cache that would be larger than `LONG_CACHE_BYTES` or take more than half of the
    available memory: then bfloat16 (with a RuntimeWarning). Checked against the available memory
    before any work."""
    import warnings
    if requested is not None:
        dt = jnp.dtype(requested)
    else:
        dt = cache_dtype(params)
        if dt != jnp.bfloat16 and getattr(attention, "num_chunks", None):
            need = memory_estimate(config, attention, batch, tokens, dt, capacity)
            avail = available_memory()
            too_big = need["cache"] > LONG_CACHE_BYTES or (avail is not None and sum(need.values()) > avail / 2)
            if too_big:
                check_memory(config, attention, batch, tokens, jnp.bfloat16, capacity)
                warnings.warn(f"a {dt.name} cache for {batch} x {tokens} tokens would take "
                              f"{need['cache'] / 2 ** 30:.1f} GiB (more than {LONG_CACHE_BYTES / 2 ** 30:.0f} GiB "
                              "or half of the available memory): using a bfloat16 cache", RuntimeWarning,
                              stacklevel=3)
                return jnp.dtype(jnp.bfloat16)
    check_memory(config, attention, batch, tokens, dt, capacity)
    return dt


@struct.dataclass
class KVCache:
    """The decoding state: per-layer caches stacked on L, next free slot, left padding per row."""

    layers: Any  # pytree with leading [L, B, ...] axes, shaped by the attention function
    index: jax.Array  # [] int32 — next slot to write
    pad: jax.Array  # [B] int32 — left-padding slots of each row
    capacity: int = struct.field(pytree_node=False, default=0)


def resolve_attention(attention):
    return FullAttention() if attention is None else attention


def params_dtype(params) -> jnp.dtype:
    return params["embed"]["embedding"].dtype


def cache_dtype(params) -> jnp.dtype:
    """The KV cache dtype `generate` uses with `params`: the params' dtype, except on the CPU, where
    a lower-precision cache is kept in float32. XLA:CPU has no bfloat16 matrix-vector kernels, so a
    decode step reading a bfloat16 cache converted the whole cache to float32 (every layer, every
    step: decode time grew with the context, 4-12x float32's on the default model)."""
    dt = jnp.dtype(params_dtype(params))
    if dt != jnp.float32 and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return dt


def check_input_ids(input_ids, config: ModelConfig, name: str = "input_ids") -> np.ndarray:
    """Validate token ids on the host and return them as an int32 [B, T] numpy array."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, tokens], got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"{name} is empty (shape {ids.shape}); give at least one token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains token id {bad} outside the vocabulary [0, {config.vocab_size})")
    return ids.astype(np.int32)


def check_attention_mask(attention_mask, shape) -> np.ndarray:
    """A [B, T] 0/1 mask with left padding only (each row 0…0 1…1, at least one 1)."""
    if attention_mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask has shape {mask.shape}, expected {tuple(shape)} like input_ids")
    mask = mask.astype(bool)
    if not mask[:, -1].all() or np.any(np.diff(mask.astype(np.int8), axis=1) < 0):
        raise ValueError("attention_mask must be left-padded: each row zeros then ones, ending in a one")
    return mask


def context(mask_BT, start, pad_before=0) -> AttentionContext:
    """Where T new tokens sit: `mask_BT` [B, T] marks real tokens (left padding False), `start` is the
    cache slot of the first one, `pad_before` the rows' left padding already in the cache."""
    T = mask_BT.shape[1]
    pad = pad_before + T - jnp.sum(mask_BT, axis=1).astype(jnp.int32)
    positions = jnp.maximum(start + jnp.arange(T, dtype=jnp.int32)[None, :] - pad[:, None], 0)
    return AttentionContext(positions=positions, token_mask=mask_BT, start=jnp.asarray(start, jnp.int32),
                            pad=pad)


@functools.partial(jax.jit, static_argnames=("config", "attention", "return_aux", "logits_to_keep"))
def _forward(params, ids, mask, config, attention, return_aux, logits_to_keep=None):
    TRACE_COUNTS["forward"] += 1
    model = Transformer(config, attention, params_dtype(params))
    logits, _, aux = model.apply({"params": params}, ids, context(mask, 0), None, logits_to_keep=logits_to_keep)
    return (logits, aux) if return_aux else logits


def forward(params, config: ModelConfig, input_ids, attention=None, attention_mask=None,
            return_aux: bool = False, logits_to_keep: int | None = None):
    """Logits [B, T, V] float32 for int ids [B, T] (full causal attention when attention is None).

    `logits_to_keep=k` returns only the last k positions' logits [B, k, V] (a long prompt then
    never holds [B, T, V]: 16 GB at 32k tokens and a 128k vocabulary). `attention_mask` [B, T]
    marks left padding; with `return_aux` also returns the attention's per-layer diagnostics (e.g.
    LongHeads' selected chunks), stacked on a leading layer axis.
    """
    attention = resolve_attention(attention)
    ids = check_input_ids(input_ids, config)
    mask = check_attention_mask(attention_mask, ids.shape)
    if logits_to_keep is not None and (not isinstance(logits_to_keep, (int, np.integer)) or
                                       not 1 <= logits_to_keep <= ids.shape[1]):
        raise ValueError(f"logits_to_keep must be an integer in 1..{ids.shape[1]} (the tokens per row), "
                         f"got {logits_to_keep!r}")
    attention.validate(config)
    return _forward(params, jnp.asarray(ids), jnp.asarray(mask), config, attention, return_aux,
                    None if logits_to_keep is None else int(logits_to_keep))


#: Tokens per block of the LM head in `token_logprobs` ([B, block, V] float32 logits at a time).
LOGPROB_BLOCK = 512


@functools.partial(jax.jit, static_argnames=("config", "attention", "block", "progress"))
def _token_logprobs(params, ids, mask, config, attention, block, progress=False):
    TRACE_COUNTS["token_logprobs"] += 1
    model = Transformer(config, attention, params_dtype(params), layer_callback=_show_layer if progress else None)
    hidden, _, _ = model.apply({"params": params}, ids, context(mask, 0), None, hidden_only=True)
    w_EV = lm_head_weight(params, config).astype(hidden.dtype)
    B, T, E = hidden.shape
    n = T - 1
    nb = -(-n // block)
    # predictions from tokens 0..T-2 of targets 1..T-1, padded to whole blocks, block axis first
    x = jnp.pad(hidden[:, :-1], ((0, 0), (0, nb * block - n), (0, 0)))
    tgt = jnp.pad(ids[:, 1:], ((0, 0), (0, nb * block - n)))
    x_NBbE = x.reshape(B, nb, block, E).transpose(1, 0, 2, 3)
    tgt_NBb = tgt.reshape(B, nb, block).transpose(1, 0, 2)

    def score(args):
        x_BbE, tgt_Bb = args
        logits = jnp.einsum("BTE,EV->BTV", x_BbE, w_EV, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, tgt_Bb[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    lp = jax.lax.map(score, (x_NBbE, tgt_NBb)).transpose(1, 0, 2).reshape(B, nb * block)[:, :n]
    # a prediction made at a padding slot means nothing (left padding: mask[t] implies mask[t+1])
    return jnp.where(mask[:, :-1], lp, 0.0)


def token_logprobs(params, config: ModelConfig, input_ids, attention=None, attention_mask=None,
                   block: int = LOGPROB_BLOCK, progress: bool | None = None):
    """log p(ids[t+1] | ids[:t+1]) as float32 [B, T-1], without materialising [B, T, V] logits.

    The model runs to its final hidden states; the LM head and log-softmax are applied `block`
    tokens at a time (`lax.map`), so memory holds [B, block, V] logits, not [B, T, V]. Equal to
    `log_softmax(forward(...))` at the next token. Entries predicted from left-padding slots
    (`attention_mask` 0 at t) are 0.
    """
    attention = resolve_attention(attention)
    ids = check_input_ids(input_ids, config)
    mask = check_attention_mask(attention_mask, ids.shape)
    if ids.shape[1] < 2:
        raise ValueError(f"input_ids has {ids.shape[1]} token per row; scoring needs at least 2 "
                         "(each score is of the next token)")
    if not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    attention.validate(config)
    check_memory(config, attention, ids.shape[0], ids.shape[1], jnp.float32, None)
    block = int(min(block, ids.shape[1] - 1))
    return _token_logprobs(params, jnp.asarray(ids), jnp.asarray(mask), config, attention, block,
                           _progress_wanted(progress, ids.shape[1]))


def init_cache(config: ModelConfig, batch: int, capacity: int, attention=None, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` rows and `capacity` slots, laid out by `attention`."""
    attention = resolve_attention(attention)
    layer = attention.init_cache(config, batch, capacity, dtype)
    layers = jax.tree.map(lambda x: jnp.broadcast_to(x, (config.num_layers,) + x.shape), layer)
    return KVCache(layers=layers, index=jnp.zeros((), jnp.int32), pad=jnp.zeros((batch,), jnp.int32),
                   capacity=capacity)


def _prefill_impl(params, ids, mask, cache: KVCache, config, attention, progress=False):
    ctx = context(mask, cache.index, cache.pad)
    model = Transformer(config, attention, params_dtype(params), layer_callback=_show_layer if progress else None)
    logits, layers, _ = model.apply({"params": params}, ids, ctx, cache.layers, logits_to_keep=1)
    cache = cache.replace(layers=layers, index=cache.index + ids.shape[1], pad=ctx.pad)
    return logits[:, -1], cache


def _decode_impl(params, token_B, cache: KVCache, config, attention):
    TRACE_COUNTS["decode_step"] += 1
    B = token_B.shape[0]
    positions = (cache.index - cache.pad)[:, None]
    ctx = AttentionContext(positions=positions, token_mask=jnp.ones((B, 1), bool), start=cache.index,
                           pad=cache.pad)
    model = Transformer(config, attention, params_dtype(params))
    logits, layers, _ = model.apply({"params": params}, token_B[:, None], ctx, cache.layers)
    return logits[:, -1], cache.replace(layers=layers, index=cache.index + 1)


_prefill_jit = jax.jit(_prefill_impl, static_argnames=("config", "attention", "progress"), donate_argnames=("cache",))
_decode_jit = jax.jit(_decode_impl, static_argnames=("config", "attention"), donate_argnames=("cache",))


def prefill(params, config: ModelConfig, input_ids, cache: KVCache, attention=None, attention_mask=None,
            progress: bool | None = None):
    """Run the prompt [B, T] into `cache` (donated); returns (last logits [B, V] f32, cache).
    `progress`: per-layer progress on stderr (default: from PROGRESS_FROM tokens on)."""
    attention = resolve_attention(attention)
    ids = check_input_ids(input_ids, config)
    mask = check_attention_mask(attention_mask, ids.shape)
    attention.validate(config)
    if ids.shape[0] != cache.pad.shape[0]:
        raise ValueError(f"input_ids has batch {ids.shape[0]} but the cache was made for {cache.pad.shape[0]}")
    used = int(cache.index)
    if used and not getattr(attention, "supports_continued_prefill", True):
        raise ValueError(f"{type(attention).__name__} supports one prefill per cache followed by decode steps; "
                         "this cache already holds tokens")
    if used and not mask.all():
        raise ValueError("attention_mask: only the first prefill into a cache may hold left padding")
    if used + ids.shape[1] > cache.capacity:
        raise CacheCapacityError(f"prefill of {ids.shape[1]} tokens after {used} overflows the cache "
                                 f"capacity {cache.capacity}; make the cache larger")
    check_memory(config, attention, ids.shape[0], ids.shape[1], jnp.float32, None)  # the cache exists already
    return _prefill_jit(params, jnp.asarray(ids), jnp.asarray(mask), cache, config, attention,
                        _progress_wanted(progress, ids.shape[1]))


def decode_step(params, config: ModelConfig, token, cache: KVCache, attention=None, check: bool = True):
    """Feed one token per row ([B] ids) at the cache cursor; returns (logits [B, V] f32, cache).

    `check=False` skips the host-side checks (token range, cache capacity), which wait for the
    previous step: for timing loops that know their inputs are valid."""
    attention = resolve_attention(attention)
    if not check:
        return _decode_jit(params, jnp.asarray(token, jnp.int32).reshape(-1), cache, config, attention)
    tok = check_input_ids(np.asarray(token).reshape(-1, 1), config, "token")[:, 0]
    if int(cache.index) >= cache.capacity:
        raise CacheCapacityError(f"decode step at slot {int(cache.index)} is past the cache capacity "
                                 f"{cache.capacity}; make the cache larger")
    return _decode_jit(params, jnp.asarray(tok), cache, config, attention)


def _next_token(logits_BV, key, temperature, top_p):
    """Greedy when temperature is 0, else a sample from softmax(logits / temperature) restricted to
    the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    def sample():
        scaled = logits_BV.astype(jnp.float32) / temperature
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        pick = jax.random.categorical(key, jnp.where(before < top_p, sorted_logits, -jnp.inf), axis=-1)
        return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "attention", "capacity", "steps", "kv_dtype", "progress"))
def _generate(params, ids, mask, num_new, config, attention, capacity, steps, key=None, temperature=0.0,
              top_p=1.0, eos_ids=None, kv_dtype=None, progress=False):
    """Prompt then up to `num_new` tokens; with `eos_ids` ([E] int32) the loop stops once every row
    has produced one of them (later slots hold the first EOS id)."""
    TRACE_COUNTS["generate"] += 1
    B = ids.shape[0]
    key = jax.random.PRNGKey(0) if key is None else key
    cache = init_cache(config, B, capacity, attention, cache_dtype(params) if kv_dtype is None else kv_dtype)
    logits, cache = _prefill_impl(params, ids, mask, cache, config, attention, progress)
    key, sub = jax.random.split(key)
    first = _next_token(logits, sub, temperature, top_p)
    is_eos = (lambda t: jnp.zeros(t.shape, bool)) if eos_ids is None else (lambda t: jnp.isin(t, eos_ids))
    fill = jnp.int32(0) if eos_ids is None else eos_ids[0]
    out = jnp.full((B, steps), fill, jnp.int32).at[:, 0].set(first)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < num_new) & ~jnp.all(done)

    def body(state):
        i, cache, tok, out, done, key = state
        logits, cache = _decode_impl(params, tok, cache, config, attention)
        key, sub = jax.random.split(key)
        tok = jnp.where(done, fill, _next_token(logits, sub, temperature, top_p))
        return i + 1, cache, tok, out.at[:, i].set(tok), done | is_eos(tok), key

    state = (jnp.int32(1), cache, first, out, is_eos(first), key)
    return jax.lax.while_loop(cond, body, state)[3]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def generate(params, config: ModelConfig, input_ids, max_new_tokens: int, attention=None,
             attention_mask=None, max_cache_length: int | None = None, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = False, cache_dtype=None,
             progress: bool | None = None):
    """ids [B, T] -> [B, T + max_new_tokens] (prompt followed by new tokens).

    Greedy by default; `temperature` > 0 samples (with `top_p` < 1: nucleus sampling) from a
    PRNG key made from `seed`. With `stop_at_eos` the decode loop ends once every row has produced
    the model's EOS token (the remaining slots then hold EOS). Prompts are left-padded to a multiple
    of 64 and the step count to a power of two, so one compilation serves a range of lengths.
    `max_cache_length` bounds the cache (error if the request does not fit). `cache_dtype`: the KV
    cache's dtype (default: see `choose_cache_dtype`; a request that fits in no dtype fails before
    any work). `progress`: per-layer progress of the prefill on stderr (default: long prompts).
    """
    attention = resolve_attention(attention)
    ids = check_input_ids(input_ids, config)
    mask = check_attention_mask(attention_mask, ids.shape)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    attention.validate(config)
    B, T = ids.shape
    if hasattr(attention, "check_generation"):
        attention.check_generation(T, int(max_new_tokens))
    if max_cache_length is not None and T + max_new_tokens > max_cache_length:
        raise CacheCapacityError(f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds "
                                 f"max_cache_length={max_cache_length}")
    original = ids
    if getattr(attention, "reread", None) is not None:
        ids, mask, attention = reread_prompts(params, config, ids, mask, attention, progress)
        B, T = ids.shape
    eos = config.eos_token_id
    eos_ids = None
    if stop_at_eos and eos is not None:
        eos_ids = jnp.asarray(eos if isinstance(eos, (tuple, list)) else [eos], jnp.int32)
    T_pad = _round_up(T, PROMPT_BUCKET)
    steps = max(16, 1 << (int(max_new_tokens) - 1).bit_length())
    capacity = T_pad + steps
    ids_p = np.zeros((B, T_pad), np.int32)
    mask_p = np.zeros((B, T_pad), bool)
    ids_p[:, T_pad - T:], mask_p[:, T_pad - T:] = ids, mask
    kv_dtype = choose_cache_dtype(config, attention, params, B, T_pad, capacity, cache_dtype)
    new = _generate(params, jnp.asarray(ids_p), jnp.asarray(mask_p), jnp.int32(max_new_tokens), config, attention,
                    capacity, steps, jax.random.PRNGKey(seed), jnp.float32(temperature), jnp.float32(top_p), eos_ids,
                    kv_dtype.name, _progress_wanted(progress, T))
    return jnp.concatenate([jnp.asarray(original), new[:, :max_new_tokens]], axis=1)


def _left_pad(rows: list[np.ndarray], bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [B, T] ids and mask of 1-D rows (T rounded up to a multiple of `bucket`)."""
    T = _round_up(max(len(r) for r in rows), bucket)
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, True
    return ids, mask


def reread_prompts(params, config: ModelConfig, ids, mask, attention, progress=None):
    """`attention.reread` (lh_jax/longheads/reread.py): each row longer than LongHeads reads whole
    is replaced by its re-read prompt, chosen by the votes of the first layers' heads. Returns the
    new (ids, mask) and the attention to answer with (the same settings without re-reading)."""
    from lh_jax.longheads.reread import Voter, pick_chunks, short_prompt
    rr, l = attention.reread, attention.chunk_size
    answer_with = dataclasses.replace(attention, reread=None)
    rows = [np.asarray(r)[m] for r, m in zip(ids, mask)]
    long = [i for i, r in enumerate(rows) if rr.applies(len(r), l, attention.dense_length)]
    if not long:
        return ids, mask, answer_with
    L = rr.voting_layers(config.num_layers)
    sub = {**params, "layers": jax.tree.map(lambda a: a[:L], params["layers"])}
    sub_config = dataclasses.replace(config, num_layers=L)
    vote_ids, vote_mask = _left_pad([rows[i] for i in long], PROMPT_BUCKET)
    check_memory(sub_config, answer_with, *vote_ids.shape, jnp.float32, None)  # the voting pass holds no cache
    if _progress_wanted(progress, vote_ids.shape[1]):
        print(f"[lh-jax] re-read: the first {L} layers vote over {vote_ids.shape[1]} tokens", file=sys.stderr)
    _, aux = _forward(sub, jnp.asarray(vote_ids), jnp.asarray(vote_mask), sub_config,
                      Voter(answer_with, rr, l), True, 1)
    chosen = pick_chunks(rr.over_layers(aux), rr)
    for j, i in enumerate(long):
        rows[i] = short_prompt(rows[i], chosen[j], l, rr.recent, rr.margin)
    ids, mask = _left_pad(rows)
    return ids, mask, answer_with


def cut_at_eos(ids, eos_token_id) -> list[int]:
    """The token ids before the first end-of-sequence id (`eos_token_id`: an int, a tuple, or None)."""
    eos = set() if eos_token_id is None else set(eos_token_id) if isinstance(eos_token_id, (tuple, list)) \
        else {eos_token_id}
    ids = [int(t) for t in ids]
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


def generate_batch(params, config: ModelConfig, prompts, max_new_tokens: int, attention=None) -> list[list[int]]:
    """Greedy continuations of prompts of different lengths (1-D id arrays), run as one left-padded
    batch; each row's new ids cut at its first EOS."""
    ids, mask = _left_pad([np.asarray(p) for p in prompts])
    T = ids.shape[1]
    out = np.asarray(generate(params, config, ids, max_new_tokens, attention=attention, attention_mask=mask))
    return [cut_at_eos(row[T:], config.eos_token_id) for row in out]
