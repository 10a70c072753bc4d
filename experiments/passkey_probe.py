"""Why does a passkey prompt fail? Probe one prompt per depth with three measurements:

1. p(" ") — the probability of the token that precedes the digits, right after the question
   ("... The pass key is"), for full attention and for LongHeads;
2. which (layer, query head) pairs select the needle's chunk at the answer step
   (`LongHeads(record_selection=True)`);
3. p(" ") when an oracle selector forces the needle's chunk into the selection of every head in a
   range of layers (`--force-layers 17-24`), the other layers selecting as usual.

    python -m lh_jax.experiments.passkey_probe --length 8k --depths 0.15,0.35 --chunk-size 256 \\
        --num-chunks 16 --force-layers 0-30,17-24 --full

The model's own tokenizer must split " 12345" into " " + digits (SmolLM2 does); otherwise p(" ")
is not the quantity described and the script says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def _layer_ranges(text: str, num_layers: int) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, hi = (int(x) for x in part.split("-"))
        if not 0 <= lo < hi <= num_layers:
            raise ValueError(f"--force-layers {part!r}: need 0 <= lo < hi <= {num_layers}")
        out.append((lo, hi))
    return out


def main(argv=None) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import lh_jax
    from lh_jax import runtime
    from lh_jax.longheads import select_chunks
    from lh_jax.experiments.passkey import NEEDLE, QUESTION, build_prompt, load_haystack, passkey_for
    from lh_jax.experiments.perplexity import parse_tokens
    from lh_jax.models.llama import DecoderLayer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--length", default="8k")
    p.add_argument("--depths", default="0.15,0.35,0.75")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--num-chunks", type=int, default=16)
    p.add_argument("--chunk-repr", default="attn")
    p.add_argument("--selection", default="head", choices=["head", "group"])
    p.add_argument("--method", default=None, metavar="SPEC",
                   help="a LongHeads method by its CLI name (e.g. longheads:recommended); overrides "
                        "--chunk-size/--num-chunks/--chunk-repr/--selection")
    p.add_argument("--force-layers", default="", help="comma list of lo-hi layer ranges (hi exclusive)")
    p.add_argument("--full", action="store_true", help="also score the prompt with full attention")
    p.add_argument("--haystack", default=None, metavar="FILE|play:NAME", help="as `lh-jax passkey --haystack`")
    p.add_argument("--needle", default=NEEDLE, help="needle template with {key}")
    p.add_argument("--question", default=QUESTION)
    args = p.parse_args(argv)
    haystack, _ = load_haystack(args.haystack)

    n = parse_tokens(args.length, "--length")
    depths = [float(d) for d in args.depths.split(",")]
    config, params = lh_jax.load(args.model, progress=False)
    tok = lh_jax.load_tokenizer(args.model)
    ranges = _layer_ranges(args.force_layers, config.num_layers)
    space = tok(" ", add_special_tokens=False)["input_ids"]
    if len(space) != 1 or tok(" 12345", add_special_tokens=False)["input_ids"][0] != space[0]:
        raise SystemExit("this tokenizer does not split ' 12345' into ' ' + digits; p(' ') is not meaningful")
    space = space[0]
    l = args.chunk_size
    if args.method:
        from lh_jax.methods import MethodSpec
        spec = MethodSpec(args.method)
        if spec.longheads is None or spec.rope_scaling != "none":
            raise SystemExit(f"--method {args.method!r}: need a LongHeads method without RoPE scaling")
        lh = dataclasses.replace(spec.longheads, record_selection=True)
        l = lh.chunk_size
    else:
        lh = lh_jax.LongHeads(chunk_size=l, num_chunks=args.num_chunks, chunk_repr=args.chunk_repr,
                              selection=args.selection, record_selection=True)
    L = config.num_layers

    def p_space(logits_last):
        return float(jax.nn.softmax(logits_last.astype(jnp.float32))[space])

    for depth in depths:
        pr = build_prompt(tok, n, depth, passkey_for(args.seed, n, depth, 0), haystack, args.needle, args.question)
        ids = pr.ids[None]
        needle = tuple(range(pr.needle_start // l, (pr.needle_end - 1) // l + 1))
        line = f"depth {depth}: {len(pr.ids)} tokens, needle tokens {pr.needle_start}-{pr.needle_end} (chunks {list(needle)})"
        print(line, flush=True)
        if args.full:
            t0 = time.time()
            logits = lh_jax.forward(params, config, ids)[0, -1]
            print(f"  full attention                p(' ') = {p_space(logits):.3f}  ({time.time() - t0:.0f} s)", flush=True)
        t0 = time.time()
        logits, aux = lh_jax.forward(params, config, ids, attention=lh, return_aux=True)
        sel = np.asarray(aux["selected"])[:, 0]  # L H T' N, positions first..Tl-1
        Tl = -(-len(pr.ids) // l) * l
        last = sel[:, :, len(pr.ids) - 1 - (Tl - sel.shape[2])]  # L H N
        hit = np.isin(last, needle).any(-1)  # L H
        print(f"  {lh.window}-token LongHeads         p(' ') = {p_space(logits[0, -1]):.3f}  ({time.time() - t0:.0f} s)")
        print(f"    heads selecting the needle chunk at the answer step: {int(hit.sum())}/{hit.size}; "
              f"per layer {hit.sum(1).tolist()}")
        missing = [(int(a), int(b)) for a, b in zip(*np.nonzero(~hit))]
        print(f"    (layer, head) pairs missing it: {missing}", flush=True)
        del logits, aux

        def oracle(scores, cur, num_chunks, force_prev=True, _needle=needle):
            for c in _needle:
                scores = scores.at[..., c].set(jnp.finfo(jnp.float32).max)
            return select_chunks(scores, cur, num_chunks, force_prev)

        plain = dataclasses.replace(lh, record_selection=False)
        forced = dataclasses.replace(plain, selector=oracle)

        def run(params, ids, lo, hi):
            ctx = runtime.context(jnp.ones(ids.shape, bool), 0)
            x = params["embed"]["embedding"][ids]
            for s, e, att in ((0, lo, plain), (lo, hi, forced), (hi, L, plain)):
                if e > s:
                    cfg = dataclasses.replace(config, num_layers=e - s)
                    layers = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                                     in_axes=(0, nn.broadcast), length=e - s)(cfg, att, x.dtype)
                    x, _ = layers.apply({"params": jax.tree.map(lambda a: a[s:e], params["layers"])}, x, None, ctx)
            h = x[:, -1].astype(jnp.float32)
            h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + config.rms_norm_eps)
            h = h * params["final_norm"]["scale"]
            return h @ runtime.lm_head_weight(params, config).astype(jnp.float32)

        for lo, hi in ranges:
            t0 = time.time()
            logits = jax.jit(run, static_argnums=(2, 3))(params, jnp.asarray(ids), lo, hi)[0]
            print(f"  needle forced in layers [{lo}, {hi})  p(' ') = {p_space(logits):.3f}  ({time.time() - t0:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    from lh_jax.cli import set_cpu_opt_level
    set_cpu_opt_level()
    main()
