"""The `lh-jax` console script: generate, convert, bench, passkey."""
from __future__ import annotations

import argparse
import sys
import time


ATTENTIONS = ("full", "longheads", "longheads-ref", "sliding")


def add_attention_arguments(p: argparse.ArgumentParser, default: str = "full") -> None:
    p.add_argument("--attention", default=default, choices=ATTENTIONS,
                   help="full: the model's own attention; longheads: LongHeads (default mode); "
                        "longheads-ref: the authors' released behaviour; sliding: chunk 0 + recent chunks")
    p.add_argument("--chunk-size", type=int, default=256, help="LongHeads tokens per chunk")
    p.add_argument("--num-chunks", type=int, default=16, help="LongHeads chunks attended per query")
    p.add_argument("--dense-length", type=int, default=None, help="LongHeads dense prefix (default: window)")
    p.add_argument("--chunk-repr", default="attn", choices=["attn", "mean", "bounds"])
    p.add_argument("--positions", default="remap", choices=["remap", "original"])
    p.add_argument("--selection", default="head", choices=["head", "group"])


def attention_spec(args) -> dict:
    return {"name": args.attention, "chunk_size": args.chunk_size, "num_chunks": args.num_chunks,
            "dense_length": args.dense_length, "chunk_repr": args.chunk_repr, "positions": args.positions,
            "selection": args.selection}


def attention_from_spec(spec: dict):
    """Build an attention function from a JSON-able spec (used by CLIs and benchmark workers)."""
    from lh_jax.longheads import LongHeads
    from lh_jax.models.attention import FullAttention
    name = spec.get("name", "full")
    if name == "full":
        return FullAttention()
    common = dict(chunk_size=spec.get("chunk_size", 256), num_chunks=spec.get("num_chunks", 16),
                  dense_length=spec.get("dense_length"))
    if name == "longheads":
        return LongHeads(**common, chunk_repr=spec.get("chunk_repr", "attn"),
                         positions=spec.get("positions", "remap"), selection=spec.get("selection", "head"))
    if name == "longheads-ref":
        return LongHeads(**common, reference=True)
    if name == "sliding":
        return LongHeads(**common, selector="recent")
    raise ValueError(f"unknown attention {name!r}; choose one of {', '.join(ATTENTIONS)}")


def cmd_generate(args) -> None:
    import numpy as np

    import lh_jax
    t0 = time.perf_counter()
    config, params = lh_jax.load(args.model, dtype=args.dtype)
    tok = lh_jax.load_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    prompt = args.prompt
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = np.asarray(tok(prompt, add_special_tokens=False)["input_ids"], dtype=np.int32)[None]
    attention = attention_from_spec(attention_spec(args))
    t0 = time.perf_counter()
    out = np.asarray(lh_jax.generate(params, config, ids, args.max_new_tokens, attention=attention))
    gen_s = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    eos = config.eos_token_id
    eos = set(eos if isinstance(eos, tuple) else [eos]) if eos is not None else set()
    for i, t in enumerate(new):
        if t in eos:
            new = new[:i]
            break
    print(tok.decode(new, skip_special_tokens=True))
    print(f"[{ids.shape[1]} prompt tokens, {args.max_new_tokens} new, load {load_s:.1f}s, "
          f"generate {gen_s:.1f}s incl. compile]", file=sys.stderr)


def cmd_convert(args) -> None:
    from lh_jax.convert import convert
    t0 = time.perf_counter()
    config = convert(args.src, args.dst, dtype=args.dtype)
    print(f"wrote {args.dst} ({config.model_type}, {config.num_layers} layers, {args.dtype}) "
          f"in {time.perf_counter() - t0:.1f}s")


def cmd_bench(args) -> None:
    from lh_jax.experiments import bench
    args.attention_spec = attention_spec(args)
    bench.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lh-jax", description="LongHeads in JAX: generate, convert, bench")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="greedy generation from a prompt")
    g.add_argument("--model", default="default", help="HF dir, .gguf, orbax dir, or 'default'")
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_attention_arguments(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint to an orbax directory")
    c.add_argument("src", help="HF dir, .gguf file, or 'default'")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    c.set_defaults(func=cmd_convert)

    from lh_jax.experiments.bench import add_arguments
    b = sub.add_parser("bench", help="prefill/decode benchmark against transformers")
    add_arguments(b)
    add_attention_arguments(b)
    b.set_defaults(func=cmd_bench)

    from lh_jax.experiments import passkey
    k = sub.add_parser("passkey", help="passkey retrieval accuracy per length and depth")
    passkey.add_arguments(k)
    add_attention_arguments(k)
    k.set_defaults(func=passkey.main)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
