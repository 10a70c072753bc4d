"""Long-context methods selectable by name: one place that turns a name + flags into a model setup.

A method is a pair (model config, attention function): RoPE-scaling methods change the config
(`pi`, `ntk`, `yarn`), window methods change the attention (`sliding`, `longheads`,
`longheads-ref`), and `--rope-scaling` combines a window method with a RoPE scaling (e.g.
LongHeads + NTK). Everything is a frozen value, so each setup compiles once per shape.

    spec = MethodSpec("longheads", chunk_size=128, num_chunks=16)
    config2, attention = spec.build(config, length=16384)
    lh_jax.generate(params, config2, ids, 8, attention=attention)
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from lh_jax.models.config import ModelConfig, RopeConfig

METHODS = ("full", "pi", "ntk", "yarn", "sliding", "longheads", "longheads-ref")
ROPE_SCALINGS = ("none", "pi", "ntk", "yarn")
_ROPE_TYPE = {"pi": "linear", "ntk": "dynamic", "yarn": "yarn"}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A named method and its parameters (JSON-able through `to_dict` / `from_dict`).

    rope_factor: the scaling factor of pi/ntk/yarn (None: length / trained length, at least 1,
    so each evaluated length gets the factor that just covers it).
    rope_scaling: a RoPE scaling applied on top of a window method ("none" by default).
    """

    method: str = "full"
    chunk_size: int = 256
    num_chunks: int = 16
    dense_length: int | None = None
    chunk_repr: str = "attn"
    positions: str = "remap"
    selection: str = "head"
    rope_factor: float | None = None
    rope_scaling: str = "none"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"unknown rope_scaling {self.rope_scaling!r}; choose one of {', '.join(ROPE_SCALINGS)}")
        if self.rope_factor is not None and not self.rope_factor >= 1.0:
            raise ValueError(f"rope_factor must be >= 1, got {self.rope_factor!r}")

    @property
    def label(self) -> str:
        """A short unique name for tables and plots, e.g. 'longheads 128x16' or 'ntk'."""
        name = self.method
        if self.method in ("sliding", "longheads", "longheads-ref"):
            name += f" {self.chunk_size}x{self.num_chunks}"
            if self.dense_length is not None and self.dense_length != self.chunk_size * self.num_chunks:
                name += f" d{self.dense_length}"
        if self.method == "longheads":
            extra = [f"{k}={getattr(self, k)}" for k, d in (("chunk_repr", "attn"), ("positions", "remap"),
                                                             ("selection", "head")) if getattr(self, k) != d]
            if extra:
                name += " " + ",".join(extra)
        if self.rope_scaling != "none":
            name += f" +{self.rope_scaling}"
        if self.rope_factor is not None and (self.method in _ROPE_TYPE or self.rope_scaling != "none"):
            name += f" f{self.rope_factor:g}"
        return name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MethodSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown method fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def scaled_config(self, config: ModelConfig, length: int) -> ModelConfig:
        scaling = self.method if self.method in _ROPE_TYPE else self.rope_scaling
        if scaling == "none":
            return config
        trained = config.trained_length
        factor = self.rope_factor if self.rope_factor is not None else max(1.0, length / trained)
        rope = RopeConfig(theta=config.rope.theta, rope_type=_ROPE_TYPE[scaling], factor=float(factor),
                          original_max_position_embeddings=trained)
        return dataclasses.replace(config, rope=rope)

    def attention(self):
        from lh_jax.longheads import LongHeads, sliding_window
        from lh_jax.models.attention import FullAttention
        if self.method in ("full",) + tuple(_ROPE_TYPE):
            return FullAttention()
        if self.method == "sliding":
            return sliding_window(self.chunk_size, self.num_chunks, self.dense_length)
        if self.method == "longheads-ref":
            return LongHeads(self.chunk_size, self.num_chunks, self.dense_length, reference=True)
        return LongHeads(self.chunk_size, self.num_chunks, self.dense_length, chunk_repr=self.chunk_repr,
                         positions=self.positions, selection=self.selection)

    def build(self, config: ModelConfig, length: int) -> tuple[ModelConfig, Any]:
        """(config, attention) for sequences of about `length` tokens."""
        return self.scaled_config(config, length), self.attention()


def _chunk_repr_name(text: str) -> str:
    from lh_jax.chunks import chunk_repr_from_name
    try:
        chunk_repr_from_name(text, chunk_size=1)  # only the name is checked here; any size will do
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_method_arguments(p: argparse.ArgumentParser, multiple: bool = False, default: str = "full") -> None:
    """Method flags shared by every command (`--methods a,b` when `multiple`, else `--attention`)."""
    if multiple:
        p.add_argument("--methods", default=default,
                       help=f"comma list of methods: {', '.join(METHODS)}")
    else:
        p.add_argument("--attention", default=default, choices=METHODS,
                       help="full: the model's own attention; pi / ntk / yarn: RoPE scaling with full attention; "
                            "sliding: chunk 0 + recent chunks; longheads: LongHeads; longheads-ref: the authors' "
                            "released behaviour")
    p.add_argument("--chunk-size", type=int, default=256, help="chunk size (sliding / LongHeads)")
    p.add_argument("--num-chunks", type=int, default=16, help="chunks attended per query (sliding / LongHeads)")
    p.add_argument("--dense-length", type=int, default=None, help="LongHeads dense prefix (default: the window)")
    p.add_argument("--chunk-repr", default="attn", type=_chunk_repr_name,
                   help="LongHeads chunk representation (ablation): attn (the paper), mean, bounds (Quest), "
                        "attn-parts / mean-parts / bounds-parts (best of 8 sub-chunk summaries; "
                        "'attn-parts:16' for 16), best-key (a chunk scores its best single key)")
    p.add_argument("--positions", default="remap", choices=["remap", "original"],
                   help="LongHeads position scheme (ablation)")
    p.add_argument("--selection", default="head", choices=["head", "group"],
                   help="LongHeads: one selection per query head or per kv group (ablation)")
    p.add_argument("--rope-factor", type=float, default=None,
                   help="pi/ntk/yarn factor (default: length / trained length, at least 1)")
    p.add_argument("--rope-scaling", default="none", choices=ROPE_SCALINGS,
                   help="RoPE scaling combined with a window method, e.g. LongHeads + ntk")


def specs_from_args(args) -> list[MethodSpec]:
    names = args.methods.split(",") if hasattr(args, "methods") else [args.attention]
    out = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        out.append(MethodSpec(name, args.chunk_size, args.num_chunks, args.dense_length, args.chunk_repr,
                              args.positions, args.selection, args.rope_factor, args.rope_scaling))
    if not out:
        raise ValueError("no method given")
    return out
