"""`lh-jax passkey` end to end on a tiny random Llama that has the default model's tokenizer:
output files, resumption, batch-size independence, determinism, custom haystack / needle, bad input.

The tiny model never finds a key; what is checked is the plumbing: the prompts (rebuilt
independently), the answers (against transformers' own greedy decoding), the cells and tables.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import lh_jax
import lh_jax.cli
from lh_jax import runtime
import re

from conftest import cli_error, save_tiny_with_tokenizer, torch_greedy
from lh_jax.experiments import passkey as pk
from lh_jax.methods import MethodSpec

LH = "longheads:16x4"  # a 64-token window: the prompts are 2.5-4x longer
# Every prompt below pads to the same 192-token bucket of lh_jax.generate, so the whole file compiles
# four programs (full / LongHeads x batch 1 / 2).
GRID = ["--lengths", "150,180", "--depths", "0.25,0.75", "--trials", "2"]
METHODS = ["--methods", f"full,{LH}"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("passkey_model"), seed=11)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return lh_jax.load_tokenizer(model_dir)


def run_cli(model_dir, out, *flags) -> dict:
    lh_jax.cli.main(["passkey", "--model", model_dir, "--out", str(out), *flags])
    with open(os.path.join(out, "passkey.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    """The reference run: both methods, two lengths, two depths, two trials, batch size 1."""
    out = tmp_path_factory.mktemp("base")
    return str(out), run_cli(model_dir, out, *GRID, *METHODS)


def cell(r) -> tuple:
    return (r["method"]["method"], r["length"], r["depth"], r["trial"])


def lines(path) -> list[str]:
    with open(path) as f:
        return [line for line in f if line.strip()]


class GenerateSpy:
    """Counts calls of the real `runtime.generate` (and the rows they decode)."""

    def __init__(self, monkeypatch):
        self.calls, self.rows = 0, 0
        real = runtime.generate

        def spy(params, config, ids, *a, **kw):
            self.calls += 1
            self.rows += np.asarray(ids).shape[0]
            return real(params, config, ids, *a, **kw)
        monkeypatch.setattr(runtime, "generate", spy)


def test_outputs_cover_the_grid(base, tokenizer, model_dir):
    out, data = base
    rows = data["rows"]
    expected = {(m, n, d, t) for m in ("full", LH) for n in (150, 180) for d in (0.25, 0.75) for t in (0, 1)}
    assert sorted(map(cell, rows)) == sorted(expected)
    for name in ("passkey.json", "passkey.csv", "passkey.md", "passkey.png", "cells.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert {"date", "argv", "versions", "machine", "args"} <= set(data["meta"])
    assert data["meta"]["labels"] == ["full", LH]

    # the CSV holds the same rows
    with open(os.path.join(out, "passkey.csv")) as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["length"], r["depth"], r["trial"], r["key"], r["answer"]) for r in csv_rows] == \
        [(str(r["length"]), str(r["depth"]), str(r["trial"]), r["key"], r["answer"]) for r in rows]

    # a method sees the same key, hence the same prompt, as every other method
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["length"], r["depth"], r["trial"]), set()).add((r["key"], r["prompt_sha1"]))
    assert all(len(v) == 1 for v in by_cell.values())
    assert len({k for v in by_cell.values() for k, _ in v}) == len(by_cell)  # distinct keys across cells

    for r in rows:
        assert len(r["key"]) == 5 and r["key"].isdigit()
        # the prompt, rebuilt here from the recorded key, is the one that was run
        p = pk.build_prompt(tokenizer, r["length"], r["depth"], r["key"])
        assert pk.prompt_digest(p.ids) == r["prompt_sha1"] and len(p.ids) == r["tokens"]
        assert r["length"] - 40 < r["tokens"] <= r["length"]
        assert tokenizer.decode(r["answer_ids"], skip_special_tokens=True) == r["answer"]
        assert r["correct"] == pk.answer_matches(r["answer"], r["key"])
        assert r["seconds"] > 0 and r["batch"] == 1
        if r["method"]["method"] == "full":
            # full attention: transformers' own greedy continuation of the same prompt
            ref = torch_greedy(model_dir, p.ids[None], 8)[0, len(p.ids):].tolist()
            if 2 in ref:
                ref = ref[:ref.index(2)]
            assert r["answer_ids"] == ref

    # the table: one per method, correct/total per length x depth counted from the rows
    md = open(os.path.join(out, "passkey.md")).read()
    assert md.count("| length \\ depth | 0.25 | 0.75 | all |") == 2
    assert "### full (" in md and f"### {LH} (" in md
    lengths, depths, ok, tot = pk.accuracy_grid([r for r in rows if r["label"] == "full"])
    assert lengths == [150, 180] and depths == [0.25, 0.75] and (tot == 2).all()
    assert ok.sum() == sum(r["correct"] for r in rows if r["label"] == "full")

    import matplotlib.image
    img = matplotlib.image.imread(os.path.join(out, "passkey.png"))
    assert img.ndim == 3 and img.shape[1] > img.shape[0]  # two subplots side by side


def test_resume_skips_finished_cells(base, model_dir, tmp_path, monkeypatch):
    src, data = base
    out = tmp_path / "resume"
    shutil.copytree(src, out)
    n_lines = len(lines(out / "cells.jsonl"))
    assert n_lines == 16
    spy = GenerateSpy(monkeypatch)

    again = run_cli(model_dir, out, *GRID, *METHODS)  # same flags: nothing runs
    assert spy.calls == 0 and len(lines(out / "cells.jsonl")) == n_lines
    assert again["rows"] == data["rows"]

    # one more depth: only its cells run, the others come from the store
    more = run_cli(model_dir, out, "--lengths", "150", "--depths", "0.25,0.5", "--trials", "2", "--methods", "full")
    assert spy.rows == 2 and len(lines(out / "cells.jsonl")) == n_lines + 2
    assert [cell(r) for r in more["rows"]] == [("full", 150, d, t) for d in (0.25, 0.5) for t in (0, 1)]
    old = {cell(r): r for r in data["rows"]}
    assert more["rows"][0] == old["full", 150, 0.25, 0] and more["rows"][1] == old["full", 150, 0.25, 1]

    # a changed flag makes new cells; greedy answers of 4 tokens are prefixes of the 8-token ones
    short = run_cli(model_dir, out, "--lengths", "150", "--depths", "0.25", "--trials", "2", "--methods", "full",
                    "--max-new-tokens", "4")
    assert spy.rows == 4 and len(lines(out / "cells.jsonl")) == n_lines + 4
    for r in short["rows"]:
        assert r["answer_ids"] == old[cell(r)]["answer_ids"][:4]
        assert r["key"] == old[cell(r)]["key"]

    # --no-resume starts over
    run_cli(model_dir, out, "--lengths", "150", "--depths", "0.25", "--trials", "1", "--methods", "full",
            "--no-resume")
    assert spy.rows == 5 and len(lines(out / "cells.jsonl")) == 1


def test_batch_size_does_not_change_rows(base, model_dir, tmp_path, monkeypatch):
    _, data = base
    spy = GenerateSpy(monkeypatch)
    batched = run_cli(model_dir, tmp_path, *GRID, "--methods", LH, "--batch-size", "2")
    assert spy.calls == 4 and spy.rows == 8  # per length: two batches of 2
    old = {cell(r): r for r in data["rows"]}
    assert len(batched["rows"]) == 8
    for r in batched["rows"]:
        o = old[cell(r)]
        assert (r["key"], r["prompt_sha1"], r["answer_ids"], r["answer"], r["correct"]) == \
            (o["key"], o["prompt_sha1"], o["answer_ids"], o["answer"], o["correct"]), cell(r)
    assert all(r["batch"] == 2 for r in batched["rows"])


def test_left_padded_batch_of_unequal_prompts(model_dir, tokenizer):
    """Prompts of different lengths in one LongHeads batch answer as they do alone (full attention
    is covered by the runtime's own padding tests)."""
    config, params = lh_jax.load(model_dir, progress=False)
    config, attention = MethodSpec(LH).build(config, 192)
    prompts = [pk.build_prompt(tokenizer, n, 0.5, key).ids for n, key in ((190, 11111), (150, 22222))]
    assert len(prompts[0]) - len(prompts[1]) > 40  # both pad to 192 (the compiled bucket)
    together = runtime.generate_batch(params, config, prompts, 8, attention)
    alone = [runtime.generate_batch(params, config, [p], 8, attention)[0] for p in prompts]
    assert together == alone


def test_same_seed_same_rows_other_seed_other_keys(base, model_dir, tmp_path):
    _, data = base
    flags = ["--lengths", "150", "--depths", "0.25,0.75", "--trials", "2", "--methods", "full"]
    same = run_cli(model_dir, tmp_path / "a", *flags)
    old = {cell(r): r for r in data["rows"]}
    for r in same["rows"]:
        assert (r["key"], r["answer_ids"]) == (old[cell(r)]["key"], old[cell(r)]["answer_ids"])
    other = run_cli(model_dir, tmp_path / "b", *flags, "--seed", "1")
    keys0 = [r["key"] for r in same["rows"]]
    keys1 = [r["key"] for r in other["rows"]]
    assert all(a != b for a, b in zip(keys0, keys1))


def test_custom_haystack_needle_question(model_dir, tokenizer, tmp_path):
    hay = tmp_path / "hay.txt"
    text = " ".join(f"Line {i} tells of the mill by the river." for i in range(100))
    hay.write_text(text)
    needle = "The secret code is {key}, do not forget {key}."
    question = "Which secret code was given? It was"
    data = run_cli(model_dir, tmp_path / "out", "--lengths", "190", "--depths", "0.2,0.8", "--methods", "full",
                   "--haystack", str(hay), "--needle", needle, "--question", question)
    assert data["meta"]["haystack"].startswith("hay.txt:")
    assert data["rows"][0]["haystack"] == "hay.txt:" + hashlib.sha1(text.encode()).hexdigest()[:12]
    for r in data["rows"]:
        p = pk.build_prompt(tokenizer, 190, r["depth"], r["key"], text, needle, question)
        assert pk.prompt_digest(p.ids) == r["prompt_sha1"]
        decoded = tokenizer.decode(p.ids)
        needle_text = needle.format(key=r["key"])
        assert decoded.count(needle_text) == 1 and pk.FILLER not in decoded
        assert decoded.endswith(question)
        # the haystack in the prompt is the file's beginning, the needle at the requested depth of it
        body = decoded[len(pk.TASK) + 1:-len(question) - 1]
        assert body.startswith("Line 0 tells of the mill")
        at = body.index(needle_text)
        frac = at / (len(body) - len(needle_text))
        assert abs(frac - r["depth"]) < 0.05, (frac, r["depth"])
        assert abs(r["needle_start"] / r["tokens"] - r["depth"]) < 0.15


@pytest.mark.parametrize("flags,match", [
    (["--haystack", "/nonexistent/hay.txt"], "--haystack file /nonexistent/hay.txt"),
    (["--haystack", "play:macbeth+hamlett"], "--haystack play:macbeth\\+hamlett: unknown play 'hamlett'"),
    (["--needle", "The pass key is 12345."], "--needle must contain '{key}'"),
    (["--needle", "The {thing} is {key}."], "--needle .* not a valid template"),
    (["--methods", "full,banana"], "unknown method 'banana'"),
    (["--depths", "0.5,1.5"], "--depths: depth 1.5 is outside"),
    (["--depths", "half"], "--depths must list numbers"),
    (["--lengths", "4q"], "--lengths must list"),
    (["--lengths", "40"], "--lengths 40: n_tokens=40 is too short"),
    (["--trials", "0"], "--trials must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--question", "  "], "--question must not be empty"),
    ("short-haystack", r"--haystack .*hay\.txt: haystack has \d+ tokens, fewer than"),
    (["--region", "4k"], "--region 4k must be shorter than every --lengths \\(got 256\\)"),
    (["--region", "four"], "--region must be one positive token count"),
    (["--region", "100"], "--region 100: at least 384 tokens"),
])
def test_bad_input_fails_before_loading_the_model(model_dir, tmp_path, monkeypatch, capsys, flags, match):
    if flags == "short-haystack":
        (tmp_path / "hay.txt").write_text("Only a few words here.")
        flags = ["--haystack", str(tmp_path / "hay.txt")]

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the bad input was noticed")
    monkeypatch.setattr(lh_jax, "load", no_load)
    out = tmp_path / "out"
    line = cli_error(["passkey", "--model", model_dir, "--out", str(out), "--lengths", "256", *flags], capsys)
    assert line.startswith("lh-jax passkey: error: ") and re.search(match, line), line
    assert not out.exists()


def test_budget_stops_starting_groups(base, model_dir, tmp_path, capsys):
    """--budget: no (method, length) group starts once the budget is spent; finished cells stay."""
    data = run_cli(model_dir, tmp_path, *GRID, *METHODS, "--budget", "0")
    groups = {(r["method"]["method"], r["length"]) for r in data["rows"]}
    assert groups == {("full", 150)}  # the first group starts (nothing spent yet), no other
    assert "--budget 0s spent" in capsys.readouterr().err


def test_region_layout_is_start_needle_blocks_and_end(tokenizer):
    """region_layout against its direct definition: the first block, the needle's whole blocks, then
    the prompt's last tokens, concatenated; the needle's tokens intact where the new prompt says."""
    p = pk.build_prompt(tokenizer, 900, 0.5, 48151)
    block, window = 64, 400
    ids = list(p.ids)
    a, b = (p.needle_start // block) * block, -(-p.needle_end // block) * block
    rest = window - block - (b - a)
    expected = ids[:block] + ids[a:b] + ids[-rest:]
    assert b < len(ids) - rest  # the three parts do not overlap in this prompt
    r = pk.region_layout(p, window, block)
    assert list(r.ids) == expected and len(r.ids) == window
    assert list(r.ids[r.needle_start:r.needle_end]) == ids[p.needle_start:p.needle_end]
    assert (r.key, r.depth) == (p.key, p.depth)
    late = pk.build_prompt(tokenizer, 900, 0.95, 48151)  # the needle inside the last tokens: kept once
    r = pk.region_layout(late, window, block)
    assert len(r.ids) == window and list(r.ids[-50:]) == list(late.ids[-50:])
    assert list(r.ids[r.needle_start:r.needle_end]) == list(late.ids[late.needle_start:late.needle_end])
    with pytest.raises(ValueError, match=f"shorter than the {len(p.ids)}-token prompt"):
        pk.region_layout(p, len(p.ids), block)


def test_region_flag_scores_the_layout(model_dir, tokenizer, tmp_path):
    """--region: each cell's prompt is the region layout of the long prompt (same key), in its own cells."""
    data = run_cli(model_dir, tmp_path, "--methods", "full", "--lengths", "600", "--depths", "0.5",
                   "--region", "400")
    (row,) = data["rows"]
    p = pk.build_prompt(tokenizer, 600, 0.5, pk.passkey_for(0, 600, 0.5, 0))
    r = pk.region_layout(p, 400)
    assert row["region"] == 400 and row["length"] == 600 and row["tokens"] == 400
    assert row["prompt_sha1"] == pk.prompt_digest(r.ids) and row["key"] == p.key
