"""Checkpoint converters: Hugging Face (safetensors / .bin), GGUF, and orbax checkpoints."""
from .loader import (TensorShapeError, convert, default_param_specs, load, load_tokenizer,
                     resolve_model_path, save_orbax)
from .sources import WeightFileError

__all__ = ["TensorShapeError", "WeightFileError", "convert", "default_param_specs", "load",
           "load_tokenizer", "resolve_model_path", "save_orbax"]
