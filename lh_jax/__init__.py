"""lh-jax: LongHeads (arXiv 2402.10685) in pure JAX on functional Flax LLaMA-family models."""
from lh_jax.models import FullAttention, ModelConfig
from lh_jax.convert import load, load_tokenizer
from lh_jax.longheads import Dispatch, LongHeads, Reread, sliding_window
from lh_jax.runtime import (CacheCapacityError, KVCache, decode_step, forward, generate, init_cache,
                            prefill)

__version__ = "0.1.0"

__all__ = ["LongHeads", "Dispatch", "Reread", "sliding_window", "FullAttention", "ModelConfig", "load", "load_tokenizer",
           "forward", "generate", "prefill", "decode_step", "init_cache", "KVCache", "CacheCapacityError"]
