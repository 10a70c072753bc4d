"""A CPU top-k for chunk selection: `top_k(x, k)` gives exactly `jax.lax.top_k(x, k)` (values and
indices, ties to the lower index, float total order), computed on the CPU by a small C++ XLA FFI
kernel that spreads the rows over XLA's threads (XLA:CPU runs top_k on one thread). Off the CPU,
or where the kernel cannot be built, it is `jax.lax.top_k` itself.

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


def top_k(x, k: int):
    """`jax.lax.top_k(x, k)` along the last axis, with the native kernel on the CPU for float32."""
    x = jnp.asarray(x)
    if (x.dtype != jnp.float32 or x.ndim == 0 or not 1 <= k <= x.shape[-1] or x.size == 0
            or not available()):
        return jax.lax.top_k(x, k)
    return _top_k_cpu(x, k)
