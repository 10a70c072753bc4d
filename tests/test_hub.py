"""Hugging Face hub ids in lh_jax.load / load_tokenizer, without network: a cache folder built by
the test in huggingface_hub's own layout (models--org--name/{refs,snapshots,blobs})."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import lh_jax
from conftest import random_ids, save_tiny_with_tokenizer

REVISION = "0123456789abcdef0123456789abcdef01234567"


def make_cache(root, repo_id: str, model_dir: str, revision: str = REVISION, ref: str = "main") -> str:
    """A hub cache holding `model_dir`'s files as repo `repo_id` at commit `revision` (blobs + links)."""
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", revision)
    os.makedirs(snap)
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", ref), "w") as f:
        f.write(revision)
    for name in os.listdir(model_dir):
        blob = os.path.join(repo, "blobs", f"{abs(hash(name)):x}")
        shutil.copy(os.path.join(model_dir, name), blob)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("hub") / "m", seed=21)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, model_dir):
    cache = make_cache(str(tmp_path / "hub"), "tiny-org/tiny-llama", model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_from_the_cache(offline_cache, model_dir):
    config, params = lh_jax.load("tiny-org/tiny-llama", progress=False)
    ref_config, ref_params = lh_jax.load(model_dir, progress=False)
    assert config == ref_config
    ids = random_ids((1, 40), seed=2, vocab=config.vocab_size)
    np.testing.assert_array_equal(np.asarray(lh_jax.forward(params, config, ids)),
                                  np.asarray(lh_jax.forward(ref_params, ref_config, ids)))
    tok = lh_jax.load_tokenizer("tiny-org/tiny-llama")
    assert tok("The mill")["input_ids"] == lh_jax.load_tokenizer(model_dir)("The mill")["input_ids"]
    # a revision names the commit; an unknown one is not in the cache
    assert lh_jax.load("tiny-org/tiny-llama", revision=REVISION, progress=False)[0] == ref_config
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        lh_jax.load("tiny-org/tiny-llama", revision="v9", progress=False)


def test_missing_hub_model_says_what_to_do(offline_cache):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download other-org/missing"):
        lh_jax.load("other-org/missing", progress=False)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        lh_jax.load_tokenizer("other-org/missing")


def test_local_paths_win_over_hub_ids(tmp_path, monkeypatch, model_dir, offline_cache):
    monkeypatch.chdir(tmp_path)
    os.makedirs("tiny-org")
    shutil.copytree(model_dir, "tiny-org/tiny-llama")
    assert lh_jax.convert.resolve_model_path("tiny-org/tiny-llama") == "tiny-org/tiny-llama"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lh_jax.load("./no/such/dir", progress=False)
