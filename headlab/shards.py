"""Resumable sweeps: one Parquet shard per grid point, named by a hash of its configuration.

A sweep is a list of configuration dicts and a function that turns one configuration into a tidy
frame. :class:`ShardStore` writes each frame atomically (temporary file + rename) next to a JSON
copy of its configuration; a rerun skips every point whose shard exists, so a sweep killed midway
resumes where it stopped and ends with the same table as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from headlab.progress import Progress, report

__all__ = ["ShardStore", "config_hash", "run_grid"]


def config_hash(config: dict[str, Any], length: int = 12) -> str:
    """Stable short hash of a JSON-able configuration (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class ShardStore:
    """A folder of result shards keyed by configuration.

    Args:
        root: folder to write into (created).
        base: configuration shared by every shard (model fingerprint, task, ...). It is part of every
            key, so changing it never reuses stale shards.
    """

    def __init__(self, root: str | Path, base: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base = dict(base or {})

    def key(self, config: dict[str, Any]) -> str:
        return config_hash({**self.base, **config})

    def path(self, config: dict[str, Any], table: str = "") -> Path:
        # sorted, like the hash: the same configuration names the same file whatever its key order
        readable = "-".join(f"{k}={v}" for k, v in sorted(config.items()) if isinstance(v, (int, float, str)))
        readable = "".join(c if c.isalnum() or c in "=-_." else "_" for c in readable)[:80]
        suffix = f".{table}" if table else ""
        return self.root / f"{readable}-{self.key(config)}{suffix}.parquet"

    def _marker(self, config: dict[str, Any]) -> Path:
        return self.path(config).with_suffix(".json")

    def done(self, config: dict[str, Any]) -> bool:
        return self._marker(config).exists()

    def save(self, config: dict[str, Any], frames: dict[str, pd.DataFrame]) -> None:
        """Write the tables of one grid point atomically; the JSON marker (written last) means done."""
        tables = {}
        for name, frame in frames.items():
            path = self.path(config, name)
            tmp = path.with_suffix(".parquet.tmp")
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, path)
            tables[name] = path.name
        record = {"config": {**self.base, **config}, "tables": tables}
        tmp = self._marker(config).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, self._marker(config))

    def load(self, config: dict[str, Any]) -> dict[str, pd.DataFrame]:
        record = json.loads(self._marker(config).read_text())
        return {name: pd.read_parquet(self.root / fname) for name, fname in record["tables"].items()}


def run_grid(
    points: Iterable[dict[str, Any]],
    compute: Callable[[dict[str, Any]], dict[str, pd.DataFrame]],
    store: ShardStore,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Compute every grid point not yet in ``store``; return each table concatenated over all points.

    Args:
        points: configurations, in the order the result should follow.
        compute: configuration -> ``{table name: tidy frame}``.
        store: where shards live.
        progress: report progress with elapsed time and an ETA (:mod:`headlab.progress`: the book's
            build log, else stderr).

    Returns:
        ``{table name: concatenation over points}`` (points already done are read from disk).
    """
    points = list(points)
    todo = [p for p in points if not store.done(p)]
    label = f"sweep into {store.root.parent.name}/{store.root.name}"
    if progress and len(todo) < len(points):
        report(f"{label}: resuming, {len(points) - len(todo)} of {len(points)} grid points already saved")
    bar = Progress(len(todo), label, unit="grid point") if progress and todo else None
    for p in todo:
        store.save(p, compute(p))
        if bar is not None:
            bar.update(note=", ".join(f"{k}={v}" for k, v in p.items() if isinstance(v, (int, float, str))))
    loaded = [store.load(p) for p in points]
    names = list(dict.fromkeys(n for d in loaded for n in d))
    return {n: pd.concat([d[n] for d in loaded if n in d], ignore_index=True) for n in names}
