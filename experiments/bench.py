"""`lh-jax bench`: the one timing harness — prefill, decode or one attention layer against length.

    lh-jax bench --methods longheads:recommended,full --lengths 4k,8k,16k,32k
    lh-jax bench --scope decode --methods longheads:128x16,full --lengths 4k,32k
    lh-jax bench --scope layer --methods full,longheads:128x16 --lengths 4k,16k
    lh-jax bench --scope answer --methods longheads:recommended,full --lengths 16k --repeats 0
    lh-jax bench --in-process --random-weights --dtype bfloat16 --lengths 8k,64k   # an accelerator

Scopes (`--scope`):
  model   the whole model: prefill through a fresh cache (median of --repeats after a warm-up;
          compilation reported apart), then the median of --decode-steps decode steps; beside
          transformers' PyTorch model (full attention) unless --no-torch.
  decode  decode steps only, on a cache filled to each length with zeros (a step's cost does not
          depend on what the cache holds): how one step scales with the context, without prefills.
  layer   one attention layer's prefill on random q/k/v: the kernel alone, with its matmul GFLOP.
  answer  what a user waits for: `lh_jax.generate` from the prompt to --decode-steps new tokens
          (LongHeads.recommended(): the voting pass, the re-read prompt and decode), beside
          transformers' `generate` (full attention, greedy); the new tokens are kept in the rows.

Each cell runs in its own subprocess (so peak RSS is the cell's own) unless --in-process (for
accelerators and long sweeps: an out-of-memory cell is reported and the run goes on). One
method's lengths run back to back, so a ratio between lengths sees as little of the machine's
drift as possible. The model scope ends with the floors summary: t(L)/t(L/2) for each doubling,
prefill against transformers' and against lh-jax's full attention, decode longest / shortest,
peak RSS at the longest length.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

SCOPES = ("model", "decode", "layer", "answer")
DEFAULT_METHODS = "longheads:recommended,full"
# The embedded default model's shape (SmolLM2-135M-Instruct), for --random-weights without the file.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)


def parse_lengths(text: str) -> list[int]:
    """'1k,4k,8192' -> [1024, 4096, 8192]."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise ValueError(f"expected token counts like 1k,4k,8192; got {part!r}") from None
    if not out or min(out) < 1:
        raise ValueError(f"expected positive token counts like 1k,4k,8k; got {text!r}")
    return out


def length_name(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# --- the model and its inputs ------------------------------------------------------------------

def smollm2_config(**overrides):
    """A ModelConfig of the embedded model's shape (SMOLLM2_135M), with fields overridden."""
    import lh_jax
    from lh_jax.models.config import RopeConfig
    c = dict(SMOLLM2_135M, **overrides)
    return lh_jax.ModelConfig(rope=RopeConfig(theta=c.pop("rope_theta")), **c)


def random_params(config, dtype: str, seed: int = 0):
    """Random params of `config`'s shape (normal 0.02, RMSNorm scales 1): timing does not depend on values."""
    import jax
    import jax.numpy as jnp

    from lh_jax.models.llama import param_shapes
    leaves, tree = jax.tree_util.tree_flatten(param_shapes(config, dtype))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [(0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype) for k, s in zip(keys, leaves)])
    params["final_norm"]["scale"] = jnp.ones_like(params["final_norm"]["scale"])
    for n in ("input_norm", "post_norm"):
        params["layers"][n]["scale"] = jnp.ones_like(params["layers"][n]["scale"])
    return params


def load_for_bench(model: str, dtype: str, random_weights: bool, seed: int = 0):
    import lh_jax
    if random_weights:
        config = smollm2_config() if model == "default" else lh_jax.load(model, dtype=dtype, progress=False)[0]
        return config, random_params(config, dtype, seed)
    return lh_jax.load(model, dtype=dtype, progress=False)


def prompt_ids(model: str, vocab: int, length: int, text: str = "hamlet", seed: int = 0) -> np.ndarray:
    """[1, length] ids: Hamlet (repeated when too short) tokenized with the model's tokenizer, or random ids."""
    if text == "random":
        return np.random.default_rng(seed).integers(3, min(vocab, 40000), size=(1, length), dtype=np.int32)
    import lh_jax
    from lh_jax.experiments.texts import hamlet_text
    ids = lh_jax.load_tokenizer(model)(hamlet_text(), add_special_tokens=False)["input_ids"]
    return np.asarray((ids * (-(-length // len(ids))))[:length], np.int32)[None]


# --- the three measurements ----------------------------------------------------------------------

def _median_decode(params, config, attention, token, cache, steps: int):
    """(first step seconds, median of `steps` more in ms, cache)."""
    import lh_jax
    t0 = time.perf_counter()
    logits, cache = lh_jax.decode_step(params, config, token, cache, attention, check=False)
    logits.block_until_ready()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, cache = lh_jax.decode_step(params, config, token, cache, attention, check=False)
        logits.block_until_ready()
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times) * 1e3), cache


def time_model(params, config, attention, ids, repeats: int, decode_steps: int) -> dict:
    """Prefill `ids` through a fresh cache (median of `repeats` after a warm-up; `repeats` 0: the
    first prefill, compilation included), then decode. The cache dtype is `generate`'s choice."""
    import jax.numpy as jnp

    import lh_jax
    from lh_jax import runtime
    capacity = ids.shape[1] + decode_steps + 2
    kv_dtype = runtime.choose_cache_dtype(config, attention, params, ids.shape[0], ids.shape[1], capacity)

    def run_prefill():
        cache = lh_jax.init_cache(config, ids.shape[0], capacity, attention, kv_dtype)
        t0 = time.perf_counter()
        logits, cache = lh_jax.prefill(params, config, ids, cache, attention)
        logits.block_until_ready()
        return time.perf_counter() - t0, logits, cache

    first, logits, cache = run_prefill()
    times = [] if repeats else [first]
    for _ in range(repeats):
        logits = cache = None  # release the previous run's cache before allocating the next one
        t, logits, cache = run_prefill()
        times.append(t)
    prefill_s = float(np.median(times))
    finite = bool(np.isfinite(np.asarray(logits, np.float32)).all())
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    decode_first, decode_ms, _ = _median_decode(params, config, attention, token, cache, decode_steps)
    return {"prefill_s": prefill_s, "tokens_per_s": ids.shape[1] / prefill_s, "decode_ms": decode_ms,
            "compile_s": max(0.0, first - prefill_s) + max(0.0, decode_first - decode_ms / 1e3), "finite": finite,
            "cache": jnp.dtype(kv_dtype).name}


def time_decode(params, config, attention, length: int, steps: int) -> dict:
    """Decode steps at `length` on a zero-filled cache."""
    import jax.numpy as jnp

    import lh_jax
    from lh_jax import runtime
    kv_dtype = runtime.choose_cache_dtype(config, attention, params, 1, length, length + steps + 2)
    cache = lh_jax.init_cache(config, 1, length + steps + 2, attention, kv_dtype)
    cache = cache.replace(index=jnp.asarray(length, jnp.int32))
    first, decode_ms, _ = _median_decode(params, config, attention, jnp.zeros((1,), jnp.int32), cache, steps)
    return {"decode_ms": decode_ms, "compile_s": max(0.0, first - decode_ms / 1e3), "finite": True,
            "cache": jnp.dtype(kv_dtype).name}


def _timed(fn, repeats: int):
    """(first call's seconds, median seconds of `repeats` calls after it (0: the first call's), last result)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times or [first])), out


def time_answer(params, config, attention, ids, repeats: int, new_tokens: int) -> dict:
    """`lh_jax.generate` of `new_tokens` greedy tokens (median of `repeats` after a warm-up; 0: the
    first call, compilation included)."""
    import lh_jax
    first, answer_s, out = _timed(lambda: np.asarray(lh_jax.generate(params, config, ids, new_tokens,
                                                                     attention=attention, progress=False)), repeats)
    return {"answer_s": answer_s, "compile_s": max(0.0, first - answer_s), "finite": True,
            "new_ids": out[0, ids.shape[1]:].tolist()}


def attention_flops(attention, T: int, H: int, D: int) -> float:
    """Matmul flops (QKᵀ and PV) of a causal prefill of T tokens: the dense prefix is full causal
    attention; a later query at t attends to its own chunk up to itself and num_chunks - 1 whole
    earlier chunks (all of them while there are fewer)."""
    import lh_jax
    if not isinstance(attention, lh_jax.LongHeads):
        return 4.0 * H * D * T * (T + 1) / 2
    l, N = attention.chunk_size, attention.num_chunks
    dense = min(attention.dense_length, T)
    t = np.arange(dense, T, dtype=np.int64)
    selective = float(np.sum(t % l + 1 + np.minimum(t // l, N - 1) * l))
    return 4.0 * H * D * (dense * (dense + 1) / 2 + selective)


def time_layer(config, attention, T: int, repeats: int, seed: int = 0) -> dict:
    """One layer's attention prefill on random q/k/v [1, T, heads, head_dim] (float32)."""
    import jax
    import jax.numpy as jnp

    from lh_jax import runtime
    from lh_jax.models.rope import Rope
    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (1, T, H, D), jnp.float32)
    k = jax.random.normal(keys[1], (1, T, K, D), jnp.float32)
    v = jax.random.normal(keys[2], (1, T, K, D), jnp.float32)
    ctx = runtime.context(jnp.ones((1, T), bool), 0)
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
    gflop = attention_flops(attention, T, H, D) / 1e9
    return {"median_ms": 1e3 * med, "best_ms": 1e3 * min(times), "gflop": gflop, "gflop_s": gflop / med,
            "compile_s": max(0.0, first - med), "finite": bool(jnp.isfinite(out).all())}


def time_torch(model: str, length: int, repeats: int, decode_steps: int, threads: int, text: str,
               dtype: str, scope: str = "model") -> dict:
    """transformers' PyTorch model (full attention): prefill and decode, like `time_model`; with
    scope "answer", `generate` of `decode_steps` greedy tokens, like `time_answer`."""
    import torch
    import transformers

    from lh_jax.convert import resolve_model_path
    torch.set_num_threads(threads)
    path = resolve_model_path(model)
    kwargs = {"dtype": getattr(torch, dtype)}
    if path.endswith(".gguf"):
        m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              **kwargs)
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    m.eval()
    ids = torch.from_numpy(prompt_ids(model, m.config.vocab_size, length, text).astype(np.int64))
    if scope == "answer":
        return _torch_answer(m, ids, repeats, decode_steps)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1 if repeats else 1):
            t0 = time.perf_counter()
            out = m(ids, use_cache=True, logits_to_keep=1)
            if i or not repeats:
                times.append(time.perf_counter() - t0)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        step_times = []
        for _ in range(decode_steps + 1):
            t0 = time.perf_counter()
            out = m(tok, past_key_values=cache, use_cache=True)
            step_times.append(time.perf_counter() - t0)
            cache = out.past_key_values
    prefill_s = float(np.median(times))
    return {"prefill_s": prefill_s, "tokens_per_s": length / prefill_s,
            "decode_ms": float(np.median(step_times[1:]) * 1e3), "compile_s": 0.0, "finite": True}


def _torch_answer(m, ids, repeats: int, new_tokens: int) -> dict:
    import torch
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=m.config.eos_token_id)
    with torch.inference_mode():
        _, answer_s, out = _timed(lambda: m.generate(ids, **kwargs), repeats)
    return {"answer_s": answer_s, "compile_s": 0.0, "finite": True, "new_ids": out[0, ids.shape[1]:].tolist()}


# --- cells -----------------------------------------------------------------------------------------

def run_cell(cell: dict) -> dict:
    """One measurement in this process: cell = {impl, method, length, dtype, scope, ...settings}."""
    from lh_jax.methods import MethodSpec
    if cell["impl"] == "transformers":
        row = time_torch(cell["model"], cell["length"], cell["repeats"], cell["decode_steps"], cell["threads"],
                         cell["text"], cell["dtype"], cell["scope"])
        return {"cache": cell["dtype"], **row, "peak_rss_gib": peak_rss_gib(), "backend": "torch-cpu"}
    import jax
    spec = MethodSpec(cell["method"])
    if cell["scope"] == "layer":
        config = smollm2_config(max_position_embeddings=max(8192, cell["length"]))
        config, attention = spec.build(config, cell["length"])
        row = time_layer(config, attention, cell["length"], cell["repeats"], cell["seed"])
    else:
        config, params = load_for_bench(cell["model"], cell["dtype"], cell["random_weights"], cell["seed"])
        config, attention = spec.build(config, cell["length"])
        if cell["scope"] == "decode":
            row = time_decode(params, config, attention, cell["length"], cell["decode_steps"])
        else:
            ids = prompt_ids(cell["model"], config.vocab_size, cell["length"], cell["text"], cell["seed"])
            timer = time_answer if cell["scope"] == "answer" else time_model
            row = timer(params, config, attention, ids, cell["repeats"], cell["decode_steps"])
    return {**row, "peak_rss_gib": peak_rss_gib(), "backend": jax.default_backend()}


def run_cell_isolated(cell: dict) -> dict:
    """`run_cell` in a subprocess (its own peak RSS); a failure becomes an "error" row."""
    cmd = [sys.executable, "-m", "lh_jax.experiments.bench", "--cell", json.dumps(cell)]
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_cells(args) -> list[dict]:
    """The cells to run, one method's lengths back to back."""
    lengths = parse_lengths(args.lengths)
    full_limit = None if str(args.full_up_to).lower() == "all" else parse_lengths(args.full_up_to)[0]
    common = {"model": args.model, "scope": args.scope, "repeats": args.repeats, "decode_steps": args.decode_steps,
              "threads": args.threads, "text": args.text, "seed": args.seed, "random_weights": args.random_weights}
    cells = []
    for spec in args.methods:
        full = spec.longheads is None  # full attention (or a RoPE scaling of it): quadratic
        for n in lengths:
            if not (full and full_limit is not None and n > full_limit):
                cells.append({**common, "impl": "lh-jax", "method": spec.name, "length": n, "dtype": args.dtype})
    if args.scope in ("model", "answer") and not args.no_torch:
        for dtype in args.torch_dtypes:
            for n in lengths:
                if full_limit is None or n <= full_limit:
                    cells.append({**common, "impl": "transformers", "method": "full", "length": n, "dtype": dtype})
    return cells


# --- tables --------------------------------------------------------------------------------------

def format_table(rows: list[dict], scope: str) -> str:
    if scope == "layer":
        head = ["impl", "method", "tokens", "median ms", "best ms", "GFLOP", "GFLOP/s", "compile s"]
        keys = [("median_ms", ".1f"), ("best_ms", ".1f"), ("gflop", ".3g"), ("gflop_s", ".0f"), ("compile_s", ".2f")]
    elif scope == "answer":
        head = ["impl", "method", "dtype", "cache", "tokens", "answer s", "compile s", "peak RSS GiB"]
        keys = [("answer_s", ".2f"), ("compile_s", ".1f"), ("peak_rss_gib", ".2f")]
    elif scope == "decode":
        head = ["impl", "method", "dtype", "cache", "tokens", "decode ms/token", "compile s", "peak RSS GiB"]
        keys = [("decode_ms", ".1f"), ("compile_s", ".1f"), ("peak_rss_gib", ".2f")]
    else:
        head = ["impl", "method", "dtype", "cache", "tokens", "prefill s", "tokens/s", "decode ms/token",
                "compile s", "peak RSS GiB"]
        keys = [("prefill_s", ".2f"), ("tokens_per_s", ".0f"), ("decode_ms", ".1f"), ("compile_s", ".1f"),
                ("peak_rss_gib", ".2f")]
    n_text = 2 if scope == "layer" else 4  # impl, method (, dtype, cache); the rest are numbers
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * n_text + "---:|" * (len(head) - n_text)]
    for r in rows:
        first = [r["impl"], r["method"]] + ([] if scope == "layer" else [r["dtype"], r.get("cache", "–")])
        first += [str(r["length"])]
        if "error" in r:
            lines.append("| " + " | ".join(first) + f" | error: {r['error']} |" + " |" * (len(keys) - 1))
        else:
            lines.append("| " + " | ".join(first + [format(r[k], f) for k, f in keys]) + " |"
                         + ("" if r.get("finite", True) else " non-finite output!"))
    return "\n".join(lines)


def summarize(rows: list[dict], key: str = "prefill_s") -> list[dict]:
    """The floors, per window method: t(L)/t(L/2) for each doubling, prefill (`key`: or answer)
    against transformers' float32 and against lh-jax's full attention at each length both ran,
    decode at the longest / shortest length (model scope), peak RSS at the longest length."""
    ok = [r for r in rows if "error" not in r]
    by = lambda impl, method, dtype=None: {r["length"]: r for r in ok if r["impl"] == impl and r["method"] == method
                                           and (dtype is None or r["dtype"] == dtype)}
    torch = by("transformers", "full", "float32")
    out = []
    for method in dict.fromkeys(r["method"] for r in ok if r["impl"] == "lh-jax" and r["method"] != "full"):
        mine = by("lh-jax", method)
        full = by("lh-jax", "full")
        lengths = sorted(mine)
        s = {"method": method, "lengths": lengths,
             "doubling": [{"long": n, "value": mine[n][key] / mine[n // 2][key]}
                          for n in lengths if n % 2 == 0 and n // 2 in mine],
             "vs_transformers": [{"length": n, "value": mine[n][key] / torch[n][key]} for n in lengths if n in torch],
             "vs_full": [{"length": n, "value": mine[n][key] / full[n][key]} for n in lengths if n in full],
             "peak_rss_gib": {"length": lengths[-1], "value": mine[lengths[-1]]["peak_rss_gib"]}}
        if len(lengths) > 1 and "decode_ms" in mine[lengths[0]]:
            s["decode_ratio"] = {"long": lengths[-1], "short": lengths[0],
                                 "value": mine[lengths[-1]]["decode_ms"] / mine[lengths[0]]["decode_ms"]}
        out.append(s)
    return out


def format_summary(summary: list[dict], what: str = "prefill") -> str:
    lines = [f"| method | {what} t(L) / t(L/2) | {what} / transformers' | {what} / lh-jax full | "
             "decode longest / shortest | peak RSS GiB at longest |", "|---|---|---|---|---:|---:|"]
    for s in summary:
        cells = [", ".join(f"{d['value']:.2f} ({length_name(d['long'])})" for d in s["doubling"]) or "–",
                 ", ".join(f"{v['value']:.2f}× ({length_name(v['length'])})" for v in s["vs_transformers"]) or "–",
                 ", ".join(f"{v['value']:.2f}× ({length_name(v['length'])})" for v in s["vs_full"]) or "–"]
        d = s.get("decode_ratio")
        cells.append(f"{d['value']:.2f} ({length_name(d['long'])} / {length_name(d['short'])})" if d else "–")
        cells.append(f"{s['peak_rss_gib']['value']:.2f} ({length_name(s['peak_rss_gib']['length'])})")
        lines.append(f"| {s['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- command ---------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    from lh_jax.methods import add_method_arguments
    p.add_argument("--model", default="default", help="model path (default: the embedded SmolLM2-135M)")
    add_method_arguments(p, multiple=True, default=DEFAULT_METHODS)
    p.add_argument("--scope", default="model", choices=SCOPES, help="what is timed (see the module docstring)")
    p.add_argument("--lengths", default="4k,8k,16k,32k", help="prompt lengths, e.g. 4k,16k,32k")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed prefills (or layer calls, answers) per cell, median, after a warm-up; 0 (model, "
                        "answer scopes): time the first one, compilation included (long lengths)")
    p.add_argument("--decode-steps", type=int, default=16,
                   help="timed decode steps per cell, median (answer scope: the tokens generated)")
    p.add_argument("--full-up-to", default="16k",
                   help="full-attention rows (lh-jax and transformers) only up to this length ('all': every length)")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    p.add_argument("--torch-dtypes", default="float32", help="dtypes of the transformers rows: float32,bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--text", default="hamlet", choices=["hamlet", "random"],
                   help="prompt tokens: Hamlet (repeated past its end) or random ids")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="params / activations dtype of the lh-jax rows (matmuls accumulate in float32)")
    p.add_argument("--random-weights", action="store_true", help="random parameters of the model's shape")
    p.add_argument("--in-process", action="store_true",
                   help="run every cell in this process (accelerators; an out-of-memory cell is reported and skipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="PATH",
                   help="also write the rows and summary as JSON: to PATH if it ends in .json, else to "
                        "PATH/bench.json (a directory, as the other commands' --out)")


def check_args(args) -> None:
    """Every flag checked before anything runs (ValueError naming the flag)."""
    if args.decode_steps < 1:
        raise ValueError(f"--decode-steps must be a positive integer, got {args.decode_steps}")
    whole = args.scope in ("model", "answer")
    if args.repeats < (0 if whole else 1):
        raise ValueError(f"--repeats must be {'0 or more' if whole else 'a positive integer'} "
                         f"with --scope {args.scope}, got {args.repeats}")
    try:
        parse_lengths(args.lengths)
    except ValueError as e:
        raise ValueError(f"--lengths: {e}") from None
    if str(args.full_up_to).lower() != "all":
        try:
            parse_lengths(args.full_up_to)
        except ValueError:
            raise ValueError(f"--full-up-to: expected a length like 16k or 'all', got {args.full_up_to!r}") from None
    dtypes = [d.strip() for d in str(args.torch_dtypes).split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad or not dtypes:
        raise ValueError(f"--torch-dtypes: expected float32 and/or bfloat16, got {args.torch_dtypes!r}")
    args.torch_dtypes = dtypes
    if args.out:
        args.out = out_file(args.out)


def out_file(out: str) -> str:
    """The JSON file --out names (PATH.json, or PATH/bench.json for a directory), its folder created
    now: a path that cannot be written fails before any cell runs."""
    path = out if out.endswith(".json") and not os.path.isdir(out) else os.path.join(out, "bench.json")
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out!r}: cannot create the folder {folder!r} ({e.strerror})") from None
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out!r}: cannot write {path!r}")
    return path


def cli_main(args) -> list[dict]:
    from tqdm.auto import tqdm
    check_args(args)
    cells = plan_cells(args)
    rows = []
    for i, cell in enumerate(tqdm(cells, desc="bench cells")):
        if args.in_process:
            try:
                result = run_cell(cell)
            except Exception as e:  # noqa: BLE001 - out of memory etc.: report and go on
                result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        else:
            result = run_cell_isolated(cell)
        rows.append((cell["length"], i, {k: cell[k] for k in ("impl", "method", "length", "dtype")} | result))
    rows = [r for _, _, r in sorted(rows, key=lambda x: x[:2])]
    header = (f"# lh-jax bench ({args.scope}) — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{datetime.date.today()}, model {args.model}{' (random weights)' if args.random_weights else ''}, "
              f"prompt {args.text}, median of {args.repeats} runs and {args.decode_steps} decode steps")
    print(header)
    print(format_table(rows, args.scope))
    what = {"model": "prefill", "answer": "answer"}.get(args.scope)
    summary = summarize(rows, f"{what}_s") if what else []
    if summary:
        print()
        print(format_summary(summary, what))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "argv": sys.argv, "rows": rows, "summary": summary}, f, indent=1)
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"lh-jax bench: {len(failed)} of {len(rows)} cells failed", file=sys.stderr)
        raise SystemExit(1)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # a subprocess's one cell (JSON)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.cell is not None:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return
    cli_main(args)


if __name__ == "__main__":
    from lh_jax.cli import set_cpu_opt_level
    set_cpu_opt_level()
    main()
