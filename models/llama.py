"""One LLaMA-style decoder (LLaMA 2/3, Mistral, Qwen2, SmolLM) as functional Flax linen.

Axis legend: B batch, T tokens, L layers, E hidden size, F MLP size, H query heads,
K kv heads, D head_dim, V vocabulary.

Params are an explicit pytree; the per-layer params are stacked on a leading L axis and the
layers run under `jax.lax.scan`, so compile time does not grow with depth. The attention function is
a module attribute (static), the KV cache a pytree passed in and returned.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import AttentionContext
from .config import ModelConfig
from .rope import Rope


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


def _dot_f32_acc(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """dot_general accumulating in float32 whatever the inputs: with bfloat16 params the product
    keeps float32 partial sums, and XLA's CPU backend takes its bfloat16 GEMM path (2x the float32
    throughput on CPUs with AVX512-BF16) instead of a bfloat16-output dot at float32 speed."""
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=jnp.float32)


class _Dense(nn.Dense):
    """nn.Dense in the params' dtype with float32 accumulation; output in `dtype`."""

    dot_general: Any = _dot_f32_acc

    def __call__(self, x):
        return super().__call__(x).astype(self.dtype)


def _dense(features, use_bias, dtype, name):
    return _Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, name=name,
                  kernel_init=nn.initializers.normal(0.02))


class DecoderLayer(nn.Module):
    config: ModelConfig
    attention: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTE, cache, ctx: AttentionContext):
        """x [B, T, E], this layer's cache (or None), ctx -> (x, (cache writes, aux))."""
        cfg = self.config
        B, T, _ = x_BTE.shape
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_norm")(x_BTE)
        q = _dense(cfg.num_heads * cfg.head_dim, cfg.attention_bias, self.dtype, "q_proj")(h)
        k = _dense(cfg.num_kv_heads * cfg.head_dim, cfg.attention_bias, self.dtype, "k_proj")(h)
        v = _dense(cfg.num_kv_heads * cfg.head_dim, cfg.attention_bias, self.dtype, "v_proj")(h)
        q_BTHD = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
        k_BTKD = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        v_BTKD = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        out_BTHD, writes, aux = self.attention(q_BTHD, k_BTKD, v_BTKD, config=cfg,
                                              rope=Rope.from_config(cfg), ctx=ctx, cache=cache)
        out = out_BTHD.reshape(B, T, cfg.num_heads * cfg.head_dim).astype(self.dtype)
        x_BTE = x_BTE + _dense(cfg.hidden_size, cfg.attention_out_bias, self.dtype, "o_proj")(out)
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_norm")(x_BTE)
        gate = _dense(cfg.intermediate_size, cfg.mlp_bias, self.dtype, "gate_proj")(h)
        up = _dense(cfg.intermediate_size, cfg.mlp_bias, self.dtype, "up_proj")(h)
        x_BTE = x_BTE + _dense(cfg.hidden_size, cfg.mlp_bias, self.dtype, "down_proj")(nn.silu(gate) * up)
        return x_BTE, (writes, aux)


class Transformer(nn.Module):
    """ids [B, T] -> logits [B, T', V] float32 (T' = T, or the last `logits_to_keep`), new cache, aux.

    With `hidden_only` the first output is the final-normed hidden state [B, T', E] instead of the
    logits (the caller applies the LM head, e.g. in blocks of tokens; see `lm_head_weight`).
    """

    config: ModelConfig
    attention: Any
    dtype: Any = jnp.float32
    # called on the host after each layer of a multi-token pass with (layer, layers): progress of long prefills
    layer_callback: Any = None

    @nn.compact
    def __call__(self, ids_BT, ctx: AttentionContext, cache=None, logits_to_keep: int | None = None,
                 hidden_only: bool = False):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        x = embed(ids_BT)
        L = cfg.num_layers
        layer = DecoderLayer(cfg, self.attention, self.dtype, parent=None)

        def init_layers(rng):  # stacked per-layer params, one independent init per layer
            return jax.vmap(lambda r: layer.init(r, x, None, ctx)["params"])(jax.random.split(rng, L))

        # read the stacked params directly when present: `self.param` would trace `init_layers`
        # (every layer, attention included) once more just to check their shapes
        if self.has_variable("params", "layers"):
            stacked = self.get_variable("params", "layers")
        else:
            stacked = self.param("layers", init_layers)
        # the layers run under jax.lax.scan over the stacked params: one trace of the layer body
        # (nn.scan traces it twice), and compile time does not grow with depth
        if cache is not None and ids_BT.shape[1] > 1:
            # prefill: the scan carries the (donated) stacked cache; each step reads its layer's
            # slice, runs the layer and writes the slice back, so the new entries of all layers
            # never exist beside the cache (peak memory ~ one cache)
            def prefill_body(carry, xs):
                x, cache = carry
                params, i = xs
                layer_cache = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, i, 0, keepdims=False), cache)
                x, (writes, aux) = layer.apply({"params": params}, x, layer_cache, ctx)
                one = lambda tree: jax.tree.map(lambda a: a[None], tree)
                new = self.attention.write_cache(one(layer_cache), one(writes), ctx)
                cache = jax.tree.map(lambda c, n: jax.lax.dynamic_update_index_in_dim(c, n[0].astype(c.dtype), i, 0),
                                     cache, new)
                if self.layer_callback is not None:
                    jax.debug.callback(self.layer_callback, i, L, ordered=True)
                return (x, cache), aux

            (x, cache), aux = jax.lax.scan(prefill_body, (x, cache), (stacked, jnp.arange(L, dtype=jnp.int32)))
        else:
            # decode (or no cache): one token's writes per layer, stacked and applied after the scan,
            # so the cache is updated in place instead of copied layer by layer
            def body(x, xs):
                params, layer_cache, i = xs
                out = layer.apply({"params": params}, x, layer_cache, ctx)
                if self.layer_callback is not None and ids_BT.shape[1] > 1:
                    jax.debug.callback(self.layer_callback, i, L, ordered=True)
                return out

            x, (writes, aux) = jax.lax.scan(body, x, (stacked, cache, jnp.arange(L, dtype=jnp.int32)))
            if cache is not None:
                cache = self.attention.write_cache(cache, writes, ctx)
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_norm")(x)
        if hidden_only:
            return x, cache, aux
        if cfg.tie_word_embeddings:
            w_EV = embed.embedding.T
        else:
            w_EV = self.param("lm_head", nn.initializers.normal(0.02),
                              (cfg.hidden_size, cfg.vocab_size), self.dtype)
        logits = jnp.einsum("BTE,EV->BTV", x, w_EV.astype(x.dtype), preferred_element_type=jnp.float32)
        return logits, cache, aux


def lm_head_weight(params, config: ModelConfig):
    """The LM head as [E, V] (the transposed embedding when tied), in the params' dtype."""
    return params["embed"]["embedding"].T if config.tie_word_embeddings else params["lm_head"]


def param_shapes(config: ModelConfig, dtype=jnp.float32) -> dict:
    """The params pytree of `config` as ShapeDtypeStructs (what a converter must produce)."""
    c, L = config, config.num_layers
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))

    def dense(n_in, n_out, bias):
        d = {"kernel": s(L, n_in, n_out)}
        if bias:
            d["bias"] = s(L, n_out)
        return d

    H, K, D, E, F = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    layers = {
        "input_norm": {"scale": s(L, E)},
        "q_proj": dense(E, H * D, c.attention_bias),
        "k_proj": dense(E, K * D, c.attention_bias),
        "v_proj": dense(E, K * D, c.attention_bias),
        "o_proj": dense(H * D, E, c.attention_out_bias),
        "post_norm": {"scale": s(L, E)},
        "gate_proj": dense(E, F, c.mlp_bias),
        "up_proj": dense(E, F, c.mlp_bias),
        "down_proj": dense(F, E, c.mlp_bias),
    }
    tree = {"embed": {"embedding": s(c.vocab_size, E)}, "layers": layers,
            "final_norm": {"scale": s(E)}}
    if not c.tie_word_embeddings:
        tree["lm_head"] = s(E, c.vocab_size)
    return tree
