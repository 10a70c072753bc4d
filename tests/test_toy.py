"""The toy testbed: the committed tiny LLaMA trained on associative recall at 256 tokens.

Beyond the trained length full attention (RoPE distances out of distribution) and a 256-token
sliding window (pair outside the window) fail, while LongHeads with the same 256-token window
keeps retrieving. Also: the data generator's invariants and a short jitted training run.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

import lh_jax
from lh_jax.experiments import toy

LONG = 2048
SAMPLES = 64  # queries per check (8 sequences x 8 queries)


@pytest.fixture(scope="module")
def asset():
    return toy.load_toy()


@pytest.fixture(scope="module")
def long_batch(asset):
    task, _, _ = asset
    return toy.make_batch(task, np.random.default_rng(123), SAMPLES // task.num_queries, LONG,
                          num_pairs=task.num_keys)


def _accuracy(asset, attention, batch, window=None):
    _, config, params = asset
    r = toy.recall_accuracy(params, config, attention, batch, window)
    acc = r["correct"] / r["n"]
    return (acc, r["correct_far"] / r["n_far"]) if window is not None else acc


def test_generator_invariants():
    task = toy.ToyTask()
    b = toy.make_batch(task, np.random.default_rng(0), 4, 512, num_pairs=task.num_keys)
    B, Q = b.targets.shape
    rows = np.arange(B)[:, None]
    # the token after each query key is its value; the pair token encodes (that key, that value)
    assert np.array_equal(b.ids[rows, b.query_pos + 1], b.targets)
    pair = b.ids[rows, b.pair_pos] - task.pair_start
    assert np.array_equal(pair // task.num_values, b.ids[rows, b.query_pos] - task.key_start)
    assert np.array_equal(pair % task.num_values, b.targets - task.value_start)
    for j in range(task.needle_repeat):  # the needle is a run of identical pair tokens
        assert np.array_equal(b.ids[rows, b.pair_pos + j], b.ids[rows, b.pair_pos])
    for row in b.ids:  # each key occurs in exactly one needle
        pairs = row[(row >= task.pair_start) & (row < task.value_start)]
        keys = (pairs - task.pair_start) // task.num_values
        assert len(pairs) == task.num_keys * task.needle_repeat
        assert np.all(np.bincount(keys, minlength=task.num_keys) == task.needle_repeat)
    assert np.all(b.pair_pos + task.needle_repeat <= b.query_pos.min())
    with pytest.raises(ValueError, match="too short"):
        toy.make_batch(task, np.random.default_rng(0), 1, 40)


def test_asset_loads_with_lh_jax_load(asset):
    task, config, params = asset
    assert config.max_position_embeddings == 256 and config.trained_length == 256
    config2, params2 = lh_jax.load(toy.ASSET_DIR)
    assert config2 == config
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, params2))
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n < 500_000


def test_recall_at_trained_length(asset):
    task, _, _ = asset
    b = toy.make_batch(task, np.random.default_rng(7), SAMPLES // task.num_queries, 256, num_pairs=task.num_keys)
    assert _accuracy(asset, None, b) >= 0.9


def test_full_attention_fails_beyond_trained_length(asset, long_batch):
    assert _accuracy(asset, None, long_batch) <= 0.6


def test_longheads_retrieves_beyond_trained_length(asset, long_batch):
    acc, far = _accuracy(asset, lh_jax.LongHeads(chunk_size=16, num_chunks=16), long_batch, window=256)
    assert acc >= 0.9 and far >= 0.9


def test_sliding_window_fails_outside_its_window(asset, long_batch):
    acc, far = _accuracy(asset, lh_jax.sliding_window(16, 16), long_batch, window=256)
    assert far <= 0.3


def test_training_steps_decrease_loss_and_run_jitted():
    task = toy.ToyTask()
    config = toy.model_config(task, hidden=32, kv_heads=4, head_dim=16)
    settings = toy.TrainSettings(steps=12, long_steps=2, batch=8, long_batch=2, lr=1e-2, warmup=2)
    params, history = toy.train(task, config, settings, log_every=1, log=lambda *_: None)
    losses = [h["loss"] for h in history]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < losses[0] - 1.0  # from ~ln(384) towards ~ln(16)
    assert [h["length"] for h in history][-2:] == [256, 256]
    # the step is jitted: repeated calls at one length reuse a single compilation
    opt = toy.make_optimizer(settings)
    step = toy.make_train_step(config, opt)
    state = opt.init(params)
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(4):
        b = toy.make_batch(task, rng, 2, 64)
        params, state, loss, acc = step(params, state, b.ids, b.targets, b.query_pos)
        sizes.append(step._cache_size())
    assert sizes[1:] == [sizes[1]] * 3  # no new trace after the first steps


def test_save_load_roundtrip(tmp_path):
    task = toy.ToyTask()
    config = toy.model_config(task, hidden=32, kv_heads=4, head_dim=16)
    params = jax.device_get(toy.init_params(config, 1))
    toy.save_toy(str(tmp_path / "m"), task, config, params)
    task2, config2, params2 = toy.load_toy(str(tmp_path / "m"))
    assert task2 == task and config2 == config
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, params2))
    with pytest.raises(FileNotFoundError, match="toy_task.json"):
        toy.load_toy(str(tmp_path))


def test_default_methods_parse():
    from lh_jax.methods import parse_methods
    assert [s.label for s in parse_methods(toy.DEFAULT_METHODS)] == [
        "full", "longheads:16x16", "longheads:32x8", "sliding:16x16", "longheads:16x16/bounds"]
