"""`lh-jax bench` (experiments/bench.py), the one timing harness: model / decode / layer scopes,
one subprocess per cell or in process, the floors summary, the flop count of the layer scope."""
from __future__ import annotations

import json

import numpy as np
import pytest

import lh_jax
import lh_jax.cli
from conftest import copy_without_weights, load_default, save_tiny_with_tokenizer
from lh_jax.experiments import bench


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("bench") / "m", seed=7)


def test_model_scope_rows_one_subprocess_per_cell(model, tmp_path):
    out = tmp_path / "rows.json"
    lh_jax.cli.main(["bench", "--model", model, "--lengths", "96", "--repeats", "1", "--decode-steps", "2",
                     "--methods", "longheads:16x4,full", "--text", "random", "--out", str(out),
                     "--torch-dtypes", "float32,bfloat16"])
    rows = json.loads(out.read_text())["rows"]
    got = {(r["impl"], r["method"], r["dtype"]) for r in rows}
    assert got == {("lh-jax", "longheads:16x4", "float32"), ("lh-jax", "full", "float32"),
                   ("transformers", "full", "float32"), ("transformers", "full", "bfloat16")}, rows
    for r in rows:
        assert "error" not in r, r
        assert r["length"] == 96 and r["prefill_s"] > 0 and r["decode_ms"] > 0 and r["peak_rss_gib"] > 0
        assert r["cache"] == r["dtype"]  # generate's choice: a small float32 cache stays float32


def test_full_up_to_and_the_floors_summary(model, tmp_path, capsys):
    # full-attention rows stop at --full-up-to; the summary's ratios are those of the rows printed
    out = tmp_path / "runs"  # a directory, as the other commands' --out: bench.json inside
    # --repeats 0: one prefill per cell, compilation included
    lh_jax.cli.main(["bench", "--model", model, "--lengths", "64,128", "--repeats", "0", "--decode-steps", "2",
                     "--methods", "longheads:16x4,full", "--text", "random", "--full-up-to", "64", "--out", str(out)])
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    got = sorted((r["impl"], r["method"], r["length"]) for r in rows)
    assert got == [("lh-jax", "full", 64), ("lh-jax", "longheads:16x4", 64), ("lh-jax", "longheads:16x4", 128),
                   ("transformers", "full", 64)], rows
    assert [r["length"] for r in rows] == sorted(r["length"] for r in rows)
    lh = {r["length"]: r for r in rows if r["method"] == "longheads:16x4"}
    tf = next(r for r in rows if r["impl"] == "transformers")
    full = next(r for r in rows if r["impl"] == "lh-jax" and r["method"] == "full")
    (s,) = data["summary"]
    assert s["doubling"] == [{"long": 128, "value": lh[128]["prefill_s"] / lh[64]["prefill_s"]}]
    assert s["vs_transformers"] == [{"length": 64, "value": lh[64]["prefill_s"] / tf["prefill_s"]}]
    assert s["vs_full"] == [{"length": 64, "value": lh[64]["prefill_s"] / full["prefill_s"]}]
    assert s["decode_ratio"]["value"] == lh[128]["decode_ms"] / lh[64]["decode_ms"]
    assert s["peak_rss_gib"] == {"length": 128, "value": lh[128]["peak_rss_gib"]}
    assert f"{s['doubling'][0]['value']:.2f} (128)" in capsys.readouterr().out


def test_decode_and_layer_scopes_in_process(model, capsys):
    rows = bench.cli_main(_args(["--model", model, "--scope", "decode", "--lengths", "64,100", "--decode-steps", "2",
                                 "--methods", "longheads:16x4,full", "--in-process", "--random-weights"]))
    assert [(r["method"], r["length"]) for r in rows] == [("longheads:16x4", 64), ("full", 64),
                                                          ("longheads:16x4", 100), ("full", 100)]
    assert all("error" not in r and r["decode_ms"] > 0 for r in rows), rows
    rows = bench.cli_main(_args(["--scope", "layer", "--lengths", "160", "--repeats", "1", "--in-process",
                                 "--methods", "full,longheads:16x4"]))
    assert all("error" not in r and r["median_ms"] > 0 and r["gflop"] > 0 and r["finite"] for r in rows), rows
    assert "GFLOP/s" in capsys.readouterr().out


def test_answer_scope_times_generate_beside_transformers_with_the_same_tokens(model, tmp_path, capsys):
    # what a user waits for: prompt -> new tokens; full attention's greedy tokens are transformers'
    out = tmp_path / "answer.json"
    lh_jax.cli.main(["bench", "--model", model, "--scope", "answer", "--lengths", "64,128", "--repeats", "0",
                     "--decode-steps", "3", "--methods", "longheads:16x4,full", "--text", "random", "--in-process",
                     "--out", str(out)])
    data = json.loads(out.read_text())
    rows = {(r["impl"], r["method"], r["length"]): r for r in data["rows"]}
    assert len(rows) == 6 and all("error" not in r and r["answer_s"] > 0 for r in rows.values()), rows
    for n in (64, 128):
        tf, full = rows[("transformers", "full", n)], rows[("lh-jax", "full", n)]
        assert len(full["new_ids"]) == 3 and full["new_ids"] == tf["new_ids"]
    (s,) = data["summary"]
    lh = {n: rows[("lh-jax", "longheads:16x4", n)]["answer_s"] for n in (64, 128)}
    assert s["doubling"] == [{"long": 128, "value": lh[128] / lh[64]}]
    assert s["vs_transformers"][1] == {"length": 128, "value": lh[128] / rows[("transformers", "full", 128)]["answer_s"]}
    assert "decode_ratio" not in s
    assert "answer / transformers'" in capsys.readouterr().out


def test_a_failed_cell_is_an_error_row_and_a_nonzero_exit(model, tmp_path, capsys):
    broken = copy_without_weights(model, tmp_path / "broken")
    with pytest.raises(SystemExit) as e:
        lh_jax.cli.main(["bench", "--model", broken, "--lengths", "64", "--repeats", "1", "--decode-steps", "1",
                         "--methods", "full", "--no-torch", "--text", "random"])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "| error:" in captured.out and "1 of 1 cells failed" in captured.err


@pytest.mark.parametrize("argv,match", [(["--torch-dtypes", "float32,float16"], "--torch-dtypes.*float16"),
                                        (["--full-up-to", "lots"], "--full-up-to"),
                                        (["--lengths", "4q"], "--lengths"), (["--repeats", "-1"], "--repeats"),
                                        (["--scope", "layer", "--repeats", "0"], "--repeats")])
def test_bad_arguments_fail_before_anything_runs(argv, match):
    with pytest.raises(ValueError, match=match):
        bench.cli_main(_args(argv))


def test_an_unwritable_out_fails_before_anything_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (blocker / "rows.json", blocker / "runs"):
        with pytest.raises(ValueError, match="--out"):
            bench.cli_main(_args(["--out", str(out)]))


def _args(argv):
    import argparse
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def _pairs(attention, T):
    """(query, key) pairs a causal prefill computes, counted from the method's definition: every
    query below the dense prefix sees all earlier keys, later queries num_chunks whole chunks —
    all earlier chunks while they are fewer (the own chunk only up to the query)."""
    if not isinstance(attention, lh_jax.LongHeads):
        return int(np.tril(np.ones((T, T))).sum())
    l, N, Dn = attention.chunk_size, attention.num_chunks, attention.dense_length
    total = 0
    for t in range(T):
        if t < Dn:
            total += t + 1
            continue
        total += t % l + 1 + min(t // l, N - 1) * l
    return total


@pytest.mark.parametrize("attention, T", [
    (lh_jax.FullAttention(), 100),
    (lh_jax.LongHeads(16, 4), 64),  # all within the dense prefix
    (lh_jax.LongHeads(16, 4), 200),
    (lh_jax.LongHeads(16, 4, dense_length=32), 200),
])
def test_layer_flop_count_matches_the_pairs_attended(attention, T):
    H, D = 3, 8
    assert bench.attention_flops(attention, T, H, D) == pytest.approx(4 * H * D * _pairs(attention, T), rel=1e-9)


def test_smollm2_shape_matches_the_default_model():
    """The built-in shape used by --random-weights without the file is the embedded model's."""
    config, _ = load_default()
    for k, v in bench.SMOLLM2_135M.items():
        got = config.rope.theta if k == "rope_theta" else getattr(config, k)
        assert got == pytest.approx(v, rel=1e-6), k
