"""Frozen, hashable model configuration (static under `jax.jit`) and its parsing from HF configs."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class ConfigError(ValueError):
    """A checkpoint configuration that lh-jax cannot represent."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters, with the same meaning as transformers' `rope_parameters`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    attention_factor: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    # per-frequency divisors of the inverse frequencies: llama.cpp's `rope_freqs` tensor, the way
    # GGUF files carry Llama-3 RoPE scaling (inv_freq[i] / freq_factors[i]); with rope_type "default"
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.freq_factors is not None:
            object.__setattr__(self, "freq_factors", tuple(float(f) for f in self.freq_factors))
            if self.rope_type != "default":
                raise ConfigError(f"RoPE freq_factors (GGUF rope_freqs) combine only with rope_type 'default', "
                                  f"not {self.rope_type!r}")
            if not all(f > 0 for f in self.freq_factors):
                raise ConfigError("RoPE freq_factors must all be positive")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"unsupported RoPE type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type != "default" and not (self.factor and self.factor > 0):
            raise ConfigError(f"RoPE type {self.rope_type!r} needs a positive 'factor', got {self.factor!r}")
        if self.rope_type == "llama3" and (self.low_freq_factor is None or self.high_freq_factor is None):
            raise ConfigError("RoPE type 'llama3' needs 'low_freq_factor' and 'high_freq_factor'")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family decoder: LLaMA 2/3, Mistral, Qwen2, SmolLM."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2, some LLaMA variants)
    attention_out_bias: bool = False  # o_proj bias (LLaMA attention_bias=True)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral v0.1
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {self.model_type!r}; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.rope.freq_factors is not None and len(self.rope.freq_factors) != self.head_dim // 2:
            raise ConfigError(f"RoPE freq_factors has {len(self.rope.freq_factors)} entries; head_dim "
                              f"{self.head_dim} needs {self.head_dim // 2}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def trained_length(self) -> int:
        """The context length the model was pre-trained on (before any RoPE scaling)."""
        return self.rope.original_max_position_embeddings or self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    """Read RoPE settings in both transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type == "su" or rope_type == "longrope":
        raise ConfigError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    original = merged.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn") and original is None:
        original = hf.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    factor = merged.get("factor")
    if rope_type == "yarn" and factor is None and original:
        factor = hf["max_position_embeddings"] / original
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(factor) if factor is not None else 1.0,
        original_max_position_embeddings=int(original) if original is not None else None,
        low_freq_factor=merged.get("low_freq_factor"),
        high_freq_factor=merged.get("high_freq_factor"),
        beta_fast=merged.get("beta_fast"),
        beta_slow=merged.get("beta_slow"),
        attention_factor=merged.get("attention_factor"),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        truncate=bool(merged.get("truncate", True)),
    )


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` dict (transformers 4 or 5 spelling)."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: unsupported model_type {model_type!r} (architectures {archs}); supported "
            f"model types: {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(architectures: {', '.join(SUPPORTED_ARCHITECTURES)})")
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise ConfigError(f"{source}: unsupported architecture {bad[0]!r}; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hidden // heads
        if hf.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
            raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
        sliding = None
        if model_type == "mistral":
            sliding = hf.get("sliding_window")
        elif model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: Qwen2 with use_sliding_window=true is not supported")
        bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bias,
            attention_out_bias=bias if model_type == "llama" else False,
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            sliding_window=int(sliding) if sliding else None,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
