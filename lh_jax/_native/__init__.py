"""Small CPU kernels for chunk selection. `top_k(x, k)` gives exactly `jax.lax.top_k(x, k)`
(values and indices, ties to the lower index, float total order), computed on the CPU by a C++
XLA FFI kernel that spreads the rows over XLA's threads (XLA:CPU runs top_k on one thread);
`top_k_picks(x, k)` gives the same top-k's indices in index order from that kernel, without a sort.
`chunk_counts(sel, width)` counts, per group of queries, how often each chunk was picked and how
many earlier queries picked each pick's chunk (the dispatch kernel's counting sort), in
O(picks + width) per group instead of XLA's O(queries x width) membership matrix. Off the CPU,
or where the kernels cannot be built, both are plain JAX with the same results.

The kernel is compiled on first use with the C++ compiler (`$CXX`, else `c++`/`g++`) against the
XLA FFI headers that ship with jaxlib, and cached under `$LH_JAX_NATIVE_DIR` (default
`~/.cache/lh_jax/native`), keyed by the source, jaxlib version and compiler. `LH_JAX_NATIVE=off`
skips it. A failed build warns once (naming the compiler and its error) and falls back.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("topk.cc")
_TARGET = "lh_jax_topk_f32"
_COUNTS_TARGET = "lh_jax_chunk_counts"
_PICKS_TARGET = "lh_jax_topk_picks_f32"
_ENV_SWITCH = "LH_JAX_NATIVE"
_lock = threading.Lock()
_state: dict[str, object] = {}


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cache_dir() -> Path:
    d = os.environ.get("LH_JAX_NATIVE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "lh_jax" / "native"


def build(force: bool = False) -> Path:
    """Compile the kernel (if not cached) and return the shared library's path; raises
    RuntimeError naming the compiler and its output if it cannot."""
    import jaxlib

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    include = jax.ffi.include_dir()
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-I", include]
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), jaxlib.__version__.encode(), cxx.encode(),
                                     " ".join(flags[:-2]).encode()])).hexdigest()[:16]
    out = _cache_dir() / f"topk-{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build to a private name, then rename: concurrent processes (pytest-xdist) never load half a file
    fd, tmp = tempfile.mkstemp(prefix=".topk-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([cxx, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        except OSError as e:
            raise RuntimeError(f"cannot run the C++ compiler {cxx}: {e}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {_SOURCE.name} (exit {proc.returncode}):\n"
                               f"{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def available() -> bool:
    """Whether the native kernel is built and registered for the CPU (building it on first call)."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        ok = False
        if os.environ.get(_ENV_SWITCH, "").strip().lower() in ("off", "0", "false", "no"):
            _state["why"] = f"{_ENV_SWITCH}=off"
        else:
            try:
                lib = ctypes.cdll.LoadLibrary(str(build()))
                jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.LhJaxTopKF32), platform="cpu")
                jax.ffi.register_ffi_target(_PICKS_TARGET, jax.ffi.pycapsule(lib.LhJaxTopKPicksF32),
                                            platform="cpu")
                jax.ffi.register_ffi_target(_COUNTS_TARGET, jax.ffi.pycapsule(lib.LhJaxChunkCounts),
                                            platform="cpu")
                _state["lib"] = lib
                ok = True
            except (RuntimeError, OSError, AttributeError) as e:
                _state["why"] = str(e)
                warnings.warn(f"lh_jax: the native CPU top-k is unavailable, using jax.lax.top_k (slower on "
                              f"the CPU): {e}", RuntimeWarning, stacklevel=2)
        _state["ok"] = ok
        return ok


def _native_call(x, k: int):
    lead = x.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    x2 = x.reshape(rows, x.shape[-1])
    vals, idx = jax.ffi.ffi_call(
        _TARGET,
        (jax.ShapeDtypeStruct((rows, k), jnp.float32), jax.ShapeDtypeStruct((rows, k), jnp.int32)),
        vmap_method="broadcast_all",
    )(x2)
    return vals.reshape(*lead, k), idx.reshape(*lead, k)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _top_k_cpu(x, k: int):
    return jax.lax.platform_dependent(
        x, cpu=lambda x: _native_call(x, k), default=lambda x: tuple(jax.lax.top_k(x, k)))


@_top_k_cpu.defjvp
def _top_k_cpu_jvp(k, primals, tangents):
    (x,), (dx,) = primals, tangents
    vals, idx = _top_k_cpu(x, k)
    dvals = jnp.take_along_axis(dx, idx, axis=-1)
    return (vals, idx), (dvals, np.zeros(idx.shape, jax.dtypes.float0))


def _native_top_k_applies(x, k: int) -> bool:
    """Whether the native top-k kernels take `x` (float32 rows, 1 <= k <= row length) here."""
    return x.dtype == jnp.float32 and x.ndim > 0 and 1 <= k <= x.shape[-1] and x.size > 0 and available()


def top_k(x, k: int):
    """`jax.lax.top_k(x, k)` along the last axis, with the native kernel on the CPU for float32."""
    x = jnp.asarray(x)
    if not _native_top_k_applies(x, k):
        return jax.lax.top_k(x, k)
    return _top_k_cpu(x, k)


def top_k_picks_reference(x, k: int):
    """`top_k_picks` from `jax.lax.top_k`: its indices whose value is > -inf, ascending, then
    x.shape[-1] for the rest."""
    vals, idx = jax.lax.top_k(x, k)
    return jnp.sort(jnp.where(vals > -jnp.inf, idx, x.shape[-1]).astype(jnp.int32), axis=-1)


def _picks_native(x, k: int):
    lead = x.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    out = jax.ffi.ffi_call(
        _PICKS_TARGET,
        (jax.ShapeDtypeStruct((rows, k), jnp.float32), jax.ShapeDtypeStruct((rows, k), jnp.int32),
         jax.ShapeDtypeStruct((rows, k), jnp.int32)),
        vmap_method="broadcast_all",
    )(x.reshape(rows, x.shape[-1]))[2]
    return out.reshape(*lead, k)


def top_k_picks(x, k: int):
    """The chunks a top-k selection picks, as LongHeads assembles them: the indices of
    `jax.lax.top_k(x, k)` whose value is > -inf (a masked candidate is no pick), in ascending
    order, then `x.shape[-1]` for the rest. Integer output: no gradient flows through it.
    Native on the CPU (no separate sort), `top_k_picks_reference` elsewhere."""
    x = jax.lax.stop_gradient(jnp.asarray(x))
    if not _native_top_k_applies(x, k):
        return top_k_picks_reference(x, k)
    return jax.lax.platform_dependent(
        x, cpu=lambda x: _picks_native(x, k), default=lambda x: top_k_picks_reference(x, k))


def chunk_counts_reference(sel, width: int):
    """`chunk_counts` in plain JAX: the [..., l, width] membership matrix of the picks and its
    column sums (exclusive cumulative along the l queries for `within`)."""
    sel = jnp.asarray(sel, jnp.int32)
    lead, (l, n) = sel.shape[:-2], sel.shape[-2:]
    s2 = sel.reshape(-1, l, n)
    valid = (s2 >= 0) & (s2 < width)
    idx = jnp.where(valid, s2, width)
    g_ = jnp.arange(s2.shape[0])[:, None, None]
    t_ = jnp.arange(l)[None, :, None]
    M = jnp.zeros((s2.shape[0], l, width), bool).at[g_, t_, idx].set(True, mode="drop")
    before = jnp.cumsum(M, axis=1, dtype=jnp.int32) - M  # earlier queries of the group, per chunk
    within = jnp.take_along_axis(before, jnp.clip(idx, 0, width - 1), axis=-1, mode="promise_in_bounds")
    within = jnp.where(valid, within, 0)
    cnt = jnp.sum(M, axis=1, dtype=jnp.int32)
    return within.reshape(sel.shape), cnt.reshape(*lead, width)


def _counts_native(sel, width: int):
    return tuple(jax.ffi.ffi_call(
        _COUNTS_TARGET,
        (jax.ShapeDtypeStruct(sel.shape, jnp.int32), jax.ShapeDtypeStruct(sel.shape[:-2] + (width,), jnp.int32)),
        vmap_method="broadcast_all",
    )(sel))


def chunk_counts(sel, width: int):
    """Per group of queries sel [..., l, N] (each query's picked chunks; a value outside
    [0, width) is no pick): (within [..., l, N], cnt [..., width]) where within is the number of
    earlier queries of the group (smaller l index) that picked the same chunk (0 for no pick) and
    cnt the number of queries of the group that picked each chunk. A chunk listed twice by one
    query counts once. Native on the CPU, `chunk_counts_reference` elsewhere."""
    sel = jnp.asarray(sel, jnp.int32)
    if sel.ndim < 2 or width < 1 or sel.size == 0 or not available():
        return chunk_counts_reference(sel, width)
    return tuple(jax.lax.platform_dependent(
        sel, cpu=lambda s: _counts_native(s, width), default=lambda s: chunk_counts_reference(s, width)))
