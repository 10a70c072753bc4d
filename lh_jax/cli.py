"""The `lh-jax` console script: generate, convert, and the experiment commands (bench, passkey, ...).

Argument and input errors print one line naming the problem on stderr and exit with code 2; a
command whose cells failed exits with code 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from lh_jax.methods import add_method_arguments

#: What a bad argument or input raises (ValueError covers lh-jax's own checks and ConfigError).
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `lh-jax <command>: error: <message>`, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def read_prompt(args) -> str:
    """--prompt, or --prompt-file (a path, or '-' for standard input)."""
    if args.prompt_file is None:
        return args.prompt
    if args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        if not os.path.isfile(args.prompt_file):
            raise FileNotFoundError(f"--prompt-file {args.prompt_file} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    if not text.strip():
        raise ValueError(f"--prompt-file {args.prompt_file}: the prompt is empty")
    return text


def cmd_generate(args) -> None:
    import numpy as np

    import lh_jax
    from lh_jax.runtime import cut_at_eos
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    prompt = read_prompt(args)
    t0 = time.perf_counter()
    config, params = lh_jax.load(args.model, dtype=args.dtype)
    tok = lh_jax.load_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = np.asarray(tok(prompt, add_special_tokens=False)["input_ids"], dtype=np.int32)[None]
    # the method's config too: pi / ntk / yarn (and +ntk etc.) rescale RoPE
    config, attention = args.attention.build(config, ids.shape[1] + args.max_new_tokens)
    t0 = time.perf_counter()
    out = np.asarray(lh_jax.generate(params, config, ids, args.max_new_tokens, attention=attention,
                                     temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                     stop_at_eos=True))
    gen_s = time.perf_counter() - t0
    new = cut_at_eos(out[0, ids.shape[1]:], config.eos_token_id)
    print(tok.decode(new, skip_special_tokens=True))
    print(f"[{ids.shape[1]} prompt tokens, {len(new)} new, load {load_s:.1f}s, "
          f"generate {gen_s:.1f}s incl. compile]", file=sys.stderr)


def cmd_convert(args) -> None:
    from lh_jax.convert import convert
    t0 = time.perf_counter()
    config = convert(args.src, args.dst, dtype=args.dtype)
    print(f"wrote {args.dst} ({config.model_type}, {config.num_layers} layers, {args.dtype}) "
          f"in {time.perf_counter() - t0:.1f}s")


#: subcommand -> (module, one-line help); experiment modules define add_arguments(p) and cli_main(args)
EXPERIMENTS = {
    "bench": ("lh_jax.experiments.bench", "prefill/decode benchmark against transformers"),
    "passkey": ("lh_jax.experiments.passkey", "passkey retrieval accuracy per length and depth"),
    "perplexity": ("lh_jax.experiments.perplexity", "perplexity by position bucket on a long text"),
    "needle": ("lh_jax.experiments.needle", "RULER-style synthetic needle tasks"),
    "compare": ("lh_jax.experiments.compare", "methods x tasks x lengths: one results table + plots"),
    "train-toy": ("lh_jax.experiments.toy", "train a tiny LLaMA on associative recall, test length generalisation"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; experiment subcommands are imported only when `command` names them."""
    p = Parser(prog="lh-jax", description="LongHeads in JAX: generation, conversion, benchmarks and "
               "long-context evaluations")
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generation from a prompt (greedy, or sampled with --temperature)")
    g.add_argument("--model", default="default", help="HF dir, .gguf, orbax dir, hub id, or 'default'")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="The capital of France is")
    source.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from FILE ('-': stdin)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="at most this many tokens (stops at EOS)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens of this mass")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_method_arguments(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint to an orbax directory")
    c.add_argument("src", help="HF dir, .gguf file, or 'default'")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    c.set_defaults(func=cmd_convert)

    import importlib
    for name, (module, help_text) in EXPERIMENTS.items():
        e = sub.add_parser(name, help=help_text)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(e)
            e.set_defaults(func=mod.cli_main)
    return p


COMPILE_CACHE_ENV = "LH_JAX_COMPILE_CACHE"


def enable_compile_cache(command: str | None) -> str | None:
    """Keep compiled programs on disk between runs (JAX's persistent compilation cache), so that a
    rerun of an evaluation skips most compilation. Directory: $LH_JAX_COMPILE_CACHE, default
    ~/.cache/lh-jax/xla; "off" disables it. Not for `bench`, which reports compile time."""
    path = os.environ.get(COMPILE_CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "lh-jax", "xla"))
    if command == "bench" or path.strip().lower() in ("", "off", "none", "0"):
        return None
    import jax
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"[lh-jax] compilation cache disabled: cannot create {path} ({e}); set {COMPILE_CACHE_ENV}",
              file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


CPU_OPT_LEVEL_ENV = "LH_JAX_CPU_OPT_LEVEL"
_OPT_FLAG = "--xla_backend_optimization_level"
_ACCEL_PLATFORMS = ("cuda", "gpu", "rocm", "tpu", "metal")


def _accelerator_possible(env) -> bool:
    """True when JAX may pick a non-CPU backend: JAX_PLATFORMS (in `env`) names one, or (unset) a
    GPU/TPU plugin is installed. Checked without initialising any backend."""
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return any(p.strip() in _ACCEL_PLATFORMS for p in platforms.split(","))
    import importlib.util
    import pkgutil
    if importlib.util.find_spec("libtpu") is not None:
        return True
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        return any(True for _ in pkgutil.iter_modules(list(spec.submodule_search_locations)))
    return False


def set_cpu_opt_level(environ=None) -> str | None:
    """On CPU-only installs, run XLA's LLVM backend at optimisation level $LH_JAX_CPU_OPT_LEVEL
    (default 1 instead of XLA's 3): measured on this project's programs, compilation takes ~30 %
    less time and the run is not slower, since the matmuls run in prebuilt library kernels.
    "default" (or "off") leaves XLA's own level. Untouched when XLA_FLAGS already sets the level,
    when JAX may use an accelerator, or when a backend exists already (the flag is read once, when
    the first backend is created). Returns the level set, or None."""
    env = os.environ if environ is None else environ
    raw = env.get(CPU_OPT_LEVEL_ENV, "1").strip().lower()
    if raw in ("default", "off", "none", ""):
        return None
    if raw not in ("0", "1", "2", "3"):
        print(f"lh-jax: error: {CPU_OPT_LEVEL_ENV}={env.get(CPU_OPT_LEVEL_ENV)!r} is not an XLA:CPU "
              f"optimisation level: use 0, 1, 2, 3 or 'default'", file=sys.stderr)
        raise SystemExit(2)
    flags = env.get("XLA_FLAGS", "")
    if _OPT_FLAG in flags or _accelerator_possible(env):
        return None
    try:
        from jax._src import xla_bridge
        if xla_bridge.backends_are_initialized():
            return None
    except (ImportError, AttributeError):
        pass
    env["XLA_FLAGS"] = f"{flags} {_OPT_FLAG}={raw}".strip()
    return raw


def version_line() -> str:
    import importlib.metadata as md
    found = []
    for dist in ("lh-jax", "jax", "jaxlib", "flax"):
        try:
            found.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    set_cpu_opt_level()
    args = build_parser(command).parse_args(argv)
    enable_compile_cache(command)
    try:
        args.func(args)
    except INPUT_ERRORS as e:
        # bad arguments or inputs: one line naming the problem (the checks run before any long work)
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"lh-jax {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
