"""`lh-jax needle`: the RULER-style task generators (hypothesis, with the default model's tokenizer),
the scoring, and the command end to end on a tiny random model that carries the real tokenizer."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lh_jax
from lh_jax.cli import build_parser
from lh_jax.experiments import needle as N

from conftest import build_hf_model, copy_without_weights, default_tokenizer, hamlet_text, save_hf_model

MAGIC = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")
ASSIGN = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def whole_word_count(text: str, s: str) -> int:
    return len(re.findall(r"(?<![A-Za-z0-9])" + re.escape(s) + r"(?![A-Za-z0-9])", text, flags=re.IGNORECASE))


def check_task(t: N.NeedleTask, tok, params: N.TaskParams, length: int) -> None:
    """Every property a generated task must have, checked from its text alone."""
    # the ids are the text's tokenization, at most `length` and within 1% (4 tokens for short ones)
    assert t.ids.tolist() == tok(t.text, add_special_tokens=False)["input_ids"]
    assert len(t.ids) <= length
    assert length - len(t.ids) <= max(4, length // 100), (length, len(t.ids))
    assert all(0.0 <= d <= 1.0 for d in t.depths) and len(t.depths) == len(t.needles)
    for needle in t.needles:
        assert t.text.count(needle) == 1, needle
    # needles in text order sit at their depth in the haystack, up to one sentence
    assert t.depths == sorted(t.depths)
    context = t.text[t.text.index("\n\n") + 2:t.text.rindex("\n\nQuestion:")]
    for needle in t.needles:
        context = context.replace(needle, "\x00")
    hay_words = context.replace("\x00", " ").split()
    gaps = np.diff(N.Haystack.boundaries(hay_words))
    tol = (gaps.max() if len(gaps) else 0) / max(len(hay_words), 1) + 1e-9
    before = [sum(w != "\x00" for w in context[:i].split()) for i, c in enumerate(context) if c == "\x00"]
    assert len(before) == len(t.needles)
    for b, d in zip(before, t.depths):
        assert abs(b / max(len(hay_words), 1) - d) <= tol, (b, len(hay_words), d, tol)
    question = t.text[t.text.rindex("Question:"):]
    if t.task != "vartrack":
        pairs = MAGIC.findall(t.text)
        assert [MAGIC.findall(n)[0] for n in t.needles] == pairs  # exactly the claimed needles, in order
        keys = [k for k, _ in pairs]
        values = [v for _, v in pairs]
        assert len(set(values)) == len(values)
        for v in values:
            assert whole_word_count(t.text, v) == 1, v
        if t.task == "multikey":
            assert len(pairs) == 1 + params.distractors
            (key,) = t.queried
            assert keys.count(key) == 1  # distractor keys differ from the queried one
            assert t.answers == [values[keys.index(key)]]
            assert sorted(t.distractors) == sorted(v for k, v in pairs if k != key)
            assert whole_word_count(t.text, key) == 1 + whole_word_count(question, key) == 3
        elif t.task == "multivalue":
            assert len(pairs) == params.values
            assert set(keys) == set(t.queried) and len(t.queried) == 1
            assert sorted(t.answers) == sorted(values)
        else:
            assert len(pairs) == params.queries and len(set(keys)) == len(keys)
            assert sorted(t.queried) == sorted(keys)
            by_key = dict(pairs)
            assert t.answers == [by_key[k] for k in t.queried]
            for k in keys:
                assert whole_word_count(t.text, k) == 1 + whole_word_count(question, k)
        return
    # vartrack: resolve every assignment in text order; the answer is every variable holding the value
    assigns = ASSIGN.findall(t.text)
    assert [ASSIGN.findall(n)[0] for n in t.needles] == assigns
    assert len(assigns) == params.chains * (params.hops + 1)
    value_of: dict[str, str] = {}
    for name, source, number in assigns:
        assert name not in value_of
        assert not source or source in value_of  # a variable is used only after its assignment
        value_of[name] = number or value_of[source]
    (value,) = t.queried
    assert sorted(t.answers) == sorted(n for n, v in value_of.items() if v == value)
    assert len(t.answers) == params.hops + 1
    assert sorted(t.distractors) == sorted(n for n in value_of if n not in t.answers)
    assert whole_word_count(t.text, value) == 1 + whole_word_count(question, value)
    sources = [s for _, s, _ in assigns if s]
    for name in value_of:
        assert whole_word_count(t.text, name) == 1 + sources.count(name)


params_strategy = st.builds(N.TaskParams, distractors=st.integers(0, 6), values=st.integers(1, 6),
                            queries=st.integers(1, 6), hops=st.integers(1, 6), chains=st.integers(1, 3),
                            key_kind=st.sampled_from(["word", "uuid"]), chat=st.booleans())


@settings(max_examples=40, deadline=None)
@given(task=st.sampled_from(N.TASKS), length=st.integers(700, 3000), seed=st.integers(0, 2 ** 32 - 1),
       trial=st.integers(0, 50), params=params_strategy)
def test_generated_tasks(tok, task, length, seed, trial, params):
    t = N.make_task(tok, task, length, N.task_rng(seed, task, length, trial), params)
    check_task(t, tok, params, length)
    again = N.make_task(tok, task, length, N.task_rng(seed, task, length, trial), params)
    assert again.text == t.text and again.answers == t.answers and np.array_equal(again.ids, t.ids)
    other = N.make_task(tok, task, length, N.task_rng(seed, task, length, trial + 1), params)
    assert other.answers != t.answers


@pytest.mark.parametrize("task", N.TASKS)
@pytest.mark.parametrize("length", [4096, 16384])
def test_long_prompts_hit_the_length(tok, task, length):
    params = N.TaskParams()
    check_task(N.make_task(tok, task, length, N.task_rng(0, task, length, 0), params), tok, params, length)


@pytest.mark.parametrize("task", N.TASKS)
def test_text_haystack(tok, task):
    hay = N.Haystack(hamlet_text(), name="hamlet.md")
    params = N.TaskParams(chains=2)
    t = N.make_task(tok, task, 2000, N.task_rng(3, task, 2000, 0), params, hay)
    check_task(t, tok, params, 2000)
    assert "Hamlet" in t.text or "HAMLET" in t.text


def test_haystack_too_short(tok):
    hay = N.Haystack("Only a few words here. Not nearly enough.", name="tiny.txt")
    with pytest.raises(ValueError, match="tiny.txt.*too short"):
        N.make_task(tok, "multikey", 1000, N.task_rng(0, "multikey", 1000, 0), N.TaskParams(), hay)
    with pytest.raises(ValueError, match="too short for the multiquery task"):
        N.make_task(tok, "multiquery", 40, N.task_rng(0, "multiquery", 40, 0), N.TaskParams())


@pytest.mark.parametrize("bad, match", [(dict(hops=0), "--hops"), (dict(values=0), "--values"),
                                        (dict(distractors=-1), "--distractors"), (dict(key_kind="x"), "--key-kind")])
def test_bad_params(tok, bad, match):
    with pytest.raises(ValueError, match=match):
        N.make_task(tok, "multikey", 500, N.task_rng(0, "multikey", 500, 0), N.TaskParams(**bad))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        N.make_task(tok, "nope", 500, N.task_rng(0, "x", 500, 0))


@settings(max_examples=30, deadline=None)
@given(task=st.sampled_from(N.TASKS), seed=st.integers(0, 2 ** 32 - 1), params=params_strategy)
def test_scoring(tok, task, seed, params):
    t = N.make_task(tok, task, 900, N.task_rng(seed, task, 900, 0), params)
    answers = t.answers
    k = len(answers)
    assert N.score(" " + ", ".join(answers) + ".", answers) == (1.0, 1)
    assert N.score("\n".join(f"VAR {a.lower()}" for a in reversed(answers)), answers) == (1.0, 1)
    if k > 1:
        frac, all_found = N.score(", ".join(answers[1:]), answers)
        assert frac == pytest.approx((k - 1) / k) and all_found == 0
    # an answer glued to more digits or letters is not that answer
    assert N.score(" ".join(a + "7" for a in answers), answers) == (0.0, 0)
    assert N.score(" ".join("1" + a for a in answers), answers) == (0.0, 0)
    assert N.score(" ".join(t.distractors) + " the grass is green", answers) == (0.0, 0)


# --- end to end on a tiny random model with the real tokenizer ----------------------------------

@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny_needle_model")
    model = build_hf_model("LlamaForCausalLM", seed=5, vocab_size=49152, max_position_embeddings=2048)
    save_hf_model(model, path)
    tok.save_pretrained(path)
    return str(path)


def run(argv: list[str]) -> dict:
    args = build_parser("needle").parse_args(["needle", *argv])
    return args.func(args)


E2E = ["--tasks", "multikey,vartrack", "--lengths", "200,256", "--max-new-tokens", "12", "--trials", "2", "--methods", "full,longheads:16x4",
       "--hops", "2", "--seed", "3"]


@pytest.mark.slow  # about 25-45 s on 2 shared CPU cores (4 compilations)
def test_command_end_to_end(tiny_with_tokenizer, tmp_path):
    out1, out2 = str(tmp_path / "b1"), str(tmp_path / "b2")
    res = run(["--model", tiny_with_tokenizer, "--out", out1, "--batch-size", "1", *E2E])
    assert res["computed"] == 2 * 2 * 2 * 2 and res["skipped"] == 0
    for ext in ("json", "csv", "md", "png"):
        assert os.path.getsize(os.path.join(out1, f"needle.{ext}")) > 0
    with open(os.path.join(out1, "needle.json")) as f:
        saved = json.load(f)
    rows = saved["rows"]
    assert len(rows) == 16 and {r["label"] for r in rows} == {"full", "longheads:16x4"}
    for r in rows:  # stored scores agree with a fresh scoring of the stored output
        assert (r["score"], r["all_found"]) == N.score(r["output"], r["answers"])
        assert r["length"] - max(4, r["length"] // 100) <= r["tokens"] <= r["length"]
    by_method = {lab: [r["output"] for r in rows if r["label"] == lab] for lab in ("full", "longheads:16x4")}
    assert by_method["full"] != by_method["longheads:16x4"]  # each method really ran with its attention
    table = open(os.path.join(out1, "needle.md")).read()
    assert "| multikey | 256 |" in table and "| vartrack | 200 |" in table and "longheads:16x4" in table

    # resume: nothing runs again; a cell dropped from the store is the only one recomputed
    cells = os.path.join(out1, "cells.jsonl")
    lines = open(cells).read().splitlines()
    assert run(["--model", tiny_with_tokenizer, "--out", out1, *E2E])["computed"] == 0
    with open(cells, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    again = run(["--model", tiny_with_tokenizer, "--out", out1, *E2E])
    assert again["computed"] == 1 and again["skipped"] == 15
    assert json.loads(open(cells).read().splitlines()[-1])["result"]["output"] == json.loads(lines[-1])["result"]["output"]

    # batch 2 (left-padded, different lengths within a batch) gives the same answers
    res2 = run(["--model", tiny_with_tokenizer, "--out", out2, "--batch-size", "2", *E2E])
    assert res2["computed"] == 16
    key = lambda r: (r["label"], r["task"], r["length"], r["trial"])  # noqa: E731
    b1 = {key(r): r for r in res["rows"]}
    assert {r["batch_size"] for r in res2["rows"]} == {2}
    assert any(len({b1[key(r)]["tokens"] for r in res2["rows"] if key(r)[:3] == c}) > 1
               for c in {key(r)[:3] for r in res2["rows"]})  # some batch really needed padding
    for r in res2["rows"]:
        assert r["output"] == b1[key(r)]["output"], key(r)
        assert r["answers"] == b1[key(r)]["answers"]


@pytest.fixture(scope="module")
def tokenizer_only_dir(tmp_path_factory, tiny_with_tokenizer):
    """The tiny model's config and tokenizer but no weights: loading the model fails."""
    return copy_without_weights(tiny_with_tokenizer, tmp_path_factory.mktemp("no_weights"))


@pytest.mark.parametrize("extra, match", [
    (["--tasks", "multikey,haystack"], "unknown task"),
    (["--hops", "0"], "--hops must be"),
    (["--trials", "0"], "--trials must be"),
    (["--haystack", "/no/such/file.txt"], "no such file"),
    (["--lengths", "1k,-4"], "--lengths"),
])
def test_bad_input_before_model(tokenizer_only_dir, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        run(["--model", tokenizer_only_dir, "--out", str(tmp_path), "--lengths", "256", *extra])


def test_short_haystack_before_model(tokenizer_only_dir, tmp_path):
    essay = tmp_path / "essay.txt"
    essay.write_text("A short essay. It has two sentences.")
    with pytest.raises(ValueError, match="essay.txt.*too short"):
        run(["--model", tokenizer_only_dir, "--out", str(tmp_path / "o"), "--lengths", "512",
             "--haystack", str(essay)])
