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
    p.add_argument("--lengths", default="1k,4k,8k", help="prompt lengths, e.g. 1k,4k,8k")
    p.add_argument("--repeats", type=int, default=3, help="timed prefill runs per cell (median)")
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per cell (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    p.add_argument("--windows", default=None,
                   help="window methods only: comma list of CHUNKxNUM (e.g. 128x16,256x16), one row each; "
                        "lh-jax full attention runs alongside unless --no-full")
    p.add_argument("--no-full", action="store_true", help="with a window method: skip lh-jax full attention")
    p.add_argument("--text", default="hamlet", choices=["hamlet", "random"],
                   help="prompt tokens: Hamlet (repeated past its end) or random ids")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="params / activations dtype of the lh-jax rows (matmuls accumulate in float32)")
    p.add_argument("--torch-dtypes", default="float32",
                   help="dtypes of the transformers baseline rows, comma list of float32,bfloat16")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    from lh_jax.cli import add_attention_arguments
    add_attention_arguments(p)


def cli_main(args) -> None:
    from lh_jax.cli import attention_spec
    args.attention_spec = attention_spec(args)
    run(args)


def run(args) -> list[dict]:
    from tqdm.auto import tqdm
    lengths = parse_lengths(args.lengths)
    base = dict(args.attention_spec)
    cells = []
    if base.get("method", "full") in ("sliding", "longheads", "longheads-ref"):
        windows = args.windows.split(",") if args.windows else [f"{base['chunk_size']}x{base['num_chunks']}"]
        for w in windows:
            try:
                c, n = (int(x) for x in w.lower().split("x"))
            except ValueError:
                raise SystemExit(f"--windows: expected CHUNKxNUM like 128x16, got {w!r}")
            cells.append(("lh-jax", {**base, "chunk_size": c, "num_chunks": n}))
        if not args.no_full:
            cells.append(("lh-jax", {"method": "full"}))
    else:
        cells.append(("lh-jax", base))
    cells = [(impl, spec, args.dtype) for impl, spec in cells]
    if not args.no_torch:
        for dt in args.torch_dtypes.split(","):
            if dt.strip() not in ("float32", "bfloat16"):
                raise SystemExit(f"--torch-dtypes: expected float32 and/or bfloat16, got {dt!r}")
            cells.append(("transformers", {"method": "full"}, dt.strip()))
    rows = []
    for length in tqdm(lengths, desc="bench lengths"):
        for impl, spec, dt in cells:
            rows.append(_run_cell(args, impl, length, spec, dt))
    header = (f"# lh-jax bench — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{datetime.date.today()}, model {args.model}, prompt {args.text}, median of {args.repeats} prefills "
              f"and {args.decode_steps} decode steps")
    print(header)
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
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
    run(args)


if __name__ == "__main__":
    from lh_jax.cli import set_cpu_opt_level
    set_cpu_opt_level()
    main()
