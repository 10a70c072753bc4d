"""`experiments.scaling` (time vs length, several attentions in one process) on a tiny model."""
from __future__ import annotations

import json

import pytest

import lh_jax
from conftest import save_tiny_with_tokenizer
from lh_jax.experiments import scaling


def test_parse_attention():
    assert isinstance(scaling.parse_attention("full"), lh_jax.FullAttention)
    lh = scaling.parse_attention("64x8/attn-parts:4")
    assert (lh.chunk_size, lh.num_chunks, lh.chunk_repr) == (64, 8, "attn-parts:4")
    assert scaling.parse_attention("64x8@union").kernel == "union"
    with pytest.raises(ValueError, match="unknown kernel"):
        scaling.parse_attention("64x8@fast")
    with pytest.raises(ValueError, match="'banana' is neither"):
        scaling.parse_attention("banana")
    with pytest.raises(ValueError, match="unknown chunk_repr"):
        scaling.parse_attention("64x8/median")


def test_smollm2_shape_matches_the_default_model():
    """The built-in shape used by --random-weights without the file is the embedded model's."""
    config, _ = lh_jax.load("default", progress=False)
    for k, v in scaling.SMOLLM2_135M.items():
        got = config.rope.theta if k == "rope_theta" else getattr(config, k)
        assert got == pytest.approx(v, rel=1e-6), k


def test_scaling_rows(tmp_path):
    model = save_tiny_with_tokenizer(tmp_path / "m", seed=3)
    out = tmp_path / "rows.json"
    scaling.main(["--model", model, "--random-weights", "--lengths", "96", "--attentions", "full,16x4",
                  "--repeats", "1", "--decode-steps", "2", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["attention"], r["tokens"]) for r in rows] == [("full", 96), ("16x4", 96)]
    for r in rows:
        assert "error" not in r and not r["nonfinite"] and r["prefill_s"] > 0 and r["decode_ms"] > 0
