"""Decode ms/token against context length, LongHeads vs full attention, side by side.

Decode cost does not depend on what the cache holds (LongHeads reads a fixed number of chunks per
head; full attention reads every cached key), so the cache is filled only up to its cursor with
zeros instead of a multi-minute prefill: this isolates how one step scales with the context.
`python -m lh_jax.experiments.decode_scaling --lengths 4k,16k,32k --windows 128x16,256x16`
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="default")
    p.add_argument("--lengths", default="4k,16k,32k")
    p.add_argument("--windows", default="128x16,256x16", help="LongHeads CHUNKxNUM, comma list")
    p.add_argument("--steps", type=int, default=8, help="timed steps per cell (median)")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    import lh_jax
    from lh_jax import runtime
    from lh_jax.experiments.bench import parse_lengths

    lengths = parse_lengths(args.lengths)
    config, params = lh_jax.load(args.model, progress=False)
    methods = [(f"longheads {w}", lh_jax.LongHeads(*(int(x) for x in w.split("x"))))
               for w in args.windows.split(",")] + [("full", lh_jax.FullAttention())]
    rows = []
    for name, att in methods:
        for n in lengths:
            cache = lh_jax.init_cache(config, 1, n + 64, att).replace(index=jnp.asarray(n, jnp.int32))
            tok = jnp.zeros((1,), jnp.int32)
            logits, cache = runtime._decode_jit(params, tok, cache, config, att)
            logits.block_until_ready()
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                logits, cache = runtime._decode_jit(params, tok, cache, config, att)
                logits.block_until_ready()
                times.append(time.perf_counter() - t0)
            rows.append((name, n, float(np.median(times)) * 1e3))
    print(f"# decode scaling — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{datetime.date.today()}, model {args.model}, median of {args.steps} steps")
    print("| attention | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    for name, _ in methods:
        print(f"| {name} | " + " | ".join(f"{ms:.1f}" for m, n, ms in rows if m == name) + " |")


if __name__ == "__main__":
    from lh_jax.cli import set_cpu_opt_level
    set_cpu_opt_level()
    main()
