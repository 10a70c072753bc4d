"""Long-context methods by name: the one grammar every command and experiment script reads.

    METHOD[:ARG][/OPTION...][+SCALING[:FACTOR]]

    full                         the model's own attention and RoPE
    pi | ntk | yarn [:FACTOR]    RoPE scaling with full attention (default factor: length / trained length)
    sliding:CxN                  chunk 0 + the most recent chunks (a window of C·N tokens)
    longheads[:CxN]              LongHeads (default 256x16); OPTIONs: a chunk representation
                                 (attn, mean, bounds, best-key, attn-parts:16, ...), a selector
                                 (topk, recent), positions (remap, original), selection (head, group),
                                 dense=N, tail=N (exact_tail), bulk=N (bulk_chunks), local=N
                                 (local_chunks), reread=N (generate re-reads N voted chunks; 0:
                                 off), vote=layer-best|sum|max (how the re-read's heads vote); or key=value:
                                 repr=, selector=, positions=, selection=, dense=, tail=, bulk=,
                                 local=, reread=, vote=
    longheads:recommended        lh_jax.LongHeads.recommended() (OPTIONs override it)
    longheads-ref[:CxN]          LongHeads as the authors' released code behaves (option: dense=N)
    +ntk / +pi / +yarn[:FACTOR]  RoPE scaling on top of a window method

    spec = MethodSpec.parse("longheads:128x32/best-key")
    config2, attention = spec.build(config, length=16384)
    lh_jax.generate(params, config2, ids, 8, attention=attention)

A spec is a frozen value holding its canonical name (`spec.name`, also its JSON form), so each
setup compiles once per shape and results files name methods the way the command line does.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from lh_jax.models.config import ModelConfig, RopeConfig

METHODS = ("full", "pi", "ntk", "yarn", "sliding", "longheads", "longheads-ref")
WINDOW_METHODS = ("sliding", "longheads", "longheads-ref")
ROPE_SCALINGS = ("pi", "ntk", "yarn")
_ROPE_TYPE = {"pi": "linear", "ntk": "dynamic", "yarn": "yarn"}
GRAMMAR = "METHOD[:CxN][/OPTION...][+ntk|+pi|+yarn], e.g. 'longheads:128x32/best-key' (see lh_jax.methods)"
_KEYS = ("repr", "selector", "positions", "selection", "dense", "tail", "bulk", "local", "reread", "vote")


def _error(text: str, why: str) -> ValueError:
    return ValueError(f"method {text!r}: {why}; expected {GRAMMAR}; methods: {', '.join(METHODS)}")


def _factor(text: str, part: str) -> float:
    try:
        factor = float(part)
    except ValueError:
        raise _error(text, f"RoPE factor {part!r} is not a number") from None
    if not factor >= 1.0:
        raise _error(text, f"RoPE factor must be >= 1, got {part}")
    return factor


def _window(text: str, part: str) -> tuple[int, int]:
    try:
        chunk_size, num_chunks = (int(x) for x in part.lower().split("x"))
    except ValueError:
        raise _error(text, f"window {part!r} is not CHUNKxNUM like 128x32") from None
    return chunk_size, num_chunks


#: integer OPTIONs of longheads: option -> (LongHeads field, what the value must be)
_INT_OPTIONS = {"tail": ("exact_tail", "a non-negative integer"), "bulk": ("bulk_chunks", "a positive integer (chunks)"),
                "local": ("local_chunks", "a non-negative integer (chunks)"),
                "reread": ("reread", "a non-negative integer (chunks re-read; 0: off)")}


def _options(text: str, method: str, options: list[str]) -> dict[str, Any]:
    """OPTION tokens -> LongHeads keyword arguments."""
    from lh_jax.longheads import POSITION_SCHEMES, SELECTORS
    out: dict[str, Any] = {}
    for token in options:
        key, eq, value = token.partition("=")
        if not eq:  # a bare token: its vocabulary says what it sets
            key, value = ("positions" if token in POSITION_SCHEMES else "selection" if token in ("head", "group")
                          else "selector" if token in SELECTORS else "repr"), token
        if key not in _KEYS:
            raise _error(text, f"unknown option {key!r} (known: {', '.join(_KEYS)})")
        if key in _INT_OPTIONS:
            field, what = _INT_OPTIONS[key]
            if method != "longheads" or not value.isdigit():
                raise _error(text, f"{key}={value!r}: {what}, for longheads only")
            out[field] = int(value)
            if field == "reread":
                from lh_jax.longheads import Reread
                out[field] = Reread(chunks=int(value)) if int(value) else None
            continue
        if method != "longheads" and key != "dense":
            raise _error(text, f"{method} takes only the option dense=N, got {token!r}")
        if key == "dense":
            if not value.isdigit():
                raise _error(text, f"dense={value!r} is not a non-negative integer")
            out["dense_length"] = int(value)
        else:
            out["chunk_repr" if key == "repr" else key] = value
    return out


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method by its name in the grammar above; `name` is canonical after construction.

    Attributes (derived from the name): method, attention (the LongHeads settings of a window
    method, else None), rope_scaling ("none", "pi", "ntk" or "yarn"), rope_factor (None: length /
    trained length, at least 1).
    """

    name: str = "full"
    method: str = dataclasses.field(init=False, compare=False)
    longheads: Any = dataclasses.field(init=False, compare=False, repr=False)
    rope_scaling: str = dataclasses.field(init=False, compare=False)
    rope_factor: float | None = dataclasses.field(init=False, compare=False)

    def __post_init__(self):
        text = self.name.strip() if isinstance(self.name, str) else self.name
        if not isinstance(text, str) or not text:
            raise _error(str(self.name), "empty")
        base, plus, scaling = text.partition("+")
        head, *options = base.split("/")
        method, colon, arg = head.partition(":")
        method = method.strip().lower()
        if method not in METHODS:
            raise _error(text, f"unknown method {method!r}")
        rope_scaling, factor = "none", None
        if plus:
            if method not in WINDOW_METHODS:
                raise _error(text, f"+{scaling} combines a RoPE scaling with a window method, not with {method}")
            rope_scaling, _, f = scaling.partition(":")
            if rope_scaling not in ROPE_SCALINGS:
                raise _error(text, f"unknown RoPE scaling +{rope_scaling} (choose +pi, +ntk or +yarn)")
            factor = _factor(text, f) if f else None
        longheads = None
        if method in ROPE_SCALINGS:
            rope_scaling, factor = method, (_factor(text, arg) if colon else None)
        if method in ("full",) + ROPE_SCALINGS and options:
            raise _error(text, f"{method} takes no options")
        if method == "full" and colon:
            raise _error(text, "full takes no argument")
        if method in WINDOW_METHODS:
            longheads = self._window_settings(text, method, arg if colon else "", options)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "longheads", longheads)
        object.__setattr__(self, "rope_scaling", rope_scaling)
        object.__setattr__(self, "rope_factor", factor)
        object.__setattr__(self, "name", self._canonical(arg if colon else "", options))

    @staticmethod
    def _window_settings(text: str, method: str, arg: str, options: list[str]):
        from lh_jax.longheads import LongHeads
        kwargs = _options(text, method, options)
        vote = kwargs.pop("vote", None)  # how re-reading votes: set on the settings the rest make
        try:
            if method == "longheads" and arg == "recommended":
                lh = dataclasses.replace(LongHeads.recommended(), **kwargs)
            else:
                window = dict(zip(("chunk_size", "num_chunks"), _window(text, arg))) if arg else {}
                extra = {"selector": "recent"} if method == "sliding" else {"reference": True} \
                    if method == "longheads-ref" else {}
                lh = LongHeads(**window, **kwargs, **extra)
            if vote is not None:
                if lh.reread is None:
                    raise ValueError(f"vote={vote} sets how re-reading votes, but re-reading is off")
                lh = dataclasses.replace(lh, reread=dataclasses.replace(lh.reread, combine=vote))
            return lh
        except (ValueError, TypeError) as e:
            raise _error(text, str(e)) from None

    def _canonical(self, arg: str, options: list[str]) -> str:
        name = self.method
        if self.method in ROPE_SCALINGS:
            return name + (f":{self.rope_factor:g}" if self.rope_factor is not None else "")
        lh = self.longheads
        if lh is not None:
            if arg == "recommended":
                name += ":recommended" + "".join(f"/{o}" for o in options)
            else:
                name += f":{lh.chunk_size}x{lh.num_chunks}"
                if lh.chunk_repr != "attn":
                    name += f"/{lh.chunk_repr}"
                for key, default in (("selector", "topk"), ("positions", "remap"), ("selection", "head")):
                    if self.method == "longheads" and getattr(lh, key) != default:
                        name += f"/{getattr(lh, key)}"
                if lh.dense_length != lh.window:
                    name += f"/dense={lh.dense_length}"
                if lh.exact_tail:
                    name += f"/tail={lh.exact_tail}"
                if lh.bulk_chunks not in (None, lh.num_chunks):
                    name += f"/bulk={lh.bulk_chunks}"
                if lh.local_chunks > 1:
                    name += f"/local={lh.local_chunks}"
                if lh.reread is not None:
                    name += f"/reread={lh.reread.chunks}"
                    if lh.reread.combine != type(lh.reread)().combine:  # the default vote is not named
                        name += f"/vote={lh.reread.combine}"
        if self.rope_scaling != "none":
            name += f"+{self.rope_scaling}" + (f":{self.rope_factor:g}" if self.rope_factor is not None else "")
        return name

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        return cls(text)

    @property
    def label(self) -> str:
        """The name, for tables and plots."""
        return self.name

    def to_dict(self) -> dict:
        return {"method": self.name}

    @property
    def resolved_name(self) -> str:
        """The name with a named setting spelled out ("longheads:recommended" -> its chunk size,
        count, representation, tail, ...): what the method computes today."""
        if self.longheads is None or not self.name.startswith("longheads:recommended"):
            return self.name
        return MethodSpec(self._canonical("", [])).name

    def cell_fields(self) -> dict:
        """Result-cache key fields: {} for a spelled-out name, else {"resolved": resolved_name}, so
        a cell computed before `LongHeads.recommended()` changed is not reused under its name."""
        return {} if self.resolved_name == self.name else {"resolved": self.resolved_name}

    @classmethod
    def from_dict(cls, d: dict) -> "MethodSpec":
        if set(d) != {"method"}:
            raise ValueError(f"a method spec dict holds exactly {{'method': NAME}}, got keys {sorted(d)}")
        return cls(d["method"])

    def scaled_config(self, config: ModelConfig, length: int) -> ModelConfig:
        if self.rope_scaling == "none":
            return config
        trained = config.trained_length
        factor = self.rope_factor if self.rope_factor is not None else max(1.0, length / trained)
        rope = RopeConfig(theta=config.rope.theta, rope_type=_ROPE_TYPE[self.rope_scaling], factor=float(factor),
                          original_max_position_embeddings=trained)
        return dataclasses.replace(config, rope=rope)

    def attention(self):
        from lh_jax.models.attention import FullAttention
        return FullAttention() if self.longheads is None else self.longheads

    def build(self, config: ModelConfig, length: int) -> tuple[ModelConfig, Any]:
        """(config, attention) for sequences of about `length` tokens."""
        return self.scaled_config(config, length), self.attention()


def parse_methods(text: str) -> list[MethodSpec]:
    """A comma list of method names -> specs (duplicates, by canonical name, dropped)."""
    specs: dict[str, MethodSpec] = {}
    for part in text.split(","):
        if part.strip():
            spec = MethodSpec(part)
            specs.setdefault(spec.name, spec)
    if not specs:
        raise ValueError(f"no method given in {text!r}; expected a comma list of {GRAMMAR}")
    return list(specs.values())


def _method_arg(text: str) -> MethodSpec:
    try:
        return MethodSpec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _methods_arg(text: str) -> list[MethodSpec]:
    try:
        return parse_methods(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_method_arguments(p: argparse.ArgumentParser, multiple: bool = False, default: str = "full") -> None:
    """`--methods a,b` (when `multiple`) or `--attention a`: names in the grammar above, checked
    by argparse (a bad name is a usage error naming it)."""
    if multiple:
        p.add_argument("--methods", default=_methods_arg(default), type=_methods_arg,
                       help=f"comma list of methods, each {GRAMMAR} (default: {default})")
    else:
        p.add_argument("--attention", default=_method_arg(default), type=_method_arg,
                       help=f"the method: {GRAMMAR} (default: {default})")
