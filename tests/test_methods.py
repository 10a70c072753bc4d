"""The method grammar (lh_jax.methods): one parser for every command and experiment script."""
from __future__ import annotations

import argparse

import pytest

import lh_jax
from conftest import load_default
from lh_jax.methods import MethodSpec, add_method_arguments, parse_methods


@pytest.mark.parametrize("text,name", [
    ("full", "full"),
    ("longheads", "longheads:256x16"),
    ("longheads:128x32/attn", "longheads:128x32"),
    ("longheads:128x32/best-key", "longheads:128x32/best-key"),
    (" longheads:128x32/repr=mean/group/original/dense=1024 ", "longheads:128x32/mean/original/group/dense=1024"),
    ("longheads:64x16/dense=512", "longheads:64x16/dense=512"), ("longheads:64x16/dense=1024", "longheads:64x16"),
    ("sliding:128x16", "sliding:128x16"),
    ("longheads-ref:64x16/dense=1024", "longheads-ref:64x16"), ("longheads-ref:64x8/dense=1024", "longheads-ref:64x8/dense=1024"),
    ("ntk", "ntk"), ("ntk:2", "ntk:2"), ("yarn:4.0", "yarn:4"),
    ("longheads:128x16+ntk", "longheads:128x16+ntk"), ("longheads:128x16+pi:2", "longheads:128x16+pi:2"),
    ("longheads:recommended", "longheads:recommended"),
    ("longheads:recommended/vote=max", "longheads:recommended/vote=max"),
    ("longheads:128x32/reread=4/vote=max", "longheads:128x32/reread=4/vote=max"),
    ("longheads:128x32/reread=4/vote=sum", "longheads:128x32/reread=4/vote=sum"),
    ("longheads:128x32/reread=4/vote=layer-best", "longheads:128x32/reread=4"),
])
def test_names_parse_to_canonical_names_that_parse_back(text, name):
    spec = MethodSpec.parse(text)
    assert spec.name == name and spec.label == name
    assert MethodSpec(spec.name) == spec and MethodSpec.from_dict(spec.to_dict()) == spec


def test_specs_build_the_settings_they_name():
    lh = MethodSpec("longheads:128x32/best-key/group/dense=1024").attention()
    assert lh == lh_jax.LongHeads(128, 32, dense_length=1024, chunk_repr="best-key", selection="group")
    assert MethodSpec("sliding:64x8").attention() == lh_jax.sliding_window(64, 8)
    assert MethodSpec("longheads-ref:64x4/dense=256").attention() == lh_jax.LongHeads(64, 4, 256, reference=True)
    assert MethodSpec("longheads:recommended").attention() == lh_jax.LongHeads.recommended()
    assert MethodSpec("longheads:recommended/dense=0").attention() == lh_jax.LongHeads.recommended(dense_length=0)
    assert MethodSpec("longheads:recommended/vote=max").attention() == lh_jax.LongHeads.recommended(
        reread=lh_jax.longheads.Reread(combine="max"))
    assert isinstance(MethodSpec("ntk").attention(), lh_jax.FullAttention)
    config, _ = load_default()
    scaled, _ = MethodSpec("ntk").build(config, 4 * config.trained_length)
    assert (scaled.rope.rope_type, scaled.rope.factor) == ("dynamic", 4.0)
    scaled, att = MethodSpec("longheads:128x16+yarn:2").build(config, 4 * config.trained_length)
    assert (scaled.rope.rope_type, scaled.rope.factor, att.chunk_size) == ("yarn", 2.0, 128)
    assert MethodSpec("longheads:128x16").build(config, 10 ** 6)[0] is config


@pytest.mark.parametrize("text,match", [
    ("", "empty"), ("banana", "unknown method 'banana'"), ("longheads:128", "window '128'"),
    ("longheads:0x16", "chunk_size"), ("longheads:128x16/median", "median"), ("longheads:128x16/bad=1", "bad"),
    ("longheads:128x16/dense=-1", "dense"), ("sliding:128x16/mean", "sliding takes only"),
    ("full/mean", "takes no options"), ("full:3", "no argument"), ("ntk:0.5", ">= 1"), ("ntk:x", "not a number"),
    ("full+ntk", "window method"), ("longheads+rope", "unknown RoPE scaling"),
    ("longheads-ref:64x4/dense=100", "multiple of chunk_size"),
    ("longheads:recommended/vote=mean", "combine 'mean'"), ("longheads:recommended/reread=0/vote=max", "re-reading is off"),
    ("longheads:128x32/vote=max", "re-reading is off"), ("sliding:128x16/vote=max", "sliding takes only"),
])
def test_bad_names_are_errors_naming_the_part(text, match):
    with pytest.raises(ValueError, match=match):
        MethodSpec(text)


def test_lists_and_argparse():
    assert [s.name for s in parse_methods("full, longheads:128x32/attn,longheads:128x32,ntk")] == \
        ["full", "longheads:128x32", "ntk"]  # duplicates (same canonical name) dropped
    p = argparse.ArgumentParser()
    add_method_arguments(p, multiple=True, default="full")
    assert [s.name for s in p.parse_args(["--methods", "ntk,sliding:64x8"]).methods] == ["ntk", "sliding:64x8"]
    with pytest.raises(SystemExit):
        p.parse_args(["--methods", "longheads:12"])


def test_a_named_setting_is_cached_under_what_it_computes(monkeypatch):
    """Result files key a cell by the method; for "longheads:recommended" the key also holds the
    spelled-out setting, so cells computed before recommended() changed are not reused."""
    from lh_jax.experiments.passkey import cell_key
    from lh_jax.longheads import LongHeads

    class Args:
        model, dtype, seed, max_new_tokens = "default", "float32", 0, 8

    class Setup:
        needle, question, haystack_id, region = "n {key}", "q", "filler", None

    today = MethodSpec("longheads:recommended")
    spelled = MethodSpec(today.resolved_name)
    assert spelled.longheads == today.longheads and spelled.cell_fields() == {}
    key = cell_key(Args, today, 16384, 0.5, 0, Setup)
    assert key["resolved"] == spelled.name
    monkeypatch.setattr(LongHeads, "recommended", classmethod(lambda cls, **kw: LongHeads(64, 8, **kw)))
    changed = MethodSpec("longheads:recommended")
    assert changed.name == today.name and changed.resolved_name == "longheads:64x8"
    assert cell_key(Args, changed, 16384, 0.5, 0, Setup) != key
