"""`lh-jax compare` end to end on a tiny random Llama with the default model's tokenizer: the summary
agrees with each task's own outputs (recomputed here from their rows and cells), every task writes
into OUT/<task>/, a rerun computes nothing, the seed fixes every cell, and bad input fails before
any model weights are loaded.
"""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

import lh_jax
import lh_jax.cli
import re

from conftest import cli_error, copy_without_weights, save_tiny_with_tokenizer
from lh_jax import runtime
from lh_jax.experiments import needle as N
from lh_jax.experiments import passkey as pk

LABELS = ["full", "longheads:16x4"]
# one length; passkey and needle share a compiled program (prompt bucket 256, 16 decode steps)
RUN = ["--methods", "full,longheads:16x4", "--lengths", "256",
       "--trials", "2", "--depths", "0.25,0.75", "--max-new-tokens", "12", "--needle-tasks", "multikey,vartrack",
       "--bucket", "64", "--reference-context", "128", "--seed", "7"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("compare_model"), seed=13)


@pytest.fixture(scope="module")
def no_weights_dir(tmp_path_factory, model_dir) -> str:
    """The tiny model's config and tokenizer without weights: loading the model fails."""
    return copy_without_weights(model_dir, tmp_path_factory.mktemp("compare_no_weights"))


class Spy:
    """Counts calls of the real runtime.generate and runtime.token_logprobs."""

    def __init__(self, monkeypatch):
        self.generate, self.logprobs = 0, 0
        gen, lp = runtime.generate, runtime.token_logprobs

        def spy_generate(*a, **kw):
            self.generate += 1
            return gen(*a, **kw)

        def spy_logprobs(*a, **kw):
            self.logprobs += 1
            return lp(*a, **kw)
        monkeypatch.setattr(runtime, "generate", spy_generate)
        monkeypatch.setattr(runtime, "token_logprobs", spy_logprobs)


def run(model, out, *extra):
    lh_jax.cli.main(["compare", "--model", model, "--out", str(out), *RUN, *extra])
    with open(os.path.join(out, "compare.json")) as f:
        return json.load(f)


def cells(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def first(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_out")
    return str(out), run(model_dir, out)


def same(x, y) -> bool:
    """Equal results: floats to 1e-6 (log-likelihood sums), everything else exactly; timings ignored."""
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x if k != "seconds")
    if isinstance(x, list):
        return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
    if isinstance(x, float):
        return x == pytest.approx(y, rel=1e-6)
    return x == y


def values(data) -> dict:
    return {(r["label"], r["task"], r["subtask"], r["length"], r["metric"]): r["value"] for r in data["rows"]}


def test_outputs_and_summary_match_the_tasks(first):
    out, data = first
    for name in ("compare.md", "compare.json", "compare.csv", "compare.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for task in ("passkey", "perplexity", "needle"):
        for ext in ("json", "md", "png"):
            assert os.path.getsize(os.path.join(out, task, f"{task}.{ext}")) > 0
        assert os.path.getsize(os.path.join(out, task, "cells.jsonl")) > 0
    meta = data["meta"]
    assert meta["labels"] == LABELS and meta["lengths"] == [256]
    assert {"date", "argv", "versions", "machine", "args", "command"} <= set(meta)
    assert meta["command"].startswith("lh-jax compare ") and "--lengths 256" in meta["command"]
    got = values(data)

    # passkey: accuracy over the task's own cells (2 depths x 2 trials), rescored from the answers
    pk_cells = cells(os.path.join(out, "passkey", "cells.jsonl"))
    assert len(pk_cells) == 2 * 2 * 2
    for label in LABELS:
        mine = [c for c in pk_cells if c["result"]["label"] == label]
        assert len(mine) == 4 and {(c["key"]["depth"], c["key"]["trial"]) for c in mine} == \
            {(0.25, 0), (0.25, 1), (0.75, 0), (0.75, 1)}
        assert all(c["key"]["seed"] == 7 and c["key"]["max_new_tokens"] == 12 for c in mine)
        acc = np.mean([pk.answer_matches(c["result"]["answer"], c["result"]["key"]) for c in mine])
        assert got[label, "passkey", None, 256, "accuracy"] == pytest.approx(acc)

    # needle: mean score per task (rescored from the outputs) and their mean
    nd_cells = cells(os.path.join(out, "needle", "cells.jsonl"))
    assert len(nd_cells) == 2 * 2 * 2
    for label in LABELS:
        means = []
        for sub in ("multikey", "vartrack"):
            mine = [c["result"] for c in nd_cells if c["result"]["label"] == label and c["key"]["task"] == sub]
            assert len(mine) == 2
            scores = [N.score(r["output"], r["answers"]) for r in mine]
            means.append(np.mean([s for s, _ in scores]))
            assert got[label, "needle", sub, 256, "score"] == pytest.approx(means[-1])
            assert got[label, "needle", sub, 256, "all_found"] == pytest.approx(np.mean([a for _, a in scores]))
        assert got[label, "needle", "mean", 256, "score"] == pytest.approx(np.mean(means))

    # perplexity: bucket ratios recomputed from the raw NLL sums of the cells (4 buckets of 64)
    pp_cells = cells(os.path.join(out, "perplexity", "cells.jsonl"))
    refs = {(c["key"]["start"], c["key"]["end"]): c["result"] for c in pp_cells if c["key"]["kind"] == "reference"}
    assert sorted(refs) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    for label in LABELS:
        (cell,) = [c["result"] for c in pp_cells if c["key"]["kind"] == "method" and c["result"]["label"] == label]
        ratios = [math.exp(nll / n - refs[s, e]["nll"] / refs[s, e]["count"]) for s, e, nll, n in cell["buckets"]]
        assert len(ratios) == 4
        assert got[label, "perplexity", None, 256, "ratio_mean"] == pytest.approx(np.mean(ratios), rel=1e-9)
        assert got[label, "perplexity", None, 256, "ratio_max"] == pytest.approx(max(ratios), rel=1e-9)
        assert got[label, "perplexity", None, 256, "ppl"] == pytest.approx(math.exp(cell["nll"] / cell["count"]))
    # bucket 0 of full attention reads the same tokens as the reference window [0, 128)
    full = next(c["result"] for c in pp_cells if c["key"]["kind"] == "method" and c["result"]["label"] == "full")
    assert full["buckets"][0][2] == pytest.approx(refs[0, 64]["nll"], rel=1e-5)

    # the markdown shows these numbers; the CSV holds the JSON rows
    md = open(os.path.join(out, "compare.md")).read()
    for label in LABELS:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
        cells_md = [c.strip().strip("*") for c in line.strip("|").split("|")][1:]
        assert cells_md == [f"{100 * got[label, 'passkey', None, 256, 'accuracy']:.1f}",
                            f"{got[label, 'perplexity', None, 256, 'ratio_mean']:.3f}",
                            f"{100 * got[label, 'needle', 'mean', 256, 'score']:.1f}"]
    assert "](passkey/passkey.png)" in md and "](perplexity/perplexity.png)" in md
    with open(os.path.join(out, "compare.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["rows"])
    assert [float(r["value"]) for r in rows] == pytest.approx([r["value"] for r in data["rows"]])


def test_rerun_computes_nothing_and_seed_fixes_cells(first, model_dir, tmp_path, monkeypatch):
    out, data = first
    paths = [os.path.join(out, t, "cells.jsonl") for t in ("passkey", "perplexity", "needle")]
    before = [open(p, "rb").read() for p in paths]
    spy = Spy(monkeypatch)
    again = run(model_dir, out)
    assert (spy.generate, spy.logprobs) == (0, 0)
    assert [open(p, "rb").read() for p in paths] == before
    assert again["rows"] == data["rows"]
    assert all(r["cells_run"] == 0 for r in again["meta"]["task_runs"].values())

    # a fresh directory with the same seed: the same prompts, answers and log-likelihoods
    other = tmp_path / "fresh"
    fresh = run(model_dir, other)
    assert spy.generate > 0 and spy.logprobs > 0
    for p in paths:
        a = {json.dumps(c["key"], sort_keys=True): c["result"] for c in cells(p)}
        b = {json.dumps(c["key"], sort_keys=True): c["result"] for c in
             cells(os.path.join(other, os.path.basename(os.path.dirname(p)), "cells.jsonl"))}
        assert a.keys() == b.keys()
        for k in a:
            assert same(a[k], b[k]), k
    assert [r["value"] for r in fresh["rows"]] == pytest.approx([r["value"] for r in data["rows"]], rel=1e-6)


def test_unknown_method_is_a_usage_error(no_weights_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(no_weights_dir, tmp_path / "out", "--methods", "full,warp")
    assert e.value.code == 2 and "unknown method 'warp'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--tasks", "passkey,summarize"], "--tasks: unknown task 'summarize'"),
    (["--needle-tasks", "multikey,haystack"], "--needle-tasks: unknown needle task 'haystack'"),
    (["--depths", "0.5,1.5"], "--depths"),
    (["--bucket", "96"], "--bucket 96 does not divide length 256"),
    (["--reference-context", "256"], "exceeds the model's trained length 128"),
    (["--trials", "0"], "--trials must be a positive integer"),
    (["--lengths", "32"], "passkey at --lengths 32"),
    (["--tasks", "needle", "--lengths", "64", "--bucket", "64"], "needle task multikey at --lengths 64"),
    (["--text", "/no/such/play.txt"], "/no/such/play.txt does not exist"),
])
def test_bad_input_fails_before_the_model_loads(no_weights_dir, tmp_path, monkeypatch, capsys, extra, match):
    loads = []
    real = lh_jax.load
    monkeypatch.setattr(lh_jax, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    line = cli_error(["compare", "--model", no_weights_dir, "--out", str(tmp_path / "o"), *RUN, *extra], capsys)
    assert line.startswith("lh-jax compare: error: ") and re.search(match, line), line
    assert loads == []
    assert not os.path.exists(tmp_path / "o" / "passkey")  # no task started
