"""Rotary position embeddings (half-split / rotate_half layout), numerically equal to transformers'.

Axis legend: B batch, T tokens, H heads, D head_dim.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig, RopeConfig, yarn_mscale


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
    inv_freq = _base_inv_freq(rope.theta, dim)
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1
    original = rope.original_max_position_embeddings

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extra_weight = 1 - ramp
    inv_freq = interpolation * (1 - extra_weight) + extrapolation * extra_weight
    return inv_freq.astype(np.float32), float(attention_factor)


@dataclasses.dataclass(frozen=True)
class Rope:
    """RoPE of one model; hashable so it can sit in static jit arguments."""

    rope: RopeConfig
    head_dim: int
    max_position_embeddings: int

    @classmethod
    def from_config(cls, config: ModelConfig) -> "Rope":
        return cls(config.rope, config.head_dim, config.max_position_embeddings)

    def static_inv_freq(self) -> tuple[np.ndarray, float]:
        """inv_freq [D/2] and the cos/sin scaling for the position-independent RoPE types."""
        r, d = self.rope, self.head_dim
        if r.freq_factors is not None:
            return (_base_inv_freq(r.theta, d) / np.asarray(r.freq_factors, np.float32)).astype(np.float32), 1.0
        if r.rope_type in ("default", "dynamic"):
            return _base_inv_freq(r.theta, d), 1.0
        if r.rope_type == "linear":
            return _base_inv_freq(r.theta, d) / np.float32(r.factor), 1.0
        if r.rope_type == "llama3":
            return _llama3_inv_freq(r, d), 1.0
        if r.rope_type == "yarn":
            return _yarn_inv_freq(r, d)
        raise AssertionError(r.rope_type)

    def inv_freq(self, seq_len=None):
        """inv_freq [..., D/2] as float32; `seq_len` ([...] array) only matters for dynamic NTK."""
        inv_freq, _ = self.static_inv_freq()
        if self.rope.rope_type != "dynamic" or seq_len is None:
            return jnp.asarray(inv_freq)
        d = self.head_dim
        seq = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(self.max_position_embeddings))
        f = self.rope.factor
        base = self.rope.theta * ((f * seq / self.max_position_embeddings) - (f - 1)) ** (d / (d - 2))
        exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
        return 1.0 / (base[..., None] ** exponents)

    def cos_sin(self, positions, seq_len=None):
        """cos, sin [B, T, D] float32 for integer positions [B, T].

        For dynamic NTK, `seq_len` [B] is each row's current length; transformers uses
        max(position) + 1 of the call, which is the default here too (per row).
        """
        if self.rope.rope_type == "dynamic" and seq_len is None:
            seq_len = jnp.max(positions, axis=-1) + 1
        inv_freq = self.inv_freq(seq_len)
        if inv_freq.ndim == 1:
            inv_freq = inv_freq[None, :]
        # angles in float32: integer positions times float32 inv_freq, as transformers does
        angles = positions.astype(jnp.float32)[..., None] * inv_freq[:, None, :]
        emb = jnp.concatenate([angles, angles], axis=-1)
        _, scale = self.static_inv_freq()
        return jnp.cos(emb) * scale, jnp.sin(emb) * scale

    def apply(self, x_BTHD, positions_BT, seq_len=None, cos_sin=None):
        """Rotate x [B, T, H, D] by positions [B, T]; computed in float32, returned in x.dtype."""
        cos, sin = cos_sin if cos_sin is not None else self.cos_sin(positions_BT, seq_len)
        return rotate(x_BTHD, cos[:, :, None], sin[:, :, None])


def rotate_half(x):
    """[-x2, x1] for x = [x1, x2] split in halves on the last axis (the HF RoPE layout)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate(x, cos, sin):
    """x·cos + rotate_half(x)·sin, computed in float32 with cos/sin broadcast against x; returned in
    x's dtype. The one RoPE rotation of the package."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
