"""Passkey retrieval: the prompt of the LongHeads / landmark-attention repositories, greedy decoding.

A task description, the filler "The grass is green. ..." repeated, the needle "The pass key is N.
Remember it. N is the pass key." at a chosen depth, then "What is the pass key? The pass key is".
Exact match of the 5-digit key in the continuation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time

import numpy as np

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclasses.dataclass
class PasskeyPrompt:
    ids: np.ndarray  # [T] int32
    key: str
    depth: float
    needle_start: int  # token index where the needle sentence starts
    needle_end: int


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(tokenizer, n_tokens: int, depth: float, key: str | int, haystack: str | None = None,
                 needle: str = NEEDLE) -> PasskeyPrompt:
    """A prompt of about `n_tokens` tokens with the needle after `depth` (0..1) of the haystack."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(key)
    needle_text = needle.format(key=key)
    head, tail = TASK + "\n", "\n" + QUESTION
    budget = n_tokens - _ntok(tokenizer, head + needle_text + tail) - 2
    if budget <= 0:
        raise ValueError(f"n_tokens={n_tokens} is too short for the task text")
    if haystack is None:
        unit = " " + FILLER
        reps = max(1, budget // _ntok(tokenizer, unit))
        before = int(round(reps * depth))
        pre, post = (unit * before).strip(), (unit * (reps - before)).strip()
    else:
        ids = tokenizer(haystack, add_special_tokens=False)["input_ids"]
        if len(ids) < budget:
            raise ValueError(f"haystack has {len(ids)} tokens, fewer than the {budget} needed")
        cut = int(round(budget * depth))
        pre, post = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:budget])
    prefix = head + pre + "\n"
    text = prefix + needle_text + "\n" + post + tail
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    start = _ntok(tokenizer, prefix)
    return PasskeyPrompt(ids, key, depth, start, start + _ntok(tokenizer, needle_text))


def answer_matches(text: str, key: str) -> bool:
    found = re.findall(r"\d+", text)
    return bool(found) and found[0] == key


def run_trials(params, config, tokenizer, attention, lengths, depths, trials: int, seed: int = 0,
               max_new_tokens: int = 8, progress: bool = True) -> list[dict]:
    """Greedy passkey trials; returns one row per (length, depth, trial)."""
    import lh_jax
    from tqdm.auto import tqdm
    rng = np.random.default_rng(seed)
    cells = [(n, d, t) for n in lengths for d in depths for t in range(trials)]
    rows = []
    for n, d, t in tqdm(cells, desc="passkey", disable=not progress):
        key = str(int(rng.integers(10000, 100000)))
        pr = build_prompt(tokenizer, n, d, key)
        t0 = time.perf_counter()
        out = np.asarray(lh_jax.generate(params, config, pr.ids[None], max_new_tokens, attention=attention))
        text = tokenizer.decode(out[0, len(pr.ids):].tolist(), skip_special_tokens=True)
        rows.append({"length": n, "tokens": int(len(pr.ids)), "depth": d, "trial": t, "key": key,
                     "answer": text, "correct": answer_matches(text, key),
                     "seconds": time.perf_counter() - t0})
    return rows


def accuracy_table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    lines = ["| length \\ depth | " + " | ".join(f"{d:g}" for d in depths) + " | all |",
             "|---" * (len(depths) + 2) + "|"]
    for n in lengths:
        cells = []
        for d in depths:
            rs = [r for r in rows if r["length"] == n and r["depth"] == d]
            cells.append(f"{sum(r['correct'] for r in rs)}/{len(rs)}")
        rs = [r for r in rows if r["length"] == n]
        cells.append(f"{sum(r['correct'] for r in rs)}/{len(rs)}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cli_main(args) -> None:
    import lh_jax
    from lh_jax.cli import attention_from_spec, attention_spec
    from lh_jax.experiments.bench import parse_lengths
    config, params = lh_jax.load(args.model)
    tokenizer = lh_jax.load_tokenizer(args.model)
    lengths = parse_lengths(args.lengths)
    depths = [float(x) for x in args.depths.split(",")]
    results = {}
    for method in args.methods.split(","):
        args.attention = method
        spec = attention_spec(args)
        rows = run_trials(params, config, tokenizer, attention_from_spec(spec), lengths, depths, args.trials,
                          args.seed)
        results[method] = {"spec": spec, "rows": rows}
        print(f"\n## {method} {spec}\n" + accuracy_table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--lengths", default="4k")
    p.add_argument("--depths", default="0.2,0.5,0.8")
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="full,longheads", help="comma list of: full, longheads, longheads-ref, sliding")
    p.add_argument("--out", default=None, help="write all rows as JSON here")
    from lh_jax.cli import add_attention_arguments
    add_attention_arguments(p)
