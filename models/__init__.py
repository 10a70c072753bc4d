"""LLaMA-family models in functional Flax: config, RoPE, attention interface, decoder."""
from . import softmax
from .attention import AttentionContext, FullAttention, attend, attend_stats
from .config import ConfigError, ModelConfig, RopeConfig, config_from_hf
from .llama import Transformer, param_shapes
from .rope import Rope

__all__ = ["AttentionContext", "FullAttention", "attend", "attend_stats", "softmax", "ConfigError", "ModelConfig",
           "RopeConfig", "config_from_hf", "Transformer", "param_shapes", "Rope"]
