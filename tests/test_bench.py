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


def _bench_args(argv):
    import argparse

    from lh_jax.experiments import bench
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(argv)
    bench.resolve_defaults(args)
    return args


def test_bench_defaults_follow_the_attention():
    # `lh-jax bench --attention longheads` alone is the grid: 4k-32k, windows 128x16 and
    # 256x16, full attention up to 16k; an explicit window or length list wins.
    a = _bench_args(["--attention", "longheads"])
    assert (a.lengths, a.windows, a.full_up_to_tokens) == ("4k,8k,16k,32k", "128x16,256x16", 16384)
    a = _bench_args(["--attention", "longheads", "--chunk-size", "64", "--lengths", "2k"])
    assert (a.lengths, a.windows, a.chunk_size, a.num_chunks) == ("2k", None, 64, 16)
    a = _bench_args([])
    assert (a.lengths, a.windows, a.full_up_to_tokens) == ("1k,4k,8k", None, None)
    import pytest
    with pytest.raises(SystemExit, match="--full-up-to"):
        _bench_args(["--attention", "longheads", "--full-up-to", "lots"])


def test_bench_full_up_to_and_scaling_summary(tmp_path, capsys):
    # Full-attention rows stop at --full-up-to; the summary's ratios are those of the rows printed.
    model = save_tiny_with_tokenizer(tmp_path / "m", seed=7)
    out = tmp_path / "rows.json"
    lh_jax.cli.main(["bench", "--model", model, "--lengths", "64,128", "--repeats", "1", "--decode-steps", "2",
                     "--attention", "longheads", "--chunk-size", "16", "--num-chunks", "4", "--text", "random",
                     "--full-up-to", "64", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = data["rows"]
    got = sorted((r["impl"], r["attention"], r["length"]) for r in rows)
    assert got == [("lh-jax", "full", 64), ("lh-jax", "longheads 16x4", 64), ("lh-jax", "longheads 16x4", 128),
                   ("transformers", "full", 64)], rows
    assert [r["length"] for r in rows] == sorted(r["length"] for r in rows)
    lh = {r["length"]: r for r in rows if r["attention"] == "longheads 16x4"}
    tf = next(r for r in rows if r["impl"] == "transformers")
    (s,) = data["summary"]
    assert s["prefill_ratio"]["value"] == lh[128]["prefill_s"] / lh[64]["prefill_s"]
    assert s["vs_transformers"] == {"length": 64, "value": lh[64]["prefill_s"] / tf["prefill_s"]}
    assert s["decode_ratio"]["value"] == lh[128]["decode_ms"] / lh[64]["decode_ms"]
    assert s["peak_rss_gib"] == {"length": 128, "value": lh[128]["peak_rss_gib"]}
    printed = capsys.readouterr().out
    assert "skipped: --full-up-to 64" in printed and f"{s['prefill_ratio']['value']:.2f} (128 / 64)" in printed
