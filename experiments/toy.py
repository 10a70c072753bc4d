"""Controlled testbed: a tiny LLaMA trained from scratch on associative recall, then asked to
retrieve beyond its trained length with full attention, LongHeads and a sliding window.

    lh-jax train-toy                      # evaluate the committed model (experiments/assets/toy)
    lh-jax train-toy --train              # train a new one first (~2-3 CPU minutes), then evaluate
    lh-jax train-toy --lengths 256,1k,2k,4k,8k --samples 256 --out results/toy

The task (all ids in a vocabulary of 384):

    BOS  a b c d e f g h a b PPPP c d ... PPPP ...  k_a v_a  k_b v_b ...   (Q = 8 query pairs)
         \_______ haystack: a filler cycle + needles ________/ \___ query block ___/

* the haystack repeats a cycle of 8 filler ids (drawn per sequence from 32, random phase), like
  the repeated "The grass is green..." filler of passkey retrieval;
* each needle `PPPP` is one pair token P(k, v) meaning "key k has value v" (16 keys x 16 values
  = 256 pair ids), written 4 times in a row over the filler; 16 needles with distinct keys sit
  at uniformly random places (not aligned to chunks);
* the query block repeats Q distinct keys as key tokens, each followed by its value token; the
  model is scored on predicting the value after each key token (chance 1/16).

The answer is held by exactly one place in the context (the needle), so retrieval has to find
it. The trained length is 256 (`max_position_embeddings=256`); evaluation lengthens the
haystack to 1k-8k tokens with the same 16 needles and 8 queries.

Design choices (and why; found by trying, numbers from this 2-core machine):
* **Fused pair tokens.** The obvious format, a key token followed by a value token, needs a
  two-layer induction circuit (previous-token head, then key matching). Trained within the time
  budget it stayed on the plateau (after 600 steps loss 3.95 vs ln 64 = 4.16). With one
  token per pair, retrieval is one content match (key token . pair token) and a copy (pair ->
  value), learnt in ~200 steps. It is still what LongHeads must do: find the chunk holding it.
* **Needle of 4 repeated tokens over a periodic filler.** With i.i.d. random filler and a single
  pair token, a model at 0.91 accuracy at 256 tokens reached with LongHeads 16x16 only 0.50 at
  1k (0.22 at 4k; 64 queries each): the paper's chunk representation (attention-pooled keys) averages the one
  needle key with 15 random filler keys, whose fluctuation from chunk to chunk swamps it (the
  layer-0 heads selected the needle's chunk for ~45 % of queries; correct answers went with
  selected chunks). Quest-style key bounds (`chunk_repr="bounds"`) found it (0.92 at 1k). With
  the needle spanning 4 tokens and a filler that is the same in every chunk, the needle
  dominates its chunk's representation, as a multi-token passkey sentence does in a real text.
  `ToyTask(filler_period=0, needle_repeat=1)` is that harder variant.
* **Length curriculum.** Most steps train on 64-token sequences (cheap; the circuit forms
  there), the last 150 on 256 tokens so that every position up to the trained length is seen.
* **Values after keys in the query block** give 8 supervised predictions per sequence.
* The model: 2 layers, hidden 64, 4 query heads of dim 32 over 2 KV heads (GQA), RoPE theta 1e4,
  SwiGLU 128, untied head: ~148k parameters, 0.6 MB in float32. AdamW (b2 0.98, wd 0.01),
  linear warmup then cosine decay from 3e-3, gradient clipping at 1.
* LongHeads / sliding windows use chunks of 16 (x16 chunks) or 32 (x8): window 256 = the trained
  length, so the first 256 tokens get plain full attention (the model's own behaviour). The
  "far" accuracy counts only queries whose needle lies before the last 256 tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")
TASK_FILE = "toy_task.json"
BOS = 0


@dataclasses.dataclass(frozen=True)
class ToyTask:
    """Token layout and sizes of the recall task (see the module docstring)."""

    num_filler: int = 32
    num_keys: int = 16
    num_values: int = 16
    num_queries: int = 8  # query pairs at the end of an evaluation sequence
    vocab_size: int = 384
    filler_period: int = 8  # the haystack repeats a fixed cycle of this many filler ids (0: random filler)
    needle_repeat: int = 4  # each pair token is written this many times in a row

    @property
    def filler_start(self) -> int:
        return 2  # id 1 is reserved

    @property
    def key_start(self) -> int:
        return self.filler_start + self.num_filler

    @property
    def pair_start(self) -> int:
        return self.key_start + self.num_keys

    @property
    def value_start(self) -> int:
        return self.pair_start + self.num_keys * self.num_values

    def __post_init__(self):
        for name in ("num_filler", "num_keys", "num_values", "num_queries", "vocab_size", "needle_repeat"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ToyTask: {name} must be a positive integer, got {v!r}")
        if self.value_start + self.num_values > self.vocab_size:
            raise ValueError(f"ToyTask: vocab_size={self.vocab_size} is too small for the layout "
                             f"(needs {self.value_start + self.num_values})")
        if not 0 <= self.filler_period <= self.num_filler:
            raise ValueError(f"ToyTask: filler_period={self.filler_period} must be in [0, num_filler={self.num_filler}]")
        if self.num_queries > self.num_keys:
            raise ValueError(f"ToyTask: num_queries={self.num_queries} exceeds num_keys={self.num_keys} "
                             "(queried keys are distinct)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Batch:
    ids: np.ndarray  # [B, T] int32
    targets: np.ndarray  # [B, Q] the value ids to predict
    query_pos: np.ndarray  # [B, Q] index of the key token whose logits predict the value
    pair_pos: np.ndarray  # [B, Q] index of the (first) pair token holding the answer


def make_batch(task: ToyTask, rng: np.random.Generator, batch: int, length: int,
               num_pairs: int | None = None, num_queries: int | None = None) -> Batch:
    """`batch` sequences of `length` tokens. num_pairs: pairs in the haystack (default: random in
    [num_queries, num_keys] per sequence); num_queries: query pairs at the end (default task's)."""
    Q = task.num_queries if num_queries is None else num_queries
    if not 1 <= Q <= task.num_keys:
        raise ValueError(f"num_queries={Q} must be in [1, {task.num_keys}]")
    if num_pairs is not None and not Q <= num_pairs <= task.num_keys:
        raise ValueError(f"num_pairs={num_pairs} must be in [num_queries={Q}, num_keys={task.num_keys}]")
    hay = length - 1 - 2 * Q
    r = task.needle_repeat
    max_pairs = min(task.num_keys, hay // r)  # short training sequences hold fewer pairs
    if max_pairs < Q or (num_pairs is not None and num_pairs > max_pairs):
        need = 1 + 2 * Q + r * max(Q, num_pairs or 0)
        raise ValueError(f"length={length} is too short for {Q} queries and {max(Q, num_pairs or 0)} pairs of "
                         f"{r} tokens (needs at least {need})")
    if task.filler_period:
        cycle = rng.permutation(task.num_filler)[:task.filler_period]
        phase = rng.integers(0, task.filler_period, size=(batch, 1))
        ids = task.filler_start + cycle[(np.arange(length)[None, :] + phase) % task.filler_period]
    else:
        ids = task.filler_start + rng.integers(0, task.num_filler, size=(batch, length))
    ids = ids.astype(np.int32)
    ids[:, 0] = BOS
    targets = np.empty((batch, Q), np.int32)
    query_pos = np.broadcast_to(1 + hay + 2 * np.arange(Q, dtype=np.int32), (batch, Q)).copy()
    pair_pos = np.empty((batch, Q), np.int32)
    for b in range(batch):
        P = num_pairs if num_pairs is not None else int(rng.integers(Q, max_pairs + 1))
        keys = rng.choice(task.num_keys, size=P, replace=False)
        vals = rng.integers(0, task.num_values, size=P)
        # P runs of r tokens, non-overlapping, anywhere in the haystack [1, hay]
        pos = 1 + np.sort(rng.choice(hay - P * (r - 1), size=P, replace=False)) + np.arange(P) * (r - 1)
        for j in range(r):
            ids[b, pos + j] = task.pair_start + keys * task.num_values + vals
        q = rng.choice(P, size=Q, replace=False)
        ids[b, query_pos[b]] = task.key_start + keys[q]
        ids[b, query_pos[b] + 1] = task.value_start + vals[q]
        targets[b] = task.value_start + vals[q]
        pair_pos[b] = pos[q]
    return Batch(ids, targets, query_pos, pair_pos)


# --- model and training -----------------------------------------------------------------------

def model_config(task: ToyTask, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 head_dim: int = 32, trained_length: int = 256):
    from lh_jax.models import ModelConfig
    return ModelConfig(vocab_size=task.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       max_position_embeddings=trained_length, rms_norm_eps=1e-5, model_type="llama",
                       bos_token_id=BOS)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 700  # total optimizer steps
    long_steps: int = 150  # the last steps train at the full trained length
    short_length: int = 64
    batch: int = 32
    long_batch: int = 16
    lr: float = 3e-3
    warmup: int = 35
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.long_steps <= self.steps or self.steps < 1:
            raise ValueError(f"need 0 <= long_steps ({self.long_steps}) <= steps ({self.steps}) and steps >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def _model(config):
    from lh_jax.models import FullAttention
    from lh_jax.models.llama import Transformer
    # the dense (differentiable) attention path at every training length
    return Transformer(config, FullAttention(differentiable=True))


def init_params(config, seed: int = 0):
    import jax
    import jax.numpy as jnp
    from lh_jax.runtime import context
    ids = jnp.zeros((1, 8), jnp.int32)
    return _model(config).init(jax.random.PRNGKey(seed), ids, context(jnp.ones((1, 8), bool), 0))["params"]


def make_optimizer(s: TrainSettings):
    import optax
    sched = optax.warmup_cosine_decay_schedule(0.0, s.lr, s.warmup, s.steps, s.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(s.clip),
                       optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=s.weight_decay))


def make_train_step(config, optimizer):
    """A jitted (params, opt_state, ids, targets, query_pos) -> (params, opt_state, loss, acc)."""
    import jax
    import jax.numpy as jnp
    import optax
    from lh_jax.runtime import context
    model = _model(config)

    def loss_fn(params, ids, targets, query_pos):
        logits, _, _ = model.apply({"params": params}, ids, context(jnp.ones(ids.shape, bool), 0), None)
        lg = jnp.take_along_axis(logits, query_pos[..., None], axis=1)  # B Q V
        nll = jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, targets[..., None], -1)[..., 0]
        return nll.mean(), jnp.mean(jnp.argmax(lg, -1) == targets)

    @jax.jit
    def step(params, opt_state, ids, targets, query_pos):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ids, targets, query_pos)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    return step


def train(task: ToyTask, config, settings: TrainSettings, log_every: int = 50, log=print):
    """Train from scratch; returns (params, history [{step, length, loss, acc, seconds}])."""
    import jax
    rng = np.random.default_rng(settings.seed)
    params = init_params(config, settings.seed)
    optimizer = make_optimizer(settings)
    opt_state = optimizer.init(params)
    step = make_train_step(config, optimizer)
    history, t0 = [], time.perf_counter()
    long_from = settings.steps - settings.long_steps
    for i in range(settings.steps):
        long = i >= long_from
        T = config.max_position_embeddings if long else settings.short_length
        b = make_batch(task, rng, settings.long_batch if long else settings.batch, T)
        params, opt_state, loss, acc = step(params, opt_state, b.ids, b.targets, b.query_pos)
        if (i + 1) % log_every == 0 or i == 0 or i == settings.steps - 1:
            rec = {"step": i + 1, "length": T, "loss": float(loss), "acc": float(acc),
                   "seconds": time.perf_counter() - t0}
            history.append(rec)
            log(f"step {rec['step']:5d}  len {T:4d}  loss {rec['loss']:.3f}  acc {rec['acc']:.3f}  "
                f"{rec['seconds']:.0f}s")
    return jax.device_get(params), history


# --- saving / loading -------------------------------------------------------------------------

def save_toy(path: str, task: ToyTask, config, params, settings: TrainSettings | None = None,
             history: list | None = None, train_seconds: float | None = None) -> None:
    """An orbax directory `lh_jax.load` reads, plus toy_task.json (task + training settings)."""
    from lh_jax.convert import save_orbax
    save_orbax(path, config, params)
    meta = {"task": task.to_dict(), "train": dataclasses.asdict(settings) if settings else None,
            "train_seconds": train_seconds, "history": history or []}
    with open(os.path.join(path, TASK_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def load_toy(path: str = ASSET_DIR, dtype: str = "float32"):
    """(task, config, params) of a saved toy model (default: the committed one)."""
    import lh_jax
    task_file = os.path.join(path, TASK_FILE)
    if not os.path.isfile(task_file):
        raise FileNotFoundError(f"{path} is not a toy model directory (no {TASK_FILE}); train one with "
                                "`lh-jax train-toy --train --model-dir DIR`")
    with open(task_file) as f:
        task = ToyTask(**json.load(f)["task"])
    config, params = lh_jax.load(path, dtype=dtype)
    return task, config, params


# --- evaluation -------------------------------------------------------------------------------

def recall_accuracy(params, config, attention, batch: Batch, window: int | None = None) -> dict:
    """Accuracy of the value predicted at every query of `batch`; with `window`, also over the
    queries whose pair lies entirely before the last `window` tokens ("far")."""
    import lh_jax
    logits = lh_jax.forward(params, config, batch.ids, attention=attention)
    pick = np.take_along_axis(np.asarray(logits), batch.query_pos[..., None], axis=1)  # B Q V
    correct = pick.argmax(-1) == batch.targets
    out = {"correct": int(correct.sum()), "n": int(correct.size)}
    if window is not None:
        far = batch.pair_pos < batch.ids.shape[1] - window
        out.update(correct_far=int(correct[far].sum()), n_far=int(far.sum()))
    return out


def evaluate(params, config, task: ToyTask, lengths, specs, samples: int = 256, batch_size: int = 8,
             seed: int = 0, store=None, model_id: str = "", progress: bool = True) -> list[dict]:
    """One row per (length, method): accuracy over `samples` queries (num_queries per sequence,
    16 pairs per sequence); the same sequences for every method at a length."""
    from lh_jax.experiments.common import progress as bar
    n_seq = -(-samples // task.num_queries)
    rows, cells = [], [(n, s) for n in lengths for s in specs]
    for length, spec in bar(cells, total=len(cells), desc="toy") if progress else cells:
        key = {"model": model_id, "length": length, "method": spec.label, **spec.cell_fields(), "samples": samples,
               "seed": seed}
        hit = store.get(key) if store is not None else None
        if hit is None:
            cfg, attention = spec.build(config, length)
            window = attention.window if spec.longheads is not None else config.trained_length
            rng = np.random.default_rng([seed, length])
            tot = {"correct": 0, "n": 0, "correct_far": 0, "n_far": 0}
            t0 = time.perf_counter()
            for start in range(0, n_seq, batch_size):
                b = make_batch(task, rng, min(batch_size, n_seq - start), length, num_pairs=task.num_keys)
                for k, v in recall_accuracy(params, cfg, attention, b, window).items():
                    tot[k] += v
            hit = {"accuracy": tot["correct"] / tot["n"], "n": tot["n"],
                   "accuracy_far": tot["correct_far"] / tot["n_far"] if tot["n_far"] else None,
                   "n_far": tot["n_far"], "window": window, "seconds": round(time.perf_counter() - t0, 2),
                   "spec": spec.to_dict()}
            if store is not None:
                store.add(key, hit)
        rows.append({**key, **hit})
    return rows


def accuracy_table(rows: list[dict], task: ToyTask | None = None) -> str:
    lengths = sorted({r["length"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["length"]): r for r in rows}
    head = "| method | " + " | ".join(str(n) for n in lengths) + " |"
    lines = [head, "|---" * (len(lengths) + 1) + "|"]
    for m in methods:
        vals = []
        for n in lengths:
            r = cell.get((m, n))
            if r is None:
                vals.append("")
                continue
            far = "" if r.get("accuracy_far") is None or n <= r["window"] else f" ({r['accuracy_far']:.2f})"
            vals.append(f"{r['accuracy']:.2f}{far}")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    note = "accuracy of the value prediction; in parentheses: over the queries whose pair lies outside the last window"
    if task is not None:
        note += f"; chance {1 / task.num_values:.3f}"
    return "\n".join(lines) + "\n\n" + note


def plot(rows: list[dict], path: str, trained_length: int, chance: float) -> None:
    from lh_jax.experiments.common import matplotlib_pyplot
    plt = matplotlib_pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("v", ":"), ("D", "-"), ("x", "--")]
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["length"])
        marker, ls = styles[i % len(styles)]
        ax.plot([r["length"] for r in rs], [r["accuracy"] for r in rs], marker=marker, ls=ls, label=m)
    ax.axvline(trained_length, color="grey", ls=":", lw=1)
    ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"toy associative recall (trained at {trained_length})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line ------------------------------------------------------------------------------

DEFAULT_METHODS = "full,longheads:16x16,longheads:32x8,sliding:16x16,longheads:16x16/bounds"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", action="store_true", help="train a new model (else evaluate --model-dir)")
    p.add_argument("--model-dir", default=ASSET_DIR, help="where the toy model is read from / saved to "
                   "(default: the committed asset)")
    p.add_argument("--steps", type=int, default=TrainSettings.steps, help="optimizer steps")
    p.add_argument("--long-steps", type=int, default=TrainSettings.long_steps,
                   help="the last steps train at the full trained length (256)")
    p.add_argument("--lr", type=float, default=TrainSettings.lr, help="peak learning rate")
    p.add_argument("--lengths", default="256,1k,2k,4k,8k", help="evaluation lengths")
    from lh_jax.methods import add_method_arguments
    add_method_arguments(p, multiple=True, default=DEFAULT_METHODS)
    p.add_argument("--samples", type=int, default=256, help="queries per (length, method)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--seed", type=int, default=0, help="training and evaluation seed")
    p.add_argument("--out", default=os.path.join("results", "toy"), help="output directory")
    p.add_argument("--no-resume", action="store_true", help="recompute every cell")


def cli_main(args) -> None:
    from lh_jax.experiments.bench import parse_lengths
    from lh_jax.experiments.common import ResultStore, run_metadata, write_outputs
    lengths = parse_lengths(args.lengths)
    specs = args.methods
    if args.samples < 1 or args.batch_size < 1:
        raise ValueError("--samples and --batch-size must be positive")
    def check_lengths(task):  # before any long computation
        for n in lengths:
            make_batch(task, np.random.default_rng(0), 1, n, num_pairs=task.num_keys)

    train_info = None
    if args.train:
        check_lengths(ToyTask())
        if os.path.abspath(args.model_dir) == os.path.abspath(ASSET_DIR):
            print(f"note: overwriting the committed asset {ASSET_DIR}", file=sys.stderr)
        task = ToyTask()
        config = model_config(task)
        settings = TrainSettings(steps=args.steps, long_steps=args.long_steps, lr=args.lr, seed=args.seed)
        t0 = time.perf_counter()
        params, history = train(task, config, settings)
        seconds = time.perf_counter() - t0
        print(f"trained {settings.steps} steps in {seconds:.0f}s (compilation included)")
        save_toy(args.model_dir, task, config, params, settings, history, seconds)
        args.no_resume = True  # a new model: old cells do not apply
        train_info = {"train_seconds": seconds, "settings": dataclasses.asdict(settings)}
    task, config, params = load_toy(args.model_dir)
    check_lengths(task)
    store = ResultStore(args.out, resume=not args.no_resume)
    rows = evaluate(params, config, task, lengths, specs, args.samples, args.batch_size, args.seed, store,
                    model_id=os.path.abspath(args.model_dir))
    table = accuracy_table(rows, task)
    print(table)
    meta = run_metadata(args, task=task.to_dict(), model=config.to_dict(), train=train_info)
    write_outputs(args.out, "toy", meta, rows, table)
    plot(rows, os.path.join(args.out, "toy.png"), config.trained_length, 1 / task.num_values)
    print(f"wrote {args.out}/toy.json, .csv, .md, .png")
