"""Bad input: each case raises a clear exception naming the problem, before anything compiles."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch

import lh_jax
from lh_jax import CacheCapacityError, runtime
from lh_jax.convert import TensorShapeError, WeightFileError
from lh_jax.models import ConfigError

from conftest import VARIANTS, build_hf_model, copy_model_dir, edit_config, nothing_compiles, random_ids, save_hf_model



def test_compile_detector_detects_compilation(tiny):
    """The nothing_compiles guard (conftest) is not vacuous: a fresh shape does trace and compile."""
    m = tiny("llama_mha")
    with pytest.raises(AssertionError, match="traced|compilation"):
        with nothing_compiles():
            lh_jax.forward(m.params, m.config, random_ids((1, 13), seed=0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small LLaMA saved once (single file) and once sharded; tests copy before damaging."""
    arch, kw = VARIANTS["llama_gqa2_tied"]
    model = build_hf_model(arch, seed=3, **kw)
    root = tmp_path_factory.mktemp("errors")
    return {"single": save_hf_model(model, root / "single"),
            "sharded": save_hf_model(model, root / "sharded", max_shard_size="50KB"),
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def load_raises(path, exc, *patterns):
    with nothing_compiles():
        with pytest.raises(exc) as info:
            lh_jax.load(path, progress=False)
    msg = str(info.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in error message: {msg}"
    return msg


# --- configs -----------------------------------------------------------------------------------

def test_unknown_model_type(saved, tmp_path):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    edit_config(path, lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    msg = load_raises(path, ConfigError, "gpt2", "config.json", "llama", "mistral", "qwen2")
    assert "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg and "MistralForCausalLM" in msg


def test_unknown_architecture(saved, tmp_path):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    edit_config(path, lambda c: c.update(architectures=["LlamaForSequenceClassification"]))
    load_raises(path, ConfigError, "LlamaForSequenceClassification", "LlamaForCausalLM", "MistralForCausalLM",
                "Qwen2ForCausalLM")


def test_unsupported_rope_type(saved, tmp_path):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    edit_config(path, lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0}))
    load_raises(path, ConfigError, "longrope", "default", "linear", "dynamic", "llama3", "yarn")


def test_missing_config(saved, tmp_path):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    os.remove(os.path.join(path, "config.json"))
    load_raises(path, WeightFileError, "config.json", path)


def test_missing_config_field(saved, tmp_path):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    edit_config(path, lambda c: c.pop("intermediate_size"))
    load_raises(path, ConfigError, "intermediate_size")


def test_config_not_json(saved, tmp_path):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{not json")
    load_raises(path, ConfigError, "config.json")


# --- weight files ------------------------------------------------------------------------------

def test_missing_weight_file(saved, tmp_path):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    load_raises(path, WeightFileError, "model.safetensors", path)


def test_missing_shard(saved, tmp_path):
    path = copy_model_dir(saved["sharded"], tmp_path / "m")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(path, shard))
    load_raises(path, WeightFileError, shard)


def test_missing_model_path(tmp_path):
    with nothing_compiles():
        with pytest.raises(FileNotFoundError, match="nowhere"):
            lh_jax.load(str(tmp_path / "nowhere"), progress=False)


def test_truncated_weight_file(saved, tmp_path):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    load_raises(path, WeightFileError, weights, "truncated")


def test_garbled_weight_header(saved, tmp_path):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage\xff" * 4)  # inside the JSON header
    load_raises(path, WeightFileError, weights, "corrupt")


def test_garbled_header_length(saved, tmp_path):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 8)
    load_raises(path, WeightFileError, weights)


def test_corrupt_bin_file(saved, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    with open(os.path.join(saved["single"], "config.json")) as f:
        (path / "config.json").write_text(f.read())
    torch.save(saved["state"], path / "pytorch_model.bin")
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    load_raises(str(path), WeightFileError, str(path / "pytorch_model.bin"))


def test_missing_tensor(saved, tmp_path):
    from safetensors.torch import save_file
    path = copy_model_dir(saved["single"], tmp_path / "m")
    state = {k: v.contiguous() for k, v in saved["state"].items()
             if k != "model.layers.1.self_attn.v_proj.weight" and k != "lm_head.weight"}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    load_raises(path, WeightFileError, "model.layers.1.self_attn.v_proj.weight", "model.safetensors")


@pytest.mark.parametrize("field,value,tensor", [
    ("intermediate_size", 160, "model.layers.0.mlp.gate_proj.weight"),
    ("num_key_value_heads", 1, "model.layers.0.self_attn.k_proj.weight"),
    ("vocab_size", 500, "model.embed_tokens.weight"),
    ("hidden_size", 96, "model.embed_tokens.weight"),
])
def test_tensor_shape_disagrees_with_config(saved, tmp_path, field, value, tensor):
    path = copy_model_dir(saved["single"], tmp_path / "m")
    edit_config(path, lambda c: c.update({field: value}))
    load_raises(path, TensorShapeError, tensor, "model.safetensors", "shape")


def test_gguf_missing_and_corrupt(tmp_path):
    with nothing_compiles():
        with pytest.raises((WeightFileError, FileNotFoundError), match="absent.gguf"):
            lh_jax.load(str(tmp_path / "absent.gguf"), progress=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
    load_raises(str(bad), WeightFileError, str(bad))


def test_no_tokenizer(saved):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        lh_jax.load_tokenizer(saved["single"])


def test_bad_dtype(saved):
    with nothing_compiles():
        with pytest.raises(ValueError, match="int8"):
            lh_jax.load(saved["single"], dtype="int8", progress=False)


# --- runtime inputs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny):
    return tiny("llama_gqa2_tied")


@pytest.mark.parametrize("shape", [(1, 0), (0, 5), (0,)])
def test_empty_input_ids(model, shape):
    ids = np.zeros(shape, np.int32)
    with nothing_compiles():
        for call in (lambda: lh_jax.forward(model.params, model.config, ids),
                     lambda: lh_jax.generate(model.params, model.config, ids, 4)):
            with pytest.raises(ValueError, match="empty"):
                call()
    cache = lh_jax.init_cache(model.config, 1, 8)
    with nothing_compiles():
        with pytest.raises(ValueError, match="empty"):
            lh_jax.prefill(model.params, model.config, ids, cache)


@pytest.mark.parametrize("bad", [-1, "vocab", "vocab+100"])
def test_ids_outside_vocabulary(model, bad):
    V = model.config.vocab_size
    value = {"vocab": V, "vocab+100": V + 100}.get(bad, bad)
    ids = random_ids((2, 29), seed=4)
    ids[1, 17] = value
    with nothing_compiles():
        for call in (lambda: lh_jax.forward(model.params, model.config, ids),
                     lambda: lh_jax.generate(model.params, model.config, ids, 4)):
            with pytest.raises(ValueError) as info:
                call()
            msg = str(info.value)
            assert str(value) in msg and "vocabulary" in msg and str(V) in msg, msg
    cache = lh_jax.init_cache(model.config, 2, 64)
    with nothing_compiles():
        with pytest.raises(ValueError, match=f"{value}.*vocabulary"):
            lh_jax.prefill(model.params, model.config, ids, cache)
        with pytest.raises(ValueError, match=f"{value}.*vocabulary"):
            lh_jax.decode_step(model.params, model.config, np.array([3, value]), cache)


def test_non_integer_ids(model):
    with nothing_compiles():
        with pytest.raises(ValueError, match="integer"):
            lh_jax.forward(model.params, model.config, np.ones((1, 7), np.float32))


def test_bad_attention_mask(model):
    ids = random_ids((2, 11), seed=1)
    right_padded = np.ones((2, 11), np.int32)
    right_padded[0, -3:] = 0
    with nothing_compiles():
        with pytest.raises(ValueError, match="left-padded"):
            lh_jax.forward(model.params, model.config, ids, attention_mask=right_padded)
        with pytest.raises(ValueError, match="shape"):
            lh_jax.forward(model.params, model.config, ids, attention_mask=np.ones((2, 10), np.int32))


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_max_new_tokens(model, n):
    with nothing_compiles():
        with pytest.raises(ValueError, match="max_new_tokens"):
            lh_jax.generate(model.params, model.config, random_ids((1, 5)), n)


def test_generate_past_max_cache_length(model):
    ids = random_ids((1, 40), seed=2)
    with nothing_compiles():
        with pytest.raises(CacheCapacityError) as info:
            lh_jax.generate(model.params, model.config, ids, 25, max_cache_length=64)
    msg = str(info.value)
    assert "64" in msg and "max_cache_length" in msg and "25" in msg
    # exactly fitting is fine
    out = lh_jax.generate(model.params, model.config, ids, 24, max_cache_length=64)
    assert out.shape == (1, 64)


def test_decode_step_on_full_cache(model):
    cache = lh_jax.init_cache(model.config, 1, 6)
    _, cache = lh_jax.prefill(model.params, model.config, random_ids((1, 4), seed=3), cache)
    for tok in (5, 6):
        _, cache = lh_jax.decode_step(model.params, model.config, np.array([tok]), cache)
    assert int(cache.index) == 6
    with nothing_compiles():
        with pytest.raises(CacheCapacityError, match="capacity 6"):
            lh_jax.decode_step(model.params, model.config, np.array([7]), cache)


def test_prefill_past_capacity(model):
    cache = lh_jax.init_cache(model.config, 1, 10)
    with nothing_compiles():
        with pytest.raises(CacheCapacityError, match="capacity 10"):
            lh_jax.prefill(model.params, model.config, random_ids((1, 11), seed=3), cache)
    _, cache = lh_jax.prefill(model.params, model.config, random_ids((1, 6), seed=3), cache)
    with nothing_compiles():
        with pytest.raises(CacheCapacityError, match="capacity 10"):
            lh_jax.prefill(model.params, model.config, random_ids((1, 5), seed=3), cache)


def test_cache_batch_mismatch(model):
    cache = lh_jax.init_cache(model.config, 2, 16)
    with nothing_compiles():
        with pytest.raises(ValueError, match="batch"):
            lh_jax.prefill(model.params, model.config, random_ids((3, 4), seed=3), cache)
