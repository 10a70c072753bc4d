"""One layer's attention prefill on random queries/keys/values: the attention kernel's own time.

`lh-jax bench` times whole prefills, where the MLP and projections (at GEMM peak on the CPU) take
a fixed share; this script isolates the attention of one layer, for tuning the LongHeads kernels
and their knobs (`--tile-rows`, `--selection-segments`, `@dispatch` / `@union`) against full
attention. Shapes are the default model's (9 query / 3 KV heads, head_dim 64) unless given.

    python -m lh_jax.experiments.layer_bench --lengths 4k,16k --attentions full,128x16,256x16@union

Prints a table: per attention and length, the median and best of `--repeats` calls after a warm-up
(compilation reported apart), the attention's matmul work in GFLOP and the rate it implies.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time


def attention_flops(attention, T: int, H: int, D: int) -> float:
    """Matmul flops (QKᵀ and PV) of a causal prefill of T tokens: the dense prefix is full causal
    attention; a later query at t attends to its own chunk up to itself and num_chunks - 1 whole
    earlier chunks (all of them while there are fewer)."""
    import numpy as np

    import lh_jax
    if not isinstance(attention, lh_jax.LongHeads):
        return 4.0 * H * D * T * (T + 1) / 2
    l, N = attention.chunk_size, attention.num_chunks
    Dn = min(attention.dense_length, T)
    t = np.arange(Dn, T, dtype=np.int64)
    selective = float(np.sum(t % l + 1 + np.minimum(t // l, N - 1) * l))
    return 4.0 * H * D * (Dn * (Dn + 1) / 2 + selective)


def time_layer(attention, config, T: int, repeats: int, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    from lh_jax import runtime
    from lh_jax.models.rope import Rope
    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (1, T, H, D), jnp.float32)
    k = jax.random.normal(keys[1], (1, T, K, D), jnp.float32)
    v = jax.random.normal(keys[2], (1, T, K, D), jnp.float32)
    ctx = runtime._context(jnp.ones((1, T), bool), jnp.int32(0), jnp.zeros((1,), jnp.int32))
    rope = Rope.from_config(config)
    attention.validate(config)
    f = jax.jit(lambda q, k, v: attention(q, k, v, config=config, rope=rope, ctx=ctx, cache=None)[0])
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(q, k, v))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, k, v))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"median_ms": 1e3 * med, "best_ms": 1e3 * min(times), "compile_s": max(0.0, first - med),
            "finite": bool(jnp.isfinite(out).all())}


def main(argv=None) -> None:
    import jax

    import lh_jax
    from lh_jax.experiments.bench import parse_lengths
    from lh_jax.experiments.scaling import parse_attention, smollm2_config
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4k,16k", help="sequence lengths, e.g. 4k,16k,32k")
    p.add_argument("--attentions", default="full,128x16,256x16",
                   help="comma list: 'full' or CHUNKxNUM[/CHUNK_REPR][@KERNEL] (LongHeads)")
    p.add_argument("--dense-length", type=int, default=None, help="LongHeads dense prefix (default: the window)")
    p.add_argument("--tile-rows", type=int, default=None, help="LongHeads dispatch kernel: rows per tile")
    p.add_argument("--selection-segments", type=int, default=None,
                   help="LongHeads dispatch kernel: selection segments")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    lengths = parse_lengths(args.lengths)
    knobs = {name: getattr(args, name) for name in ("dense_length", "tile_rows", "selection_segments")
             if getattr(args, name) is not None}
    attentions = []
    for name in args.attentions.split(","):
        a = parse_attention(name.strip())
        if isinstance(a, lh_jax.LongHeads) and knobs:
            a = dataclasses.replace(a, **knobs)
        attentions.append((name.strip(), a))
    config = smollm2_config(num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                            hidden_size=args.heads * args.head_dim,
                            max_position_embeddings=max(8192, max(lengths)))
    dev = jax.devices()[0]
    print(f"# one layer's attention prefill — {dev.platform} ({dev.device_kind}), {args.heads} query / "
          f"{args.kv_heads} kv heads, head_dim {args.head_dim}, float32, median of {args.repeats}"
          + (f", {knobs}" if knobs else ""))
    print("| attention | tokens | median ms | best ms | GFLOP | GFLOP/s | compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for T in lengths:
        for name, a in attentions:
            r = time_layer(a, config, T, args.repeats)
            if not r["finite"]:
                raise SystemExit(f"{name} at {T} tokens produced non-finite outputs")
            gf = attention_flops(a, T, args.heads, args.head_dim) / 1e9
            print(f"| {name} | {T} | {r['median_ms']:.1f} | {r['best_ms']:.1f} | {gf:.3g} | "
                  f"{gf / (r['median_ms'] / 1e3):.0f} | {r['compile_s']:.2f} |", flush=True)


if __name__ == "__main__":
    from lh_jax.cli import set_cpu_opt_level
    set_cpu_opt_level()
    main()
