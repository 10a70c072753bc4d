"""Readers that hand out one named tensor at a time as numpy, from the checkpoint formats we load.

- `SafetensorsSource`: one or more `.safetensors` files (memory-mapped; bfloat16 via ml_dtypes).
- `TorchBinSource`: `pytorch_model*.bin` (needs torch, imported only here).
- `GGUFSource`: a llama.cpp GGUF file (via the `gguf` package; quantised types dequantised).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np


class WeightFileError(ValueError):
    """A checkpoint file that is missing, unreadable or inconsistent."""


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class _SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise WeightFileError(f"weight file {path} does not exist")
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", raw)
                if n < 2 or n > size - 8:
                    raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise WeightFileError(f"corrupt safetensors file {path}: {e}") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        data_size = size - self.base
        self.header = header
        for name, info in header.items():
            start, end = info["data_offsets"]
            if info["dtype"] not in _ST_DTYPES:
                raise WeightFileError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
            if end > data_size or end - start != expected:
                raise WeightFileError(f"corrupt or truncated safetensors file {path}: tensor {name!r} "
                                      f"needs bytes {start}..{end} of {data_size}")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if header else None

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        raw = self._mm[self.base + start:self.base + end]
        return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class TensorSource:
    """A mapping from tensor name to numpy array, reporting which file each tensor comes from."""

    files: list[str]

    def names(self) -> Iterable[str]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def where(self, name: str) -> str:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())


class SafetensorsSource(TensorSource):
    def __init__(self, paths: list[str], index: dict[str, str] | None = None):
        self.files = paths
        self._files = {p: _SafetensorsFile(p) for p in paths}
        self._where = {}
        for p, f in self._files.items():
            for name in f.header:
                self._where[name] = p
        if index is not None:
            missing = sorted({os.path.basename(p) for n, p in index.items() if n not in self._where})
            if missing:
                raise WeightFileError(f"sharded checkpoint index names tensors missing from {missing}")

    def names(self):
        return self._where.keys()

    def __contains__(self, name):
        return name in self._where

    def get(self, name):
        return self._files[self._where[name]].get(name)

    def where(self, name):
        return self._where.get(name, ", ".join(self.files))


class TorchBinSource(TensorSource):
    def __init__(self, paths: list[str]):
        try:
            import torch
        except ImportError:
            raise WeightFileError(f"loading {paths[0]} (a PyTorch .bin checkpoint) needs torch; "
                                  "install torch or convert the checkpoint to safetensors") from None
        self.files = paths
        self._tensors, self._where = {}, {}
        for p in paths:
            if not os.path.isfile(p):
                raise WeightFileError(f"weight file {p} does not exist")
            try:
                state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a damaged file
                raise WeightFileError(f"corrupt PyTorch weight file {p}: {type(e).__name__}: {e}") from None
            for name, t in state.items():
                self._tensors[name] = t
                self._where[name] = p

    def names(self):
        return self._tensors.keys()

    def __contains__(self, name):
        return name in self._tensors

    def get(self, name):
        t = self._tensors[name]
        import torch
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def where(self, name):
        return self._where.get(name, ", ".join(self.files))


class GGUFSource(TensorSource):
    """Tensors of a GGUF file; `get` dequantises and returns [out, in] like PyTorch."""

    def __init__(self, path: str):
        import gguf
        if not os.path.isfile(path):
            raise WeightFileError(f"GGUF file {path} does not exist")
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:
            raise WeightFileError(f"corrupt GGUF file {path}: {type(e).__name__}: {e}") from None
        self.files = [path]
        self._tensors = {t.name: t for t in self.reader.tensors}

    def names(self):
        return self._tensors.keys()

    def __contains__(self, name):
        return name in self._tensors

    def get(self, name):
        import gguf
        t = self._tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        return np.asarray(arr).reshape(shape)

    def where(self, name):
        return self.files[0]

    def field(self, key, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()
