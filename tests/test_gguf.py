"""GGUF files written by the `gguf` package's own writer (as llama.cpp's converter lays them out),
loaded by lh-jax and compared with the same weights loaded from a Hugging Face directory and with
transformers' PyTorch model: llama (tied and untied), Llama 3 RoPE scaling carried as the
`rope_freqs` tensor, qwen2 (q/k/v biases, rows not permuted) and mistral."""
from __future__ import annotations

import math

import numpy as np
import pytest

import lh_jax
from conftest import build_hf_model, random_ids, save_hf_model, torch_logits

gguf = pytest.importorskip("gguf")

T = 600  # long enough for RoPE mistakes to show (style.md: short prompts cannot detect them)


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation for its interleaved RoPE (what lh-jax's loader undoes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama3_rope_freqs(theta, dim, factor, low, high, original) -> np.ndarray:
    """The divisors llama.cpp's converter writes as rope_freqs for a Llama 3 rope_scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(model, path: str, arch: str, rope_freqs: np.ndarray | None = None) -> str:
    cfg = model.config
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") and cfg.rope_parameters
                         else cfg.rope_theta)
    for name, p in model.state_dict().items():
        a = p.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                w.add_tensor("output.weight", a)
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if arch in ("llama", "mistral") and module in ("self_attn.q_proj", "self_attn.k_proj"):
                a = permute_rows(a, H if module.endswith("q_proj") else K)
            w.add_tensor(f"blk.{i}.{GGUF_NAMES[module]}.{kind}", a)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
CASES = {
    "llama-untied": ("LlamaForCausalLM", "llama", dict(tie_word_embeddings=False)),
    "llama-tied": ("LlamaForCausalLM", "llama", dict(tie_word_embeddings=True)),
    "llama3-rope-freqs": ("LlamaForCausalLM", "llama", dict(tie_word_embeddings=False, rope_scaling=LLAMA3)),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", dict(tie_word_embeddings=False)),
    "mistral": ("MistralForCausalLM", "mistral", dict(tie_word_embeddings=False, sliding_window=None)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_equals_the_hf_directory_and_transformers(case, tmp_path):
    hf_class, arch, overrides = CASES[case]
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, max_position_embeddings=1024, rope_theta=10000.0, **overrides)
    model = build_hf_model(hf_class, seed=3, **kw)
    hf_dir = save_hf_model(model, tmp_path / "hf")
    freqs = llama3_rope_freqs(10000.0, 16, 8.0, 1.0, 4.0, 64) if "rope_scaling" in overrides else None
    path = write_gguf(model, str(tmp_path / "m.gguf"), arch, freqs)
    config, params = lh_jax.load(path, progress=False)
    hf_config, hf_params = lh_jax.load(hf_dir, progress=False)
    assert config.tie_word_embeddings == overrides["tie_word_embeddings"] == ("lm_head" not in params)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    if freqs is not None:
        assert config.rope.freq_factors == tuple(float(f) for f in freqs)
        assert hf_config.rope.rope_type == "llama3"
    ids = random_ids((1, T), seed=4, vocab=256)
    ours = np.asarray(lh_jax.forward(params, config, ids))
    np.testing.assert_allclose(ours, np.asarray(lh_jax.forward(hf_params, hf_config, ids)), atol=1e-4)
    np.testing.assert_allclose(ours, torch_logits(hf_dir, ids), atol=1e-4)


def test_rope_freqs_are_not_ignored(tmp_path):
    """The test above is not vacuous: the same file without rope_freqs gives other logits."""
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, max_position_embeddings=1024, tie_word_embeddings=False, rope_scaling=LLAMA3)
    model = build_hf_model("LlamaForCausalLM", seed=3, **kw)
    freqs = llama3_rope_freqs(10000.0, 16, 8.0, 1.0, 4.0, 64)
    with_freqs = lh_jax.load(write_gguf(model, str(tmp_path / "a.gguf"), "llama", freqs), progress=False)
    without = lh_jax.load(write_gguf(model, str(tmp_path / "b.gguf"), "llama"), progress=False)
    ids = random_ids((1, T), seed=4, vocab=256)
    a = np.asarray(lh_jax.forward(with_freqs[1], with_freqs[0], ids))
    b = np.asarray(lh_jax.forward(without[1], without[0], ids))
    assert np.abs(a - b).max() > 1e-2
    import dataclasses
    with pytest.raises(lh_jax.models.ConfigError, match="entries"):  # one divisor per frequency
        dataclasses.replace(with_freqs[0], head_dim=32)
