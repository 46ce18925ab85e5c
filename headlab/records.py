"""Saving results together with what produced them: parameters, model fingerprint, package versions."""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from headlab.models import LoadedModel

__all__ = ["environment", "peak_memory", "save_frames", "update_summary", "write_config", "write_summary"]

_PACKAGES = ("headlab", "torch", "transformers", "gguf", "numpy", "pandas", "papermill", "jupyter-book")


def environment() -> dict[str, Any]:
    """Python, platform, device and the versions of the packages that shape the numbers."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
    }


def write_config(results_dir: str | Path, params: dict[str, Any], lm: LoadedModel | None = None,
                 **extra: Any) -> Path:
    """Write ``config.json`` (parameters, model description, environment, time) into ``results_dir``."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "parameters": params,
        "model": lm.describe() if lm is not None else None,
        "environment": environment(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    path = out / "config.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def save_frames(results_dir: str | Path, **frames: pd.DataFrame) -> dict[str, Path]:
    """Save each frame as ``<name>.parquet`` and ``<name>.csv`` (CSV for quick reading)."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in frames.items():
        frame.to_parquet(out / f"{name}.parquet", index=False)
        frame.to_csv(out / f"{name}.csv", index=False)
        paths[name] = out / f"{name}.parquet"
    return paths


def write_summary(results_dir: str | Path, **metrics: Any) -> Path:
    """Write the run's headline scalars to ``summary.json`` in ``results_dir`` (atomically).

    This is the convention ``headlab grid`` relies on: a chapter that calls it gets one column per
    metric in the grid's summary table (one row per grid point).

    Args:
        results_dir: the chapter's results folder.
        **metrics: name -> a number, string, bool or None (NumPy / 0-d torch scalars are converted).

    Returns:
        The path of ``summary.json``.

    Raises:
        TypeError: a value that is not a scalar, naming it.
    """
    clean: dict[str, Any] = {}
    for name, value in metrics.items():
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()  # numpy / torch scalar
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"summary metric {name}={value!r} is a {type(value).__name__}; "
                            "give a number, string, bool or None.")
        clean[name] = value
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(clean, indent=1))
    tmp.replace(path)
    return path


def update_summary(results_dir: str | Path, **metrics: Any) -> Path:
    """Add entries to the run's ``summary.json`` (keeping those already written), like :func:`write_summary`.

    A chapter ends with ``update_summary(results_dir, headline=...)``: the ``headline`` entry is its
    one-sentence answer, written from the run's numbers, which the book's front page shows
    (:mod:`headlab.book.frontpage`).
    """
    path = Path(results_dir) / "summary.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    return write_summary(results_dir, **{**old, **metrics})


def _rss_kib(field: str) -> int | None:
    try:
        m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


@contextmanager
def peak_memory() -> Iterator[dict[str, Any]]:
    """Measure the peak memory of the block; the yielded dict is filled on exit.

    Keys: ``rss_before`` and ``rss_peak`` (bytes; the process's resident set before the block and its
    high-water mark during it, reset on entry through ``/proc/self/clear_refs`` on Linux, else
    ``None``), ``rss_increase`` (peak - before), and on CUDA ``cuda_peak_allocated`` and
    ``cuda_before`` (bytes, ``torch.cuda`` allocator).
    """
    out: dict[str, Any] = {"rss_before": None, "rss_peak": None, "rss_increase": None}
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out["cuda_before"] = torch.cuda.memory_allocated()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
            out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
        peak = _rss_kib("VmHWM") if reset else None
        if before is not None and peak is not None:
            out.update(rss_before=before * 1024, rss_peak=peak * 1024, rss_increase=(peak - before) * 1024)
