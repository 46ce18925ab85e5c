"""Run a chapter over a parameter grid with papermill: ``headlab grid SPEC.yaml``.

A grid spec (YAML) names a chapter, the parameters shared by every point, the values to vary and an
executor. Every grid point is an independent, resumable unit: its own folder, named after the values
it varies plus a short hash of all its parameters, holding

* ``<chapter>.ipynb`` -- the executed notebook (papermill),
* ``results/``        -- the chapter's ``results_dir`` (its tables, ``config.json`` and, by convention,
  ``summary.json``: a flat dict of scalar metrics written with :func:`headlab.records.write_summary`),
* ``log.txt``         -- stdout/stderr of the papermill run,
* ``point.json``      -- parameters, status, timings, host and the collected metrics. It is replaced
  atomically; a point is *done* only once it says ``"status": "done"``, which is written last.

A rerun skips done points and runs the rest (failed, timed out, interrupted or new ones); a chapter that
keeps shards in its ``results_dir`` (:class:`headlab.shards.ShardStore`) resumes inside a point too.
At the end the grid writes ``summary.csv`` / ``summary.parquet`` next to the point folders: one row per
point with its varied parameters, status, seconds, the device and dtype the chapter reported, and the
chapter's ``summary.json`` metrics.

Spec keys (see ``grids/*.yaml``)::

    chapter: 03_induction        # name in notebooks/ or a path to a jupytext .py (or .ipynb)
    out: results/grids/induction # folder of the point folders (relative to cwd)
    parameters: {n_sequences: 4} # papermill parameters of every point
    grid: {seed: [0, 1]}         # cartesian product of these values ...
    points: [{seed: 7}]          # ... plus these explicit points (either may be left out)
    device: auto                 # passed to the chapter's `device` parameter: auto | cpu | cuda | cuda:N
    dtype: auto                  # passed to `dtype`: auto | float32 | bfloat16 | float16
    timeout: 1800                # seconds per point (null: none)
    executor: local              # local | dask | slurm, or {kind: ..., options}: see EXECUTOR_OPTIONS
    kernel: python3              # Jupyter kernel
    cwd: .                       # working directory of the kernels (relative paths in chapters)

Executors (each point runs ``python -m headlab.grid _execute`` in its own process, so a crash or a
timeout stays inside its point):

* ``local``: a pool of ``max_workers`` local processes (default 1); ``gpus: [0, 1]`` pins each running
  point to one GPU through ``CUDA_VISIBLE_DEVICES``.
* ``dask``: Dask distributed; ``address`` of a running scheduler, else a ``LocalCluster`` on 127.0.0.1.
* ``slurm``: submitit, one Slurm job array (``map_array``) per run; ``cluster: local|debug`` runs the
  same submission through submitit's local executors (for trying a spec without Slurm).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from headlab.chapter import declared_parameters, declared_types
from headlab.params import check_parameters
from headlab.schema import Field, check_record
from headlab.shards import config_hash, process_alive, process_start

__all__ = [
    "DEVICES",
    "DTYPES",
    "EXECUTOR_OPTIONS",
    "SPEC_KEYS",
    "GridPoint",
    "GridSpec",
    "chapter_parameter_types",
    "chapter_parameters",
    "collect_summary",
    "expand_points",
    "grid_main",
    "load_spec",
    "parse_spec",
    "point_name",
    "read_point",
    "run_grid_spec",
    "run_point",
    "submit_slurm",
]

#: Top-level keys of a grid spec and what each holds.
SPEC_KEYS: dict[str, str] = {
    "chapter": "chapter name in notebooks/ or path to its jupytext .py / .ipynb (required)",
    "out": "folder of the point folders (default results/grids/<spec file stem>)",
    "parameters": "mapping of papermill parameters shared by every point",
    "grid": "mapping parameter -> non-empty list of values (cartesian product)",
    "points": "list of mappings, explicit points added to the product",
    "device": "value of the chapter's `device` parameter (default auto)",
    "dtype": "value of the chapter's `dtype` parameter (default auto)",
    "timeout": "seconds one point may run (positive number or null)",
    "executor": "local | dask | slurm, or a mapping {kind: ..., <options>}",
    "kernel": "Jupyter kernel name (default python3)",
    "cwd": "working directory of the kernels (default: where `headlab grid` runs)",
}

#: Options each executor accepts (``executor: {kind: local, max_workers: 2}``).
EXECUTOR_OPTIONS: dict[str, dict[str, str]] = {
    "local": {
        "max_workers": "points run at once (int >= 1, default 1)",
        "gpus": "GPU ids; each running point sees one of them as CUDA_VISIBLE_DEVICES",
    },
    "dask": {
        "address": "scheduler address (tcp://host:8786); default: a LocalCluster on 127.0.0.1",
        "n_workers": "LocalCluster workers (default 1)",
        "threads_per_worker": "LocalCluster threads per worker (default 1)",
        "processes": "LocalCluster workers as processes (default true)",
    },
    "slurm": {
        "cluster": "submitit cluster: slurm (default), local or debug (no Slurm needed)",
        "folder": "submitit logs and pickles (default <out>/_submitit)",
        "partition": "Slurm partition",
        "timeout_min": "job time limit in minutes (default: timeout + 10 %, else 60)",
        "gpus_per_node": "GPUs per job (default 0)",
        "cpus_per_task": "CPUs per job (default 1)",
        "mem_gb": "memory per job in GB",
        "array_parallelism": "array tasks running at once (default: all)",
        "setup": "shell lines run before the job (module load ..., source .venv/bin/activate)",
        "additional": "further sbatch options, e.g. {account: abc, qos: high}",
        "wait": "wait for the jobs and write the summary (default true); false: submit and return",
    },
}

_POSITIVE = Field("int", low=1, required=False)
#: The type and range of each executor option (:data:`EXECUTOR_OPTIONS` says what they mean).
EXECUTOR_FIELDS: dict[str, dict[str, Field]] = {
    "local": {"max_workers": _POSITIVE,
              "gpus": Field("list", items=Field(("int", "str")), nonempty=True, required=False,
                            help="a non-empty list of GPU ids, e.g. [0, 1]")},
    "dask": {"address": Field("str", nonempty=True, required=False), "n_workers": _POSITIVE,
             "threads_per_worker": _POSITIVE, "processes": Field("bool", required=False)},
    "slurm": {"cluster": Field("str", choices=["slurm", "local", "debug"], required=False),
              "folder": Field("str", nonempty=True, required=False),
              "partition": Field("str", nonempty=True, required=False), "timeout_min": _POSITIVE,
              "gpus_per_node": Field("int", low=0, required=False), "cpus_per_task": _POSITIVE,
              "mem_gb": Field("float", low=1e-3, required=False), "array_parallelism": _POSITIVE,
              "setup": Field("list", items=Field("str"), required=False),
              "additional": Field("dict", required=False), "wait": Field("bool", required=False)},
}

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Point states in the summary: pending (never started), submitted (Slurm), running, interrupted (its
#: process is gone), failed, timeout, done.
STATUSES = ("pending", "submitted", "running", "interrupted", "failed", "timeout", "done")
_CHAPTER_SUFFIXES = (".py", ".ipynb")


# --------------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------------
@dataclass
class GridSpec:
    """A validated grid spec (see the module docstring for the YAML keys).

    Attributes:
        chapter: absolute path of the chapter source.
        out: absolute folder of the point folders.
        parameters: papermill parameters of every point.
        grid: parameter -> values; the points are their cartesian product (in key order) ...
        points: ... followed by these explicit points.
        device, dtype: values for the chapter's ``device`` / ``dtype`` parameters.
        timeout: seconds per point, or None.
        executor: ``"local"``, ``"dask"`` or ``"slurm"``.
        executor_options: the executor's options (:data:`EXECUTOR_OPTIONS`).
        kernel: Jupyter kernel name.
        cwd: absolute working directory of the kernels.
    """

    chapter: Path
    out: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    timeout: float | None = None
    executor: str = "local"
    executor_options: dict[str, Any] = field(default_factory=dict)
    kernel: str = "python3"
    cwd: Path = field(default_factory=Path.cwd)


@dataclass(frozen=True)
class GridPoint:
    """One point of a grid: everything a worker needs to run it (picklable, for Dask and submitit).

    Attributes:
        name: folder name, ``<varied values>-<hash>``.
        varied: the values this point sets for the grid's varied parameters.
        parameters: every papermill parameter injected (``results_dir`` included).
        chapter: chapter source.
        point_dir: the point's folder.
        cwd: kernel working directory.
        kernel: Jupyter kernel name.
        timeout: seconds, or None.
        env: extra environment variables of the point's process (e.g. ``CUDA_VISIBLE_DEVICES``).
    """

    name: str
    varied: dict[str, Any]
    parameters: dict[str, Any]
    chapter: str
    point_dir: str
    cwd: str
    kernel: str = "python3"
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _check_mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        _fail(f"{where} must be a mapping of parameter names to values, got {value!r}.")
    return dict(value)


def _check_device(value: Any, where: str) -> str:
    if not isinstance(value, str) or not (value in DEVICES or re.fullmatch(r"cuda:\d+", value)):
        _fail(f"{where}={value!r} is not a device; use one of {DEVICES} (N: a GPU index).")
    return value


def _check_dtype(value: Any, where: str) -> str:
    if value not in DTYPES:
        _fail(f"{where}={value!r} is not a dtype; use one of {DTYPES}.")
    return value


def _parse_executor(value: Any) -> tuple[str, dict[str, Any]]:
    """``"local"`` or ``{kind: local, max_workers: 2}`` -> (kind, options), validated."""
    if value is None:
        return "local", {}
    if isinstance(value, str):
        kind, options = value, {}
    elif isinstance(value, dict):
        options = dict(value)
        kind = options.pop("kind", None)
        if kind is None:
            _fail(f"executor mapping {value!r} needs `kind`: one of {sorted(EXECUTOR_OPTIONS)}.")
    else:
        _fail(f"executor={value!r}; give one of {sorted(EXECUTOR_OPTIONS)} or a mapping with `kind`.")
    if not isinstance(kind, str) or kind not in EXECUTOR_OPTIONS:
        _fail(f"executor kind {kind!r} is unknown; choose one of {sorted(EXECUTOR_OPTIONS)}.")
    allowed = EXECUTOR_OPTIONS[kind]
    bad = sorted(set(options) - set(allowed))
    if bad:
        _fail(f"executor {kind!r} has no option(s) {bad}; it accepts {sorted(allowed)}.")
    return kind, check_record(options, EXECUTOR_FIELDS[kind], f"executor {kind!r} option")


def parse_spec(raw: Any, spec_path: Path | None = None, cwd: Path | None = None) -> GridSpec:
    """Validate a spec mapping (as read from YAML) and resolve its paths.

    Args:
        raw: the mapping.
        spec_path: the YAML file it came from (names the default ``out`` folder).
        cwd: base of relative paths (default: the current directory).

    Returns:
        The :class:`GridSpec`.

    Raises:
        ValueError: naming the bad key or value and what is allowed.
        FileNotFoundError: the chapter does not exist.
    """
    if not isinstance(raw, dict):
        _fail(f"a grid spec is a YAML mapping with keys {sorted(SPEC_KEYS)}; got {type(raw).__name__}.")
    bad = sorted(set(raw) - set(SPEC_KEYS))
    if bad:
        _fail(f"unknown spec key(s) {bad}; allowed: {sorted(SPEC_KEYS)}.")
    if not raw.get("chapter"):
        _fail("the spec needs `chapter`: a chapter name in notebooks/ (03_induction) or a path.")
    base_dir = Path(cwd or Path.cwd()).resolve()
    work = Path(raw.get("cwd") or base_dir)
    work = (work if work.is_absolute() else base_dir / work).resolve()
    if not work.is_dir():
        _fail(f"cwd={raw.get('cwd')!r} is not a directory.")
    chapter = _resolve_chapter(str(raw["chapter"]), work)

    parameters = _check_mapping(raw.get("parameters"), "parameters")
    grid = _check_mapping(raw.get("grid"), "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            _fail(f"grid[{key!r}]={values!r} must be a non-empty list of values.")
        if key in parameters:
            _fail(f"parameter {key!r} is both in `parameters` and in `grid`; keep it in one of them.")
    points = raw.get("points") or []
    if not isinstance(points, list):
        _fail(f"points={points!r} must be a list of mappings.")
    points = [_check_mapping(p, f"points[{i}]") for i, p in enumerate(points)]
    for where, mapping in [("parameters", parameters), ("grid", grid)] + [
            (f"points[{i}]", p) for i, p in enumerate(points)]:
        if "results_dir" in mapping:
            _fail(f"{where} sets results_dir; the grid sets it to each point's own folder.")
        if where == "grid":
            continue  # its values are lists, checked below
        if "device" in mapping:
            _check_device(mapping["device"], f"{where}.device")
        if "dtype" in mapping:
            _check_dtype(mapping["dtype"], f"{where}.dtype")
    if "device" in grid:
        for v in grid["device"]:
            _check_device(v, "grid.device")
    if "dtype" in grid:
        for v in grid["dtype"]:
            _check_dtype(v, "grid.dtype")

    timeout = raw.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout <= 0):
        _fail(f"timeout={timeout!r} must be a positive number of seconds or null.")
    kind, options = _parse_executor(raw.get("executor"))
    kernel = raw.get("kernel") or "python3"
    if not isinstance(kernel, str):
        _fail(f"kernel={kernel!r} must be a kernel name such as 'python3'.")
    default_out = f"results/grids/{spec_path.stem if spec_path else chapter.stem}"
    out = Path(raw.get("out") or default_out)
    return GridSpec(
        chapter=chapter, out=(out if out.is_absolute() else work / out).resolve(), parameters=parameters,
        grid=grid, points=points, device=_check_device(raw.get("device", "auto"), "device"),
        dtype=_check_dtype(raw.get("dtype", "auto"), "dtype"),
        timeout=None if timeout is None else float(timeout), executor=kind, executor_options=options,
        kernel=kernel, cwd=work)


def load_spec(path: str | Path, cwd: Path | None = None) -> GridSpec:
    """Read and validate a grid spec YAML file (see :func:`parse_spec`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid spec {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"grid spec {path} is not valid YAML: {err}") from err
    return parse_spec(raw, spec_path=path, cwd=cwd)


def _resolve_chapter(name: str, cwd: Path) -> Path:
    """A chapter path, or a name looked up as ``notebooks/<name>.py`` under ``cwd``."""
    candidates = [Path(name)] if Path(name).is_absolute() else [cwd / name]
    stem = Path(name).name if Path(name).suffix in _CHAPTER_SUFFIXES else f"{Path(name).name}.py"
    candidates.append(cwd / "notebooks" / stem)
    for path in candidates:
        if path.is_file():
            if path.suffix not in _CHAPTER_SUFFIXES:
                _fail(f"chapter {name!r} is a {path.suffix or 'suffix-less'} file; use a jupytext .py or .ipynb.")
            return path.resolve()
    raise FileNotFoundError(f"no chapter {name!r}; looked for {', '.join(map(str, candidates))}. "
                            f"Chapters in notebooks/: {sorted(p.stem for p in (cwd / 'notebooks').glob('*.py'))}.")


def chapter_parameters(chapter: str | Path) -> dict[str, Any]:
    """The names and defaults of a chapter's ``parameters`` cell: :func:`headlab.chapter.declared_parameters`
    (the rule the chapter itself applies with :func:`headlab.chapter.parameters`)."""
    return declared_parameters(chapter)


def chapter_parameter_types(chapter: str | Path) -> dict[str, str]:
    """``{name: annotation text}`` of a chapter's ``parameters`` cell (:func:`headlab.chapter.declared_types`);
    :func:`headlab.params.check_parameters` checks values against them."""
    return declared_types(chapter)


# --------------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------------
def _slug(value: Any) -> str:
    """A short, filesystem-safe text for one parameter value."""
    if isinstance(value, (list, tuple)):
        return "+".join(_slug(v) for v in value) or "none"
    if isinstance(value, dict):
        return "+".join(f"{k}-{_slug(v)}" for k, v in value.items()) or "none"
    if isinstance(value, float):
        value = f"{value:g}"
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(value)).strip("-.") or "x"


def point_name(varied: dict[str, Any], parameters: dict[str, Any], chapter: str, max_len: int = 80) -> str:
    """Folder name of a grid point: ``key=value,key=value-<hash>``.

    The readable part shows the varied values (lists joined with ``+``, unsafe characters replaced,
    cut at ``max_len``); the 10-character hash (:func:`headlab.shards.config_hash`) covers the chapter
    name and *every* parameter, so changing a shared parameter never reuses an old point.
    """
    readable = ",".join(f"{_slug(k)}={_slug(v)}" for k, v in varied.items())[:max_len].rstrip(",=+-.")
    digest = config_hash({"chapter": chapter, "parameters": parameters}, length=10)
    return f"{readable or 'point'}-{digest}"


def expand_points(spec: GridSpec, declared: dict[str, Any] | None = None) -> list[GridPoint]:
    """The spec's grid points, in order (product of ``grid`` first, then ``points``), duplicates dropped.

    Args:
        spec: the spec.
        declared: the chapter's declared parameters (:func:`chapter_parameters`); when given, every
            parameter is checked against it, and ``device`` / ``dtype`` are passed only to chapters
            that declare them.

    Raises:
        ValueError: a parameter the chapter does not declare, or a chapter without ``results_dir``.
    """
    combos = [dict(zip(spec.grid, values)) for values in itertools.product(*spec.grid.values())]
    combos += [dict(p) for p in spec.points]
    combos = combos or [{}]
    varied_keys = list(dict.fromkeys(k for c in combos for k in c))
    shared = dict(spec.parameters)
    for key, value, default in (("device", spec.device, "auto"), ("dtype", spec.dtype, "auto")):
        if declared is None or key in declared:
            shared.setdefault(key, value)
        elif value != default:
            _fail(f"{key}={value!r} given, but {spec.chapter.name} has no `{key}` parameter.")
    if declared is not None:
        if "results_dir" not in declared:
            _fail(f"{spec.chapter.name} has no `results_dir` parameter; a grid needs it to keep each "
                  "point's results in the point's folder.")
        used = set(shared) | set(varied_keys)
        unknown = sorted(used - set(declared))
        if unknown:
            _fail(f"parameter(s) {unknown} are not in the parameters cell of {spec.chapter.name}; "
                  f"it declares {sorted(declared)}.")
    out, seen = [], set()
    for combo in combos:
        params = {**shared, **combo}
        varied = {k: params[k] for k in varied_keys if k in params}
        name = point_name(varied, params, spec.chapter.stem)
        if name in seen:
            continue
        seen.add(name)
        point_dir = spec.out / name
        out.append(GridPoint(
            name=name, varied=varied, parameters={**params, "results_dir": str(point_dir / "results")},
            chapter=str(spec.chapter), point_dir=str(point_dir), cwd=str(spec.cwd), kernel=spec.kernel,
            timeout=spec.timeout))
    return out


# --------------------------------------------------------------------------------------------------
# One point
# --------------------------------------------------------------------------------------------------
def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def read_point(point_dir: str | Path) -> dict[str, Any] | None:
    """The ``point.json`` record of a point folder, or None if the point never started."""
    path = Path(point_dir) / "point.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a mapping")  # noqa: TRY004 - handled right below
    except (ValueError, OSError) as err:  # damaged: the point runs again
        return {"status": "interrupted", "error": f"{path} is unreadable ({err}); the point runs again"}
    return record


def _is_done(point: GridPoint) -> bool:
    record = read_point(point.point_dir)
    return record is not None and record.get("status") == "done"


def _in_flight(point: GridPoint) -> bool:
    """Submitted to Slurm and not finished, or running in a process that is still alive."""
    record = read_point(point.point_dir) or {}
    return record.get("status") == "submitted" or (record.get("status") == "running" and _alive(record))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a point's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


#: Seconds between heartbeats of a running point (``heartbeat`` in its ``point.json``).
HEARTBEAT_S = 15.0
#: A ``running`` point on another host whose heartbeat is older than this is taken as interrupted.
STALE_AFTER_S = 90.0
#: Environment variable telling a point's runner the pid of the grid process it must die with.
_PARENT_ENV = "HEADLAB_GRID_PARENT"


def _wait_with_heartbeat(proc: subprocess.Popen, timeout: float | None, path: Path,
                         record: dict[str, Any]) -> int:
    """``proc.wait(timeout)``, renewing ``record["heartbeat"]`` in ``path`` every :data:`HEARTBEAT_S`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = HEARTBEAT_S if deadline is None else min(HEARTBEAT_S, max(0.0, deadline - time.monotonic()))
        try:
            return proc.wait(timeout=step)
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                raise
        record["heartbeat"] = time.time()
        _write_json(path, record)


def _die_with_parent() -> None:
    """Make this runner die when the grid process that started it dies, even by SIGKILL.

    On Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)``; everywhere a watchdog thread that ends the process
    when its parent pid changes. The point's Jupyter kernel then follows its runner (ipykernel polls
    its parent). A runner whose parent is already gone exits at once.
    """
    parent = int(os.environ.get(_PARENT_ENV) or 0)
    if not parent:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(143)

    if os.getppid() != parent:
        os._exit(143)
    threading.Thread(target=watchdog, name="die-with-parent", daemon=True).start()


#: Child processes of the points running in this process (stopped when the grid is interrupted).
_RUNNING: set[subprocess.Popen] = set()
#: Set when this process stops its points (Ctrl-C, SIGTERM): their records then say ``interrupted``.
_STOPPING = threading.Event()


def run_point(point: GridPoint) -> dict[str, Any]:
    """Execute one grid point unless it is done; return its ``point.json`` record.

    The chapter runs under papermill in a child process (``python -m headlab.grid _execute``) in its own
    process group, so a timeout stops it and its kernel. ``point.json`` says ``running`` while it runs
    and is replaced atomically at the end by ``done``, ``failed``, ``timeout`` or ``interrupted``, with
    the seconds, the host, the chapter's ``summary.json`` metrics and the device/dtype its
    ``config.json`` reports. Only ``done`` counts as done; every other state is run again next time.
    """
    folder = Path(point.point_dir)
    old = read_point(folder)
    if old is not None and old.get("status") == "done":
        return old
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "name": point.name, "chapter": point.chapter, "varied": point.varied, "parameters": point.parameters,
        "status": "running", "host": socket.gethostname(), "pid": os.getpid(),
        "pid_started": process_start(os.getpid()), "heartbeat": time.time(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attempt": int((old or {}).get("attempt", 0)) + 1,
        "env": point.env,
    }
    _write_json(folder / "point.json", record)
    task = folder / "task.json"
    _write_json(task, asdict(point))
    t0 = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "headlab.grid", "_execute", str(task)],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **point.env, _PARENT_ENV: str(os.getpid())},
                                start_new_session=True)
        _RUNNING.add(proc)
        record["runner_pid"] = proc.pid
        _write_json(folder / "point.json", record)
        try:
            rc = _wait_with_heartbeat(proc, point.timeout, folder / "point.json", record)
            status = "done" if rc == 0 else "interrupted" if _STOPPING.is_set() else "failed"
        except subprocess.TimeoutExpired:
            _stop(proc)
            status, rc = "timeout", None
        except BaseException:  # interrupted (Ctrl-C, worker shutdown): leave no orphan kernel
            _stop(proc, grace=2.0)
            raise
        finally:
            _RUNNING.discard(proc)
    record.update(status=status, returncode=rc, seconds=round(time.perf_counter() - t0, 3),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if status == "timeout":
        record["error"] = f"stopped after the point timeout of {point.timeout:g} s"
    elif status == "interrupted":
        record["error"] = "stopped: the grid was interrupted"
    elif status == "failed":
        if (folder / "error.txt").is_file():  # written by _execute: the cell, exception and message
            record["error"] = (folder / "error.txt").read_text()
        else:  # the runner itself died: the end of its log says why
            lines = (folder / "log.txt").read_text(errors="replace").strip().splitlines()
            record["error"] = "\n".join(lines[-6:])
    results = Path(point.parameters["results_dir"])
    try:  # a damaged summary.json / config.json of the chapter costs its metrics, not the grid
        if (results / "summary.json").is_file():
            record["metrics"] = json.loads((results / "summary.json").read_text())
        if (results / "config.json").is_file():
            model = json.loads((results / "config.json").read_text()).get("model") or {}
            record.update({k: model[k] for k in ("device", "dtype") if k in model})
    except (ValueError, AttributeError, OSError) as err:
        record["metrics_error"] = f"could not read the chapter's summary/config in {results}: {err}"
    _write_json(folder / "point.json", record)
    return record


def _execute(task_path: str) -> int:
    """Child-process entry: run one point's chapter with papermill (see :func:`run_point`)."""
    from headlab.book import ChapterError, execute_chapter

    _die_with_parent()
    task = json.loads(Path(task_path).read_text())
    (Path(task["point_dir"]) / "error.txt").unlink(missing_ok=True)
    try:
        nb = execute_chapter(Path(task["chapter"]), Path(task["point_dir"]), parameters=task["parameters"],
                             kernel=task["kernel"], cwd=Path(task["cwd"]))
    except ChapterError as err:
        print(f"[grid] {err}", file=sys.stderr)
        (Path(task["point_dir"]) / "error.txt").write_text(str(err))
        return 1
    print(f"[grid] executed {nb}")
    return 0


# --------------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------------
def _report(done: int, total: int, rec: dict[str, Any], t0: float) -> None:
    spent = time.time() - t0
    eta = spent / done * (total - done)
    extra = "" if rec.get("status") == "done" else f": {(str(rec.get('error')) + chr(10)).splitlines()[0]}"
    print(f"[grid {done}/{total}] {rec.get('name')} {rec.get('status')} in {rec.get('seconds', 0):.1f} s"
          f"{extra}; elapsed {spent:.0f} s, ETA {eta:.0f} s", file=sys.stderr, flush=True)


def _run_local(points: list[GridPoint], max_workers: int | None = None,
               gpus: list | None = None) -> list[dict[str, Any]]:
    """Run points in ``max_workers`` local processes at once (one GPU each when ``gpus`` is given)."""
    import queue

    max_workers = max_workers or (len(gpus) if gpus else 1)
    free: queue.Queue = queue.Queue()
    for g in gpus or []:
        free.put(str(g))

    def one(point: GridPoint) -> dict[str, Any]:
        if not gpus:
            return run_point(point)
        gpu = free.get()
        try:
            return run_point(replace(point, env={**point.env, "CUDA_VISIBLE_DEVICES": gpu}))
        finally:
            free.put(gpu)

    records, t0 = [], time.time()
    pool = ThreadPoolExecutor(max_workers=max_workers)
    try:
        futures = [pool.submit(one, p) for p in points]
        for fut in as_completed(futures):
            records.append(fut.result())
            _report(len(records), len(points), records[-1], t0)
    except BaseException:  # Ctrl-C / SIGTERM: start nothing more and stop the running points
        _STOPPING.set()
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(_RUNNING):
            _stop(proc, grace=2.0)
        raise
    pool.shutdown()
    return records


def _run_dask(points: list[GridPoint], address: str | None = None, n_workers: int = 1,
              threads_per_worker: int = 1, processes: bool = True) -> list[dict[str, Any]]:
    """Run points as Dask tasks on a scheduler at ``address`` or on a LocalCluster on 127.0.0.1."""
    try:
        from dask.distributed import Client, LocalCluster
        from dask.distributed import as_completed as dask_completed
    except ImportError as err:
        raise ImportError("the dask executor needs `pip install 'dask[distributed]'` "
                          "(or `pip install 'headlab[grid]'`).") from err
    cluster = None
    if address:
        client = Client(address)
    else:
        # TCP on loopback even for in-process workers (whose default transport is "inproc")
        cluster = LocalCluster(host="127.0.0.1", protocol="tcp", n_workers=n_workers, processes=processes,
                               threads_per_worker=threads_per_worker, dashboard_address=None)
        client = Client(cluster)
    records, t0 = [], time.time()
    try:
        futures = client.map(run_point, points, key=[f"headlab-grid-{p.name}" for p in points], pure=False)
        for fut in dask_completed(futures):
            records.append(fut.result())
            _report(len(records), len(points), records[-1], t0)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return records


def submit_slurm(points: list[GridPoint], folder: str | Path, cluster: str = "slurm", *,
                 partition: str | None = None, timeout_min: int | None = None, gpus_per_node: int = 0,
                 cpus_per_task: int = 1, mem_gb: float | None = None, array_parallelism: int | None = None,
                 setup: list[str] | None = None, additional: dict[str, Any] | None = None,
                 job_name: str = "headlab-grid") -> list[Any]:
    """Submit the points as one job array with submitit (``AutoExecutor.map_array``).

    Args:
        points: points to run, one array task each.
        folder: submitit's folder (sbatch files, pickled points, logs).
        cluster: ``"slurm"``, or ``"local"`` / ``"debug"`` to run the same submission without Slurm.
        partition, timeout_min, gpus_per_node, cpus_per_task, mem_gb, array_parallelism, setup,
            additional: Slurm settings (``additional`` becomes further ``#SBATCH`` lines).

    Returns:
        The submitit jobs, in the order of ``points``; ``job.result()`` is the point's record.
    """
    try:
        import submitit
    except ImportError as err:
        raise ImportError("the slurm executor needs `pip install submitit` (or `pip install 'headlab[grid]'`).") from err
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = {"name": job_name, "timeout_min": timeout_min or 60,
                              "cpus_per_task": cpus_per_task, "gpus_per_node": gpus_per_node}
    if mem_gb is not None:
        params["mem_gb"] = mem_gb
    slurm = {"slurm_partition": partition, "slurm_setup": setup, "slurm_additional_parameters": additional,
             "slurm_array_parallelism": array_parallelism or len(points)}
    params.update({k: v for k, v in slurm.items() if v is not None})
    executor.update_parameters(**params)
    return executor.map_array(run_point, points)


def _run_slurm(points: list[GridPoint], spec: GridSpec, wait: bool = True, folder: str | None = None,
               **options: Any) -> list[dict[str, Any]]:
    if options.get("timeout_min") is None and spec.timeout:
        options["timeout_min"] = math.ceil(spec.timeout * 1.1 / 60) + 1
    jobs = submit_slurm(points, folder or spec.out / "_submitit", **options)
    for point, job in zip(points, jobs):  # in flight: a rerun does not submit these again
        Path(point.point_dir).mkdir(parents=True, exist_ok=True)
        old = read_point(point.point_dir) or {}
        _write_json(Path(point.point_dir) / "point.json",
                    {**old, "name": point.name, "varied": point.varied, "parameters": point.parameters,
                     "status": "submitted", "job_id": str(job.job_id),
                     "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
    print(f"[grid] submitted {len(jobs)} point(s) as job(s) {', '.join(ids)}", file=sys.stderr, flush=True)
    if not wait:
        return []
    records, t0 = [], time.time()
    for point, job in zip(points, jobs):
        try:
            rec = job.result()
        except Exception as err:  # the job itself died (node failure, Slurm time limit, ...)
            rec = read_point(point.point_dir) or {"name": point.name}
            rec.update(status="failed", error=f"{type(err).__name__}: {err}"[-2000:])
        records.append(rec)
        _report(len(records), len(points), rec, t0)
    return records


# --------------------------------------------------------------------------------------------------
# Whole grid
# --------------------------------------------------------------------------------------------------
def _cell(value: Any) -> Any:
    """Table cell for a parameter value: scalars as they are, lists and mappings as JSON text."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def collect_summary(points: list[GridPoint]) -> pd.DataFrame:
    """One row per point: ``point``, the varied parameters, ``status``, ``seconds``, ``device``,
    ``dtype``, then the chapter's ``summary.json`` metrics (``metric_`` prefixed if a name clashes),
    ``error`` and the ``notebook`` path. Points never started have status ``pending``."""
    rows = []
    for p in points:
        rec = read_point(p.point_dir) or {}
        status = rec.get("status", "pending")
        if status == "running" and not _alive(rec):
            status = "interrupted"
        row: dict[str, Any] = {"point": p.name, **{k: _cell(v) for k, v in p.varied.items()},
                               "status": status, "seconds": rec.get("seconds"),
                               "device": rec.get("device"), "dtype": rec.get("dtype")}
        metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
        for key, value in metrics.items():
            row[f"metric_{key}" if key in row else key] = _cell(value)
        row["error"] = rec["error"].splitlines()[0] if rec.get("error") else None
        row["notebook"] = str(Path(p.point_dir) / f"{Path(p.chapter).stem}.ipynb")
        rows.append(row)
    return pd.DataFrame(rows)


def _alive(record: dict[str, Any]) -> bool:
    """Whether the process that marked a point ``running`` still runs it.

    On this host: the grid process (``pid``, with its start time ``pid_started`` against a reused pid)
    exists. On another host: its heartbeat (renewed every :data:`HEARTBEAT_S` seconds while the point
    runs) is younger than :data:`STALE_AFTER_S`; a record without a heartbeat from another host counts
    as alive (it cannot be told).
    """
    if record.get("host") != socket.gethostname():
        beat = record.get("heartbeat")
        return not isinstance(beat, (int, float)) or time.time() - beat < STALE_AFTER_S
    try:
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return process_alive(pid, record.get("pid_started"))


def _reap_orphan(point: GridPoint, record: dict[str, Any], log: Callable[[str], None]) -> None:
    """Stop the runner a dead grid process left behind for ``point`` (same host only), if it still runs.

    Runners die with their grid process (:func:`_die_with_parent`); this covers the rest (another OS,
    a runner that could not arm it). The runner is recognised by its command line, not only its pid.
    """
    if record.get("host") != socket.gethostname() or not record.get("runner_pid"):
        return
    pid = int(record["runner_pid"])
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if "headlab.grid _execute" in cmdline and str(Path(point.point_dir) / "task.json") in cmdline:
        log(f"[grid] {point.name}: stopping runner {pid} left behind by a dead grid process {record.get('pid')}")
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _save_summary(out: Path, summary: pd.DataFrame) -> None:
    """Write ``summary.csv`` and ``summary.parquet`` atomically (a column whose values mix types,
    e.g. a metric that is a number in one point and text in another, is stored as text in Parquet)."""
    mixed = [c for c in summary.columns if summary[c].dtype == object
             and len({type(v) for v in summary[c].dropna()}) > 1]
    table = summary.astype({c: "string" for c in mixed})
    for suffix, write in ((".csv", lambda f, p: f.to_csv(p, index=False)),
                          (".parquet", lambda f, p: f.to_parquet(p, index=False))):
        path = out / f"summary{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        write(table, tmp)
        os.replace(tmp, path)


def run_grid_spec(spec: GridSpec, *, dry_run: bool = False, summary_only: bool = False,
                  resubmit: bool = False, log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Run every point of ``spec`` that is not done yet and write the summary table.

    Args:
        spec: the validated spec.
        dry_run: list the points (with their status) without running anything or writing files.
        summary_only: do not run anything; collect and save the summary of what is on disk.
        resubmit: also run points that are in flight (submitted to Slurm and not finished, or
            running in another live process); by default they are left alone.
        log: where progress lines go (default: stderr).

    Returns:
        The summary (see :func:`collect_summary`), also saved as ``<out>/summary.csv`` and
        ``<out>/summary.parquet`` (not for ``dry_run``).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    points = expand_points(spec, chapter_parameters(spec.chapter))
    types = chapter_parameter_types(spec.chapter)
    for p in points:  # every value fits its declared type before anything runs
        check_parameters({k: v for k, v in p.parameters.items() if k != "results_dir"}, types,
                         f"{spec.chapter.name} (grid point {p.name})")
    todo = [p for p in points if not _is_done(p)]
    flying = [p for p in todo if _in_flight(p)] if not resubmit else []
    todo = [p for p in todo if p not in flying]
    log(f"[grid] {spec.chapter.name}: {len(points)} point(s) in {spec.out}; "
        f"{len(points) - len(todo) - len(flying)} done, {len(todo)} to run with the {spec.executor} executor")
    if flying:
        log(f"[grid] {len(flying)} point(s) already submitted or running elsewhere are left alone "
            "(--resubmit runs them again): " + ", ".join(p.name for p in flying))
    if dry_run:
        return collect_summary(points)
    for p in todo:  # a point left `running` by a dead grid process: say so, stop what it left behind
        rec = read_point(p.point_dir) or {}
        if rec.get("status") == "running":
            log(f"[grid] {p.name} was left running by process {rec.get('pid')} on {rec.get('host')}, which "
                "is gone (or silent for long); running it again")
            _reap_orphan(p, rec, log)
    spec.out.mkdir(parents=True, exist_ok=True)
    record = {"spec": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()},
              "points": [{"name": p.name, "varied": p.varied} for p in points]}
    _write_json(spec.out / "grid.json", record)
    if todo and not summary_only:
        opts = dict(spec.executor_options)
        if spec.executor == "local":
            _run_local(todo, **opts)
        elif spec.executor == "dask":
            _run_dask(todo, **opts)
        else:
            wait = opts.pop("wait", True)
            _run_slurm(todo, spec, wait=wait, **opts)
            if not wait:
                log("[grid] not waiting for the jobs; run the same command again (or with --summary) "
                    "once they finished to collect the summary.")
    summary = collect_summary(points)
    _save_summary(spec.out, summary)
    return summary


def grid_main(argv: list[str] | None = None) -> int:
    """``headlab grid SPEC.yaml [options]``: run a chapter over a parameter grid (see module docstring).

    Returns:
        0 when every point is done (or with ``--dry-run`` / ``--no-wait``), 1 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="headlab grid", description="Run a chapter over a parameter grid with papermill: one executed "
        "notebook and one results folder per point, resumable, with a summary table.")
    parser.add_argument("spec", help="grid spec YAML (see grids/*.yaml)")
    parser.add_argument("--executor", choices=sorted(EXECUTOR_OPTIONS), help="override the spec's executor")
    parser.add_argument("--max-workers", type=int, help="local executor: points at once")
    parser.add_argument("--address", help="dask executor: scheduler address (default: a LocalCluster)")
    parser.add_argument("--device", help=f"override the spec's device ({', '.join(DEVICES)})")
    parser.add_argument("--dtype", help=f"override the spec's dtype ({', '.join(DTYPES)})")
    parser.add_argument("--timeout", type=float, help="seconds per point")
    parser.add_argument("--out", help="override the spec's out folder")
    parser.add_argument("--dry-run", action="store_true", help="list the points and their status only")
    parser.add_argument("--summary", action="store_true", help="only collect and print the summary")
    parser.add_argument("--no-wait", action="store_true", help="slurm executor: submit and return")
    parser.add_argument("--resubmit", action="store_true",
                        help="also run points still marked submitted/running (e.g. after a lost Slurm job)")
    ns = parser.parse_args(argv)
    try:
        import yaml

        if not Path(ns.spec).is_file():
            raise FileNotFoundError(f"grid spec {ns.spec!r} does not exist.")
        try:
            raw = yaml.safe_load(Path(ns.spec).read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"grid spec {ns.spec} is not valid YAML: {err}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"grid spec {ns.spec} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
        if not isinstance(raw, dict):
            raise ValueError(f"grid spec {ns.spec} is {'empty' if raw is None else type(raw).__name__}; it must "  # noqa: TRY004
                             f"be a YAML mapping with keys {sorted(SPEC_KEYS)}.")
        for key in ("device", "dtype", "timeout", "out"):
            if getattr(ns, key) is not None:
                raw[key] = getattr(ns, key)
        if ns.executor or ns.max_workers is not None or ns.address or ns.no_wait:
            current = raw.get("executor") or "local"
            kind = ns.executor or (current if isinstance(current, str) else current.get("kind", "local"))
            opts = dict(current) if isinstance(current, dict) and current.get("kind", kind) == kind else {}
            opts["kind"] = kind
            for key, value in (("max_workers", ns.max_workers), ("address", ns.address),
                               ("wait", False if ns.no_wait else None)):
                if value is not None:
                    opts[key] = value
            raw["executor"] = opts
        spec = parse_spec(raw, spec_path=Path(ns.spec))
        signal.signal(signal.SIGTERM, _interrupt)  # stop the running points on SIGTERM as on Ctrl-C
        signal.signal(signal.SIGHUP, _interrupt)  # and when the terminal goes away
        summary = run_grid_spec(spec, dry_run=ns.dry_run, summary_only=ns.summary, resubmit=ns.resubmit)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"headlab grid: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headlab grid: interrupted; the same command resumes (done points are skipped).", file=sys.stderr)
        return 130
    with pd.option_context("display.width", 160, "display.max_columns", 30, "display.max_colwidth", 40):
        print(summary.drop(columns=["notebook"]).to_string(index=False))
    if not ns.dry_run:
        print(f"\nsummary: {spec.out / 'summary.csv'} (and .parquet); one folder per point in {spec.out}")
    finished = ns.dry_run or ns.no_wait or bool((summary["status"] == "done").all())
    return 0 if finished else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["_execute"]:
        raise SystemExit(_execute(sys.argv[2]))
    raise SystemExit(grid_main())
