"""Prefill / decode benchmark of lh-jax against transformers' PyTorch model, side by side.

Every (implementation, length) cell runs in its own subprocess so that peak RSS belongs to that
cell alone. Timings are medians over `--repeats` runs after a warm-up (compile time is reported
separately). Run: `lh-jax bench` or `python -m lh_jax.experiments.bench`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def parse_lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    if not out or min(out) < 1:
        raise ValueError(f"--lengths must list positive token counts like 1k,4k,8k; got {text!r}")
    return out


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _prompt(model: str, vocab: int, length: int, text: str = "hamlet", seed: int = 0) -> np.ndarray:
    """[1, length] ids: Hamlet (repeated when too short) tokenized with the model's tokenizer, or random ids."""
    if text == "random":
        return np.random.default_rng(seed).integers(3, min(vocab, 40000), size=(1, length), dtype=np.int32)
    import lh_jax
    from lh_jax.experiments.texts import hamlet_text
    ids = lh_jax.load_tokenizer(model)(hamlet_text(), add_special_tokens=False)["input_ids"]
    ids = (ids * (-(-length // len(ids))))[:length]
    return np.asarray(ids, np.int32)[None]


def measure_jax(params, config, attention, ids, repeats: int, decode_steps: int) -> dict:
    """Prefill `ids` through a fresh cache (median of `repeats` after a warm-up), then the median of
    `decode_steps` decode steps; compilation is the warm-up's excess. Also returns the last logits."""
    import jax.numpy as jnp

    import lh_jax
    from lh_jax import runtime
    capacity = ids.shape[1] + decode_steps + 2

    def run_prefill():
        cache = lh_jax.init_cache(config, ids.shape[0], capacity, attention, runtime.cache_dtype(params))
        t0 = time.perf_counter()
        logits, cache = lh_jax.prefill(params, config, ids, cache, attention)
        logits.block_until_ready()
        return time.perf_counter() - t0, logits, cache

    first, logits, cache = run_prefill()
    times = []
    for _ in range(repeats):
        logits = cache = None  # release the previous run's cache before allocating the next one
        t, logits, cache = run_prefill()
        times.append(t)
    prefill_s = float(np.median(times))
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    t0 = time.perf_counter()
    logits, cache = runtime._decode_jit(params, tok, cache, config, attention)
    logits.block_until_ready()
    decode_first = time.perf_counter() - t0
    step_times = []
    for _ in range(decode_steps):
        t0 = time.perf_counter()
        logits, cache = runtime._decode_jit(params, tok, cache, config, attention)
        logits.block_until_ready()
        step_times.append(time.perf_counter() - t0)
    decode_ms = float(np.median(step_times) * 1e3)
    return {"prefill_s": prefill_s, "tokens_per_s": ids.shape[1] / prefill_s, "decode_ms": decode_ms,
            "compile_s": max(0.0, first - prefill_s) + max(0.0, decode_first - decode_ms / 1e3), "logits": logits}


def worker_jax(model: str, length: int, repeats: int, decode_steps: int, attention_spec: dict,
               text: str = "hamlet", dtype: str = "float32") -> dict:
    import jax

    import lh_jax
    from lh_jax.methods import MethodSpec

    config, params = lh_jax.load(model, dtype=dtype, progress=False)
    config, attention = MethodSpec.from_dict(attention_spec).build(config, length)
    ids = _prompt(model, config.vocab_size, length, text)
    m = measure_jax(params, config, attention, ids, repeats, decode_steps)
    m.pop("logits")
    return {"impl": "lh-jax", "length": length, "dtype": dtype, **m, "peak_rss_gib": _peak_rss_gib(),
            "backend": jax.default_backend()}


def worker_torch(model: str, length: int, repeats: int, decode_steps: int, threads: int,
                 text: str = "hamlet", dtype: str = "float32") -> dict:
    import torch
    import transformers

    from lh_jax.convert import resolve_model_path

    torch.set_num_threads(threads)
    path = resolve_model_path(model)
    tdtype = getattr(torch, dtype)
    if path.endswith(".gguf"):
        m = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=tdtype)
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=tdtype)
    m.eval()
    ids = torch.from_numpy(_prompt(model, m.config.vocab_size, length, text).astype(np.int64))
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = m(ids, use_cache=True, logits_to_keep=1)
            if i:
                times.append(time.perf_counter() - t0)
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        step_times = []
        for _ in range(decode_steps + 1):
            t0 = time.perf_counter()
            out = m(tok, past_key_values=cache, use_cache=True)
            step_times.append(time.perf_counter() - t0)
            cache = out.past_key_values
    prefill_s = float(np.median(times))
    return {"impl": "transformers", "length": length, "dtype": dtype, "prefill_s": prefill_s,
            "tokens_per_s": length / prefill_s, "decode_ms": float(np.median(step_times[1:]) * 1e3),
            "compile_s": 0.0, "peak_rss_gib": _peak_rss_gib(), "backend": "torch-cpu"}


def _label(spec: dict) -> str:
    from lh_jax.methods import MethodSpec
    return MethodSpec.from_dict(spec).label


def _run_cell(args, impl: str, length: int, spec: dict, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "lh_jax.experiments.bench", "--worker", impl, "--lengths", str(length),
           "--model", args.model, "--repeats", str(args.repeats), "--decode-steps", str(args.decode_steps),
           "--threads", str(args.threads), "--attention-json", json.dumps(spec), "--text", args.text,
           "--dtype", dtype]
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    label = "full" if impl == "transformers" else _label(spec)
    if proc.returncode != 0:
        return {"impl": impl, "attention": label, "length": length, "dtype": dtype,
                "error": proc.stderr.strip().splitlines()[-1:]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "attention": label}


def format_table(rows: list[dict]) -> str:
    head = ("| impl | attention | dtype | tokens | prefill s | tokens/s | decode ms/token | compile s | peak RSS GiB |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        att = r.get("attention", "full")
        if "error" in r:
            lines.append(f"| {r['impl']} | {att} | {r.get('dtype', '')} | {r['length']} | error: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['impl']} | {att} | {r.get('dtype', 'float32')} | {r['length']} | {r['prefill_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | "
                     f"{r['decode_ms']:.1f} | {r['compile_s']:.1f} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model path (default: embedded SmolLM2-135M)")
    p.add_argument("--lengths", default=None,
                   help="prompt lengths, e.g. 1k,4k,8k (default: 1k,4k,8k; with a window method 4k,8k,16k,32k)")
    p.add_argument("--repeats", type=int, default=3, help="timed prefill runs per cell (median)")
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per cell (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    p.add_argument("--windows", default=None,
                   help="window methods only: comma list of CHUNKxNUM (e.g. 128x16,256x16), one row each; "
                        "lh-jax full attention runs alongside unless --no-full (default: --chunk-size x "
                        "--num-chunks when either is given, else 128x16,256x16)")
    p.add_argument("--no-full", action="store_true", help="with a window method: skip lh-jax full attention")
    p.add_argument("--full-up-to", default=None,
                   help="with a window method: run the full-attention rows (lh-jax and transformers) only up "
                        "to this length (default 16k; 'all' for every length)")
    p.add_argument("--text", default="hamlet", choices=["hamlet", "random"],
                   help="prompt tokens: Hamlet (repeated past its end) or random ids")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="params / activations dtype of the lh-jax rows (matmuls accumulate in float32)")
    p.add_argument("--torch-dtypes", default="float32",
                   help="dtypes of the transformers baseline rows, comma list of float32,bfloat16")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    from lh_jax.cli import add_attention_arguments
    add_attention_arguments(p)
    # None = not given, so that a window method can default to the two windows
    p.set_defaults(chunk_size=None, num_chunks=None)


WINDOW_METHODS = ("sliding", "longheads", "longheads-ref")
DEFAULT_WINDOWS = "128x16,256x16"


def resolve_defaults(args) -> None:
    """Fill the flags left unset: a window method (`--attention longheads`) benches the issue's grid
    (4k-32k, windows 128x16 and 256x16, full attention up to 16k); anything else 1k,4k,8k."""
    window = getattr(args, "attention", "full") in WINDOW_METHODS
    if args.lengths is None:
        args.lengths = "4k,8k,16k,32k" if window else "1k,4k,8k"
    if window and args.windows is None and args.chunk_size is None and args.num_chunks is None:
        args.windows = DEFAULT_WINDOWS
    if args.chunk_size is None:
        args.chunk_size = 256
    if args.num_chunks is None:
        args.num_chunks = 16
    if getattr(args, "full_up_to", None) is None:
        args.full_up_to = "16k" if window else "all"
    if str(args.full_up_to).lower() == "all":
        args.full_up_to_tokens = None
    else:
        try:
            args.full_up_to_tokens = parse_lengths(str(args.full_up_to))[0]
        except ValueError:
            raise SystemExit(f"--full-up-to: expected a length like 16k or 'all', got {args.full_up_to!r}")


def cli_main(args) -> None:
    from lh_jax.cli import attention_spec
    resolve_defaults(args)
    args.attention_spec = attention_spec(args)
    run(args)


def scaling_summary(rows: list[dict]) -> list[dict]:
    """The issue's floors, per window row set: t(L)/t(L/2) for the longest length L whose half was
    also run; prefill at each length against transformers' float32 full attention at the same
    length; decode ms/token at the longest against the shortest length; peak RSS at the longest."""
    ok = [r for r in rows if "error" not in r]
    torch = {r["length"]: r for r in ok if r["impl"] == "transformers" and r.get("dtype", "float32") == "float32"}
    out = []
    for label in dict.fromkeys(r["attention"] for r in ok if r["impl"] == "lh-jax" and r["attention"] != "full"):
        mine = {r["length"]: r for r in ok if r["impl"] == "lh-jax" and r["attention"] == label}
        lengths = sorted(mine)
        s = {"attention": label, "lengths": lengths}
        pairs = [n for n in lengths if n % 2 == 0 and n // 2 in mine]
        if pairs:
            n = pairs[-1]
            s["prefill_ratio"] = {"long": n, "short": n // 2,
                                  "value": mine[n]["prefill_s"] / mine[n // 2]["prefill_s"]}
        both = [n for n in lengths if n in torch]
        if both:
            n = both[-1]
            s["vs_transformers"] = {"length": n, "value": mine[n]["prefill_s"] / torch[n]["prefill_s"]}
        if len(lengths) > 1:
            s["decode_ratio"] = {"long": lengths[-1], "short": lengths[0],
                                 "value": mine[lengths[-1]]["decode_ms"] / mine[lengths[0]]["decode_ms"]}
        s["peak_rss_gib"] = {"length": lengths[-1], "value": mine[lengths[-1]]["peak_rss_gib"]}
        out.append(s)
    return out


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def format_summary(summary: list[dict]) -> str:
    lines = ["| attention | prefill t(long) / t(long/2) | prefill / transformers' | decode long / short | "
             "peak RSS GiB at longest |", "|---|---:|---:|---:|---:|"]
    for s in summary:
        cells = []
        p = s.get("prefill_ratio")
        cells.append(f"{p['value']:.2f} ({_k(p['long'])} / {_k(p['short'])})" if p else "–")
        v = s.get("vs_transformers")
        cells.append(f"{v['value']:.2f}× ({_k(v['length'])})" if v else "–")
        d = s.get("decode_ratio")
        cells.append(f"{d['value']:.2f} ({_k(d['long'])} / {_k(d['short'])})" if d else "–")
        m = s["peak_rss_gib"]
        cells.append(f"{m['value']:.2f} ({_k(m['length'])})")
        lines.append(f"| {s['attention']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> list[dict]:
    from tqdm.auto import tqdm
    lengths = parse_lengths(args.lengths)
    base = dict(args.attention_spec)
    window = base.get("method", "full") in WINDOW_METHODS
    cells = []
    if window:
        windows = args.windows.split(",") if args.windows else [f"{base['chunk_size']}x{base['num_chunks']}"]
        for w in windows:
            try:
                c, n = (int(x) for x in w.lower().split("x"))
            except ValueError:
                raise SystemExit(f"--windows: expected CHUNKxNUM like 128x16, got {w!r}")
            cells.append(("lh-jax", {**base, "chunk_size": c, "num_chunks": n}, args.dtype, False))
        if not args.no_full:
            cells.append(("lh-jax", {"method": "full"}, args.dtype, True))
    else:
        cells.append(("lh-jax", base, args.dtype, False))
    if not args.no_torch:
        for dt in args.torch_dtypes.split(","):
            if dt.strip() not in ("float32", "bfloat16"):
                raise SystemExit(f"--torch-dtypes: expected float32 and/or bfloat16, got {dt!r}")
            cells.append(("transformers", {"method": "full"}, dt.strip(), window))
    limit = getattr(args, "full_up_to_tokens", None)
    # One cell's lengths run back to back (16k next to 32k), so that the ratio between them sees as
    # little of the machine's drift as possible; the table is then sorted by length.
    jobs = [(ci, length, cell) for ci, cell in enumerate(cells) for length in lengths
            if not (cell[3] and limit is not None and length > limit)]
    skipped = len(cells) * len(lengths) - len(jobs)
    rows = []
    for ci, length, (impl, spec, dt, _) in tqdm(jobs, desc="bench cells"):
        rows.append((length, ci, _run_cell(args, impl, length, spec, dt)))
    rows = [r for _, _, r in sorted(rows, key=lambda x: (x[0], x[1]))]
    header = (f"# lh-jax bench — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{datetime.date.today()}, model {args.model}, prompt {args.text}, median of {args.repeats} prefills "
              f"and {args.decode_steps} decode steps")
    print(header)
    print(format_table(rows))
    if skipped:
        print(f"(full-attention rows above {_k(limit)} skipped: --full-up-to {args.full_up_to})")
    summary = scaling_summary(rows) if window else []
    if summary:
        print()
        print(format_summary(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "rows": rows, "summary": summary}, f, indent=1)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    p.add_argument("--worker", choices=["lh-jax", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--attention-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.attention_json is None:
        cli_main(args)
        return
    args.attention_spec = json.loads(args.attention_json)
    if args.worker:
        length = parse_lengths(args.lengths)[0]
        if args.worker == "lh-jax":
            res = worker_jax(args.model, length, args.repeats, args.decode_steps, args.attention_spec, args.text,
                             args.dtype)
        else:
            res = worker_torch(args.model, length, args.repeats, args.decode_steps, args.threads, args.text,
                               args.dtype)
        print(json.dumps(res))
        return
    resolve_defaults(args)
    run(args)


if __name__ == "__main__":
    from lh_jax.cli import set_cpu_opt_level
    set_cpu_opt_level()
    main()
