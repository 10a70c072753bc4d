"""RULER-style synthetic retrieval tasks (multi-key, multi-value, multi-query, variable tracking).

Every task is generated offline and deterministically from a seed: a haystack (the passkey
filler repeated, or the words of `--haystack FILE`) with needle sentences inserted at random
sentence boundaries, sized with the model's tokenizer to the requested token count, then a
question and an answer prefix. Greedy decoding; a trial scores the fraction of expected answers
found in the continuation (RULER's "string match all", on whole words) and 1 when all are found.

    lh-jax needle --tasks multikey,vartrack --lengths 2k --trials 2 --methods full,longheads \
        --chunk-size 64 --num-chunks 16 --dense-length 1024

Tasks:
  multikey    "One of the special magic numbers for {key} is: {value}." for the queried key plus
              `--distractors` needles with other keys; asks for the one key's number.
  multivalue  `--values` needles with the same key and different numbers; asks for all of them.
  multiquery  `--queries` needles with different keys; asks for all their numbers at once.
  vartrack    "VAR A = 12345." then `--hops` assignments "VAR B = VAR A." ... (plus `--chains`-1
              distractor chains); asks for every variable that holds the first chain's value.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import time
import zlib

import numpy as np

TASKS = ("multikey", "multivalue", "multiquery", "vartrack")
TEMPLATE_VERSION = 1  # part of every cell key: change it when a template's wording changes

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
MAGIC_NEEDLE = "One of the special magic numbers for {key} is: {value}."
VAR_VALUE = "VAR {name} = {value}."
VAR_COPY = "VAR {name} = VAR {source}."

MAGIC_INSTRUCTION = ("Below is a long text. Hidden inside it are a few special magic numbers, each one given for "
                     "a key. Read the whole text and remember every special magic number together with its key; "
                     "you will be asked about them at the end.")
VAR_INSTRUCTION = ("Below is a long text. Hidden inside it are variable assignments, either of a number "
                   "(\"VAR <name> = <number>.\") or of another variable (\"VAR <name> = VAR <other name>.\"), "
                   "which gives the variable the same value as the other one. Keep track of every assignment; "
                   "you will be asked which variables hold a given number.")

# keys: "<adjective>-<noun>" pairs (about 5000 of them) or short hex ids
_ADJECTIVES = ("amber", "bitter", "brave", "brisk", "calm", "chilly", "clever", "coral", "crimson", "curly", "dusty",
               "eager", "early", "faint", "fancy", "fierce", "fluffy", "frozen", "gentle", "giant", "golden", "grumpy",
               "hollow", "humble", "icy", "jolly", "keen", "lazy", "lively", "lucky", "misty", "modest", "narrow",
               "noble", "odd", "pale", "polite", "proud", "quiet", "rapid", "rusty", "salty", "shiny", "silent",
               "silver", "sleepy", "smooth", "sour", "spicy", "steady", "sticky", "stormy", "sunny", "swift", "tame",
               "tidy", "tiny", "vast", "velvet", "wary", "witty", "wooden", "young", "zesty", "hasty", "mellow",
               "plain", "rough")
_NOUNS = ("anchor", "apron", "badger", "banjo", "barrel", "beacon", "biscuit", "blanket", "bottle", "bucket",
          "cabin", "camel", "candle", "canyon", "carrot", "castle", "cello", "cherry", "comet", "cricket", "dolphin",
          "dragon", "falcon", "feather", "fiddle", "garden", "glacier", "goblet", "harbor", "hazel", "helmet",
          "island", "jacket", "kettle", "ladder", "lantern", "lemon", "magnet", "maple", "meadow", "mirror",
          "monkey", "needle", "oyster", "paddle", "parrot", "pebble", "pepper", "pillow", "pirate", "puzzle",
          "rabbit", "river", "rocket", "saddle", "salmon", "shovel", "spider", "sponge", "teapot", "thimble",
          "tiger", "tulip", "turnip", "violin", "walrus", "wagon", "whistle", "willow", "zebra", "orchid", "button")


@dataclasses.dataclass
class NeedleTask:
    """One generated prompt with its expected answers."""

    task: str
    length: int           # requested prompt length in tokens
    ids: np.ndarray       # [T] int32, T <= length and close to it
    text: str             # the prompt text (ids are its tokenization)
    answers: list[str]    # every one must appear in the answer
    needles: list[str]    # the needle sentences inserted, in text order, each exactly once
    queried: list[str]    # keys asked for (vartrack: the value asked for)
    distractors: list[str]  # values (vartrack: variable names) that must not be confused with answers
    depths: list[float]   # relative position of each needle in the haystack, in text order
    max_new_tokens: int


# --- haystack -------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


class Haystack:
    """The words of the filling text and the word boundaries where a needle may be inserted."""

    def __init__(self, text: str | None = None, name: str | None = None):
        self.name = name or ("filler" if text is None else "text")
        self.is_filler = text is None
        self.text = FILLER if text is None else text
        self.words = self.text.split()
        if not self.words:
            raise ValueError(f"haystack {self.name!r} contains no words")
        self._lower = self.text.lower()

    def contains(self, s: str) -> bool:
        """Whether `s` occurs in the haystack as a whole word (case-insensitive)."""
        return _found(self._lower, s)

    def words_for(self, n: int) -> list[str]:
        if self.is_filler:
            reps = -(-n // len(self.words))
            return (self.words * reps)[:n]
        if n > len(self.words):
            raise ValueError(f"haystack {self.name!r} has only {len(self.words)} words, {n} needed")
        return self.words[:n]

    @staticmethod
    def boundaries(words: list[str]) -> np.ndarray:
        """Word indices i (0..len) such that a needle may go before words[i]: sentence starts."""
        cut = [0] + [i + 1 for i, w in enumerate(words) if _SENTENCE_END.search(w)]
        if cut[-1] != len(words):
            cut.append(len(words))
        return np.asarray(sorted(set(cut)))


def load_haystack(path: str | None) -> Haystack:
    if path is None:
        return Haystack()
    if not os.path.isfile(path):
        raise ValueError(f"--haystack: no such file {path!r}")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return Haystack(text, name=path)


def haystack_id(hay: Haystack) -> dict | str:
    if hay.is_filler:
        return "filler"
    return {"file": os.path.basename(hay.name), "sha1": hashlib.sha1(hay.text.encode()).hexdigest()[:16]}


# --- random keys, values, names -------------------------------------------------------------------

def _value(rng: np.random.Generator) -> str:
    digits = int(rng.integers(5, 8))
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _word_key(rng: np.random.Generator) -> str:
    return f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"


def _uuid_key(rng: np.random.Generator) -> str:
    h = "".join("0123456789abcdef"[i] for i in rng.integers(16, size=12))
    return f"{h[:8]}-{h[8:]}"


def _var_name(rng: np.random.Generator) -> str:
    return "".join(chr(65 + i) for i in rng.integers(26, size=5))


def _distinct(rng, make, n: int, hay: "Haystack", taken: list[str] = ()) -> list[str]:
    """`n` distinct strings from `make(rng)`: none occurs in the haystack, and none is a substring of
    another one or of `taken` (so that no answer hides inside another)."""
    out: list[str] = []
    for _ in range(1000 * max(n, 1)):
        if len(out) == n:
            return out
        s = make(rng)
        low = s.lower()
        if hay.contains(s) or any(low in o.lower() or o.lower() in low for o in [*out, *taken]):
            continue
        out.append(s)
    raise RuntimeError(f"could not draw {n} distinct values")


# --- prompt assembly ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskParams:
    distractors: int = 3
    values: int = 4
    queries: int = 4
    hops: int = 4
    chains: int = 1
    key_kind: str = "word"
    chat: bool = False

    def validate(self) -> None:
        for name, low in (("distractors", 0), ("values", 1), ("queries", 1), ("hops", 1), ("chains", 1)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {v!r}")
        if self.key_kind not in ("word", "uuid"):
            raise ValueError(f"--key-kind must be 'word' or 'uuid', got {self.key_kind!r}")

    def for_task(self, task: str) -> dict:
        """The parameters that matter to `task` (part of the result cell key)."""
        own = {"multikey": ("distractors", "key_kind"), "multivalue": ("values", "key_kind"),
               "multiquery": ("queries", "key_kind"), "vartrack": ("hops", "chains")}[task]
        return {**{k: getattr(self, k) for k in own}, "chat": self.chat, "template": TEMPLATE_VERSION}


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def default_max_new_tokens(task: str, params: TaskParams) -> int:
    """Enough greedy tokens for a complete answer (digits are single tokens in the default tokenizer)."""
    if task == "multikey":
        return 16
    if task == "multivalue":
        return 10 * params.values + 8
    if task == "multiquery":
        return 24 * params.queries + 8  # the model often repeats each key before its number
    return 8 * (params.hops + 1) + 8


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _wrap(tokenizer, instruction: str, context: str, question: str, prefix: str, chat: bool) -> str:
    if not chat:
        return f"{instruction}\n\n{context}\n\n{question}\n{prefix}"
    user = f"{instruction}\n\n{context}\n\n{question}"
    head = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    return head + prefix


def _layout(task: str, rng: np.random.Generator, params: TaskParams, hay: Haystack):
    """Needles (in insertion order), their depths, and the fixed texts of one task."""
    make_key = _word_key if params.key_kind == "word" else _uuid_key
    if task in ("multikey", "multivalue", "multiquery"):
        if task == "multikey":
            keys = _distinct(rng, make_key, 1 + params.distractors, hay)
            values = _distinct(rng, _value, len(keys), hay)
            queried, answers, others = keys[:1], values[:1], values[1:]
            needles = [MAGIC_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
            question = f"Question: what is the special magic number for {keys[0]}? Give only the number."
            prefix = f"Answer: the special magic number for {keys[0]} is"
        elif task == "multivalue":
            key = _distinct(rng, make_key, 1, hay)[0]
            values = _distinct(rng, _value, params.values, hay)
            queried, answers, others = [key], values, []
            needles = [MAGIC_NEEDLE.format(key=key, value=v) for v in values]
            question = (f"Question: what are all the special magic numbers for {key}? "
                        "List every one of them, separated by commas.")
            prefix = f"Answer: the special magic numbers for {key} are"
        else:
            keys = _distinct(rng, make_key, params.queries, hay)
            values = _distinct(rng, _value, len(keys), hay)
            queried, answers, others = keys, values, []
            needles = [MAGIC_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
            question = (f"Question: what are the special magic numbers for {_join_keys(keys)}? "
                        "Give each number, separated by commas.")
            prefix = f"Answer: the special magic numbers for {_join_keys(keys)} are"
        depths = rng.random(len(needles))
        order = np.argsort(depths, kind="stable")  # the text order of the needles
        return MAGIC_INSTRUCTION, needles, depths, order, question, prefix, queried, answers, others
    # vartrack: chain 0 is asked for; chains are interleaved, each in its own assignment order
    n_vars = params.hops + 1
    names = _distinct(rng, _var_name, n_vars * params.chains, hay)
    values = _distinct(rng, _value, params.chains, hay)
    needles, chain_of = [], []
    for c in range(params.chains):
        chain = names[c * n_vars:(c + 1) * n_vars]
        needles.append(VAR_VALUE.format(name=chain[0], value=values[c]))
        needles += [VAR_COPY.format(name=b, source=a) for a, b in zip(chain, chain[1:])]
        chain_of += [c] * n_vars
    depths = np.empty(len(needles))
    for c in range(params.chains):  # sorted within a chain: every assignment follows its source
        idx = [i for i, cc in enumerate(chain_of) if cc == c]
        depths[idx] = np.sort(rng.random(len(idx)))
    order = np.argsort(depths, kind="stable")
    question = (f"Question: which variables hold the value {values[0]}? "
                "List all of them, separated by commas.")
    # ending on "VAR" makes a small model list names instead of drifting back into the filler
    prefix = f"Answer: the variables that hold the value {values[0]} are: VAR"
    return (VAR_INSTRUCTION, needles, depths, order, question, prefix, [values[0]], names[:n_vars],
            names[n_vars:])


def task_rng(seed: int, task: str, length: int, trial: int) -> np.random.Generator:
    """The generator of one (task, length, trial): independent of the other tasks, lengths and methods."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, trial])


def make_task(tokenizer, task: str, length: int, rng: np.random.Generator, params: TaskParams = TaskParams(),
              haystack: Haystack | None = None, max_new_tokens: int | None = None) -> NeedleTask:
    """A prompt of at most `length` tokens (and within about 1% of it) for `task`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    params.validate()
    hay = haystack or Haystack()
    instruction, needles, depths, order, question, prefix, queried, answers, others = \
        _layout(task, rng, params, hay)
    needles = [needles[i] for i in order]
    depths = [float(depths[i]) for i in order]

    def build(n_words: int) -> str:
        words = hay.words_for(n_words)
        cut = Haystack.boundaries(words)
        # each needle goes to the sentence boundary nearest to its depth (depths are sorted)
        at = [int(cut[np.argmin(np.abs(cut - d * n_words))]) for d in depths]
        pieces, start = [], 0
        for pos, needle in zip(at, needles):
            pieces += words[start:pos] + [needle]
            start = pos
        pieces += words[start:]
        return _wrap(tokenizer, instruction, " ".join(pieces), question, prefix, params.chat)

    fixed = _ntok(tokenizer, build(0))
    if fixed > length:
        raise ValueError(f"length {length} is too short for the {task} task: its instruction, needles and "
                         f"question alone take {fixed} tokens")
    # the largest word count whose prompt fits: gallop from an estimate, then bisect
    limit = None if hay.is_filler else len(hay.words)

    def fits(n_words: int) -> bool:
        return _ntok(tokenizer, build(n_words)) <= length

    per_word = max(_ntok(tokenizer, " ".join(hay.words_for(min(200, limit or 200)))) / min(200, limit or 200), 0.1)
    guess = max(1, int((length - fixed) / per_word))
    if limit is not None:
        guess = min(guess, limit)
    step = max(4, guess // 64)
    lo, hi = 0, None  # fits(lo), not fits(hi) (None: the whole haystack fits)
    if fits(guess):
        lo = guess
        while limit is None or lo < limit:
            nxt = lo + step if limit is None else min(lo + step, limit)
            if not fits(nxt):
                hi = nxt
                break
            lo, step = nxt, step * 2
    else:
        hi = guess
        while True:
            nxt = max(0, hi - step)
            if nxt == 0 or fits(nxt):
                lo = nxt
                break
            hi, step = nxt, step * 2
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    text = build(lo)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    tolerance = max(4, length // 100)
    if len(ids) < length - tolerance:
        raise ValueError(f"haystack {hay.name!r} is too short: {len(hay.words)} words give a {len(ids)}-token "
                         f"prompt, {length} tokens requested")
    mnt = max_new_tokens if max_new_tokens is not None else default_max_new_tokens(task, params)
    return NeedleTask(task, length, ids, text, list(answers), needles, list(queried), list(others), depths, mnt)


# --- scoring --------------------------------------------------------------------------------------

def _found(text: str, answer: str) -> bool:
    """`answer` occurs in `text` as a whole word (case-insensitive): 12345 is not found in 123456."""
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(answer.lower()) + r"(?![A-Za-z0-9])", text.lower()) is not None


def score(text: str, answers: list[str]) -> tuple[float, int]:
    """(fraction of `answers` found in `text`, 1 if all are found else 0)."""
    if not answers:
        raise ValueError("no expected answers")
    hits = sum(_found(text, a) for a in answers)
    return hits / len(answers), int(hits == len(answers))


# --- running --------------------------------------------------------------------------------------

def generate_batch(params, config, attention, tasks: list[NeedleTask], tokenizer) -> list[str]:
    """Greedy continuations of a left-padded batch (one max_new_tokens for the batch)."""
    from lh_jax.runtime import generate_batch as generate_ids
    mnt = max(t.max_new_tokens for t in tasks)
    rows = generate_ids(params, config, [t.ids for t in tasks], mnt, attention)
    return [tokenizer.decode(new[:t.max_new_tokens], skip_special_tokens=True) for new, t in zip(rows, tasks)]


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"--tasks: unknown task(s) {bad or text!r}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def results_table(rows: list[dict], labels: list[str]) -> str:
    """task x length rows, one column per method: mean score (all-found count / trials)."""
    lines = ["| task | length | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    cells = sorted({(r["task"], r["length"]) for r in rows}, key=lambda c: (TASKS.index(c[0]), c[1]))
    for task, n in cells:
        out = []
        for label in labels:
            rs = [r for r in rows if r["task"] == task and r["length"] == n and r["label"] == label]
            out.append("—" if not rs else
                       f"{np.mean([r['score'] for r in rs]):.2f} ({sum(r['all_found'] for r in rs)}/{len(rs)})")
        lines.append(f"| {task} | {n} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], labels: list[str], tasks: list[str], path: str) -> None:
    from lh_jax.experiments.common import matplotlib_pyplot
    plt = matplotlib_pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label in labels:
            rs = [r for r in rows if r["task"] == task and r["label"] == label]
            lengths = sorted({r["length"] for r in rs})
            means = [np.mean([r["score"] for r in rs if r["length"] == n]) for n in lengths]
            ax.plot(lengths, means, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(task)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def task_params_from_args(args) -> TaskParams:
    return TaskParams(args.distractors, args.values, args.queries, args.hops, args.chains, args.key_kind, args.chat)


def cli_main(args) -> dict:
    """Runs the grid; returns {"computed": cells run now, "skipped": cells found done, "paths": ...}."""
    import lh_jax
    from lh_jax.experiments.bench import parse_lengths
    from lh_jax.experiments.common import ResultStore, progress, run_metadata, write_outputs

    # every check that needs no model first
    tasks = parse_tasks(args.tasks)
    try:
        lengths = parse_lengths(args.lengths)
    except ValueError as e:
        raise ValueError(f"--lengths: {e}") from None
    params = task_params_from_args(args)
    params.validate()
    for name in ("trials", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    specs = args.methods
    hay = load_haystack(args.haystack)
    tokenizer = lh_jax.load_tokenizer(args.model)
    prompts = {(task, n, t): make_task(tokenizer, task, n, task_rng(args.seed, task, n, t), params, hay,
                                       args.max_new_tokens)
               for task in tasks for n in lengths for t in range(args.trials)}

    store = ResultStore(args.out, resume=not args.no_resume)
    hay_id = haystack_id(hay)

    def key(spec, task, n, t):
        return {"model": args.model, "dtype": args.dtype, "method": spec.to_dict(), **spec.cell_fields(), "task": task,
                "params": {**params.for_task(task), "haystack": hay_id,
                           "max_new_tokens": prompts[(task, n, t)].max_new_tokens},
                "length": n, "trial": t, "seed": args.seed}

    groups = []  # (spec, task, length, pending trials)
    for spec in specs:
        for task in tasks:
            for n in lengths:
                pending = [t for t in range(args.trials) if key(spec, task, n, t) not in store]
                if pending:
                    groups.append((spec, task, n, pending))
    total = sum(args.trials for _ in specs for _ in tasks for _ in lengths)
    todo = sum(len(g[3]) for g in groups)
    computed = 0
    if groups:
        config, model_params = lh_jax.load(args.model, dtype=args.dtype)
        bar = progress(range(todo), total=todo, desc="needle")
        built = {}
        for spec, task, n, pending in groups:
            if (spec, n) not in built:
                built[(spec, n)] = spec.build(config, n)
            config_n, attention = built[(spec, n)]
            for b in range(0, len(pending), args.batch_size):
                trials = pending[b:b + args.batch_size]
                batch = [prompts[(task, n, t)] for t in trials]
                t0 = time.perf_counter()
                texts = generate_batch(model_params, config_n, attention, batch, tokenizer)
                seconds = (time.perf_counter() - t0) / len(batch)
                for t, pr, text in zip(trials, batch, texts):
                    frac, all_found = score(text, pr.answers)
                    store.add(key(spec, task, n, t), {
                        "label": spec.label, "tokens": int(len(pr.ids)), "answers": pr.answers,
                        "queried": pr.queried, "depths": [round(d, 4) for d in pr.depths], "output": text,
                        "score": frac, "all_found": all_found,
                        "distractors_output": sum(_found(text, d) for d in pr.distractors),
                        "batch_size": len(batch), "seconds": seconds})
                    computed += 1
                bar.update(len(batch))
        bar.close()
    keys = [key(spec, task, n, t) for spec in specs for task in tasks for n in lengths for t in range(args.trials)]
    rows = store.rows(keys)
    labels = list(dict.fromkeys(s.label for s in specs))
    table = results_table(rows, labels)
    meta = run_metadata(args, tasks=tasks, lengths=lengths, task_params=dataclasses.asdict(params),
                        haystack=hay_id, methods=[s.to_dict() for s in specs], template_version=TEMPLATE_VERSION)
    paths = write_outputs(args.out, "needle", meta, rows, table)
    paths["png"] = os.path.join(args.out, "needle.png")
    plot(rows, labels, tasks, paths["png"])
    print(f"\nscore = fraction of expected answers found (all found / trials); {computed} cells run, "
          f"{total - todo} reused\n" + table)
    return {"computed": computed, "skipped": total - todo, "paths": paths, "rows": rows}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lh_jax.experiments.common import add_common_arguments
    from lh_jax.methods import add_method_arguments
    add_common_arguments(p, "needle")
    add_method_arguments(p, multiple=True, default="full,longheads")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of: {', '.join(TASKS)}")
    p.add_argument("--lengths", default="4k,8k,16k", help="prompt lengths in tokens, e.g. 2k,4k or 3000")
    p.add_argument("--trials", type=int, default=4, help="prompts per (task, length)")
    p.add_argument("--distractors", type=int, default=3, help="multikey: needles with other keys")
    p.add_argument("--values", type=int, default=4, help="multivalue: numbers given for the one key")
    p.add_argument("--queries", type=int, default=4, help="multiquery: keys asked at once")
    p.add_argument("--hops", type=int, default=4, help="vartrack: assignments after the first (chain length - 1)")
    p.add_argument("--chains", type=int, default=1, help="vartrack: chains (1 asked + distractor chains)")
    p.add_argument("--key-kind", default="word", choices=["word", "uuid"],
                   help="keys as adjective-noun words or short hex ids")
    p.add_argument("--haystack", default=None, metavar="FILE",
                   help="text file used as haystack (default: the passkey filler repeated)")
    p.add_argument("--chat", action="store_true", help="wrap instruction+text+question in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: chosen per task")
