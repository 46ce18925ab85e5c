"""Resumable sweeps: one Parquet shard per grid point, keyed by everything that changes its numbers.

A sweep is a list of configuration dicts and a function that turns one configuration into tidy
frames. :class:`ShardStore` writes each point's frames next to a JSON *marker* (written last) that
holds the point's full key and the SHA-256 of every table; :func:`run_grid` computes only the points
whose shard is missing or fails verification, so a sweep killed midway resumes where it stopped and
ends with the same table as an uninterrupted run.

Three guarantees:

* **No stale results.** The key of a shard is a hash of the point's configuration, the store's base
  configuration and, when the store is given the model, :func:`computation_identity`: the weights
  (file fingerprint and a digest of the tensors in memory), dtype, device kind, attention
  implementation and :data:`RESULTS_VERSION`. Values are made canonical first (:func:`canonical`), so
  ``np.int64(2)`` keys like ``2`` and ``np.arange(2)`` like ``[0, 1]``.
* **No damaged results.** A shard is used only if its marker parses, names the expected key, and every
  table it lists exists with the recorded checksum and reads back; otherwise it is recomputed and one
  line on stderr names the shard and the reason.
* **One writer per point.** Temporary files have unique names (host, pid, random) and a point is
  computed under a per-shard lock file (created with ``O_EXCL``; it records pid, host and a heartbeat).
  A lock whose process is gone (same host) or whose heartbeat stopped is stale and taken over, so two or
  three processes running the same sweep on one folder compute each point once between them.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import hashlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path, PurePath
from typing import Any

import pandas as pd

from headlab.progress import Progress, report

__all__ = [
    "RESULTS_VERSION",
    "ShardLock",
    "ShardStore",
    "canonical",
    "computation_identity",
    "config_hash",
    "process_alive",
    "process_start",
    "run_grid",
    "weights_digest",
]

#: Version of headlab's computations as saved in shards. Bump it in the commit that changes a number
#: a shard could hold (an engine fix, a new default inside a computation): every older shard then has
#: another key and is recomputed instead of being served.
RESULTS_VERSION = 2

#: Marker format written by :meth:`ShardStore.save` (markers of other formats are recomputed).
MARKER_FORMAT = 2


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------
def canonical(value: Any) -> Any:
    """``value`` as plain JSON data, the same for equal values whatever their container type.

    numpy and torch scalars become Python numbers (``np.int64(2)`` -> ``2``), arrays and tensors become
    nested lists, tuples become lists, sets sorted lists, mapping keys text, paths text, dtypes and
    devices their names, enums their value and dataclasses a mapping of their fields (plus ``__type__``).

    Raises:
        TypeError: a value with no stable text form (an arbitrary object, whose ``str`` may hold a
            memory address or be cut short), naming its type.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {str(canonical(k)) if not isinstance(k, str) else k: canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return canonical(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__,
                **{f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray):
            return canonical(value.tolist())
        if isinstance(value, np.generic):
            return canonical(value.item())
        if isinstance(value, np.dtype):
            return str(value)
    if module == "torch":
        import torch

        if isinstance(value, torch.Tensor):
            return canonical(value.detach().cpu().tolist())
        if isinstance(value, (torch.dtype, torch.device)):
            return str(value).removeprefix("torch.")
    if module == "pandas":
        if isinstance(value, (pd.Series, pd.Index)):
            return canonical(value.tolist())
        if isinstance(value, pd.DataFrame):
            return {"columns": canonical(list(value.columns)), "rows": canonical(value.to_numpy().tolist())}
    raise TypeError(f"cannot key a result by a {type(value).__module__}.{type(value).__qualname__} "
                    f"({str(value)[:60]!r}); give JSON-able values (numbers, text, lists, dicts, arrays).")


def _key_text(config: Any) -> str:
    return json.dumps(canonical(config), sort_keys=True, separators=(",", ":"), allow_nan=True)


def config_hash(config: dict[str, Any], length: int = 12) -> str:
    """Stable short hash of a configuration (key order and numpy/torch/Python number types do not
    matter: see :func:`canonical`)."""
    return hashlib.sha256(_key_text(config).encode()).hexdigest()[:length]


def _word_sums(flat: Any) -> str:
    """Exact sum and position-weighted sum of a tensor's 16-bit words, computed where it lives."""
    import torch

    words = flat.contiguous().view(torch.uint8)
    words = words[: words.numel() // 2 * 2].view(torch.int16)
    total, weighted, chunk = 0, 0, 1 << 24
    for start in range(0, words.numel(), chunk):
        w = words[start:start + chunk].to(torch.int64) & 0xFFFF  # < 2**16
        pos = (torch.arange(start, start + w.numel(), device=w.device) % 65521) + 1  # < 2**16
        total += int(w.sum())
        weighted += int((w * pos).sum())  # < 2**24 * 2**32: no overflow
    return f"{total}|{weighted}|{words.numel()}"


def weights_digest(model: Any) -> str:
    """A digest of a model's state dict: names, dtypes, shapes and every value.

    Tensors in CPU memory are hashed byte by byte (SHA-256, about 0.8 s for a 135M-parameter float32
    model); tensors on an accelerator are summarised where they live, without copying them, by the
    exact sum and position-weighted sum of their 16-bit words (integer arithmetic: no rounding, so
    every edit of a value and every reordering changes it). A tensor shared by several names (tied
    embeddings) is read once.

    Returns:
        Hex SHA-256 of the above.
    """
    import torch

    h = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel() == 0 or t.device.type == "meta":
            continue
        ident = (t.device.type, t.device.index, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if ident in seen:
            h.update(seen[ident].encode())
            continue
        flat = t.reshape(-1)
        if t.device.type == "cpu":
            digest = hashlib.sha256(flat.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        else:
            digest = _word_sums(flat)
        seen[ident] = digest
        h.update(digest.encode())
    return h.hexdigest()


def computation_identity(lm: Any) -> dict[str, Any]:
    """Everything about a model run that changes a number without being a setting of the sweep.

    * ``weights``: the fingerprint of a loaded model (its file's checksum, or its hub commit; empty
      for a wrapped in-memory model) and :func:`weights_digest` of the tensors as they are now, so
      another in-memory model, or a model edited in memory, is never taken for the one a shard was
      computed with. The digest is computed on every call, not cached: headlab's weight edits write
      through ``.data``, which leaves torch's version counters alone, so a cache could not tell.
    * ``model_type``, ``dtype``, ``device`` (kind: ``cpu``, ``cuda``, ``mps``) and
      ``attn_implementation`` (eager and sdpa differ in the last bits);
    * ``results_version``: :data:`RESULTS_VERSION`.

    Give the model to :class:`ShardStore` as ``lm=`` (every sweep of headlab does).
    """
    model = lm.model
    param = next(model.parameters())
    return {"fingerprint": lm.fingerprint or None, "weights": weights_digest(model),
            "model_type": getattr(model.config, "model_type", None),
            "dtype": str(param.dtype).removeprefix("torch."), "device": param.device.type,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "results_version": RESULTS_VERSION}


# --------------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------------
_HOST = socket.gethostname()
#: Tokens of the locks this process holds (a lock file with this pid and another token is a leftover
#: of an earlier process that had the same pid).
_HELD: set[str] = set()


def process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks after boot (Linux ``/proc``), None where unknown.

    With the pid it identifies a process: a pid reused by a later process has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` exists on this host (and, when ``started`` is given and known here, is
    the process that started then, not a later one with a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OverflowError, ValueError, TypeError):
        return False
    return started is None or process_start(pid) in (None, started)


class ShardLock:
    """A claim on one shard: a lock file created with ``O_EXCL`` holding pid, host and a token; its
    modification time is the heartbeat, renewed every ``heartbeat`` seconds by a thread while held.

    A lock is *stale* (and taken over by :meth:`acquire`) when its process no longer exists on this
    host (its pid is gone, or now belongs to a later process), or, for a process on another host, when
    its heartbeat is older than ``stale_after`` seconds.
    """

    def __init__(self, path: str | Path, heartbeat: float = 10.0, stale_after: float = 120.0) -> None:
        if stale_after <= heartbeat:
            raise ValueError(f"stale_after={stale_after} must exceed heartbeat={heartbeat} seconds.")
        self.path = Path(path)
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.token = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def owner(self) -> dict[str, Any] | None:
        """The lock file's record (pid, host, token, started; ``age``: seconds since its heartbeat),
        ``{}`` while it is being written, or None when there is no lock."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = {}
        return {**(record if isinstance(record, dict) else {}), "age": age}

    def stale_reason(self, owner: dict[str, Any]) -> str | None:
        """Why the lock described by ``owner`` (:meth:`owner`) is stale, or None while it is live."""
        if owner.get("host") == _HOST and isinstance(owner.get("pid"), int):
            if not process_alive(owner["pid"], owner.get("pid_started")):
                return f"its process {owner['pid']} on {_HOST} is gone"
            if owner["pid"] == os.getpid() and owner.get("token") not in _HELD:
                return f"it is a leftover of an earlier process {owner['pid']}"
            return None  # alive on this host: never taken from it, however slow its heartbeat
        if owner["age"] > self.stale_after:
            return (f"its heartbeat stopped {owner['age']:.0f} s ago (process {owner.get('pid')} on "
                    f"{owner.get('host')})")
        return None

    def acquire(self) -> bool:
        """Take the lock if it is free or stale; False while another live process holds it."""
        for _ in range(3):
            token = f"{_HOST}:{os.getpid()}:{secrets.token_hex(6)}"
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released meanwhile: try again
                reason = self.stale_reason(owner)
                if reason is None:
                    return False
                if self._break(owner):
                    print(f"shard lock {self.path.name}: taken over, {reason}", file=sys.stderr, flush=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "pid_started": process_start(os.getpid()), "host": _HOST,
                           "token": token, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
            self.token = token
            _HELD.add(token)
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
            self._thread.start()
            return True
        return False

    def _break(self, owner: dict[str, Any]) -> bool:
        """Remove a stale lock, unless another process replaced it meanwhile (then leave that one)."""
        grave = self.path.with_name(f"{self.path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.stale")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return False
        try:
            taken = json.loads(grave.read_text() or "{}").get("token")
        except ValueError:
            taken = None
        if taken != owner.get("token"):  # not the stale lock we judged: put the live one back
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file (only if it is still this lock)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        owner = self.owner()
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        _HELD.discard(self.token)
        self.token = ""


# --------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class ShardStore:
    """A folder of result shards keyed by configuration.

    Args:
        root: folder to write into (created).
        base: configuration shared by every shard (task, data hashes, ...). It is part of every key,
            so changing it never reuses stale shards.
        lm: the model the shards are computed with; its :func:`computation_identity` joins the base
            (pass it whenever a model computes the numbers).
        heartbeat, stale_after: seconds between lock heartbeats, and after which a silent lock is
            stale (see :class:`ShardLock`).
    """

    def __init__(self, root: str | Path, base: dict[str, Any] | None = None, *, lm: Any = None,
                 heartbeat: float = 10.0, stale_after: float = 120.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base = canonical(dict(base or {}))
        if lm is not None:
            self.base["computation"] = computation_identity(lm)
        self.heartbeat = heartbeat
        self.stale_after = stale_after

    def full_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The base and the point's configuration, canonical (what the key is a hash of)."""
        return {**self.base, **canonical(dict(config))}

    def full_key(self, config: dict[str, Any]) -> str:
        """SHA-256 (hex) of :meth:`full_config`; recorded in the marker and checked on load."""
        return hashlib.sha256(_key_text(self.full_config(config)).encode()).hexdigest()

    def key(self, config: dict[str, Any]) -> str:
        """The short key in the shard's file names (first 12 characters of :meth:`full_key`)."""
        return self.full_key(config)[:12]

    def _stem(self, config: dict[str, Any]) -> str:
        # sorted, like the hash: the same configuration names the same file whatever its key order
        readable = "-".join(f"{k}={v}" for k, v in sorted(canonical(dict(config)).items())
                            if isinstance(v, (int, float, str)))
        readable = "".join(c if c.isalnum() or c in "=-_." else "_" for c in readable)[:80]
        return f"{readable}-{self.key(config)}"

    def path(self, config: dict[str, Any], table: str = "") -> Path:
        """Parquet file of one table of a point (``table=""``: the point's base name)."""
        suffix = f".{table}" if table else ""
        return self.root / f"{self._stem(config)}{suffix}.parquet"

    def _marker(self, config: dict[str, Any]) -> Path:
        return self.root / f"{self._stem(config)}.json"

    def lock(self, config: dict[str, Any]) -> ShardLock:
        """The (not yet acquired) lock of one point's shard."""
        return ShardLock(self.root / f"{self._stem(config)}.lock", self.heartbeat, self.stale_after)

    def _tmp(self, path: Path) -> Path:
        """A temporary name next to ``path`` that no other writer uses (host, pid, random)."""
        return path.with_name(f"{path.stem}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}.tmp")

    def verify(self, config: dict[str, Any]) -> tuple[dict[str, pd.DataFrame] | None, str]:
        """Read and check one point's shard.

        Returns:
            ``(frames, "")`` when the marker parses, names this point's key and every table exists,
            matches its checksum and reads back; else ``(None, reason)``, ``reason`` being
            ``"missing"`` when there is no marker (the point was never finished).
        """
        marker = self._marker(config)
        try:
            text = marker.read_text()
        except FileNotFoundError:
            return None, "missing"
        except OSError as err:
            return None, f"marker unreadable ({err})"
        try:
            record = json.loads(text)
            tables = record["tables"]
            if not isinstance(tables, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return None, "marker is not valid shard JSON (truncated or damaged)"
        if record.get("format") != MARKER_FORMAT:
            return None, f"marker format {record.get('format')!r} is not {MARKER_FORMAT} (an older headlab)"
        if record.get("key") != self.full_key(config):
            return None, ("marker holds another configuration's key (a shard copied or renamed over this "
                          "one, or a hash collision)")
        frames = {}
        for name, entry in tables.items():
            try:
                path = self.root / entry["file"]
                digest = entry["sha256"]
            except (KeyError, TypeError):
                return None, f"marker entry of table {name!r} is damaged"
            if not path.is_file():
                return None, f"table {name!r} ({entry['file']}) is missing"
            if _sha256_file(path) != digest:
                return None, f"table {name!r} ({entry['file']}) does not match its checksum (cut short or changed)"
            try:
                frames[name] = pd.read_parquet(path)
            except Exception as err:  # noqa: BLE001 - any reader error means: recompute
                return None, f"table {name!r} ({entry['file']}) does not read back ({type(err).__name__})"
        return frames, ""

    def done(self, config: dict[str, Any]) -> bool:
        """Whether the point has a complete shard that passes :meth:`verify`."""
        return self.verify(config)[0] is not None

    def save(self, config: dict[str, Any], frames: dict[str, pd.DataFrame]) -> None:
        """Write the tables of one grid point atomically; the JSON marker (written last) means done.

        Each file goes to a temporary name of its own and is renamed into place; the marker records
        the point's full key and every table's SHA-256. Leftover temporary files of this point (from
        killed writers) are removed. Call it while holding :meth:`lock` when other processes may
        write the same folder (:func:`run_grid` does).
        """
        tables = {}
        for name, frame in frames.items():
            path = self.path(config, name)
            tmp = self._tmp(path)
            frame.to_parquet(tmp, index=False)
            digest = _sha256_file(tmp)
            os.replace(tmp, path)
            tables[name] = {"file": path.name, "sha256": digest, "rows": len(frame)}
        record = {"format": MARKER_FORMAT, "key": self.full_key(config), "config": self.full_config(config),
                  "tables": tables, "host": _HOST, "pid": os.getpid(),
                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        marker = self._marker(config)
        tmp = self._tmp(marker)
        tmp.write_text(json.dumps(record, indent=1, allow_nan=True))
        os.replace(tmp, marker)
        for left in glob.glob(glob.escape(str(self.root / self._stem(config))) + ".*.tmp"):
            Path(left).unlink(missing_ok=True)

    def load(self, config: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """The verified tables of a finished point.

        Raises:
            ValueError: the shard is missing or damaged, naming it and why.
        """
        frames, reason = self.verify(config)
        if frames is None:
            raise ValueError(f"shard {self._stem(config)} in {self.root}: {reason}.")
        return frames


def run_grid(
    points: Iterable[dict[str, Any]],
    compute: Callable[[dict[str, Any]], dict[str, pd.DataFrame]],
    store: ShardStore,
    progress: bool = True,
    poll: float = 0.5,
) -> dict[str, pd.DataFrame]:
    """Compute every grid point without a valid shard in ``store``; return each table concatenated.

    A shard that fails verification (:meth:`ShardStore.verify`) is recomputed, with one line on stderr
    naming it and the reason. Each point is computed under its lock (:meth:`ShardStore.lock`), so
    processes running the same sweep on one folder share the work: a point locked by another live
    process is waited for and then read, not computed again.

    Args:
        points: configurations, in the order the result should follow.
        compute: configuration -> ``{table name: tidy frame}``.
        store: where shards live.
        progress: report progress with elapsed time and an ETA (:mod:`headlab.progress`: the book's
            build log, else stderr).
        poll: seconds between looks at points other processes are computing.

    Returns:
        ``{table name: concatenation over points}`` (every table read back from its verified shard).
    """
    points = list(points)
    todo = []
    for i, p in enumerate(points):
        frames, reason = store.verify(p)
        if frames is None:
            todo.append(i)
            if reason != "missing":  # a warning about the results, not progress: always on stderr
                print(f"shard {store._stem(p)}: {reason}; recomputing it", file=sys.stderr, flush=True)
    label = f"sweep into {store.root.parent.name}/{store.root.name}"
    if progress and len(todo) < len(points):
        report(f"{label}: resuming, {len(points) - len(todo)} of {len(points)} grid points already saved")
    bar = Progress(len(todo), label, unit="grid point") if progress and todo else None
    told: set[int] = set()
    while todo:
        waiting = []
        for i in todo:
            p = points[i]
            lock = store.lock(p)
            if not lock.acquire():
                waiting.append(i)
                continue
            try:
                frames, _ = store.verify(p)
                if frames is None:  # nobody else finished it meanwhile
                    store.save(p, compute(p))
                elif progress:
                    report(f"{label}: {p} was computed by another process")
            finally:
                lock.release()
            if bar is not None:
                bar.update(note=", ".join(f"{k}={v}" for k, v in p.items() if isinstance(v, (int, float, str))))
        if waiting:
            fresh = [i for i in waiting if i not in told]
            if progress and fresh:
                owners = {f"{o.get('pid')}@{o.get('host')}" for i in fresh
                          if (o := store.lock(points[i]).owner())}
                report(f"{label}: waiting for {len(fresh)} grid point(s) another process is computing "
                       f"({', '.join(sorted(owners)) or 'lock being written'})")
                told.update(fresh)
            time.sleep(poll)
        todo = waiting
    loaded = [store.load(p) for p in points]
    names = list(dict.fromkeys(n for d in loaded for n in d))
    return {n: pd.concat([d[n] for d in loaded if n in d], ignore_index=True) for n in names}


