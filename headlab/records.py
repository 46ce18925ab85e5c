"""Saving results together with what produced them: parameters, model fingerprint, package versions."""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from headlab.models import LoadedModel

__all__ = ["environment", "save_frames", "write_config"]

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
