"""Passkey over many LongHeads variants in one process: the model is loaded once, every variant sees
the very prompts of `lh-jax passkey` (same keys for the same seed), and a time budget stops the
sweep cleanly (finished cells are kept). Meant for an accelerator, where a 32k trial takes about a
second and compilation dominates; on the CPU use small grids.

    python -m lh_jax.experiments.passkey_sweep --lengths 16k,32k --trials 2 \
        --variants 256x16/attn,256x16/attn-parts:16,256x16/bounds-parts:16/group --budget 480

A variant is CHUNKxNUM/CHUNK_REPR[/SELECTION] (SELECTION: head | group). `--plan` gives the cells
in the order to run them, e.g. "16k=256x16/attn,256x16/attn-parts:16;32k=256x16/attn-parts:16"
(overrides --lengths and --variants), so that a budget cut drops the least wanted. Writes OUT/cells.jsonl
(one line per trial, resumable like the other commands), OUT/sweep.md (accuracy per variant,
length and depth, seconds per batch) and OUT/sweep.png (a length x depth heatmap per variant).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from lh_jax.experiments import passkey as pk


@dataclasses.dataclass(frozen=True)
class Variant:
    chunk_size: int
    num_chunks: int
    chunk_repr: str
    selection: str = "head"

    @property
    def label(self) -> str:
        s = f"{self.chunk_size}x{self.num_chunks} {self.chunk_repr}"
        return s + (" group" if self.selection == "group" else "")

    def attention(self):
        import lh_jax
        return lh_jax.LongHeads(self.chunk_size, self.num_chunks, chunk_repr=self.chunk_repr,
                                selection=self.selection)


def parse_variants(text: str) -> list[Variant]:
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.split("/")
        try:
            cs, nc = (int(x) for x in parts[0].lower().split("x"))
            v = Variant(cs, nc, parts[1] if len(parts) > 1 else "attn", parts[2] if len(parts) > 2 else "head")
            if len(parts) > 3:
                raise ValueError("too many '/' fields")
            v.attention()  # validates every field
        except (ValueError, TypeError) as e:
            raise ValueError(f"--variants: bad variant {item!r} (want CHUNKxNUM/CHUNK_REPR[/head|group]): {e}") from None
        out.append(v)
    if not out:
        raise ValueError("--variants: no variant given")
    return out


def summary(rows: list[dict], depths: list[float]) -> str:
    lines = ["| variant | tokens | " + " | ".join(f"{d:g}" for d in depths) + " | all | s/batch |",
             "|---|---:|" + "---|" * len(depths) + "---|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["length"]), []).append(r)
    for (label, n), rs in groups.items():
        cells = []
        for d in depths:
            hit = [r["correct"] for r in rs if r["depth"] == d]
            cells.append(f"{sum(hit)}/{len(hit)}" if hit else "–")
        ok = sum(r["correct"] for r in rs)
        secs = sorted({r["batch_seconds"] for r in rs})
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + f" | {ok}/{len(rs)} ({100 * ok / len(rs):.0f} %) | "
                     + "/".join(f"{s:.1f}" for s in secs) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from lh_jax.experiments.bench import parse_lengths
    from lh_jax.experiments.common import ResultStore, add_common_arguments, load_model, run_metadata
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, "passkey_sweep")
    p.add_argument("--variants", default=None, help="comma list of CHUNKxNUM/CHUNK_REPR[/head|group]")
    p.add_argument("--plan", default=None, help="LENGTHS=VARIANTS groups separated by ';', run in order")
    p.add_argument("--lengths", default="16k")
    p.add_argument("--depths", default="0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-batch-tokens", type=int, default=None, help="cap batch size * length (device memory)")
    p.add_argument("--budget", type=float, default=None, help="seconds; no new (variant, length) starts after it")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.plan:
        plan = []
        for group in (g.strip() for g in args.plan.split(";")):
            if not group:
                continue
            if "=" not in group:
                raise ValueError(f"--plan: group {group!r} is not LENGTHS=VARIANTS")
            ls, vs = group.split("=", 1)
            plan += [(n, v) for n in parse_lengths(ls) for v in parse_variants(vs)]
    elif args.variants:
        plan = [(n, v) for n in parse_lengths(args.lengths) for v in parse_variants(args.variants)]
    else:
        raise ValueError("give --variants (with --lengths) or --plan")
    lengths = list(dict.fromkeys(n for n, _ in plan))
    depths = pk.parse_depths(args.depths)
    if args.trials < 1:
        raise ValueError(f"--trials must be positive, got {args.trials}")
    config, params, tokenizer = load_model(args)
    setup = pk.Setup(lengths=lengths, depths=depths, specs=[], haystack=None, haystack_id="filler",
                     haystack_path=None, needle=pk.NEEDLE, question=pk.QUESTION)
    prompts = pk.build_prompts(tokenizer, setup, args.trials, args.seed)
    store = ResultStore(args.out, resume=not args.no_resume)
    print(f"[sweep] model loaded, {len(prompts)} prompts, {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    keys = []
    for n, v in plan:
        if args.budget is not None and time.perf_counter() - t_start > args.budget:
            print(f"[sweep] budget spent: skip {v.label} @ {n}", file=sys.stderr, flush=True)
            continue
        pending = []
        for d in depths:
            for t in range(args.trials):
                key = {"task": "passkey_sweep", "model": args.model, "dtype": args.dtype,
                       "variant": dataclasses.asdict(v), "length": n, "depth": d, "trial": t, "seed": args.seed,
                       "max_new_tokens": args.max_new_tokens}
                keys.append(key)
                if key not in store:
                    pending.append((d, t, key))
        bs = args.batch_size if args.batch_size > 1 else len(pending) or 1
        if args.max_batch_tokens:
            bs = max(1, min(bs, args.max_batch_tokens // n))
        attention = v.attention()
        try:
            for b in range(0, len(pending), bs):
                batch = pending[b:b + bs]
                ps = [prompts[n, d, t] for d, t, _ in batch]
                t0 = time.perf_counter()
                new = pk.generate_batch(params, config, attention, ps, args.max_new_tokens)
                sec = time.perf_counter() - t0
                for (d, t, key), pr, toks in zip(batch, ps, new):
                    text = tokenizer.decode(toks, skip_special_tokens=True)
                    store.add(key, {"label": v.label, "length": n, "depth": d, "key": pr.key, "answer": text,
                                    "correct": pk.answer_matches(text, pr.key), "batch_seconds": round(sec, 2)})
        except Exception as e:  # noqa: BLE001 - e.g. out of device memory: report, go on with the next cell
            print(f"[sweep] {v.label} @ {n} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                  file=sys.stderr, flush=True)
        done = store.rows(keys)
        mine = [r for r in done if r["label"] == v.label and r["length"] == n]
        print(f"[sweep] {v.label} @ {n}: {sum(r['correct'] for r in mine)}/{len(mine)}  "
              f"(elapsed {time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
        with open(os.path.join(args.out, "sweep.md"), "w") as f:
            f.write(summary(done, depths) + "\n")
    rows = store.rows(keys)
    table = summary(rows, depths)
    meta = run_metadata(args, task="passkey_sweep")
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(table + "\n\n" + repr(meta["machine"]) + "\n")
    if rows:
        pk.heatmap(rows, os.path.join(args.out, "sweep.png"), title=f"passkey, LongHeads variants ({args.dtype})")
    print(table)


if __name__ == "__main__":
    from lh_jax.cli import set_cpu_opt_level
    set_cpu_opt_level()
    main()
