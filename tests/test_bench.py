"""`lh-jax bench` end to end on a tiny model: one subprocess per cell, LongHeads / lh-jax full /
transformers rows, each with positive timings and memory (a failed cell would carry an error)."""
from __future__ import annotations

import json

import lh_jax.cli
from conftest import save_tiny_with_tokenizer


def test_bench_rows(tmp_path):
    model = save_tiny_with_tokenizer(tmp_path / "m", seed=7)
    out = tmp_path / "rows.json"
    lh_jax.cli.main(["bench", "--model", model, "--lengths", "96", "--repeats", "1", "--decode-steps", "2",
                     "--attention", "longheads", "--windows", "16x4", "--text", "random", "--out", str(out),
                     "--torch-dtypes", "float32,bfloat16"])
    rows = json.loads(out.read_text())["rows"]
    got = {(r["impl"], r["attention"], r["dtype"]) for r in rows}
    assert got == {("lh-jax", "longheads 16x4", "float32"), ("lh-jax", "full", "float32"),
                   ("transformers", "full", "float32"), ("transformers", "full", "bfloat16")}, rows
    for r in rows:
        assert "error" not in r, r
        assert r["length"] == 96 and r["prefill_s"] > 0 and r["decode_ms"] > 0 and r["peak_rss_gib"] > 0


def test_bench_rejects_unknown_torch_dtype(capsys):
    import pytest
    with pytest.raises(SystemExit, match="--torch-dtypes.*float16"):
        lh_jax.cli.main(["bench", "--lengths", "96", "--torch-dtypes", "float32,float16"])
