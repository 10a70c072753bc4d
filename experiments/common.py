"""Shared plumbing of the evaluation commands: results store (resumable), metadata, CSV, progress.

Every command writes into `--out DIR` (default `results/<command>`):
  cells.jsonl   one line per finished cell {"key": {...}, "result": {...}} — appended as cells
                finish, so an interrupted run resumes where it stopped (cells already there are skipped)
  <name>.json   metadata (exact configuration, command line, versions, machine) + all rows
  <name>.csv    the rows, flat
  <name>.png    the plot; <name>.md the printed table
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any, Iterable


def add_common_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--model", default="default", help="HF dir, .gguf, orbax dir, or 'default' (embedded SmolLM2-135M)")
    p.add_argument("--batch-size", type=int, default=1, help="trials run together in one batch (throughput on GPU/TPU)")
    p.add_argument("--seed", type=int, default=0, help="all randomness derives from this seed")
    p.add_argument("--out", default=os.path.join("results", command), help="output directory")
    p.add_argument("--no-resume", action="store_true", help="start over instead of skipping finished cells")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for dist in ("lh-jax", "jax", "jaxlib", "flax", "numpy", "transformers", "optax", "orbax-checkpoint"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
    try:
        import jax
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception as e:  # noqa: BLE001 - metadata only
        info["jax_devices"] = f"unavailable: {e}"
    return info


def run_metadata(args: argparse.Namespace | None = None, **extra) -> dict:
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv, "versions": versions(), "machine": machine()}
    if args is not None:
        meta["args"] = namespace_dict(args)
    meta.update(extra)
    return meta


def namespace_dict(args: argparse.Namespace) -> dict:
    """The arguments as JSON-able values (methods by their names; functions left out)."""
    from lh_jax.methods import MethodSpec

    def plain(v):
        if isinstance(v, MethodSpec):
            return v.name
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return {k: plain(v) for k, v in vars(args).items() if not callable(v)}


def _key_id(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


class ResultStore:
    """Finished cells keyed by a JSON-able dict; persisted line by line for resumption."""

    def __init__(self, out_dir: str, resume: bool = True):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "cells.jsonl")
        self._cells: dict[str, tuple[dict, dict]] = {}
        if resume and os.path.exists(self.path):
            with open(self.path) as f:
                for n, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        # a line cut by an interruption: drop it, the cell runs again
                        print(f"[{self.path}:{n}] ignoring a truncated line", file=sys.stderr)
                        continue
                    self._cells[_key_id(rec["key"])] = (rec["key"], rec["result"])
        elif not resume and os.path.exists(self.path):
            os.remove(self.path)

    def get(self, key: dict) -> dict | None:
        hit = self._cells.get(_key_id(key))
        return None if hit is None else hit[1]

    def __contains__(self, key: dict) -> bool:
        return _key_id(key) in self._cells

    def add(self, key: dict, result: dict) -> None:
        self._cells[_key_id(key)] = (key, result)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "result": result}) + "\n")
            f.flush()

    def rows(self, keys: Iterable[dict] | None = None) -> list[dict]:
        """Flat rows (key fields then result fields), for the given keys in order or all."""
        if keys is None:
            items = list(self._cells.values())
        else:
            items = [self._cells[_key_id(k)] for k in keys if _key_id(k) in self._cells]
        return [{**k, **r} for k, r in items]


def _flat(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else value


def write_csv(path: str, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _flat(v) for k, v in r.items()})


def write_outputs(out_dir: str, name: str, meta: dict, rows: list[dict], table: str | None = None) -> dict:
    """<name>.json (metadata + rows), <name>.csv, <name>.md; returns the paths."""
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "csv": os.path.join(out_dir, f"{name}.csv")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    write_csv(paths["csv"], rows)
    if table is not None:
        paths["md"] = os.path.join(out_dir, f"{name}.md")
        with open(paths["md"], "w") as f:
            f.write(table + "\n")
    return paths


def progress(iterable, total: int | None = None, desc: str = ""):
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)


def load_model(args):
    """(config, params, tokenizer) for `args.model`, with a clear error for a bad path."""
    import lh_jax
    config, params = lh_jax.load(args.model, dtype=args.dtype)
    return config, params, lh_jax.load_tokenizer(args.model)


def matplotlib_pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed:
    the plots are optional (`pip install lh-jax[experiments]`), the tables and JSON are not."""
    try:
        import matplotlib
    except ImportError:
        print("[lh-jax] no plot written: matplotlib is not installed (pip install 'lh-jax[experiments]')",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
