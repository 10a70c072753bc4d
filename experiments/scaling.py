"""Prefill and decode time against context length, several attentions side by side in one process.

Meant for accelerators and long contexts (where `lh-jax bench`'s one-process-per-cell and the
PyTorch baseline do not fit): for each length and attention, the median of `--repeats` prefills
after a warm-up (compilation reported apart), then the median of `--decode-steps` decode steps.
A cell that runs out of memory is reported as such and the sweep goes on.

    python -m lh_jax.experiments.scaling --lengths 4k,16k,64k,128k --attentions full,256x16,128x16

`--random-weights` uses random parameters of the model's shape (timing does not depend on the
values); with `--model default` the shape of the embedded SmolLM2-135M is known without its file.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

# The embedded default model's shape (SmolLM2-135M-Instruct), for --random-weights without the file.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)


def parse_attention(name: str):
    """'full' or 'CHUNKxNUM[/CHUNK_REPR][@KERNEL]' (LongHeads with dense_length = the window;
    KERNEL: dispatch | union, the selective-prefill kernel)."""
    import lh_jax
    if name == "full":
        return lh_jax.FullAttention()
    spec, _, kernel = name.partition("@")
    head, _, rep = spec.partition("/")
    try:
        cs, nc = (int(x) for x in head.lower().split("x"))
    except ValueError:
        raise ValueError(f"--attentions: {name!r} is neither 'full' nor CHUNKxNUM[/CHUNK_REPR][@KERNEL]") from None
    return lh_jax.LongHeads(cs, nc, chunk_repr=rep or "attn", kernel=kernel or "dispatch")


def smollm2_config(**overrides):
    """A ModelConfig of the embedded model's shape (SMOLLM2_135M), with fields overridden."""
    import lh_jax
    from lh_jax.models.config import RopeConfig
    c = dict(SMOLLM2_135M, **overrides)
    return lh_jax.ModelConfig(rope=RopeConfig(theta=c.pop("rope_theta")), **c)


def random_model(args):
    import jax
    import jax.numpy as jnp

    import lh_jax
    from lh_jax.models.llama import param_shapes
    if args.model == "default":
        config = smollm2_config()
    else:
        config, _ = lh_jax.load(args.model, dtype=args.dtype, progress=False)
    shapes = param_shapes(config, args.dtype)
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(args.seed), len(leaves))
    vals = [(0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype) for k, s in zip(keys, leaves)]
    params = jax.tree_util.tree_unflatten(tree, vals)
    # RMSNorm scales of 1, as a trained model has about
    params["final_norm"]["scale"] = jnp.ones_like(params["final_norm"]["scale"])
    for n in ("input_norm", "post_norm"):
        params["layers"][n]["scale"] = jnp.ones_like(params["layers"][n]["scale"])
    return config, params


def time_cell(params, config, attention, length: int, repeats: int, decode_steps: int, seed: int) -> dict:
    from lh_jax.experiments.bench import measure_jax
    ids = np.random.default_rng(seed).integers(3, min(config.vocab_size, 40000), size=(1, length), dtype=np.int32)
    m = measure_jax(params, config, attention, ids, repeats, decode_steps)
    m["nonfinite"] = not bool(np.isfinite(np.asarray(m.pop("logits"), np.float32)).all())
    return m


def main(argv=None) -> None:
    import jax

    import lh_jax
    from lh_jax.experiments.bench import parse_lengths
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--random-weights", action="store_true", help="random parameters of the model's shape")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--lengths", default="4k,8k,16k,32k")
    p.add_argument("--attentions", default="full,128x16,256x16", help="comma list: full, CHUNKxNUM[/CHUNK_REPR][@dispatch|union]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    lengths = parse_lengths(args.lengths)
    attentions = [(a, parse_attention(a)) for a in args.attentions.split(",") if a.strip()]
    if args.random_weights:
        config, params = random_model(args)
    else:
        config, params = lh_jax.load(args.model, dtype=args.dtype, progress=False)
    device = str(jax.devices()[0].device_kind)
    print(f"[scaling] {device}, {args.dtype}, {'random' if args.random_weights else args.model} weights",
          file=sys.stderr, flush=True)
    rows = []
    for n in lengths:
        for name, attention in attentions:
            row = {"attention": name, "tokens": n, "device": device, "dtype": args.dtype}
            try:
                row.update(time_cell(params, config, attention, n, args.repeats, args.decode_steps, args.seed))
            except Exception as e:  # noqa: BLE001 - out of memory etc.: report and go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
    print(f"| attention | tokens | prefill s | tokens/s | decode ms/token | compile s |  ({device}, {args.dtype})")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['attention']} | {r['tokens']} | {r['error']} | | | |")
        else:
            print(f"| {r['attention']} | {r['tokens']} | {r['prefill_s']:.3f} | {r['tokens_per_s']:.0f} | "
                  f"{r['decode_ms']:.2f} | {r['compile_s']:.1f} |" + (" NaN!" if r["nonfinite"] else ""))


if __name__ == "__main__":
    from lh_jax.cli import set_cpu_opt_level
    set_cpu_opt_level()
    main()
